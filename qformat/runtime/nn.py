"""``QLinear``: a drop-in for ``nn.Linear`` whose weight stays packed and is multiplied by a kernel.

The module owns a :class:`qformat.kernel_api.PreparedWeight` (packed data only) and an optional bias. The packed data
is deliberately not a parameter or buffer: transformers re-creates missing buffers as empty tensors and ``state_dict``
consumers would expect a dense weight, neither of which fits a packed record.

Decoding runs a few hundred of these per token, so the per-call path is resolved when the weight is attached
(``qformat.runtime.dispatch.bind``): ``forward`` is one call into a function that already holds the kernel.

:func:`fuse_shared_inputs` (run by the loaders) stacks sibling layers that read the same input (q/k/v, gate/up) into
one kernel call per input; see :class:`SharedInput`.

Gradients (fine-tuning, :mod:`qformat.runtime.trainable`): with grad mode on and an input that requires grad,
``QLinear`` runs its kernel inside :class:`PackedLinearFunction`, whose backward computes ``grad_x = grad_y @ W`` from
this layer's weight decoded on demand (``prepared.dequantize()``: one layer's temporary, never the model's); the packed
codes get no gradient. A layer may also hold a trainable low-rank sidecar (``sidecar_a`` [out, r], ``sidecar_b``
[r, in], fp32 parameters: y += (x @ bᵀ) @ aᵀ), split off a ``sum(base, lowrank(a, b))`` record when the model is
loaded with ``trainable=True``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..format import bits_per_weight, signature
from ..kernel_api import PreparedWeight

LinearFn = Callable[[PreparedWeight, torch.Tensor, torch.Tensor | None], torch.Tensor]
BoundLinear = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
ENV_FUSE = "QFORMAT_FUSE"
# Sibling layers that read the same input in the architectures transformers ships (Llama-style attention and gated
# MLPs, BERT-style attention, Mixtral-style experts). A group whose members turn out not to share their input (e.g.
# cross-attention) gives up fusing by itself: see SharedInput.
SHARED_INPUT_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("query", "key", "value"),
                         ("w1", "w3"))


def _bind(prepared: PreparedWeight) -> BoundLinear:
    from .dispatch import bind

    return bind(prepared)


def _unattached(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    raise RuntimeError("QLinear has no prepared weight yet (load the model with qformat.load)")


class PackedLinearFunction(torch.autograd.Function):
    """``y = x @ W.T`` through a QLinear's bound kernel, differentiable in ``x`` only (the packed codes are frozen).

    The backward decodes the layer's weight once per call (``prepared.dequantize()``, a temporary [out, in] fp32
    tensor of this layer alone, freed on return) and multiplies ``grad_y @ W``; nothing dense is kept between calls,
    so training holds the packed model plus one layer's decode at a time. The kernel sees a detached input (kernels
    may read it through numpy)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: QLinear) -> torch.Tensor:  # type: ignore[override]
        ctx.layer = layer
        return layer._run(x.detach(), None)

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, None]:  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None
        prepared = ctx.layer.prepared
        if prepared is None:
            raise RuntimeError("QLinear lost its prepared weight before the backward pass")
        weight = prepared.dequantize().to(device=grad_y.device)
        compute = torch.float32 if grad_y.device.type == "cpu" else grad_y.dtype
        grad_x = torch.matmul(grad_y.to(compute), weight.to(compute)).to(grad_y.dtype)
        return grad_x, None


