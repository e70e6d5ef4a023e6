"""`qformat export`: write a qformat folder in another tool's format (an exporter plugin; see `qformat plugins`)."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path


def add_parsers(sub: argparse._SubParsersAction) -> None:
    exp = sub.add_parser(
        "export", help="write a qformat folder as GGUF, compressed-tensors, ... (exactly; see `qformat plugins`)",
        description="Write a qformat model folder in a format people deploy with, keeping its stored integers and "
        "scales: every tensor is written in a layout that expresses its record exactly, and the target library's own "
        "dequantization is checked bit for bit against the reference decode. A tensor no layout expresses is an error "
        "listing every such tensor, unless --allow-requant re-quantizes those with the target's own quantizer (a "
        "warning gives each one's relative error). The output is written under a temporary name and renamed when "
        "complete.")
    exp.add_argument("--to", required=True, metavar="NAME", help="the exporter (gguf, compressed-tensors, ...)")
    exp.add_argument("folder", metavar="DIR", help="the qformat model folder")
    exp.add_argument("out", metavar="OUT", help="output file or folder (must not exist)")
    exp.add_argument("--allow-requant", action="store_true",
                     help="re-quantize the tensors the target cannot express exactly (with a warning each)")
    exp.add_argument("--json", action="store_true", help="print the export report as JSON")
    exp.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from ..exporters import ExportWarning, opened
    from ..plugins import get_exporter, get_plugins

    exporter = get_exporter(args.to)  # an unknown name fails before the folder is read
    with opened(Path(args.folder), get_plugins().codecs) as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore", ExportWarning)  # the report's warnings are printed below instead
        report = exporter.export(folder, Path(args.out), allow_requant=args.allow_requant)
    for line in report.warnings:
        print(f"qformat: warning: {line}", file=sys.stderr)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2, default=str))
        return 0
    kinds = ", ".join(f"{n} {kind}" for kind, n in report.kinds.items())
    requant = len(report.requantized)
    print(f"exported {args.folder} with {exporter.name!r} to {report.out}: {len(report.tensors)} tensors ({kinds}), "
          f"{len(report.tensors) - requant} exact" + (f", {requant} re-quantized" if requant else "")
          + f", {report.seconds:.1f} s")
    return 0
