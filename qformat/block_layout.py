"""Which norm feeds which linears in a decoder block, per architecture, and helpers that fold scales into them.

A scale pair says: the output of ``prev`` (a norm, or some rows of a linear) is the input of ``linears``, so a
per-channel scale ``s`` on those linears' input columns (``W · diag(s)``) is undone exactly by dividing ``prev``'s
output channels by ``s``. ``inspect`` is the module whose output a scale search compares (the attention or MLP the
linears belong to, or the single linear).

For transformers' Llama, Mistral, Qwen2, Qwen3, Phi-3 (fused ``qkv_proj`` / ``gate_up_proj``), Gemma and Gemma2
(norm weight used as ``1 + w``; Gemma2's post-norms sit after o_proj / down_proj and are no pair):

    input_layernorm                          → q_proj, k_proj, v_proj   (inspect self_attn)
    v_proj                                   → o_proj                   only when the shapes match (not under GQA)
    post_attention_layernorm                 → gate_proj, up_proj       (Gemma2: pre_feedforward_layernorm; inspect mlp)
    up_proj (Phi-3: the up half of gate_up)  → down_proj

This module is importable without torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import PluginError

if TYPE_CHECKING:
    import torch
    from torch import nn


class SkipBlock(PluginError):
    """A transform does not understand this block; the message says why. Raise it before changing anything."""


@dataclass(frozen=True)
class ScalePair:
    """``prev``'s output (rows ``rows`` of it for a fused linear) is the input of every linear in ``linears``."""

    prev: str  # relative module name: a norm or a linear
    kind: str  # "norm" or "linear"
    linears: tuple[str, ...]
    inspect: str
    rows: tuple[int, int] | None = None  # a fused previous linear: the output rows feeding ``linears``
    norm_offset: float = 0.0  # Gemma: the norm multiplies by (offset + weight)

    def fold(self, block: nn.Module, s: torch.Tensor) -> None:
        """Divide ``prev``'s output channels by ``s`` (the linears' columns are multiplied by ``s`` separately)."""
        module = block.get_submodule(self.prev)
        if self.kind == "norm":
            fold_into_norm(module, s, self.norm_offset)
        else:
            fold_into_rows(module, s, self.rows)


_STANDARD = {"norm_attn": "input_layernorm", "norm_mlp": "post_attention_layernorm", "offset": 0.0}
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "llama": {**_STANDARD, "fused": False},
    "mistral": {**_STANDARD, "fused": False},
    "qwen2": {**_STANDARD, "fused": False},
    "qwen3": {**_STANDARD, "fused": False},
    "phi3": {**_STANDARD, "fused": True},
    "gemma": {**_STANDARD, "fused": False, "offset": 1.0},
    "gemma2": {**_STANDARD, "norm_mlp": "pre_feedforward_layernorm", "fused": False, "offset": 1.0},
}
LAYOUT_ARCHITECTURES = frozenset(ARCHITECTURES)


def _width(module: Any, what: str, where: str) -> int:
    weight = getattr(module, "weight", None)
    if weight is None or weight.dim() != (1 if what == "norm" else 2):
        raise SkipBlock(f"{where} is not a {what} with a {'1' if what == 'norm' else '2'}-D weight")
    return int(weight.shape[0])


