"""`qformat kernels`: which kernels are installed, what they support, and which one each record of a model would get."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("kernels", help="list kernels and the codecs they support; with a path, the kernel per record")
    p.add_argument("path", type=Path, nargs="?", help="a qformat file or model folder: show each codec signature's "
                   "kernel")
    p.add_argument("--device", default="cpu", help="device to select for (default cpu)")
    p.add_argument("--batch", type=int, default=1, help="rows of x to select for (default 1)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_kernels)


def _kernel_rows() -> list[dict[str, Any]]:
    from qformat.plugins import get_plugins
    from qformat.runtime.dispatch import available_kernels

    plugins = get_plugins()
    rows = []
    for name, kernel in available_kernels().items():
        owner = plugins.kernel_owner.get(name)
        info = plugins.info.get(owner) if owner else None
        rows.append({"name": name, "device": kernel.device, "priority": kernel.priority,
                     "max_batch": kernel.max_batch if kernel.max_batch < 1 << 30 else None,
                     "provider": f"{info.package} {info.version} ({owner})" if info else "qformat.runtime.dispatch",
                     "supports": list(kernel.supported or [(kernel.__doc__ or "").strip()])})
    return rows


def _records(path: Path) -> tuple[dict[str, dict], Any]:
    from qformat.format import open_file, open_folder
    from qformat.plugins import get_plugins

    codecs = get_plugins().codecs  # records may use plugin codecs
    source = open_folder(path, codecs) if path.is_dir() else open_file(path, codecs)
    return dict(source.records), source


def _signature_rows(path: Path, device: str, batch: int) -> list[dict[str, Any]]:
    from qformat.errors import QformatError
    from qformat.format import signature
    from qformat.runtime.dispatch import available_kernels, runs_on, select_kernel

    records, source = _records(path)
    try:
        by_signature: dict[str, list[str]] = {}
        for name, record in records.items():
            by_signature.setdefault(signature(record["weight"]), []).append(name)
        rows = []
        for sig, names in sorted(by_signature.items()):
            record = records[names[0]]
            try:
                chosen = select_kernel(record, device, batch).name
            except QformatError as exc:
                chosen = f"error: {exc}"
            able = [k.name for k in available_kernels().values() if runs_on(k, device) and k.supports(record)]
            rows.append({"signature": sig, "records": len(names), "example": names[0], "kernel": chosen,
                         "supported_by": able})
        return rows
    finally:
        source.close()


def cmd_kernels(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    rows = _signature_rows(args.path, args.device, args.batch) if args.path else _kernel_rows()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    console = Console(width=None if sys.stdout.isatty() else 200)
    if args.path:
        table = Table(title=f"kernels for {escape(str(args.path))} on {escape(args.device)}, batch {args.batch}")
        for col in ("codec signature", "records", "example", "kernel", "supported by"):
            table.add_column(col, overflow="fold")
        for row in rows:
            table.add_row(escape(row["signature"]), str(row["records"]), escape(row["example"]),
                          escape(row["kernel"]), escape(", ".join(row["supported_by"])))
    else:
        table = Table(title="qformat kernels (QFORMAT_KERNEL=<name> forces one)")
        for col in ("kernel", "device", "priority", "max batch", "provided by", "supports"):
            table.add_column(col, overflow="fold")
        for row in rows:
            table.add_row(row["name"], row["device"], str(row["priority"]), str(row["max_batch"] or "any"),
                          escape(row["provider"]), escape("\n".join(f"- {s}" for s in row["supports"])))
    console.print(table)
    return 0