class QLinear(nn.Module):
    """y = x @ W.T + b, with W a qformat record prepared for one kernel on one device (plus, where set, a low-rank
    sidecar ``(x @ sidecar_b.T) @ sidecar_a.T`` held as float parameters)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, record: dict | None = None,
                 device: Any = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.record = record
        self.prepared: PreparedWeight | None = None
        self.kernel_name: str | None = None
        self.kernel_device: str | None = None  # device type the prepared weight lives on ("cpu", "cuda")
        self.shared: SharedInput | None = None  # set when fused with siblings reading the same input
        self._run: BoundLinear = _unattached
        self._custom = False
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.register_parameter("sidecar_a", None)
        self.register_parameter("sidecar_b", None)

    @classmethod
    def like(cls, linear: nn.Linear, record: dict) -> QLinear:
        """A placeholder for ``linear`` (same shape and bias dtype/device, typically meta) awaiting its weight."""
        bias = linear.bias
        return cls(linear.in_features, linear.out_features, bias is not None, record=record,
                   device=bias.device if bias is not None else None, dtype=bias.dtype if bias is not None else None)

    def attach(self, prepared: PreparedWeight, kernel_name: str | None = None, linear: LinearFn | None = None) -> None:
        """Install the prepared weight; ``linear(prepared, x, bias)`` overrides the dispatcher's (tests)."""
        if (prepared.out_features, prepared.in_features) != (self.out_features, self.in_features):
            raise ValueError(f"prepared weight is {prepared.out_features}x{prepared.in_features}, the layer is "
                             f"{self.out_features}x{self.in_features}")
        self.prepared = prepared
        self.kernel_name = kernel_name or (prepared.kernel.name if prepared.kernel is not None else None)
        self.shared = None
        self._custom = linear is not None
        if linear is None:
            self._run = _bind(prepared)
        else:
            def run(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
                return linear(prepared, x, bias)
            self._run = run

    def _join(self, group: SharedInput, index: int, view: PreparedWeight) -> None:
        """Compute through ``group`` (part ``index``); ``view`` (this layer's rows of the stacked weight) serves
        inputs the group has not seen."""
        own = _bind(view)
        self.prepared, self.shared = view, group

        def run(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
            return group.part(index, x, bias, own)

        self._run = run

    @property
    def qweight(self) -> torch.Tensor:
        """An empty uint8 tensor on the device the packed weight lives on: what libraries that place modules next to
        a quantized layer's weight look for (peft's LoRA puts adapters on ``qweight.device``, as for GPTQ layers;
        an integer dtype, so the adapter keeps its own float dtype). The packed data itself is not a tensor here."""
        return torch.empty(0, dtype=torch.uint8, device=self.kernel_device or "cpu")

    def set_sidecar(self, a: torch.Tensor, b: torch.Tensor, requires_grad: bool = True) -> None:
        """Hold ``a`` [out, r] and ``b`` [r, in] as fp32 parameters added to the kernel's output (the prepared weight
        must then be the record without that low-rank term)."""
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != self.out_features or b.shape[1] != self.in_features \
                or a.shape[1] != b.shape[0]:
            raise ValueError(f"a sidecar of {self.out_features}x{self.in_features} is a [out, r] and b [r, in], got "
                             f"{list(a.shape)} and {list(b.shape)}")
        self.sidecar_a = nn.Parameter(a.detach().to(torch.float32).clone(), requires_grad=requires_grad)
        self.sidecar_b = nn.Parameter(b.detach().to(torch.float32).clone(), requires_grad=requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias
        grad = torch.is_grad_enabled() and x.requires_grad
        if self.sidecar_a is None and not grad:
            return self._run(x, bias)  # inference (a trainable bias is added by torch ops there too)
        y = PackedLinearFunction.apply(x, self) if grad else self._run(x, None)
        if self.sidecar_a is not None and self.sidecar_b is not None:
            y = y + F.linear(F.linear(x, self.sidecar_b.to(x.dtype)), self.sidecar_a.to(x.dtype))
        return y if bias is None else y + bias.to(y.dtype)

    def _apply(self, fn: Callable, recurse: bool = True) -> QLinear:  # type: ignore[override]
        """``model.to(device)`` moves the bias; the packed weight stays with the kernel it was prepared for (it
        is not a parameter), and inputs from another device are copied to it and back. Say so once."""
        result = super()._apply(fn, recurse)
        kernel_device = self.kernel_device
        if kernel_device is not None and self.prepared is not None:
            target = fn(torch.empty(0, device=self.bias.device if self.bias is not None else "cpu")).device.type
            if target not in ("meta", kernel_device) and not QLinear._warned_move:
                QLinear._warned_move = True
                warnings.warn(f"qformat: the packed weights stay on their {kernel_device} kernels when the model is "
                              f"moved to {target}; inputs are copied there and back. Load with "
                              f"qformat.load(path, device={target!r}) to run {target} kernels.", stacklevel=3)
        return result

    _warned_move = False

    def nbytes(self) -> int:
        """Bytes this layer holds: the prepared (packed) weight plus the bias."""
        held = self.prepared.nbytes() if self.prepared is not None else 0
        extra = [t for t in (self.bias, self.sidecar_a, self.sidecar_b) if t is not None]
        return held + sum(t.numel() * t.element_size() for t in extra)

    def extra_repr(self) -> str:
        text = f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        if self.record is not None:
            text += f", codec={signature(self.record['weight'])}, bits={bits_per_weight(self.record):.3g}"
        if self.kernel_name:
            text += f", kernel={self.kernel_name}"
        if self.shared is not None:
            text += f", fused={self.shared.label}"
        if self.sidecar_a is not None:
            text += f", sidecar_rank={self.sidecar_a.shape[1]}"
        return text


class SharedInput:
    """Sibling linears that read the same input, multiplied as one stacked weight (one kernel call, not three).

    The first part called with an input computes every part's rows and keeps them; a sibling called with the same
    tensor object (unmodified since: same version counter where the tensor has one; inference tensors have none,
    and nothing in a transformer block writes into the projections' input) takes its slice. A part called with
    another input computes only its own rows, from its row view of the stacked weight, so results never depend on
    the order of calls. If rows computed ahead go unused ``GIVE_UP_AFTER`` times in a row (siblings that do not share
    their input, such as cross-attention q vs k/v), the group stops computing ahead.
    """

    GIVE_UP_AFTER = 2

    def __init__(self, prepared: PreparedWeight, sizes: Sequence[int], label: str = "") -> None:
        self.prepared = prepared
        self.sizes = list(sizes)
        self.label = label or "+".join(str(n) for n in sizes)
        self.enabled = True
        self.misses = 0
        self._run = _bind(prepared)
        self._all = (1 << len(self.sizes)) - 1
        self._cache: tuple | None = None  # (x, x's version, outputs): one tuple, read at once (threads)
        self._left = 0  # parts that have not taken their output from the cache yet

    def part(self, index: int, x: torch.Tensor, bias: torch.Tensor | None, own: BoundLinear) -> torch.Tensor:
        cache = self._cache
        if cache is not None and cache[0] is x and cache[1] == _version(x):
            out = cache[2][index]
            self._left &= ~(1 << index)
            if not self._left:  # every part took its rows
                self._cache, self.misses = None, 0
            return out if bias is None else out + bias.to(out.dtype)
        if not self.enabled:
            return own(x, bias)
        if self._cache is not None and self._left:  # computed rows went unused
            self.misses += 1
            if self.misses >= self.GIVE_UP_AFTER:
                self.enabled, self._cache = False, None
                return own(x, bias)
        y = self._run(x, None)
        outs = y.split(self.sizes, dim=-1)
        if y.numel() != y.shape[-1]:  # several rows: slices are strided; give callers ordinary tensors
            outs = tuple(o.contiguous() for o in outs)
        self._cache = (x, _version(x), outs)
        self._left = self._all & ~(1 << index)
        out = outs[index]
        return out if bias is None else out + bias.to(out.dtype)


def _version(x: torch.Tensor) -> int:
    return -1 if x.is_inference() else x._version


def fusion_enabled() -> bool:
    return os.environ.get(ENV_FUSE, "1").strip().lower() not in ("0", "false", "no", "off")


def fuse_shared_inputs(model: nn.Module) -> int:
    """Stack the weights of sibling QLinears that read the same input (``SHARED_INPUT_SIBLINGS``), where their
    kernel can concatenate them (same kernel, codec layout and input width); return the number of groups formed.

    In-memory only (the folder's layout is untouched) and memory-neutral: each part keeps a view of the stacked
    weight. ``QFORMAT_FUSE=0`` turns it off."""
    if not fusion_enabled():
        return 0
    from .dispatch import fuse_rows

    groups = 0
    for parent_name, parent in model.named_modules():
        children = dict(parent.named_children())
        for names in SHARED_INPUT_SIBLINGS:
            parts = [(n, children[n]) for n in names if isinstance(children.get(n), QLinear)]
            parts = [(n, m) for n, m in parts if m.prepared is not None and m.shared is None and not m._custom]
            if len(parts) < 2 or len({m.in_features for _, m in parts}) != 1:
                continue
            fused = fuse_rows([m.prepared for _, m in parts],
                              f"{parent_name}.{'+'.join(n for n, _ in parts)}".lstrip("."))
            if fused is None:
                continue
            whole, views = fused
            group = SharedInput(whole, [m.out_features for _, m in parts], "+".join(n for n, _ in parts))
            for index, ((_, module), view) in enumerate(zip(parts, views, strict=True)):
                module._join(group, index, view)
            groups += 1
    return groups


def qlinear_modules(model: nn.Module) -> dict[str, QLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QLinear)}


class QEmbedding(nn.Module):
    """A drop-in for ``nn.Embedding`` whose table stays a record: a lookup decodes only the rows it needs (through
    the reference decoder's row ranges, :class:`qformat.format.record.RowReader`), so an imported GGUF keeps its
    quantized token embedding quantized in memory too. Rows come out exactly as the reference decode gives them."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None, *,
                 record: dict | None = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx
        self.record = record
        self.dtype = dtype
        self.reader: Any = None
        self.stored_bytes = 0

    @classmethod
    def like(cls, embedding: nn.Embedding, record: dict) -> QEmbedding:
        return cls(embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx, record=record,
                   dtype=embedding.weight.dtype)

    def attach(self, reader: Any, stored_bytes: int) -> None:
        self.reader = reader
        self.stored_bytes = stored_bytes

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.reader is None:
            raise RuntimeError("QEmbedding has no record attached yet (load the model with qformat.load)")
        rows = torch.from_numpy(self.reader.rows(ids.detach().cpu().numpy()))
        return rows.to(device=ids.device, dtype=self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, record (decoded by rows)"
