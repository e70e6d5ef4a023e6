"""What a case runs in its child: each target opens the mutated file or folder the way a user's code would.

``reader``: open_file, decode every record, read every plain tensor. ``folder``: verify_folder(deep=True).
``load``: qformat.load_dequantized on a model folder. ``kernel``: the numba kernel's prepare/dequantize/matmul
against the reference decoder, record by record (it must reject what the reference rejects, and agree otherwise).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any


def target_reader(path: Path) -> dict[str, Any]:
    from qformat.format import bits_per_weight, open_file, signature

    qfile = open_file(path)
    try:
        for name in qfile.records:
            qfile.decode(name)
            signature(qfile.records[name]["weight"])
            bits_per_weight(qfile.records[name])
        for name in qfile.plain_names:
            qfile.tensor(name)
    finally:
        qfile.close()
    return {}


def target_folder(path: Path) -> dict[str, Any]:
    from qformat.format import verify_folder

    verify_folder(path, deep=True)
    return {}


def target_load(path: Path) -> dict[str, Any]:
    from qformat import load_dequantized

    load_dequantized(path)
    return {}


def target_kernel(path: Path) -> dict[str, Any]:
    """Differential: the numba kernel must reject what the reference rejects at decode, and agree on the rest."""
    import numpy as np
    import torch
    from qformat_kernels.numba_plugin import NumbaKernel

    from qformat.errors import FormatError
    from qformat.format import open_file

    kernel = NumbaKernel()
    qfile = open_file(path)
    try:
        for name, record in qfile.records.items():
            if not kernel.supports(record):
                continue
            try:
                expected = qfile.decode(name)
                reference_error = None
            except FormatError as exc:
                expected, reference_error = None, exc.code
            try:
                prepared = kernel.prepare(qfile.quantized(name))
                got = prepared.dequantize().numpy().reshape(-1)
                cols = got.size // max(int(record["shape"][0]), 1)
                prepared.matmul(torch.ones(1, cols))
            except FormatError as exc:
                if reference_error is None:
                    return {"mismatch": f"kernel rejects a record the reference decodes ({exc.code})", "tensor": name}
                continue
            if reference_error is not None:
                return {"mismatch": f"kernel accepts a record the reference rejects ({reference_error})",
                        "tensor": name}
            want = expected.reshape(-1)
            close = np.isclose(got, want, rtol=1e-3, atol=1e-5) | (np.isnan(got) & np.isnan(want))
            if not close.all():
                finite = bool(np.isfinite(want).all())
                what = "kernel and reference decode differ" + ("" if finite else " (non-finite values)")
                return {"mismatch": what, "tensor": name}
    finally:
        qfile.close()
    return {}


TARGET_FUNCTIONS: dict[str, Callable[[Path], dict[str, Any]]] = {
    "reader": target_reader, "folder": target_folder, "load": target_load, "kernel": target_kernel,
}


def preload(target: str) -> None:
    """Import what the target needs in the parent, so children start warm (fork copies the imports)."""
    import qformat.format

    if target == "load":
        import transformers  # noqa: F401

        import qformat.runtime.loader  # noqa: F401
    if target == "kernel":
        import qformat_kernels.numba_prepared  # noqa: F401
        import torch  # noqa: F401
