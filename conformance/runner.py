"""Check a decoder or kernel implementation against the conformance vectors (see README.md).

Implementations (the ``impl`` argument):
- ``reference``: qformat's numpy reader and decoder.
- a kernel name registered by a plugin (``qformat plugins`` lists them): for every valid vector whose records the
  kernel supports, ``prepare(...).matmul(x)`` is compared with ``x @ expected.T`` and ``dequantize()`` with the
  expected weight. Invalid vectors are the reader's business and are not run through kernels.
- ``py:package.module:function``: a Python decoder ``function(path: str, options: dict) -> {name: array}`` that
  raises an exception carrying ``.code`` (and optionally ``.tensor``, ``.field``) to reject a file.
- ``exec:COMMAND``: any program, run as ``COMMAND <vector> <output> <options-json>``; it writes the decoded fp32
  tensors as a plain safetensors file and exits 0, or prints ``{"code": ..., "tensor": ..., "field": ...}`` as its last
  stdout line and exits non-zero.
- ``all``: the reference and every registered kernel.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import shlex
import subprocess
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file

from qformat.errors import PluginError
from qformat.format import CORE_CODECS, CodecRegistry

VECTORS_DIR = Path(__file__).resolve().parent / "vectors"
PASS, FAIL, NA, SKIP = "PASS", "FAIL", "n/a", "SKIP"
DEFAULT_KERNEL_RTOL = {"cpu": 1e-4, "cuda": 5e-3}  # |y - x W^T| <= rtol * (|x| |W|^T), elementwise
EXEC_TIMEOUT_S = 120


@dataclass
class Result:
    impl: str
    vector_id: str
    kind: str  # "valid" | "invalid" | "-" (a whole implementation skipped)
    status: str  # PASS | FAIL | n/a | SKIP
    expected: str
    got: str
    detail: str = ""


class Rejected(Exception):
    """What a decoder adapter raises for a file it refuses: the error code and, when known, where."""

    def __init__(self, code: str | None, tensor: str | None = None, field: str | None = None, stage: str | None = None,
                 message: str = "") -> None:
        super().__init__(message or str(code))
        self.code, self.tensor, self.field, self.stage = code, tensor, field, stage


Decoder = Callable[[Path, Mapping[str, Any]], Mapping[str, np.ndarray]]


# ---------------------------------------------------------------------------------------------------------------
# manifest

def load_manifest(vectors_dir: str | Path | None = None) -> dict[str, Any]:
    folder = Path(vectors_dir) if vectors_dir else VECTORS_DIR
    path = folder / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PluginError(f"cannot read conformance manifest {path}: {exc}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("vectors"), list):
        raise PluginError(f"{path}: a manifest needs a 'vectors' list")
    manifest["_dir"] = str(folder)
    return manifest


def _file_ok(folder: Path, entry: Mapping[str, Any], key: str = "file", sha_key: str = "sha256") -> str | None:
    """None when the file exists and matches its recorded sha256, else what is wrong."""
    path = folder / entry[key]
    if not path.is_file():
        return f"vector file {entry[key]} is missing"
    expected = entry.get(sha_key)
    if expected and hashlib.sha256(path.read_bytes()).hexdigest() != expected:
        return f"{entry[key]} does not match its sha256 in the manifest (corrupted checkout?)"
    return None


def _load_expected(folder: Path, entry: Mapping[str, Any], key: str = "expected") -> dict[str, np.ndarray]:
    return {k: np.asarray(v, dtype=np.float32) for k, v in load_file(str(folder / entry[key])).items()}


def _load_tolerance(folder: Path, entry: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Per-element bounds for vectors with matrix products; empty for exact vectors."""
    return {} if entry.get("exact", True) else _load_expected(folder, entry, "tolerance")


def compare(got: np.ndarray, expected: np.ndarray, tolerance: np.ndarray | None = None) -> str | None:
    """None if ``got`` matches: equal as fp32 without ``tolerance``, else |got - exp| <= tolerance per element."""
    got = np.asarray(got)
    if got.shape != expected.shape:
        return f"shape {list(got.shape)}, expected {list(expected.shape)}"
    got = got.astype(np.float32)
    if tolerance is None:
        bad = got != expected
    else:
        bad = ~(np.abs(got.astype(np.float64) - expected) <= tolerance)  # NaN counts as a failure
    if not bad.any():
        return None
    where = tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), bad.shape))
    limit = "" if tolerance is None else f" (tolerance {float(tolerance[where]):.3g})"
    return f"{int(bad.sum())} values differ, first at {list(where)}: {got[where]!r} vs {expected[where]!r}{limit}"