def block_layout(architecture: str, block: nn.Module, prefix: str = "") -> list[ScalePair]:
    """The scale pairs of one decoder block; raises :class:`SkipBlock` with the reason when the architecture is not
    in the table or the block's modules are not what it says (a module missing, a width that does not match)."""
    spec = ARCHITECTURES.get(architecture)
    if spec is None:
        raise SkipBlock(f"no block layout for architecture {architecture!r} (known: {', '.join(sorted(ARCHITECTURES))})")
    modules = dict(block.named_modules())

    def need(name: str) -> Any:
        if name not in modules:
            raise SkipBlock(f"{architecture} block {prefix}{name} is missing")
        return modules[name]

    offset = spec["offset"]
    hidden = _width(need(spec["norm_attn"]), "norm", prefix + spec["norm_attn"])
    pairs: list[ScalePair] = []
    if spec["fused"]:
        qkv, o = need("self_attn.qkv_proj"), need("self_attn.o_proj")
        gate_up, down = need("mlp.gate_up_proj"), need("mlp.down_proj")
        attn_linears, mlp_linears = ("self_attn.qkv_proj",), ("mlp.gate_up_proj",)
        v_rows = _phi3_v_rows(block, qkv, hidden, prefix)
        v_prev = ("self_attn.qkv_proj", v_rows)
        inter = _width(gate_up, "linear", prefix + "mlp.gate_up_proj") // 2
        up_prev = ("mlp.gate_up_proj", (inter, 2 * inter))
    else:
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            need(name)
        o, down = modules["self_attn.o_proj"], modules["mlp.down_proj"]
        attn_linears = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
        mlp_linears = ("mlp.gate_proj", "mlp.up_proj")
        v_prev = ("self_attn.v_proj", None)
        up_prev = ("mlp.up_proj", None)
    norm_mlp = need(spec["norm_mlp"])
    for names in (attn_linears, mlp_linears):
        for name in names:
            if modules[name].weight.shape[1] != hidden:
                raise SkipBlock(f"{prefix}{name} reads {modules[name].weight.shape[1]} features, not the "
                                f"{hidden} of {prefix}{spec['norm_attn']}")
    if _width(norm_mlp, "norm", prefix + spec["norm_mlp"]) != hidden:
        raise SkipBlock(f"{prefix}{spec['norm_mlp']} is not {hidden} wide")
    pairs.append(ScalePair(spec["norm_attn"], "norm", attn_linears, "self_attn", norm_offset=offset))
    v_name, v_rows = v_prev
    v_width = (v_rows[1] - v_rows[0]) if v_rows else _width(modules[v_name], "linear", prefix + v_name)
    if v_width == o.weight.shape[1]:  # under GQA, v's rows are repeated over heads: no one-to-one fold
        pairs.append(ScalePair(v_name, "linear", ("self_attn.o_proj",), "self_attn.o_proj", rows=v_rows))
    pairs.append(ScalePair(spec["norm_mlp"], "norm", mlp_linears, "mlp", norm_offset=offset))
    up_name, up_rows = up_prev
    up_width = (up_rows[1] - up_rows[0]) if up_rows else _width(modules[up_name], "linear", prefix + up_name)
    if up_width != down.weight.shape[1]:
        raise SkipBlock(f"{prefix}mlp.down_proj reads {down.weight.shape[1]} features, not the {up_width} "
                        f"{prefix}{up_name} gives")
    pairs.append(ScalePair(up_name, "linear", ("mlp.down_proj",), "mlp.down_proj", rows=up_rows))
    return pairs


def _phi3_v_rows(block: Any, qkv: Any, hidden: int, prefix: str) -> tuple[int, int]:
    """The rows of Phi-3's fused qkv_proj that produce v: [q | k | v] with q = heads·d and k = v = kv_heads·d."""
    attn = block.get_submodule("self_attn")
    head_dim = getattr(attn, "head_dim", None)
    kv_heads = getattr(attn, "num_key_value_heads", None)
    if kv_heads is None:
        config = getattr(attn, "config", None)
        kv_heads = getattr(config, "num_key_value_heads", None)
        heads = getattr(config, "num_attention_heads", None)
    else:
        heads = getattr(attn, "num_heads", None) or getattr(getattr(attn, "config", None), "num_attention_heads", None)
    if head_dim is None or kv_heads is None or heads is None:
        raise SkipBlock(f"{prefix}self_attn does not say its head counts, so the v rows of qkv_proj are unknown")
    q, kv = heads * head_dim, kv_heads * head_dim
    if qkv.weight.shape[0] != q + 2 * kv:
        raise SkipBlock(f"{prefix}self_attn.qkv_proj has {qkv.weight.shape[0]} rows, not q+k+v = {q + 2 * kv}")
    return q + kv, q + 2 * kv


# ---------------------------------------------------------------------------------------------------------------
# folding


def fold_into_norm(norm: nn.Module, s: torch.Tensor, offset: float = 0.0) -> None:
    """Divide a norm's output channels by ``s``: weight (used as ``offset + weight``: Gemma's 1 + w) and bias."""
    import torch

    with torch.no_grad():
        s = s.to(norm.weight.dtype)
        norm.weight.copy_((offset + norm.weight) / s - offset)
        bias = getattr(norm, "bias", None)
        if bias is not None:
            bias.div_(s)


def fold_into_rows(linear: nn.Module, s: torch.Tensor, rows: tuple[int, int] | None = None) -> None:
    """Divide a linear's output rows (``rows`` of a fused one) and their bias by ``s``."""
    import torch

    start, stop = rows if rows is not None else (0, linear.weight.shape[0])
    with torch.no_grad():
        s = s.to(linear.weight.dtype)
        linear.weight[start:stop].div_(s[:, None])
        bias = getattr(linear, "bias", None)
        if bias is not None:
            bias[start:stop].div_(s)


def scale_columns(linear: nn.Module, s: torch.Tensor) -> None:
    """Multiply a linear's input columns by ``s`` (the other half of a fold)."""
    import torch

    with torch.no_grad():
        linear.weight.mul_(s.to(linear.weight.dtype)[None, :])
