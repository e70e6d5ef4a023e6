"""`qformat convert` (a model into the format, with a method plugin and optional block transforms) and `qformat plugins`
(what is installed)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ParameterError

if TYPE_CHECKING:
    from ..conversion.pipeline import Converter
    from ..methods import MethodConfig


def add_parsers(sub: argparse._SubParsersAction) -> None:
    from ..conversion.calibration import DEFAULT_SAMPLES, DEFAULT_SEQLEN

    conv = sub.add_parser(
        "convert", help="quantize a Hugging Face model (folder, Hub id or .gguf) into a qformat folder",
        description="Quantize a model block by block with a method plugin (see `qformat plugins`) and write a "
        "Hugging Face-style qformat folder. Only one decoder block is in memory at a time; a run that is killed "
        "can be started again with the same command and resumes from the last finished block.")
    conv.add_argument("source", metavar="SRC", help="local model folder (config.json + safetensors), Hub id "
                      "(namespace/name; a repo of several GGUF files: -p gguf_file=NAME) or .gguf file")
    conv.add_argument("--method", help="quantization method (a plugin; see `qformat plugins`), or `import` to bring a "
                      "checkpoint another tool quantized (GGUF, GPTQ, AWQ, compressed-tensors, bitsandbytes, HQQ, ...) "
                      "in bit-exactly with its own integers and scales (-p format=NAME picks the importer); left out, "
                      "a source an importer recognises is imported")
    conv.add_argument("--out", required=True, help="output folder (written atomically; must not exist unless "
                      "--overwrite)")
    conv.add_argument("--bits", help="the method's `bits` parameter")
    conv.add_argument("--group-size", help="the method's `group_size` parameter")
    conv.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                      help="any other method parameter, e.g. -p outlier_threshold=0.2 (repeatable); an import takes "
                      "-p format=IMPORTER and -p gguf_file=NAME (the file of a GGUF repo or folder to import)")
    conv.add_argument("--transform", action="append", default=[], metavar="NAME[:KEY=VALUE,...]",
                      help="a block transform (a plugin; see `qformat plugins`) applied to each decoder block before "
                           "the method, e.g. --transform awq or --transform hadamard:block=64; repeatable, applied in "
                           "the order given; parameters left out take the method's of the same name (--bits, "
                           "--group-size); needs calibration")
    conv.add_argument("--output-layer", metavar="METHOD[:KEY=VALUE,...]",
                      help="quantize the output layer (lm_head) with its own method, e.g. --output-layer rtn:bits=4 "
                           "or --output-layer int8; default 'auto': rtn:bits=8,group_size=-1,sym=true (8 bits per output "
                           "channel, exact Q8_0 in GGUF; measured: same perplexity, faster decode) where the model "
                           "has a linear output layer and no --include is given; 'keep': it follows --include like "
                           "any module (left as it is unless named there)")
    side = conv.add_argument_group("low-rank sidecar (ZeroQuant-V2 LoRC; any method)")
    side.add_argument("--sidecar-rank", type=int, default=0, metavar="R",
                      help="after each decoder linear is quantized, store a rank-R low-rank term of its error "
                           "(record sum(base, lowrank)); counted in bits per weight (default 0: none)")
    side.add_argument("--sidecar-bits", type=int, default=16, choices=(8, 16),
                      help="the sidecar's factors in F16 (16, default) or 8-bit codes with F16 row scales (8)")
    side.add_argument("--sidecar-weighted", action="store_true",
                      help="fit the sidecar to the activation-weighted error (the layer's calibration Hessian) "
                           "instead of the plain error; also for the candidates' sidecars of a size budget")
    bud = conv.add_argument_group("size budget (mixed precision across layers and methods)")
    bud.add_argument("--target-bits", type=float, metavar="BITS",
                     help="bits per weight of the quantized decoder linears (bits from bytes): each layer gets the "
                          "candidate configuration that minimises the summed estimated loss within this budget; "
                          "--method, if given, narrows the candidates to that method's")
    bud.add_argument("--target-size", metavar="SIZE",
                     help="the same with the output's tensor bytes as the budget, e.g. 80MB or 1.5GiB")
    bud.add_argument("--candidate", action="append", default=[], metavar="METHOD[:KEY=VALUE,...]",
                     help="a configuration the budget may give a layer (repeatable; sidecar_rank=R and sidecar_bits "
                          "are accepted as keys); default: a grid of rtn, gptq, nf4 and hqq widths and group sizes "
                          "with a few sidecars")
    bud.add_argument("--measurements", metavar="PATH",
                     help="reuse the measurements of an earlier budget conversion (its output folder or its "
                          "allocation.json) taken with the same source, calibration and candidates: only the "
                          "allocation runs again, for this target")
    bud.add_argument("--budget-estimate", choices=("loss", "output", "relative"), default="loss",
                     help="loss estimate per layer and candidate: 'loss' (default): its output error tr(dW H dW^T) "
                          "on the calibration text times the layer's measured loss gain (one forward of the whole "
                          "model per layer); 'output': the output error alone; 'relative': divided by tr(W H W^T)")
    cal = conv.add_argument_group("calibration (methods that need statistics: gptq, spqr, ...)")
    cal.add_argument("--calib", metavar="FILE", help="UTF-8 calibration text (default: the shipped Wikipedia text, "
                     "works offline)")
    cal.add_argument("--calib-samples", type=int, default=DEFAULT_SAMPLES,
                     help=f"number of random token windows (default {DEFAULT_SAMPLES}, sized for a 2-core CPU; "
                          "papers use 128)")
    cal.add_argument("--calib-seqlen", type=int, default=DEFAULT_SEQLEN,
                     help=f"tokens per window (default {DEFAULT_SEQLEN}; papers use 2048)")
    cal.add_argument("--seed", type=int, default=0, help="seed of the window offsets and of the methods (default 0)")
    cal.add_argument("--true-sequential", action="store_true",
                     help="re-collect statistics after each group of linears sharing an input (q/k/v -> o -> "
                          "gate/up -> down) instead of once per block")
    sel = conv.add_argument_group("modules")
    sel.add_argument("--include", nargs="+", action="extend", default=[], metavar="PAT",
                     help="quantize only modules matching these globs (full name or dotted suffix, e.g. 'mlp.*', "
                          "'lm_head'); default: every linear in the decoder blocks")
    sel.add_argument("--exclude", nargs="+", action="extend", default=[], metavar="PAT",
                     help="leave modules matching these globs unquantized (e.g. 'down_proj', 'layers.0.*')")
    conv.add_argument("--revision", help="Hub revision (branch, tag or commit) of a Hub id source")
    conv.add_argument("--base-model", metavar="ID", help="Hub id of the model the source derives from, linked as the "
                      "card's base_model (inferred from a Hub source, a folder in the Hugging Face cache, a GGUF's "
                      "metadata or an imported checkpoint's card)")
    conv.add_argument("--overwrite", action="store_true", help="replace an existing output folder (once the new "
                      "one is complete)")
    conv.add_argument("--restart", action="store_true", help="discard a partial conversion of --out instead of "
                      "resuming it")
    conv.add_argument("--quiet", action="store_true", help="no progress bars or summary table")
    conv.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    ev = conv.add_argument_group("quality check")
    ev.add_argument("--eval", nargs="?", const="default", metavar="TEXT",
                    help="after converting, print perplexity before/after on TEXT (default: the shipped evaluation "
                         "text) and a short greedy generation; results also go into the model card")
    ev.add_argument("--eval-windows", type=int, default=8, help="evaluate at most this many windows (default 8; 0: all)")
    ev.add_argument("--eval-seqlen", type=int, default=2048, help="tokens per evaluation window (default 2048)")
    ev.add_argument("--prompt", help="prompt of the generated sample (default 'The history of the city begins')")
    hub = conv.add_argument_group("publishing")
    hub.add_argument("--push-to", metavar="REPO", help="upload the finished folder to this Hub repository")
    hub.add_argument("--private", action="store_true", help="create the Hub repository as private")
    hub.add_argument("--create-pr", action="store_true", help="push as a pull request")
    conv.set_defaults(func=run_convert)

    plug = sub.add_parser("plugins", help="list installed plugins, their methods and parameters",
                          description="Plugins are found through the Python entry-point group `qformat`.")
    plug.add_argument("--json", action="store_true", help="print as JSON")
    plug.set_defaults(func=run_plugins)


def parse_params(items: list[str]) -> dict[str, str]:
    """``-p KEY=VALUE`` options by key (values still strings)."""
    from ..conversion.transform_chain import parse_key_values

    return parse_key_values(items, malformed="-p expects KEY=VALUE")


def method_config(method: Any, args: argparse.Namespace) -> MethodConfig:
    """The method's config from ``-p k=v`` pairs plus ``--bits``/``--group-size``, each parsed and checked against the
    method's declared parameters (before any work, naming the parameter)."""
    declared = {p.name for p in method.params}
    values = parse_params(args.param)
    if GGUF_FILE in values and GGUF_FILE not in declared:
        raise ParameterError(f"-p {GGUF_FILE}= picks the GGUF file of a repository to import (--method import, or no "
                             f"--method); method {method.name!r} converts a local .gguf file: download it first")
    for flag, key in (("--bits", "bits"), ("--group-size", "group_size")):
        value = getattr(args, key)
        if value is None:
            continue
        if key not in declared:
            raise ParameterError(f"method {method.name!r} has no {key!r} parameter, so {flag} does not apply; it "
                                 f"takes: {', '.join(sorted(declared)) or 'none'}")
        if key in values:
            raise ParameterError(f"{flag} and -p {key}= both set {key!r}; give one")
        values[key] = value
    return method.validate_params(values)