# ---------------------------------------------------------------------------------------------------------------
# decoder implementations

def reference_decode(path: Path, options: Mapping[str, Any],
                     registry: CodecRegistry = CORE_CODECS) -> dict[str, np.ndarray]:
    """qformat's reader and decoder, with the codecs of ``registry`` (plugin vectors need the plugin's codecs)."""
    from qformat.errors import FormatError
    from qformat.format import open_file

    try:
        qfile = open_file(path, registry)
    except FormatError as exc:
        raise Rejected(exc.code, exc.tensor, exc.field, "open", str(exc)) from exc
    try:
        out = {name: qfile.decode(name, **options) for name in qfile.records}
        out.update({name: np.asarray(qfile.tensor(name), dtype=np.float32) for name in qfile.plain_names})
        return out
    except FormatError as exc:
        raise Rejected(exc.code, exc.tensor, exc.field, "decode", str(exc)) from exc
    finally:
        qfile.close()


def python_decoder(spec: str) -> Decoder:
    module_name, _, func_name = spec.rpartition(":")
    if not module_name or not func_name:
        raise PluginError(f"--impl py:{spec}: expected py:package.module:function")
    func = getattr(importlib.import_module(module_name), func_name)

    def decode(path: Path, options: Mapping[str, Any]) -> Mapping[str, np.ndarray]:
        try:
            return func(str(path), dict(options))
        except Exception as exc:
            code = getattr(exc, "code", None)
            if not isinstance(code, str):
                raise
            raise Rejected(code, getattr(exc, "tensor", None), getattr(exc, "field", None), None, str(exc)) from exc
    return decode


def exec_decoder(command: str) -> Decoder:
    argv = shlex.split(command)
    if not argv:
        raise PluginError("--impl exec: needs a command")

    def decode(path: Path, options: Mapping[str, Any]) -> Mapping[str, np.ndarray]:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "decoded.safetensors"
            proc = subprocess.run(argv + [str(path), str(out), json.dumps(dict(options))], capture_output=True,
                                  text=True, timeout=EXEC_TIMEOUT_S)
            if proc.returncode == 0:
                if not out.is_file():
                    raise RuntimeError(f"exit 0 but no output file; stderr: {proc.stderr.strip()[-300:]}")
                return dict(load_file(str(out)))
            lines = [line for line in proc.stdout.strip().splitlines() if line.strip()]
            try:
                error = json.loads(lines[-1]) if lines else None
            except ValueError:
                error = None
            if not isinstance(error, dict) or not isinstance(error.get("code"), str):
                raise RuntimeError(f"exit {proc.returncode} without an error line; stderr: "
                                   f"{proc.stderr.strip()[-300:]}")
            raise Rejected(error["code"], error.get("tensor"), error.get("field"), error.get("stage"))
    return decode


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:200]}"


def check_decoder(impl: str, decode: Decoder, entry: Mapping[str, Any], folder: Path) -> Result:
    vid, kind = entry["id"], entry["kind"]
    problem = _file_ok(folder, entry)
    if kind == "valid":
        problem = problem or _file_ok(folder, entry, "expected", "expected_sha256")
        if not problem and not entry.get("exact", True):
            problem = _file_ok(folder, entry, "tolerance", "tolerance_sha256")
    if problem:
        return Result(impl, vid, kind, FAIL, "-", "-", problem)
    if kind == "valid":
        return _check_valid(impl, decode, entry, folder)
    return _check_invalid(impl, decode, entry, folder)


