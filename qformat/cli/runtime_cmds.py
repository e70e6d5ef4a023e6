"""`qformat eval` (perplexity, agreement with the source model) and `qformat generate` (a quick sanity check)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

DTYPES = ("float32", "bfloat16", "float16", "auto")
ENGINES = ("auto", "lean", "transformers")


def int_at_least(minimum: int) -> Any:
    """An argparse ``type``: an integer >= ``minimum`` (argparse names the flag in its one-line error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"  # shown by argparse for a value it cannot convert
    return parse


def add_parsers(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="perplexity of a model on a text file (and KL / top-1 agreement with its source)",
                        description="Perplexity with the standard protocol: the whole file is tokenized once, cut "
                        "into non-overlapping windows of --seqlen tokens (the remainder is dropped), and the result "
                        "is exp of the mean per-window token cross-entropy. With --against, also the mean "
                        "KL(source || model) per token and the top-1 agreement, over the same windows.")
    ev.add_argument("model", help="qformat folder or Hub id (also a plain transformers folder/Hub id or a .gguf)")
    ev.add_argument("--text", required=True, help="UTF-8 text file to evaluate on")
    ev.add_argument("--seqlen", type=int_at_least(2), default=2048, help="window length in tokens, at least 2 "
                    "(default 2048)")
    ev.add_argument("--limit", type=int_at_least(1), help="evaluate at most this many windows")
    ev.add_argument("--against", metavar="SOURCE", help="source model: plain transformers folder, Hub id or .gguf")
    _common(ev)
    ev.add_argument("--reference", action="store_true",
                    help="use the format's reference decode (dense fp32 weights) instead of the kernels")
    ev.add_argument("--json", action="store_true", help="print the results as one JSON object")
    ev.set_defaults(func=run_eval)

    gen = sub.add_parser("generate", help="generate text from a prompt and report tokens/s",
                         description="Greedy decoding (unless --sample) from a prompt; prints the text, then the "
                         "number of new tokens and the speed (after a one-token warm-up run, prompt included). "
                         "--engine lean runs Llama, Mistral and Qwen2 models through qformat's lean decode loop "
                         "(qformat.runtime.decode_engine: static KV cache, no transformers forward/generate); auto "
                         "(default) uses it where it applies and says why not otherwise.")
    gen.add_argument("model", help="qformat folder or Hub id (also a plain transformers folder/Hub id or a .gguf)")
    gen.add_argument("prompt", help="prompt text")
    gen.add_argument("--max-new-tokens", type=int_at_least(1), default=64, help="tokens to generate (default 64)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    gen.add_argument("--sample", action="store_true", help="sample (temperature 0.7, top-p 0.9) instead of greedy")
    gen.add_argument("--engine", choices=ENGINES, default="auto",
                     help="decode loop: lean (qformat's, Llama/Mistral/Qwen2), transformers (model.generate), or "
                     "auto (default): lean where it applies, else transformers with a one-line note why")
    _common(gen)
    gen.set_defaults(func=run_generate)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kernel", help="force an installed kernel (default: the dispatcher chooses per layer)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="dtype of activations and unquantized parts (default float32; auto: the config's)")
    parser.add_argument("--revision", help="Hub revision (branch, tag or commit) for a Hub id")
    parser.add_argument("--threads", type=int_at_least(1), help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--max-memory", metavar="SIZE",
                        help="load the largest prefix of the file's stacks (BitStack blocks, BCQ planes) whose "
                        "tensors fit SIZE (e.g. 60MB, 1.5GiB; spec/partial.md)")
    parser.add_argument("--keep-terms", type=int_at_least(1), metavar="K",
                        help="load the first K terms of every stack (e.g. 2 planes of a 4-plane BCQ file)")
    parser.add_argument("--planes", type=int_at_least(1), metavar="P",
                        help="read bit-plane codes (files converted with -p planes=true) at P planes: a 4-bit file "
                        "at 3 bits")


def _partial(args: argparse.Namespace) -> dict[str, Any]:
    return {"max_memory": args.max_memory, "keep_terms": args.keep_terms, "planes": args.planes}


def _report_partial(model: Any) -> dict[str, Any] | None:
    """Print (stderr) and return what a partial load kept."""
    plan = getattr(model, "qformat_partial", None)
    if plan is None:
        return None
    summary = plan.summary()
    what = (f"{summary['plane_records']} weights at {summary['planes']} bit-planes" if summary["planes"] else
            f"{summary['terms_kept']} terms kept over {summary['stacked_records']} stacked weights; smallest load "
            f"{summary['smallest_bytes'] / 2**20:.1f} MiB")
    print(f"qformat: partial load: {summary['loaded_bytes'] / 2**20:.1f} MiB of {summary['full_bytes'] / 2**20:.1f} "
          f"MiB ({what})", file=sys.stderr)
    return summary


def _setup(args: argparse.Namespace) -> Any:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    return args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)


