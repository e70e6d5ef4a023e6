"""qformat vs llama.cpp on identical weights: SmolLM2-135M's Q4_1 GGUF run by llama.cpp, and the same file imported
bit-exactly (``qformat convert --method import``) run by qformat's kernels.

    python bench/llama_race.py [--tokens 64] [--threads 2] [--repeat 5] [--json]

Needs ``llama-cpp-python`` (``pip install llama-cpp-python`` builds llama.cpp from source, 10-15 minutes on 2 cores).
Each engine lives in its own process (the e2e.py workers' protocol): both load first, then each round runs them one
after the other (alternating order) on the same prompt, greedy, --tokens new tokens, EOS ignored. Decode tokens/s
excludes the prompt: (N - 1) / (time of N tokens - time of 1 token). Reported: the best round of each and the median
of the per-round ratios qformat / llama.cpp, plus both engines' greedy continuations (the same weights give the
same text until the two engines' different float summation orders tip a near-tie).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e import PROMPT, Worker, cache_dir, gguf_path, warm_up  # noqa: E402


def _mib(value: float | None) -> str:
    return "?" if value is None else f"{value:.0f} MiB"


def imported_folder() -> Path:
    """The GGUF imported bit-exactly into a qformat folder (cached)."""
    out = cache_dir() / "smollm2-135m-q4_1-imported"
    if (out / "config.json").is_file():
        return out
    argv = ["convert", "--method", "import", str(gguf_path()), "--out", str(out), "--quiet"]
    print(f"importing: qformat {' '.join(argv)}", file=sys.stderr)
    subprocess.run([sys.executable, "-c", "import sys; from qformat.cli import main; sys.exit(main(sys.argv[1:]))",
                    *argv], check=True)
    return out


def llama_worker(gguf: str, tokens: int, threads: int) -> None:
    """The e2e.py worker protocol, for llama.cpp: 'run' lines timed, 'quit' reports the text."""
    from llama_cpp import Llama

    model = Llama(model_path=gguf, n_threads=threads, n_threads_batch=threads, n_ctx=512, verbose=False,
                  seed=0, logits_all=False)
    prompt = model.tokenize(PROMPT.encode(), add_bos=False)

    def run(n: int) -> tuple[float, list[int]]:
        model.reset()
        t0 = time.perf_counter()
        model.eval(prompt)
        out = []
        for _ in range(n):
            token = int(model.sample(temp=0.0))
            out.append(token)
            if len(out) < n:
                model.eval([token])
        return time.perf_counter() - t0, out

    run(4)
    print(json.dumps({"ready": True}), flush=True)
    out: list[int] = []
    command = ""
    for line in sys.stdin:
        command = line.strip()
        if command != "run":
            break
        t_one, _ = run(1)
        t_all, out = run(tokens)
        print(json.dumps({"rate": (tokens - 1) / max(t_all - t_one, 1e-9), "load_average": os.getloadavg()[0]}),
              flush=True)
    if command != "quit":
        return
    text = PROMPT + model.detokenize(out).decode(errors="replace")
    print(json.dumps({"kind": "llama.cpp", "engine": "llama.cpp", "folder": gguf, "text": text,
                      "rss_after_bytes": _vm_rss()}), flush=True)


def _vm_rss() -> int:
    """This process's resident bytes now (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class LlamaWorker(Worker):
    def __init__(self, label: str, gguf: Path, args: argparse.Namespace) -> None:
        self.label = label
        cmd = [sys.executable, __file__, "--llama-worker", str(gguf), "--tokens", str(args.tokens), "--threads",
               str(args.threads)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        self.rates: list[float] = []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--no-fuse", action="store_true", help="load qformat without fusing q/k/v and gate/up")
    parser.add_argument("--engine", choices=("transformers", "lean", "both"), default="lean",
                        help="qformat's decode loop: the lean engine (default, what qformat generate picks), "
                             "transformers' generate, or both (one process each, interleaved)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--llama-worker", metavar="GGUF", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.llama_worker:
        llama_worker(args.llama_worker, args.tokens, args.threads)
        return 0
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        sys.exit("llama-cpp-python is not installed: pip install llama-cpp-python (builds llama.cpp, 10-15 min)")
    warm_up()  # compiles the kernels once in this process so the worker finds numba's cache warm
    folder = imported_folder()
    engines = ["lean", "transformers"] if args.engine == "both" else [args.engine]
    workers = [LlamaWorker("llama.cpp", gguf_path(), args)] + [
        Worker(f"qformat {engine}", "qformat", folder, args, engine) for engine in engines]
    for worker in workers:
        worker.ask()
    loads = []
    for round_ in range(args.repeat):
        loads.append(os.getloadavg()[0])
        for worker in workers if round_ % 2 == 0 else workers[::-1]:
            worker.rates.append(worker.ask("run")["rate"])
    results = [w.finish() for w in workers]
    llama, ours = results[0], results[1:]
    rows = []
    for worker, result in zip(workers[1:], ours, strict=True):
        paired = sorted(q / c for q, c in zip(result["rates"], llama["rates"], strict=True))
        rows.append({"engine": result["engine"], "tokens_per_s": result["decode_tokens_per_s"],
                     "ratio_best": result["decode_tokens_per_s"] / llama["decode_tokens_per_s"],
                     "ratio_median_paired": paired[len(paired) // 2], "rss_mib": result["rss_after_bytes"] / 2**20,
                     "text": result["text"], "kernels": result.get("kernels"), "label": worker.label})
    summary: dict[str, Any] = {
        "tokens": args.tokens, "threads": args.threads, "rounds": args.repeat, "load_averages": loads,
        "llama_cpp_tokens_per_s": llama["decode_tokens_per_s"], "llama_cpp_rss_mib": llama["rss_after_bytes"] / 2**20,
        "llama_cpp_text": llama["text"], "qformat": rows}
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"SmolLM2-135M Q4_1, identical weights; greedy decode of {args.tokens} tokens, {args.threads} threads, "
          f"best of {args.repeat} interleaved rounds (load average per round: {' '.join(f'{x:.1f}' for x in loads)})")
    print("  resident: the whole process after the rounds (VmRSS: libraries, interpreter and model)")
    print(f"  {'llama.cpp':22s} {summary['llama_cpp_tokens_per_s']:7.1f} tokens/s   resident "
          f"{_mib(summary['llama_cpp_rss_mib'])}")
    for row in rows:
        print(f"  {row['label']:22s} {row['tokens_per_s']:7.1f} tokens/s   resident {_mib(row['rss_mib'])}   "
              f"x llama.cpp: {row['ratio_best']:.2f} best vs best, {row['ratio_median_paired']:.2f} median of paired "
              f"rounds   kernels {row['kernels']}")
    print(f"  llama.cpp: {summary['llama_cpp_text']!r}")
    for row in rows:
        print(f"  {row['label']}: {row['text']!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