def _check_valid(impl: str, decode: Decoder, entry: Mapping[str, Any], folder: Path) -> Result:
    vid = entry["id"]
    expected_label = "exact" if entry.get("exact", True) else "within bound"
    expected = _load_expected(folder, entry)
    tolerance = _load_tolerance(folder, entry)
    try:
        decoded = decode(folder / entry["file"], entry.get("options") or {})
    except Rejected as exc:
        return Result(impl, vid, "valid", FAIL, expected_label, f"rejected: {exc.code}", str(exc))
    except Exception as exc:  # a crash is a failure to report, not a reason to stop the run
        return Result(impl, vid, "valid", FAIL, expected_label, "crash", _describe(exc))
    missing = sorted(set(expected) - set(decoded))
    extra = sorted(set(decoded) - set(expected))
    if missing or extra:
        return Result(impl, vid, "valid", FAIL, expected_label, "wrong names",
                      f"missing {missing[:3]}, unexpected {extra[:3]}")
    for name in sorted(expected):
        problem = compare(decoded[name], expected[name], tolerance.get(name))
        if problem:
            return Result(impl, vid, "valid", FAIL, expected_label, "mismatch", f"{name}: {problem}")
    return Result(impl, vid, "valid", PASS, expected_label, "match")


def _check_invalid(impl: str, decode: Decoder, entry: Mapping[str, Any], folder: Path) -> Result:
    vid, error = entry["id"], entry["error"]
    want = error["code"] + (f" @ {error['tensor']}" if error.get("tensor") else "")
    try:
        decode(folder / entry["file"], {})
    except Rejected as exc:
        got = f"{exc.code}" + (f" @ {exc.tensor}" if exc.tensor else "") + (f" ({exc.stage})" if exc.stage else "")
        if exc.code != error["code"]:
            return Result(impl, vid, "invalid", FAIL, want, got, str(exc))
        if error.get("tensor") and exc.tensor is not None and exc.tensor != error["tensor"]:
            return Result(impl, vid, "invalid", FAIL, want, got, f"names tensor {exc.tensor!r}")
        return Result(impl, vid, "invalid", PASS, want, got, str(exc))
    except Exception as exc:
        return Result(impl, vid, "invalid", FAIL, want, "crash", _describe(exc))
    return Result(impl, vid, "invalid", FAIL, want, "accepted", "the file was decoded without an error")


# ---------------------------------------------------------------------------------------------------------------
# kernels

def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def check_kernel(kernel: Any, entry: Mapping[str, Any], folder: Path, rtol: float, seed: int = 0,
                 registry: CodecRegistry = CORE_CODECS) -> Result:
    import torch

    from qformat.format import open_file

    impl, vid = kernel.name, entry["id"]
    label = f"rtol {rtol:g}"
    if entry["kind"] != "valid":
        return Result(impl, vid, "invalid", NA, "-", "-", "validation is the reader's job")
    if entry.get("options"):
        return Result(impl, vid, "valid", NA, label, "-", f"decode options {entry['options']}")
    problem = _file_ok(folder, entry) or _file_ok(folder, entry, "expected", "expected_sha256")
    if not problem and not entry.get("exact", True):
        problem = _file_ok(folder, entry, "tolerance", "tolerance_sha256")
    if problem:
        return Result(impl, vid, "valid", FAIL, label, "-", problem)
    expected = _load_expected(folder, entry)
    tolerance = _load_tolerance(folder, entry)
    qfile = open_file(folder / entry["file"], registry)
    try:
        names = [n for n in sorted(qfile.records) if kernel.supports(qfile.records[n])]
        if not names:
            return Result(impl, vid, "valid", NA, label, "-", "no supported record")
        worst = 0.0
        rng = np.random.default_rng(seed)
        for name in names:
            weight = expected[name].reshape(expected[name].shape[0], -1).astype(np.float64)
            prepared = kernel.prepare(qfile.quantized(name), kernel.device)
            deq = np.asarray(prepared.dequantize().detach().float().cpu().numpy(), dtype=np.float32)
            bound = rtol * float(np.max(np.abs(weight), initial=0.0)) + tolerance.get(
                name, np.zeros(expected[name].shape, np.float32)).reshape(weight.shape)
            problem = compare(deq.reshape(weight.shape), weight.astype(np.float32), bound)
            if problem:
                return Result(impl, vid, "valid", FAIL, label, "dequantize mismatch", f"{name}: {problem}")
            for batch in (1, 3):
                x = rng.standard_normal((batch, weight.shape[1])).astype(np.float32)
                y = prepared.matmul(torch.from_numpy(x).to(kernel.device))
                y = y.detach().double().cpu().numpy()
                ref = x.astype(np.float64) @ weight.T
                bound = rtol * (np.abs(x).astype(np.float64) @ np.abs(weight).T) + 1e-30
                if y.shape != ref.shape:
                    return Result(impl, vid, "valid", FAIL, label, "matmul shape", f"{name}: {list(y.shape)}")
                worst = max(worst, float(np.max(np.abs(y - ref) / bound)))
                if worst > 1:
                    return Result(impl, vid, "valid", FAIL, label, f"error {worst:.2f}x bound",
                                  f"{name}, batch {batch}")
        return Result(impl, vid, "valid", PASS, label, f"{worst:.2g}x bound", f"{len(names)} record(s)")
    except Exception as exc:
        return Result(impl, vid, "valid", FAIL, label, "crash", _describe(exc))
    finally:
        qfile.close()