MAX_EVAL = 1 << 20  # windows or tokens per window: far beyond any evaluation a CPU finishes


def check_eval_options(args: argparse.Namespace) -> None:
    """--eval-windows and --eval-seqlen in range, with the option named (before any work)."""
    for flag, value, low in (("--eval-windows", args.eval_windows, 0), ("--eval-seqlen", args.eval_seqlen, 2)):
        if not low <= value <= MAX_EVAL:
            raise ParameterError(f"{flag} must be an integer from {low} to {MAX_EVAL} (got {value})")


def quiet_openmp_waits() -> bool:
    """Make torch's OpenMP threads sleep at barriers instead of spinning, unless the user chose a policy. On a
    machine where another process holds a core, spinning threads wait for a descheduled peer at every parallel op:
    a SmolLM2 SpQR conversion took 16 min instead of under 3 (bench/QUALITY_NOTES.md); on an idle machine it costs
    ~9%. Only effective before torch is imported (its OpenMP runtime reads the variable once)."""
    if "torch" in sys.modules:
        return False
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return True


IMPORT = "import"
GGUF_FILE = "gguf_file"  # transformers' name for the file of a GGUF repo: from_pretrained(repo, gguf_file=...)


def run_convert(args: argparse.Namespace) -> int:
    quiet_openmp_waits()
    check_base_model(args.base_model)
    budget = args.target_bits is not None or args.target_size is not None
    if args.method is None and not budget:
        args.method = _method_by_detection(args)
    if args.method == IMPORT:
        return run_import(args)
    from ..conversion.pipeline import AUTO_OUTPUT_LAYER, Converter, ConvertOptions, resolve_output_layer
    from ..conversion.quality import resolve_eval_text
    from ..conversion.transform_chain import resolve_chain
    from ..hub import resolve_model_source
    from ..plugins import get_method

    if budget:
        if args.bits is not None or args.group_size is not None or args.param:
            raise ParameterError("with --target-bits/--target-size the parameters come from the candidates: give "
                                 "them as --candidate METHOD:key=value,... instead of --bits, --group-size or -p")
        if args.method is not None:
            get_method(args.method)  # an unknown name before anything else
        config: Any = {}
    else:
        method = get_method(args.method)
        config = method_config(method, args)
        resolve_chain(args.transform, method, config)  # unknown names and bad parameters before anything else
    output_layer = AUTO_OUTPUT_LAYER if args.output_layer is None else args.output_layer
    resolve_output_layer(output_layer)
    check_eval_options(args)
    eval_text = resolve_eval_text(args.eval) if args.eval else None
    options = ConvertOptions(
        source=args.source, out=args.out, method=args.method or "", params=config, transforms=tuple(args.transform),
        sidecar_rank=args.sidecar_rank, sidecar_bits=args.sidecar_bits, sidecar_weighted=args.sidecar_weighted,
        target_bits=args.target_bits, target_size=args.target_size, candidates=tuple(args.candidate),
        budget_estimate=args.budget_estimate, measurements=args.measurements,
        revision=args.revision, output_layer=output_layer,
        calib=args.calib, calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen, seed=args.seed,
        include=args.include, exclude=args.exclude, true_sequential=args.true_sequential, overwrite=args.overwrite,
        restart=args.restart, quiet=args.quiet, resolve_hub=resolve_model_source, base_model=args.base_model)
    converter = Converter(options)
    converter.prepare()
    try:
        return _convert_and_publish(converter, args, eval_text)
    finally:
        converter.close()  # held through evaluation and pushing: no other convert replaces the folder meanwhile


