"""A size budget against the best uniform configuration of the same size, on all-MiniLM-L6-v2 (a truly fp32 BERT).

    python bench/budget.py                                  # targets 3.0, 3.5, 4.0; the candidate grid below
    python bench/budget.py --targets 3.25 --estimates loss output

What it does, per target: every candidate configuration quantizes every encoder linear of the fp32 model (statistics
from the calibration paragraphs run through the original model, as the pipeline's measuring pass does), giving each
layer's bytes and estimated loss; qformat.conversion.budget.allocate picks one per layer under the budget; the model
is then quantized sequentially with those choices (bench/quality.py's MiniLM harness) and scored by the embedding
cosine to fp32. The uniform rows are every candidate applied to all layers; the table marks the best uniform one
whose bits per weight are within the target. SmolLM2 perplexity rows run through the pipeline itself
(`bench/quality.py --only --row mix3=mixed:target_bits=3.06,candidate=...`, see bench/QUALITY_NOTES.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality  # noqa: E402  (bench/quality.py: the MiniLM harness and data)

CANDIDATES = ("gptq:bits=2,group_size=64", "gptq:bits=3,group_size=-1", "gptq:bits=3,group_size=128",
              "gptq:bits=3,group_size=64", "gptq:bits=4,group_size=-1", "gptq:bits=4,group_size=128",
              "gptq:bits=5,group_size=128", "rtn:bits=8,group_size=-1",
              "gptq:bits=2,group_size=64,sidecar_rank=16", "gptq:bits=3,group_size=-1,sidecar_rank=8")


def measure(calib: dict, candidates: list, target: float) -> tuple[list, dict]:
    """LayerCosts of every encoder linear for every candidate, on the fp32 model's activations, and each layer's probe
    (the candidate nearest ``target`` bits): its output error and weight error, for the loss gains."""
    import torch
    from transformers import AutoModel

    from qformat.conversion.budget import LayerCosts
    from qformat.methods import LayerInput, output_error
    from qformat.sidecar import with_sidecar

    model = AutoModel.from_pretrained(str(quality.minilm_folder()), dtype=torch.float32).eval()
    linears = {f"layer.{i}.{n}": m for i, layer in enumerate(model.encoder.layer)
               for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    xtx: dict[str, torch.Tensor] = {}
    tokens: dict[str, int] = {}
    real: list[torch.Tensor] = []
    hooks = []
    for name, module in linears.items():
        def hook(_m: torch.nn.Module, args: tuple, _n: str = name) -> None:
            flat = args[0].reshape(-1, args[0].shape[-1])[real[0]]
            xtx[_n] = xtx.get(_n, 0) + flat.T @ flat
            tokens[_n] = tokens.get(_n, 0) + flat.shape[0]
        hooks.append(module.register_forward_pre_hook(hook))
    with torch.inference_mode():
        for i in range(0, calib["input_ids"].shape[0], 64):
            part = {k: v[i:i + 64] for k, v in calib.items()}
            real[:] = [part["attention_mask"].reshape(-1).bool()]
            model(**part)
    for handle in hooks:
        handle.remove()
    layers, probes = [], {}
    for name, module in linears.items():
        weight = module.weight.detach().clone()
        hessian = xtx[name] * (2.0 / tokens[name])
        sizes, errors, deltas = [], [], []
        for c in candidates:
            qt = c.method.quantize(LayerInput(name, weight.clone(), "F32", hessian.clone(), None, tokens[name]),
                                   c.config)
            if c.sidecar_rank:
                qt = with_sidecar(qt, weight, c.sidecar_rank, bits=c.sidecar_bits)
            delta = weight - torch.from_numpy(qt.decode()).reshape(weight.shape)
            sizes.append(int(qt.record["storage_bytes"]))
            errors.append(output_error(delta, hessian))
            deltas.append(delta)
        probe = min(range(len(sizes)), key=lambda i: abs(8 * sizes[i] / weight.numel() - target))
        probes[name] = (errors[probe], deltas[probe])
        layers.append(LayerCosts(name, weight.numel(), sizes, errors, output_error(weight, hessian)))
    return layers, probes


def measure_gains(layers: list, probes: dict, calib: dict) -> None:
    """Each linear's loss gain (the pipeline's estimate "loss"): 1 - mean cosine of the embeddings of 64 calibration
    paragraphs to fp32's with that layer alone at its probe's error, divided by the probe's output error."""
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(quality.minilm_folder()), dtype=torch.float32).eval()
    batch = {k: v[:64] for k, v in calib.items()}
    ref = quality.embed(model, batch)
    modules = {f"layer.{i}.{n}": m for i, layer in enumerate(model.encoder.layer) for n, m in layer.named_modules()}
    for layer in layers:
        error, delta = probes[layer.name]
        weight = modules[layer.name].weight
        original = weight.detach().clone()
        with torch.no_grad():
            weight.sub_(delta)
        rise = 1 - float((quality.embed(model, batch) * ref).sum(-1).mean())
        with torch.no_grad():
            weight.copy_(original)
        layer.gain = max(rise, 0.0) / error if error > 0 else 0.0
        layer.gain = layer.gain or 1e-12