def run_eval(args: argparse.Namespace) -> int:
    from ..api import load_any
    from ..errors import QformatError
    from ..runtime.evaluate import compare_to_source, perplexity, tokenize_text
    from ..runtime.loader import model_summary
    from ..text import read_text_file

    text = read_text_file(args.text)  # a missing or binary text fails before the (slow) model load
    dtype = _setup(args)
    model, tokenizer = load_any(args.model, args.device, revision=args.revision, kernel=args.kernel, dtype=dtype,
                                reference=args.reference, **_partial(args))
    partial = _report_partial(model)
    ids = tokenize_text(tokenizer, text)
    start = time.perf_counter()
    try:
        result = perplexity(model, ids, args.seqlen, args.limit)
    except ValueError as exc:
        raise QformatError(f"{args.text}: {exc}") from None
    out: dict[str, Any] = {"model": args.model, "text": args.text, "seqlen": args.seqlen, "windows": result.windows,
                           "tokens": result.tokens, "perplexity": result.ppl, "mean_nll": result.mean_nll,
                           "seconds": round(time.perf_counter() - start, 3)}
    summary = model_summary(model)
    if summary["quantized_layers"]:
        out["kernels"] = summary["kernels"]
    if partial is not None:
        out["partial_load"] = partial
    if args.against:
        source, _ = load_any(args.against, args.device, dtype=dtype)
        if source.config.vocab_size != model.config.vocab_size:
            raise QformatError(f"{args.against} has a vocabulary of {source.config.vocab_size}, {args.model} of "
                               f"{model.config.vocab_size}: they cannot be compared token by token")
        agreement = compare_to_source(model, source, ids, args.seqlen, args.limit)
        out.update(against=args.against, kl_divergence=agreement.kl_divergence,
                   top1_agreement=agreement.top1_agreement)
    if args.json:
        print(json.dumps(out, sort_keys=True))
        return 0
    print(f"perplexity {result.ppl:.4f}  (mean NLL {result.mean_nll:.5f} over {result.windows} window(s) of "
          f"{args.seqlen} tokens, {out['seconds']:.1f} s)")
    if args.against:
        print(f"against {args.against}: KL(source || model) {out['kl_divergence']:.5f} nats/token, top-1 agreement "
              f"{100 * out['top1_agreement']:.2f}%")
    if "kernels" in out:
        print("kernels: " + ", ".join(f"{name} x{count}" for name, count in sorted(out["kernels"].items())))
    return 0


def _lean_engine(model: Any, choice: str, max_len: int) -> Any:
    """The lean decode engine for ``model`` (None: use transformers' generate); ``choice`` is --engine."""
    if choice == "transformers":
        return None
    from ..runtime.decode_engine import DecodeEngine, check_supported, why_unsupported

    if choice == "lean":
        check_supported(model, max_len)  # UnsupportedModel (a QformatError): a one-line error
        return DecodeEngine(model, max_len)
    reason = why_unsupported(model, max_len)
    if reason is not None:
        print(f"qformat: the lean engine does not apply ({reason}); using transformers' generate", file=sys.stderr)
        return None
    return DecodeEngine(model, max_len)


def run_generate(args: argparse.Namespace) -> int:
    import torch

    from ..api import load_any

    dtype = _setup(args)
    model, tokenizer = load_any(args.model, args.device, revision=args.revision, kernel=args.kernel, dtype=dtype,
                                **_partial(args))
    _report_partial(model)
    if args.chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True).input_ids
    else:
        ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    ids = ids.to(args.device)
    engine = _lean_engine(model, args.engine, ids.shape[1] + args.max_new_tokens)
    sampling = {"do_sample": True, "temperature": 0.7, "top_p": 0.9} if args.sample else {"do_sample": False}
    if engine is not None:
        eos = getattr(model.generation_config, "eos_token_id", None)
        engine.generate(ids, 1)  # one-time costs: kernel caches
        start = time.perf_counter()
        out = engine.generate(ids, args.max_new_tokens, eos_token_id=eos, **sampling)
    else:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=1, pad_token_id=pad, do_sample=False)  # one-time costs: kernel caches
            start = time.perf_counter()
            out = model.generate(ids, max_new_tokens=args.max_new_tokens, pad_token_id=pad, **sampling)
    seconds = time.perf_counter() - start
    new = out[0, ids.shape[1]:]
    print(tokenizer.decode(out[0] if not args.chat else new, skip_special_tokens=True))
    print(f"[{new.numel()} new tokens in {seconds:.2f} s: {new.numel() / seconds:.1f} tokens/s]")
    return 0