def check_base_model(value: str | None) -> None:
    if value is None:
        return
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError as exc:
        raise ParameterError(f"--base-model {value!r} is not a Hub model id (namespace/name): {exc}") from None


def _method_by_detection(args: argparse.Namespace) -> str:
    """`import` when an installed importer recognises the (local) source, or the source is a Hub repo of GGUF files
    (or -p gguf_file= names one); otherwise the user must name a method."""
    from ..hub import is_gguf_repo
    from ..plugins import detect_importer

    path = Path(args.source).expanduser()
    if path.exists() and detect_importer(path) is not None:
        return IMPORT
    if not path.exists() and (GGUF_FILE in parse_params(args.param) or is_gguf_repo(args.source, args.revision)):
        return IMPORT
    raise ParameterError("--method is required: no importer recognises the source as a quantized checkpoint, so "
                         "name a quantization method (see `qformat plugins`), e.g. --method rtn")


# Options that quantize; an import keeps the source's own quantization, so each of them is refused by name.
_NOT_FOR_IMPORT = (("bits", "--bits"), ("group_size", "--group-size"), ("transform", "--transform"),
                   ("calib", "--calib"), ("include", "--include"), ("exclude", "--exclude"),
                   ("true_sequential", "--true-sequential"), ("restart", "--restart"),
                   ("output_layer", "--output-layer"))