# ---------------------------------------------------------------------------------------------------------------
# entry point

def implementations() -> dict[str, str]:
    """Every implementation ``run`` knows, with a one-line description."""
    from qformat.plugins import get_plugins

    known = {"reference": "qformat's numpy reader and decoder"}
    try:
        kernels = get_plugins().kernels
    except PluginError as exc:  # a broken plugin must not hide the reference
        known["(plugins)"] = f"failed to load: {exc}"
        return known
    for name, kernel in sorted(kernels.items()):
        known[name] = f"kernel on {kernel.device}"
    return known


def run(impl: str = "reference", vectors_dir: str | Path | None = None, *, rtol: float | None = None,
        seed: int = 0, only: list[str] | None = None, registry: CodecRegistry | None = None) -> list[Result]:
    """Run one implementation (or ``all``) against every vector (or the ids in ``only``) and return the results.

    ``registry``: the codecs the reference reader knows (default: the installed plugin set's, core + plugins).
    """
    manifest = load_manifest(vectors_dir)
    folder = Path(manifest["_dir"])
    entries = [e for e in manifest["vectors"] if only is None or e["id"] in only]
    if registry is None:
        from qformat.plugins import get_plugins

        registry = get_plugins().codecs
    if impl == "all":
        results = run("reference", folder, only=only, registry=registry)
        from qformat.plugins import get_plugins

        for name in sorted(get_plugins().kernels):
            results += run(name, folder, rtol=rtol, seed=seed, only=only, registry=registry)
        return results
    decoder: Decoder | None = None
    if impl == "reference":
        decoder = partial(reference_decode, registry=registry)
    elif impl.startswith("py:"):
        decoder = python_decoder(impl[3:])
    elif impl.startswith("exec:"):
        decoder = exec_decoder(impl[5:])
    if decoder is not None:
        return [check_decoder(impl, decoder, e, folder) for e in entries]

    from qformat.plugins import get_plugins

    kernel = get_plugins().kernels.get(impl)
    if kernel is None:
        raise PluginError(f"unknown implementation {impl!r}; known: {', '.join(implementations())}, all, "
                          "py:module:function, exec:COMMAND")
    if kernel.device == "cuda" and not _cuda_available():
        return [Result(impl, "*", "-", SKIP, "-", "no CUDA device available")]
    tol = rtol if rtol is not None else DEFAULT_KERNEL_RTOL.get(kernel.device, 1e-3)
    return [check_kernel(kernel, e, folder, tol, seed, registry) for e in entries]


def summarize(results: list[Result]) -> dict[str, int]:
    counts = {PASS: 0, FAIL: 0, NA: 0, SKIP: 0}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    return counts


def print_table(results: list[Result], *, failures_only: bool = False, console: Any = None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    table = Table(title="qformat conformance", show_lines=False)
    for column in ("impl", "vector", "kind", "expected", "got", "status"):
        table.add_column(column, overflow="fold")
    style = {PASS: "green", FAIL: "bold red", NA: "dim", SKIP: "yellow"}
    for r in results:
        if failures_only and r.status != FAIL:
            continue
        status = f"[{style[r.status]}]{r.status}[/]"
        got = r.got + (f" - {r.detail}" if r.status == FAIL and r.detail else "")
        table.add_row(*(escape(v) for v in (r.impl, r.vector_id, r.kind, r.expected, got)), status)
    console.print(table)
    counts = summarize(results)
    console.print(f"{counts[PASS]} passed, {counts[FAIL]} failed, {counts[NA]} n/a, {counts[SKIP]} skipped")