def score(model: object, evals: dict, ref: dict) -> dict:
    got = {k: quality.embed(model, v) for k, v in evals.items()}
    return {k: float((got[k] * ref[k]).sum(-1).mean()) for k in evals}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=float, nargs="+", default=[3.0, 3.5, 4.0])
    parser.add_argument("--candidate", action="append", default=[], help=f"default: {list(CANDIDATES)}")
    parser.add_argument("--estimates", nargs="+", choices=("loss", "output", "relative"),
                        default=["loss", "output", "relative"])
    parser.add_argument("--probe-bits", type=float, default=3.5, help="bits the loss gains are probed at")
    parser.add_argument("--skip-uniform", action="store_true")
    parser.add_argument("--data", type=Path, default=quality.DATA)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import torch
    from transformers import AutoModel, AutoTokenizer

    from qformat.conversion.budget import allocate, parse_candidate

    torch.manual_seed(0)
    candidates = [parse_candidate(s) for s in (args.candidate or CANDIDATES)]
    tokenizer = AutoTokenizer.from_pretrained(str(quality.minilm_folder()))
    calib = quality.minilm_texts(tokenizer, args.data / "wiki_calib.txt", 256, 128)
    evals = {"wiki": quality.minilm_texts(tokenizer, args.data / "wiki_eval.txt", 512, 128),
             "britannica": quality.minilm_texts(tokenizer, args.data / "britannica_11th.txt", 512, 128)}
    reference = AutoModel.from_pretrained(str(quality.minilm_folder()), dtype=torch.float32).eval()
    ref = {k: quality.embed(reference, v) for k, v in evals.items()}
    start = time.perf_counter()
    layers, probes = measure(calib, candidates, args.probe_bits)
    measure_gains(layers, probes, calib)
    measured = time.perf_counter() - start
    print(f"measured {len(candidates)} candidates x {len(layers)} linears in {measured:.0f} s", file=sys.stderr)
    weights = sum(layer.weights for layer in layers)
    rows = []
    for index, candidate in enumerate([] if args.skip_uniform else candidates):  # uniform: one choice everywhere
        model, bits, _ = quality.minilm_quantize(None, calib, choices={layer.name: candidate for layer in layers})
        rows.append({"name": candidate.label, "kind": "uniform", "bits_per_weight": bits, **score(model, evals, ref),
                     "estimate": sum(layer.errors[index] for layer in layers)})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    for estimate, target in ((e, t) for t in args.targets for e in args.estimates):
        scored = [layer.scored(estimate) for layer in layers]
        picked = allocate(scored, int(target * weights / 8))
        choices = {layer.name: candidates[c] for layer, c in zip(layers, picked, strict=True)}
        model, bits, _ = quality.minilm_quantize(None, calib, choices=choices)
        mix: dict[str, int] = {}
        for c in picked:
            mix[candidates[c].label] = mix.get(candidates[c].label, 0) + 1
        rows.append({"name": f"budget {target} ({estimate})", "kind": "budget", "target": target,
                     "bits_per_weight": bits, **score(model, evals, ref), "mix": mix,
                     "estimate": sum(layer.errors[c] for layer, c in zip(scored, picked, strict=True))})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print("\nall-MiniLM-L6-v2; 1 - mean embedding cosine to fp32 (lower is better); summed estimate: output error "
          "tr(dW H dW^T) for uniform rows, the row's own estimate for budget rows\n")
    print("| configuration | bits/weight | wiki 1-cos | britannica 1-cos | summed estimate | best uniform within "
          "target (wiki / brit 1-cos) |")
    print("|---|---|---|---|---|---|")
    uniform = [r for r in rows if r["kind"] == "uniform"]
    for row in rows:
        versus = ""
        if row["kind"] == "budget":
            fitting = [u for u in uniform if u["bits_per_weight"] <= row["target"] + 1e-9]
            best = max(fitting, key=lambda u: u["wiki"] + u["britannica"], default=None)
            versus = (f"{best['name']} ({best['bits_per_weight']:.3f} b): {1 - best['wiki']:.4f} / "
                      f"{1 - best['britannica']:.4f}" if best else "none fits")
        name = row["name"] + (f" ({', '.join(f'{k} x{n}' for k, n in row['mix'].items())})" if "mix" in row else "")
        print(f"| {name} | {row['bits_per_weight']:.3f} | {1 - row['wiki']:.4f} | {1 - row['britannica']:.4f} | "
              f"{row['estimate']:.4g} | {versus} |")


if __name__ == "__main__":
    main()