def import_params(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """(importer, GGUF file): -p format=NAME and -p gguf_file=NAME, the only parameters an import takes."""
    values = parse_params(args.param)
    for key, value in values.items():
        if key not in ("format", GGUF_FILE) or not value:
            raise ParameterError(f"--method import takes only -p format=NAME (an importer; see `qformat plugins`) "
                                 f"and -p {GGUF_FILE}=NAME (the GGUF file of a repository), got -p {key}={value!r}")
    return values.get("format"), values.get(GGUF_FILE)


def run_import(args: argparse.Namespace) -> int:
    from ..api import import_checkpoint
    from ..conversion.importing import choose_importer
    from ..conversion.quality import resolve_eval_text

    for attr, flag in _NOT_FOR_IMPORT:
        if getattr(args, attr):
            raise ParameterError(f"{flag} does not apply to --method import: an import keeps the source's own "
                                 "quantization bit for bit (convert the original model with a method to change it)")
    fmt, gguf_file = import_params(args)
    if fmt is not None:
        from ..plugins import get_importer

        get_importer(fmt)  # an unknown name fails before any download
    check_eval_options(args)
    eval_text = resolve_eval_text(args.eval) if args.eval else None
    local = Path(args.source).expanduser()
    if local.exists() and fmt is None and gguf_file is None:
        choose_importer(local)  # "no importer reads this" before anything else happens
    result = import_checkpoint(args.source, args.out, format=fmt, gguf_file=gguf_file, revision=args.revision,
                               base_model=args.base_model, overwrite=args.overwrite, quiet=args.quiet)
    output: dict[str, Any] = {"out": str(result.out), "importer": result.importer, "source_format": result.source_format,
                              "records": result.records, "plain_tensors": result.plain,
                              "bits_per_weight": result.bits_per_weight, "source_bits_per_weight": result.source_bits,
                              "seconds": round(result.seconds, 2)}
    if not args.quiet and not args.json:
        src_bits = f"{result.source_bits:.3f}" if result.source_bits is not None else "?"
        bits = f"{result.bits_per_weight:.3f}" if result.bits_per_weight is not None else "-"
        print(f"imported {args.source} ({result.source_format}) with {result.importer!r} into {result.out}: "
              f"{result.records} quantized tensors at {bits} bits/weight (source: {src_bits}), "
              f"{result.plain} plain tensors, {result.seconds:.1f} s")
    if eval_text is not None:
        output["eval"] = _evaluate_import(args, result.out, eval_text)
    return _publish_and_print(args, result.out, output)


def _evaluate_import(args: argparse.Namespace, out: Path, eval_text: Path) -> dict[str, Any]:
    """Perplexity of the imported folder through the kernels (there is no unquantized source to compare with)."""
    from ..runtime.evaluate import folder_perplexity

    ppl = folder_perplexity(out, eval_text, windows=args.eval_windows or None, seqlen=args.eval_seqlen)
    if not args.json:
        print(f"perplexity on {eval_text.name}: {ppl['ppl']:.3f} ({ppl['windows']} x {ppl['seqlen']} tokens)")
    return ppl


def _convert_and_publish(converter: Converter, args: argparse.Namespace, eval_text: Path | None) -> int:
    from ..conversion.quality import DEFAULT_PROMPT, add_results_to_card, evaluate_conversion
    from ..conversion.report import print_summary

    if converter.resuming and not args.quiet:
        print(f"qformat: resuming the partial conversion in {converter.work_dir}", file=sys.stderr)
    result = converter.run(keep_lock=True)
    if not args.quiet:
        print_summary(result.summary, str(result.out))
    output: dict[str, Any] = {"out": str(result.out), "summary": result.summary.as_dict()}
    if eval_text is not None:
        report = evaluate_conversion(result.source, result.out, eval_text, windows=args.eval_windows or None,
                                     seqlen=args.eval_seqlen, prompt=args.prompt or DEFAULT_PROMPT)
        add_results_to_card(result.out, result.source, report)
        output["eval"] = report.__dict__
        if not args.json:
            change = (report.ppl_after / report.ppl_before - 1) * 100
            print(f"perplexity on {report.text} ({report.windows} x {report.seqlen} tokens): "
                  f"before {report.ppl_before:.3f}, after {report.ppl_after:.3f} ({change:+.2f}%)")
            print(f"prompt: {report.prompt!r}")
            print(f"  source:    {report.sample_before!r}")
            print(f"  quantized: {report.sample_after!r}")
    return _publish_and_print(args, result.out, output)


def _publish_and_print(args: argparse.Namespace, out: Path, output: dict[str, Any]) -> int:
    """The end of convert and import alike: push with --push-to, then print the JSON summary or the folder."""
    if args.push_to:
        from ..hub import push_folder

        lineage = {"base_model": args.base_model} if args.base_model else {}
        pushed = push_folder(out, args.push_to, private=args.private, create_pr=args.create_pr, **lineage)
        output["push"] = {"repo_id": pushed.repo_id, "revision": pushed.revision, "commit": pushed.commit_sha,
                          "url": pushed.pr_url or pushed.commit_url}
        if not args.json:
            print(f"pushed to {pushed.repo_id}@{pushed.revision}: {pushed.pr_url or pushed.commit_url or 'no changes'}")
    if args.json:
        print(json.dumps(output, indent=2, default=str))
    elif args.quiet:
        print(out)
    return 0


def plugin_listing() -> list[dict[str, Any]]:
    from ..plugins import get_plugins

    plugins = get_plugins()
    listing = []
    for name, info in sorted(plugins.info.items()):
        methods = []
        for method_name in info.methods:
            method = plugins.methods[method_name]
            methods.append({
                "name": method_name, "description": method.description,
                "calibration": sorted(method.calibration),
                "config": method.config.__name__, "config_version": method.config.version,
                "params": [_param_listing(p) for p in method.params]})
        transforms = []
        for transform_name in info.transforms:
            transform = plugins.transforms[transform_name]
            known = transform.architectures
            transforms.append({
                "name": transform_name, "description": transform.description,
                "architectures": sorted(known) if isinstance(known, (set, frozenset)) else "any it accepts",
                "config": transform.config.__name__, "config_version": transform.config.version,
                "params": [_param_listing(p) for p in transform.params]})
        importers = [{"name": n, "description": plugins.importers[n].description} for n in info.importers]
        exporters = [{"name": n, "description": plugins.exporters[n].description} for n in info.exporters]
        listing.append({"entry_point": name, "module": info.module, "package": info.package,
                        "version": info.version, "methods": methods, "transforms": transforms, "importers": importers,
                        "exporters": exporters, "codecs": info.codecs,
                        "kernels": info.kernels, "error": info.error})
    return listing


def _param_listing(p: Any) -> dict[str, Any]:
    return {"name": p.name, "type": p.type.__name__, "default": p.default, "min": p.min, "max": p.max,
            "choices": list(p.choices) if p.choices else None, "help": p.help, "describe": p.describe()}


def run_plugins(args: argparse.Namespace) -> int:
    listing = plugin_listing()
    if args.json:
        print(json.dumps(listing, indent=2, default=str))
        return 0
    for plugin in listing:
        print(f"{plugin['entry_point']}  ({plugin['package']} {plugin['version']}, module {plugin['module']})")
        if plugin["error"]:
            print(f"  failed to load: {plugin['error']}")
        for kind in ("codecs", "kernels"):
            if plugin[kind]:
                print(f"  {kind}: {', '.join(plugin[kind])}")
        for method in plugin["methods"]:
            calib = ", ".join(method["calibration"]) or "none"
            print(f"  method {method['name']} (calibration: {calib})")
            if method["description"]:
                print(f"    {method['description']}")
            if method["params"]:
                print(f"    parameters ({method['config']}, version {method['config_version']}):")
            for param in method["params"]:
                print(f"    - {param['describe']}")
        for transform in plugin["transforms"]:
            archs = transform["architectures"]
            print(f"  transform {transform['name']} (architectures: "
                  f"{', '.join(archs) if isinstance(archs, list) else archs})")
            if transform["description"]:
                print(f"    {transform['description']}")
            if transform["params"]:
                print(f"    parameters ({transform['config']}, version {transform['config_version']}):")
            for param in transform["params"]:
                print(f"    - {param['describe']}")
        for importer in plugin["importers"]:
            print(f"  importer {importer['name']} (qformat convert --method import; -p format={importer['name']})")
            if importer["description"]:
                print(f"    {importer['description']}")
        for exporter in plugin["exporters"]:
            print(f"  exporter {exporter['name']} (qformat export --to {exporter['name']} DIR OUT)")
            if exporter["description"]:
                print(f"    {exporter['description']}")
        if not any(plugin[k] for k in ("methods", "transforms", "importers", "exporters", "codecs", "kernels")) \
                and not plugin["error"]:
            print("  (no hook implementations)")
    return 0
