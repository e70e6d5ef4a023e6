"""`qformat inspect`, `qformat verify` and `qformat conformance`: look into files, check them, check decoders."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FormatError
from ..format import CORE_CODECS, CodecRegistry, bits_by_layer_type, open_folder, signature, verify_folder
from ..format.safetensors_io import safe_text


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="show the records, components and bits/weight of a qformat file or folder")
    p.add_argument("path", type=Path, help="a qformat .safetensors file or a model folder")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("verify", help="validate a qformat folder or file: structure, checksums, every decode")
    p.add_argument("path", type=Path, help="a model folder (or a single qformat file)")
    p.add_argument("--shallow", action="store_true", help="skip decoding every record (structure and checksums only)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("conformance", help="check decoders and kernels against the conformance vectors")
    p.add_argument("--impl", default="reference",
                   help="reference (default), a kernel name, all, py:module:function or exec:COMMAND")
    p.add_argument("--vectors", type=Path, default=None, help="a vectors folder with manifest.json (default: built-in)")
    p.add_argument("--list", action="store_true", help="list the vectors and implementations, run nothing")
    p.add_argument("--rtol", type=float, default=None, help="kernel tolerance relative to |x| |W| (default per device)")
    p.add_argument("--failures-only", action="store_true", help="print only failing rows")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_conformance)


def plugin_codecs() -> CodecRegistry:
    """The installed plugin set's codecs (core + plugins), so files using plugin codecs validate and decode; when the
    plugins cannot load, the core codecs with a warning (never fatal here)."""
    from ..errors import PluginError
    from ..plugins import get_plugins

    try:
        return get_plugins().codecs
    except PluginError as exc:
        print(f"qformat: warning: plugins failed to load, their codecs are unknown: {exc}", file=sys.stderr)
        return CORE_CODECS


def _console() -> Any:
    from rich.console import Console

    # Piped output keeps whole names on one line instead of folding them at 80 columns.
    return Console(width=None if sys.stdout.isatty() else 200)


def _esc(value: Any) -> str:
    from rich.markup import escape

    # Names like "terms[1]" or "[bad_header]" are text, not rich markup; a path from the command line may hold bytes
    # that are not UTF-8 (decoded as lone surrogates), which stdout cannot encode: they print as \udcff escapes.
    return escape(safe_text(str(value)))


def _natural(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _shape(shape: Any) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _numel(shape: Any) -> int:
    return int(np.prod(shape, dtype=object)) if len(shape) else 1


# ---------------------------------------------------------------------------------------------------------------
# inspect

def describe(path: str | Path, registry: CodecRegistry = CORE_CODECS) -> dict[str, Any]:
    """Everything `qformat inspect` shows, as plain data (``registry``: the codecs to read with)."""
    folder = open_folder(path, registry)
    try:
        records = []
        all_records = folder.records
        for name in sorted(all_records, key=_natural):
            record = all_records[name]
            qfile = folder.file(folder.record_shard[name])
            components = []
            for tensor in qfile.owned_tensors(name):
                info = qfile.st.info(tensor)
                components.append({"role": tensor[len(name) + 1:], "dtype": info.dtype, "shape": list(info.shape),
                                   "bytes": info.nbytes})
            numel = _numel(record["shape"])
            records.append({"name": name, "shape": record["shape"], "dtype": record["dtype"],
                            "signature": signature(record["weight"]), "components": components,
                            "storage_bytes": record["storage_bytes"], "weights": numel,
                            "bits_per_weight": record["storage_bytes"] * 8 / numel,
                            "shard": folder.record_shard[name], "info": record.get("info", {})})
        plain = []
        for name in sorted(folder.plain_names, key=_natural):
            info = folder.file(folder.tensor_shard[name]).st.info(name)
            plain.append({"name": name, "dtype": info.dtype, "shape": list(info.shape), "bytes": info.nbytes,
                          "shard": folder.tensor_shard[name]})
        quant_bytes = sum(r["storage_bytes"] for r in records)
        quant_weights = sum(r["weights"] for r in records)
        totals = {
            "shards": len(folder.shards), "records": len(records), "plain_tensors": len(plain),
            "quantized_weights": quant_weights, "quantized_bytes": quant_bytes,
            "bits_per_weight": quant_bytes * 8 / quant_weights if quant_weights else None,
            "plain_bytes": sum(p["bytes"] for p in plain),
            "file_bytes": sum((folder.root / s).stat().st_size for s in folder.shards),
            "bits_by_layer_type": bits_by_layer_type(all_records),
        }
        method = folder.quantization_config.get("method")
        allocated = (folder.quantization_config.get("allocation") or {}).get("layers") or {}
        for r in records:
            if r["name"].removesuffix(".weight") in allocated:
                r["config"] = allocated[r["name"].removesuffix(".weight")]
        return {"path": str(path), "kind": "folder" if Path(path).is_dir() else "file", "method": method,
                "records": records, "plain": plain, "totals": totals}
    finally:
        folder.close()


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def cmd_inspect(args: argparse.Namespace) -> int:
    summary = describe(args.path, plugin_codecs())
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    from rich.table import Table

    console = _console()
    if summary["records"]:
        table = Table(title=f"quantized records in {_esc(summary['path'])}")
        allocated = any("config" in r for r in summary["records"])  # a size budget: the configuration per layer
        for column in ("name", "shape", "dtype", *(("config",) if allocated else ()), "codec", "components", "bits/w"):
            table.add_column(column, justify="right" if column == "bits/w" else "left", overflow="fold")
        for r in summary["records"]:
            parts = "\n".join(f"{c['role']} {c['dtype']}{_shape(c['shape'])} {_bytes(c['bytes'])}"
                              for c in r["components"])
            config = (_esc(r.get("config", "")),) if allocated else ()
            table.add_row(_esc(r["name"]), _shape(r["shape"]), r["dtype"], *config, _esc(r["signature"]),
                          _esc(parts), f"{r['bits_per_weight']:.3f}")
        console.print(table)
    if summary["plain"]:
        table = Table(title="plain tensors")
        for column in ("name", "dtype", "shape", "bytes"):
            table.add_column(column, overflow="fold")
        for p in summary["plain"]:
            table.add_row(_esc(p["name"]), p["dtype"], _shape(p["shape"]), _bytes(p["bytes"]))
        console.print(table)
    t = summary["totals"]
    table = Table(title="totals", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    rows = [("shards", str(t["shards"])), ("quantized records", str(t["records"])),
            ("quantized weights", f"{t['quantized_weights']:,}"), ("quantized bytes", _bytes(t["quantized_bytes"])),
            ("bits/weight (quantized)", "-" if t["bits_per_weight"] is None else f"{t['bits_per_weight']:.4f}"),
            ("plain tensors", str(t["plain_tensors"])), ("plain bytes", _bytes(t["plain_bytes"])),
            ("file bytes", _bytes(t["file_bytes"]))]
    if summary["method"]:
        rows.insert(0, ("method", str(summary["method"])))
    rows += [(f"bits/weight {kind}", f"{bits:.4f}") for kind, bits in t["bits_by_layer_type"].items()]
    for what, value in rows:
        table.add_row(_esc(what), _esc(value))
    console.print(table)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# verify

def cmd_verify(args: argparse.Namespace) -> int:
    codecs = plugin_codecs()
    try:
        summary = verify_folder(args.path, deep=not args.shallow, registry=codecs)
    except FormatError as exc:
        if args.json:
            print(json.dumps({"ok": False, "code": exc.code, "message": exc.message, "file": exc.file,
                              "tensor": exc.tensor, "field": exc.field}, indent=1))
        else:
            _console().print(f"[bold red]FAILED[/] {_esc(args.path)}: {_esc(exc)}", highlight=False, soft_wrap=True)
        return 1
    if args.json:
        print(json.dumps({"ok": True, **summary}, indent=1))
        return 0
    bits = summary["bits_per_weight"]
    checks = "structure" + (", checksums" if summary["checksums_available"] else "") + (
        "; data not decoded: run without --shallow to check it" if args.shallow else ", every decode")
    checksums = (f"{summary['checksums_verified']} checksum(s) verified" if summary["checksums_available"]
                 else "no checksums to verify (a single file carries none; verify its model folder for them)")
    _console().print(
        f"[bold green]OK[/] {_esc(args.path)}: {summary['shards']} shard(s), {summary['records']} quantized record(s), "
        f"{summary['plain']} plain tensor(s), {checksums}, "
        f"bits/weight {'-' if bits is None else f'{bits:.4f}'} ({checks})", highlight=False, soft_wrap=True)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# conformance

def cmd_conformance(args: argparse.Namespace) -> int:
    from qformat_conformance.runner import FAIL, implementations, load_manifest, print_table, run, summarize

    if args.list:
        return _list_vectors(load_manifest(args.vectors), implementations(), args.json)
    # a plugin's own vectors (--vectors) need its codecs in the reference reader
    results = run(args.impl, args.vectors, rtol=args.rtol, registry=plugin_codecs())
    if args.json:
        print(json.dumps({"summary": summarize(results), "results": [r.__dict__ for r in results]}, indent=1))
    else:
        print_table(results, failures_only=args.failures_only, console=_console())
    return 1 if any(r.status == FAIL for r in results) else 0


def _list_vectors(manifest: dict[str, Any], impls: dict[str, str], as_json: bool) -> int:
    vectors = manifest["vectors"]
    if as_json:
        print(json.dumps({"implementations": impls, "vectors": vectors}, indent=1))
        return 0
    from rich.table import Table

    console = _console()
    table = Table(title=f"conformance vectors in {_esc(manifest['_dir'])}")
    for column in ("vector", "kind", "checks", "description"):
        table.add_column(column, overflow="fold")
    for v in vectors:
        checks = (", ".join(v.get("codecs", [])) if v["kind"] == "valid" else f"rejects: {v['error']['code']}")
        table.add_row(_esc(v["id"]), v["kind"], _esc(checks), _esc(v["description"]))
    console.print(table)
    kinds = [v["kind"] for v in vectors]
    console.print(f"{kinds.count('valid')} valid, {kinds.count('invalid')} invalid vectors")
    console.print(safe_text("implementations: " + ", ".join(f"{name} ({what})" for name, what in impls.items())),
                  markup=False)
    return 0
