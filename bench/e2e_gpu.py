"""End-to-end decode on a CUDA device: a qformat model on the Triton kernels vs the same model in fp16 transformers.

    python bench/e2e_gpu.py [--folder HF_FOLDER] [--tokens 64] [--repeat 5] [--bits 4] [--group-size 128]

Without --folder it builds a random-weight Llama with SmolLM2-135M's shapes (30 layers, hidden 576, MLP 1536,
9 heads / 3 KV heads, vocabulary 49152, tied embeddings): decode speed does not depend on the weights' values, and
the real model cannot travel to a GPU machine here. The folder is converted with ``rtn`` (every decoder linear), then:

- correctness: logits of the qformat model on the Triton kernels vs the same folder decoded by the reference decoder
  (``qformat.load_dequantized``), both fp32 on the GPU, on a 64-token prompt: max |Δ| / max |ref|;
- decode: greedy decoding of --tokens new tokens (EOS ignored), best of --repeat, tokens/s excluding the first
  token, for the fp16 source model and the fp16 qformat model; peak GPU memory of each. A 135M model's decode step
  is bound by kernel launches on the host, so each is also timed with a static KV cache and one CUDA graph per
  step (captured once, replayed per token; its first 8 tokens are checked against eager decoding).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

SMOLLM2 = dict(layers=30, hidden=576, intermediate=1536, heads=9, kv_heads=3, vocab_size=49152,
               tie_word_embeddings=True)


def decode_tokens_per_s(model, tokens: int, repeat: int, vocab: int) -> float:
    prompt = torch.randint(2, vocab, (1, 16), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    settings = dict(do_sample=False, pad_token_id=0, eos_token_id=None)

    def timed(n: int) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=n, min_new_tokens=n, **settings)
        torch.cuda.synchronize()
        assert out.shape[1] == prompt.shape[1] + n
        return time.perf_counter() - start

    timed(tokens)  # warm-up: kernels compiled and autotuned
    best = min(timed(tokens) - timed(1) for _ in range(repeat))
    return (tokens - 1) / best


def graph_decode(model, tokens: int, repeat: int, vocab: int) -> tuple[float, bool | str]:
    """Greedy decoding with a static KV cache, one CUDA graph per decode step (captured once, replayed per token):
    tokens/s (best of ``repeat``), and whether the graph's first 8 tokens equal eager decoding's from the same
    state. The static cache advances its own position counter (a tensor, so replays advance it too); positions are
    passed explicitly from a static tensor, and both are reset before each run."""
    from transformers import StaticCache

    prompt = torch.randint(2, vocab, (1, 16), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    start_pos = prompt.shape[1]
    cache = StaticCache(config=model.config, max_cache_len=start_pos + tokens + 8)
    first = model(prompt, past_key_values=cache, use_cache=True,
                  position_ids=torch.arange(start_pos, device="cuda")[None]).logits[:, -1:].argmax(-1)
    counters = [getattr(layer, "cumulative_length", None) for layer in cache.layers]
    if not all(torch.is_tensor(c) for c in counters):
        return float("nan"), "this transformers' StaticCache keeps no position tensor to reset"
    tok, pos = first.clone(), torch.tensor([start_pos], device="cuda")

    def reset() -> None:
        for counter in counters:
            counter.fill_(start_pos)
        tok.copy_(first)
        pos.fill_(start_pos)

    def step() -> torch.Tensor:
        logits = model(tok, past_key_values=cache, use_cache=True, position_ids=pos[None]).logits
        return logits[:, -1:].argmax(-1)

    reset()
    eager = []
    for _ in range(8):  # eager reference (also compiles and autotunes every kernel before capture)
        tok.copy_(step())
        eager.append(int(tok))
        pos.add_(1)
    reset()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    reset()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_next = step()

    def run(n: int) -> list[int]:
        reset()
        out = []
        for i in range(n):
            graph.replay()
            tok.copy_(static_next)
            pos.add_(1)
            if i < 8:
                out.append(static_next.clone())
        return [int(t) for t in out]

    same = run(8) == eager
    best = float("inf")
    for _ in range(repeat):
        torch.cuda.synchronize()
        begin = time.perf_counter()
        run(tokens)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - begin)
    return tokens / best, same


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", help="an HF model folder (default: random SmolLM2-135M shapes)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: skipped")
        return 0

    from transformers import AutoModelForCausalLM

    import qformat
    from qformat.conversion import ConvertOptions, convert
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test model factory (not shipped)
    from tiny_model import make_tiny_llama

    work = Path(tempfile.mkdtemp(prefix="qformat-e2e-gpu-"))
    source = Path(args.folder) if args.folder else make_tiny_llama(work / "source", **SMOLLM2)
    out = work / "qformat"
    start = time.perf_counter()
    convert(ConvertOptions(str(source), out, "rtn", params={"bits": args.bits, "group_size": args.group_size},
                           quiet=True))
    convert_s = time.perf_counter() - start
    results: dict = {"device": torch.cuda.get_device_name(), "source": "random SmolLM2-135M shapes"
                     if not args.folder else str(source), "bits": args.bits, "group_size": args.group_size,
                     "convert_s": convert_s}

    # correctness on the GPU, fp32 both sides
    prompt = torch.randint(2, 49152 if not args.folder else 1000, (1, 64), device="cuda",
                           generator=torch.Generator("cuda").manual_seed(1))
    with torch.no_grad():
        kernels = qformat.load(out, device="cuda")
        ref = qformat.load_dequantized(out, device="cuda")
        kinds = sorted({type(m).__name__ + ":" + str(getattr(m, "kernel_name", "")) for m in kernels.modules()
                        if type(m).__name__ == "QLinear"})
        y, y_ref = kernels(prompt).logits.float(), ref(prompt).logits.float()
        results["logits_rel_err_fp32"] = float((y - y_ref).abs().max() / y_ref.abs().max())
        results["top1_agreement_fp32"] = float((y.argmax(-1) == y_ref.argmax(-1)).float().mean())
        results["qlinear_kernels"] = kinds
        del kernels, ref
    torch.cuda.empty_cache()

    rows = {}
    for label in ("fp16 transformers", "qformat fp16 (triton)"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.no_grad():
            if label.startswith("fp16"):
                model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float16).to("cuda").eval()
            else:
                model = qformat.load(out, device="cuda", dtype=torch.float16)
            resident = torch.cuda.memory_allocated() - base
            tps = decode_tokens_per_s(model, args.tokens, args.repeat, model.config.vocab_size)
            try:
                graph_tps, graph_same = graph_decode(model, args.tokens, args.repeat, model.config.vocab_size)
            except Exception as exc:  # report it; the eager figure stands
                graph_tps, graph_same = float("nan"), f"{type(exc).__name__}: {str(exc)[:300]}"
        rows[label] = {"tokens_per_s": tps, "resident_MiB": resident / 2**20,
                       "peak_MiB": (torch.cuda.max_memory_allocated() - base) / 2**20,
                       "cuda_graph_tokens_per_s": graph_tps, "cuda_graph_matches_eager": graph_same}
        del model
        torch.cuda.empty_cache()
    results["decode"] = rows
    base_tps = rows["fp16 transformers"]["tokens_per_s"]
    print(f"device: {results['device']}; {results['source']}; rtn {args.bits}-bit g{args.group_size}, "
          f"converted in {convert_s:.1f} s")
    print(f"kernels vs reference decode (fp32 logits): max rel err {results['logits_rel_err_fp32']:.2e}, "
          f"top-1 agreement {results['top1_agreement_fp32']:.3f}; QLinear kernels {kinds}")
    graph_base = rows["fp16 transformers"]["cuda_graph_tokens_per_s"]
    print(f"{'model':24s} {'tok/s':>8s} {'vs fp16':>8s} {'resident MiB':>13s} {'peak MiB':>9s} "
          f"{'graph tok/s':>12s} {'vs fp16':>8s}  graph tokens = eager")
    for label, row in rows.items():
        print(f"{label:24s} {row['tokens_per_s']:8.1f} {row['tokens_per_s'] / base_tps:7.2f}x "
              f"{row['resident_MiB']:13.1f} {row['peak_MiB']:9.1f} {row['cuda_graph_tokens_per_s']:12.1f} "
              f"{row['cuda_graph_tokens_per_s'] / graph_base:7.2f}x  {row['cuda_graph_matches_eager']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
