"""Low-rank sidecars: a rank-r term ``a @ b`` fitted to a quantization error and stored beside the quantized weight.

ZeroQuant-V2's LoRC (SVD of ``E = W − Ŵ``, ``a = U_r √Σ_r``, ``b = √Σ_r V_rᵀ``), its activation-weighted form (the
same with the error measured on the calibration inputs: minimise ``‖(E − a b) H^½‖``, H the layer's Hessian), LQ-LoRA's
and SVDQuant's alternations all end in the format's ``lowrank`` codec; this module is the one place that fits and
stores it, for methods (``plugins/``) and for the pipeline's ``--sidecar-rank`` alike.

    a, b = fit_lowrank(W - W_hat, rank=16, hessian=H)        # torch float32 [R, r], [r, C]
    qt = with_sidecar(qt, W, rank=16, bits=8, hessian=H)      # record -> sum(base, lowrank(a, b))

Stored in F16 (``bits=16``) or as 8-bit symmetric affine codes with one F16 scale per row of ``a`` and of ``b``
(``bits=8``: ZeroQuant-V2's "optionally 8-bit"); bits from bytes count them like any other tensor of the record.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ParameterError
from .format import CORE_CODECS, CodecRegistry, QuantizedTensor, RecordBuilder
from .format.builder import Node

if TYPE_CHECKING:
    import torch

SIDECAR_BITS = (8, 16)
SIDECAR_ROLE = "sidecar"
DEFAULT_DAMP = 0.01  # relative to mean diag(H), as GPTQ's percdamp: keeps the Cholesky factor of H well conditioned


def _hessian_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Lower-triangular L with ``L Lᵀ = H + damp · mean(diag H) · I`` (float64); dead inputs (zero diagonal) get the
    damping alone, so they carry no weight in the fit but keep L invertible."""
    import torch

    h = hessian.to(torch.float64).clone()
    diag = torch.diagonal(h)
    mean = float(diag[diag > 0].mean()) if bool((diag > 0).any()) else 1.0
    diag += damp * mean
    return torch.linalg.cholesky(h)


def fit_lowrank(error: torch.Tensor, rank: int, hessian: torch.Tensor | None = None,
                damp: float = DEFAULT_DAMP) -> tuple[torch.Tensor, torch.Tensor]:
    """``a [R, r]``, ``b [r, C]`` (float32) minimising ``‖E − a b‖_F`` (``hessian`` None: the truncated SVD, split as
    ``U√Σ``, ``√ΣVᵀ``) or ``‖(E − a b) L‖_F`` with ``L Lᵀ = H`` damped (the output error on the calibration inputs:
    the SVD of ``E L``, then ``b = √Σ Vᵀ L⁻¹``). The SVD runs in float64, as SVDQuant's does."""
    import torch

    if rank < 0:
        raise ParameterError(f"a low-rank sidecar's rank is >= 0, got {rank}")
    rows, cols = error.shape
    rank = min(rank, rows, cols)
    e = error.detach().to(torch.float64)
    if rank == 0:
        return torch.zeros(rows, 0), torch.zeros(0, cols)
    factor = _hessian_factor(hessian, damp) if hessian is not None else None
    target = e @ factor if factor is not None else e
    u, s, vh = torch.linalg.svd(target, full_matrices=False)
    root = s[:rank].sqrt()
    a = u[:, :rank] * root
    b = root[:, None] * vh[:rank]
    if factor is not None:  # b L = √Σ Vᵀ  ->  b = √Σ Vᵀ L⁻¹ (a triangular solve on the right)
        b = torch.linalg.solve_triangular(factor, b, upper=False, left=False)
    return a.to(torch.float32), b.to(torch.float32)


def lowrank_node(builder: RecordBuilder, a: torch.Tensor, b: torch.Tensor, bits: int = 16,
                 role: str = SIDECAR_ROLE) -> tuple[Node, torch.Tensor]:
    """The ``lowrank`` node of ``a @ b`` stored at ``bits`` (16: F16 tensors; 8: int8-range codes per row with F16
    row scales), and the product exactly as the file decodes it (float32 [R, C])."""
    if bits not in SIDECAR_BITS:
        raise ParameterError(f"a low-rank sidecar is stored in {' or '.join(map(str, SIDECAR_BITS))} bits, got {bits}")
    import torch

    (node_a, a_stored), (node_b, b_stored) = (
        _stored_factor(builder, f"{role}.{name}", m.detach().float().numpy(), bits) for name, m in (("a", a), ("b", b)))
    product = torch.from_numpy(a_stored) @ torch.from_numpy(b_stored)
    return builder.lowrank(node_a, node_b), product


def _stored_factor(builder: RecordBuilder, role: str, m: np.ndarray, bits: int) -> tuple[Node, np.ndarray]:
    if bits == 16 or m.size == 0:
        half = m.astype(np.float16)
        return builder.tensor(role, half), half.astype(np.float32)
    # Symmetric 8-bit per row: codes q in [1, 255] around zero 128, scale = max|row| / 127 rounded to F16 first so the
    # codes are computed against the scale the file holds.
    scale = (np.abs(m).max(axis=1, keepdims=True) / 127.0).astype(np.float16)
    scale[scale == 0] = np.float16(1.0)
    s32 = scale.astype(np.float32)
    codes = np.clip(np.rint(m / s32) + 128, 1, 255).astype(np.uint8)
    node = builder.affine(builder.packed(f"{role}.codes", codes, 8), scale=builder.tensor(f"{role}.scale", scale),
                          zero=128, bits=8, group_shape=(1, m.shape[1]))
    return node, (codes.astype(np.float32) - 128.0) * s32


def with_sidecar(qt: QuantizedTensor, weight: torch.Tensor, rank: int, *, bits: int = 16,
                 hessian: torch.Tensor | None = None, registry: CodecRegistry = CORE_CODECS,
                 damp: float = DEFAULT_DAMP) -> QuantizedTensor:
    """``qt`` with a rank-``rank`` sidecar of its error ``weight − decode(qt)`` added: the record's weight becomes
    ``sum(base, lowrank)`` (a base ``sum`` gains one more term), its other tensors unchanged, ``info.sidecar`` says
    rank, bits and whether the fit was activation-weighted. ``registry``: the codecs ``qt`` uses."""
    import torch

    if f"{qt.name}.{SIDECAR_ROLE}.a" in qt.tensors or f"{qt.name}.{SIDECAR_ROLE}.a.codes" in qt.tensors:
        raise ParameterError(f"{qt.name}: the record already has a sidecar")
    w = weight.detach().to(torch.float32).reshape(qt.record["shape"][0], -1)
    decoded = torch.from_numpy(np.asarray(qt.decode(registry), dtype=np.float32)).reshape(w.shape)
    a, b = fit_lowrank(w - decoded, rank, hessian, damp)
    builder = RecordBuilder(qt.name, qt.record["shape"], qt.record.get("dtype", "F32"), registry)
    builder.tensors.update(qt.tensors)
    node, _ = lowrank_node(builder, a, b, bits)
    base = qt.record["weight"]
    terms = [*base["terms"], node] if base.get("codec") == "sum" else [base, node]
    info: dict[str, Any] = dict(qt.record.get("info") or {})
    info["sidecar"] = {"rank": int(a.shape[1]), "bits": bits, "weighted": hessian is not None}
    return builder.finish(builder.sum(terms), info)
