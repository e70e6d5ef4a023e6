"""A lean greedy/sampling decoder for Llama-family models (Llama, Mistral, Qwen2) loaded by ``qformat.load``.

    from qformat.runtime.decode_engine import generate
    out = generate(model, input_ids, max_new_tokens=64)            # greedy; [1, prompt + new] token ids

transformers spends several milliseconds per token outside the kernels (module calls, mask and cache bookkeeping,
``generate``'s logits processors). This engine runs the same modules' arithmetic with a few torch ops per layer:

- per layer: RMSNorm (transformers' fp32 order: ``w * (x * rsqrt(mean(x**2) + eps))``), q/k/v through the model's
  own linear modules (q first, then k and v on the same tensor, so fused siblings compute once), RoPE from cos/sin
  tables built once by the model's own rotary module (so ``rope_theta`` and the static scalings ``linear``,
  ``llama3``, ``yarn`` match transformers exactly; ``rotate_half(x) * sin`` is computed as
  ``roll(x, D/2) * sin_signed``, bit-identical), k/v written in place into a static cache
  ``[layers, kv_heads, max_len, head_dim]``, attention over the cache prefix with
  ``scaled_dot_product_attention`` (decoding: the query heads sharing a KV head are that head's query rows, so GQA
  needs no expanded keys and no mask), o_proj, residual, RMSNorm, gate/up (fused siblings), ``silu(gate) * up``,
  down, residual; final norm; the model's ``lm_head`` module as it is (a QLinear, or the tied embedding).
- Prefill: the prompt in one batched pass through the same per-layer code (causal boolean mask, GQA through
  ``enable_gqa``); only the last position goes through the final norm and ``lm_head``.
- Linear modules are called through ``forward`` (no module hooks); a model with hooks is refused.
- fp32 on the CPU, a decoding step runs the ops between the linears as three compiled numba functions
  (:mod:`qformat.runtime.lean_ops`: residual add + RMSNorm, RoPE + cache write + attention, SiLU * up) on
  preallocated numpy buffers, the residual stream included; the linears get zero-copy torch views of those buffers.
  Other dtypes and devices, and ``numba_ops=False``, run the torch ops above.

Anything else is refused with :class:`UnsupportedModel` naming what (other architectures, sliding-window attention
that would act within ``max_len``, rope types whose tables depend on the sequence length such as ``dynamic`` or
``longrope``, other activations, batch > 1, linears that are neither QLinear nor nn.Linear); callers fall back to
transformers (``qformat generate --engine auto`` does). Logits agree with transformers' to float rounding (the
attention reductions run in another shape); the tests hold them to 1e-4 of the logits' scale.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import QformatError
from .nn import QEmbedding, QLinear

SUPPORTED = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # tables independent of the sequence length
ACTIVATIONS = ("silu", "swish")
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class UnsupportedModel(QformatError):
    """The lean engine does not implement this model (the message says what); use transformers' generate."""


class ContextFull(QformatError):
    """The static KV cache has no room for more positions."""


# -- checks ------------------------------------------------------------------------------------------------------------


def _rope_type(config: Any) -> str:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return str(params.get("rope_type", params.get("type", "default")) or "default")


def _sliding_window_in_use(config: Any, max_len: int) -> str | None:
    window = getattr(config, "sliding_window", None)
    if window is None or max_len <= window:  # mask kv > q - window: no effect while every position fits
        return None
    model_type = getattr(config, "model_type", "")
    if model_type == "qwen2":
        types = getattr(config, "layer_types", None) or []
        if not any(t == "sliding_attention" for t in types):
            return None
    return f"sliding-window attention (window {window} < max_len {max_len})"


def why_unsupported(model: nn.Module, max_len: int | None = None) -> str | None:
    """Why :class:`DecodeEngine` cannot run ``model`` with a cache of ``max_len`` positions; None when it can."""
    name = type(model).__name__
    config = getattr(model, "config", None)
    if name not in SUPPORTED or config is None or getattr(config, "model_type", None) != SUPPORTED[name]:
        return (f"model class {name} (model_type {getattr(config, 'model_type', None)!r}); the lean engine runs "
                f"{', '.join(SUPPORTED)}")
    rope = _rope_type(config)
    if rope not in STATIC_ROPE_TYPES:
        return f"rope type {rope!r} (implemented: {', '.join(STATIC_ROPE_TYPES)})"
    act = getattr(config, "hidden_act", None)
    if act not in ACTIVATIONS:
        return f"activation {act!r} (implemented: silu)"
    types = getattr(config, "layer_types", None) or []
    other = sorted({t for t in types if t not in ("full_attention", "sliding_attention")})
    if other:
        return f"layer types {', '.join(other)}"
    window = _sliding_window_in_use(config, max_len if max_len is not None else _default_max_len(config))
    if window:
        return window
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if layers is None or getattr(base, "rotary_emb", None) is None or getattr(base, "norm", None) is None:
        return "a model without model.layers / model.rotary_emb / model.norm"
    if len(layers) < config.num_hidden_layers:
        return f"{len(layers)} layers for num_hidden_layers={config.num_hidden_layers}"
    embed = getattr(base, "embed_tokens", None)
    if not isinstance(embed, (nn.Embedding, QEmbedding)):
        return f"token embedding of type {type(embed).__name__}"
    if not isinstance(getattr(model, "lm_head", None), (nn.Linear, QLinear)):
        return f"output layer of type {type(getattr(model, 'lm_head', None)).__name__}"
    for i, layer in enumerate(layers[:config.num_hidden_layers]):
        for norm_name in ("input_layernorm", "post_attention_layernorm"):
            norm = getattr(layer, norm_name, None)
            if not type(norm).__name__.endswith("RMSNorm") or not hasattr(norm, "variance_epsilon"):
                return f"layers.{i}.{norm_name} of type {type(norm).__name__}"
        for linear in LINEARS:
            parent = layer.self_attn if linear in LINEARS[:4] else layer.mlp
            module = getattr(parent, linear, None)
            if type(module) not in (nn.Linear, QLinear):
                return f"layers.{i}.{linear} of type {type(module).__name__} (needs QLinear or nn.Linear)"
    if not type(base.norm).__name__.endswith("RMSNorm"):
        return f"final norm of type {type(base.norm).__name__}"
    hooked = [n or "model" for n, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks]
    if hooked:
        return f"forward hooks on {', '.join(hooked[:3])}{' ...' if len(hooked) > 3 else ''}"
    return None


def check_supported(model: nn.Module, max_len: int | None = None) -> None:
    """Raise :class:`UnsupportedModel` naming what the lean engine does not implement for ``model``."""
    reason = why_unsupported(model, max_len)
    if reason is not None:
        raise UnsupportedModel(f"the lean decode engine does not support {reason}; use transformers' generate")


def _default_max_len(config: Any) -> int:
    return int(getattr(config, "max_position_embeddings", 2048) or 2048)


# -- the engine --------------------------------------------------------------------------------------------------------


def _forward_of(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    return module.forward  # QLinear.forward is one call into its bound kernel; no hooks (refused above)


class _Layer:
    __slots__ = ("in_norm", "post_norm", "q", "k", "v", "o", "gate", "up", "down", "k_cache", "v_cache", "k4", "v4",
                 "np")

    def __init__(self, layer: nn.Module, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.in_norm = (layer.input_layernorm.weight, float(layer.input_layernorm.variance_epsilon))
        self.post_norm = (layer.post_attention_layernorm.weight, float(layer.post_attention_layernorm.variance_epsilon))
        self.q, self.k, self.v, self.o = (_forward_of(m) for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj))
        self.gate, self.up, self.down = (_forward_of(m) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
        self.k_cache, self.v_cache = k_cache, v_cache  # [kv_heads, max_len, head_dim] views of the engine's cache
        self.k4, self.v4 = k_cache[None], v_cache[None]  # the same, 4-D: CPU sdpa is ~2x faster on 4-D inputs
        self.np: tuple | None = None  # numba step: (in_norm w, eps, post_norm w, eps, k_cache, v_cache) as numpy


class DecodeEngine:
    """Greedy or sampled decoding of one sequence with a static KV cache of ``max_len`` positions.

    ``prefill(ids)`` runs the prompt and returns the last position's logits; ``step(token)`` appends one token and
    returns its logits; ``generate(...)`` does both. ``reset()`` empties the cache (the buffers are kept).

    ``layer_threads``: torch threads for a decoding step's per-layer ops; None: torch's setting; "auto" (default):
    1 where every decoder linear is a QLinear on a kernel of its own (not the torch reference path), else torch's
    setting. At batch 1 the torch ops between kernels are tiny (norms, RoPE, attention over the cache), and waking
    torch's OpenMP pool for them between the kernels' calls (numba runs its own pool) costs more than they do,
    badly so on a busy machine. The output layer and the prefill always run with torch's setting.

    ``numba_ops``: run a decoding step's ops between the linears (residual adds, RMSNorm, RoPE, the cache write,
    attention, SiLU * up) as the compiled functions of :mod:`qformat.runtime.lean_ops` on preallocated numpy buffers
    instead of torch ops (SmolLM2-135M: ~0.7 ms instead of ~4 ms per token, and no torch pool woken between numba's
    kernels; see bench/E2E_NOTES.md); the linears are still called as modules on (zero-copy) torch views of those
    buffers and must return fp32 C-contiguous rows (QLinear kernels and nn.Linear do). None (default): where the
    model runs in fp32 on the CPU; other dtypes and devices keep the torch ops. The prefill always runs torch ops.
    """

    def __init__(self, model: nn.Module, max_len: int | None = None, *,
                 layer_threads: int | str | None = "auto", numba_ops: bool | None = None) -> None:
        config = model.config
        max_len = int(max_len) if max_len is not None else _default_max_len(config)
        if max_len < 1:
            raise ValueError(f"max_len must be at least 1, got {max_len}")
        check_supported(model, max_len)
        base = model.model
        self.model, self.config, self.max_len = model, config, max_len
        if layer_threads == "auto":
            own_kernels = all(isinstance(m, QLinear) and m.kernel_name not in (None, "torch")
                              for layer in base.layers[:config.num_hidden_layers]
                              for m in (*(getattr(layer.self_attn, n) for n in LINEARS[:4]),
                                        *(getattr(layer.mlp, n) for n in LINEARS[4:])))
            layer_threads = 1 if own_kernels else None
        self.layer_threads = None if layer_threads is None else int(layer_threads)
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.heads)
        if self.heads % self.kv_heads:
            raise UnsupportedModel(f"the lean decode engine does not support {self.heads} attention heads over "
                                   f"{self.kv_heads} KV heads (not a multiple)")
        attn0 = base.layers[0].self_attn
        if (attn0.q_proj.out_features, attn0.k_proj.out_features) != (self.heads * self.head_dim,
                                                                       self.kv_heads * self.head_dim):
            raise UnsupportedModel("the lean decode engine does not support q/k projections whose widths are not "
                                   "heads x head_dim")
        self.scale = float(getattr(attn0, "scaling", self.head_dim ** -0.5))
        final = base.norm
        self.dtype = final.weight.dtype
        self.device = final.weight.device
        self.final_norm = (final.weight, float(final.variance_epsilon))
        self._norm = _rms_norm if self.dtype == torch.float32 else _rms_norm_cast
        self._embed = self._embedder(base.embed_tokens)
        self._lm_head = _forward_of(model.lm_head)
        self.cos, self.sin = self._rope_tables(base.rotary_emb)
        layers = config.num_hidden_layers
        shape = (layers, self.kv_heads, max_len, self.head_dim)
        # Never read past the filled prefix, so left uninitialised: pages are touched only as positions fill.
        self.k_cache = torch.empty(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.empty(shape, dtype=self.dtype, device=self.device)
        self.layers = [_Layer(layer, self.k_cache[i], self.v_cache[i])
                       for i, layer in enumerate(base.layers[:layers])]
        self.position = 0
        numba_fits = self.dtype == torch.float32 and self.device.type == "cpu"
        if numba_ops and not numba_fits:
            raise ValueError(f"numba_ops runs fp32 on the CPU; this model is {self.dtype} on {self.device}")
        self.numba_ops = numba_fits if numba_ops is None else bool(numba_ops)
        if self.numba_ops:
            self._numba_setup(base, config)

    def _numba_setup(self, base: nn.Module, config: Any) -> None:
        from . import lean_ops

        self._ops = lean_ops
        f32 = np.float32

        def weight(norm: tuple[torch.Tensor, float]) -> tuple[np.ndarray, np.float32]:
            return np.ascontiguousarray(norm[0].detach().numpy(), dtype=f32), f32(norm[1])

        for layer in self.layers:
            layer.np = (*weight(layer.in_norm), *weight(layer.post_norm), layer.k_cache.numpy(), layer.v_cache.numpy())
        self._final_np = weight(self.final_norm)
        hidden, inter = int(config.hidden_size), int(base.layers[0].mlp.down_proj.in_features)
        self._h = np.zeros(hidden, f32)  # the residual stream
        self._x = np.zeros(hidden, f32)  # a norm's output: the input of q/k/v, gate/up and the output layer
        self._a = np.zeros(self.heads * self.head_dim, f32)  # attention output, o_proj's input
        self._m = np.zeros(inter, f32)  # silu(gate) * up, down_proj's input
        self._qrot = np.zeros(self.head_dim, f32)  # rope_attend's scratch
        self._scores = np.zeros(self.max_len, f32)
        self._xt, self._at, self._mt = (torch.from_numpy(b) for b in (self._x, self._a, self._m))
        self._cos_np, self._sin_np = self.cos.numpy(), self.sin.numpy()
        self._scale_np = f32(self.scale)
        embed = base.embed_tokens
        self._embed_np = (embed.weight.detach().numpy() if type(embed) is nn.Embedding
                          and embed.weight.dtype == torch.float32 and embed.weight.is_contiguous() else None)

    def _embedder(self, embed: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        if isinstance(embed, nn.Embedding):
            weight = embed.weight
            return lambda ids: F.embedding(ids, weight).to(self.dtype)
        return lambda ids: embed(ids).to(self.dtype)

    def _rope_tables(self, rotary: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sign-folded sin [max_len, head_dim] from the model's own rotary module (its inv_freq, scaling
        and attention factor): ``rotate_half(x) * sin == roll(x, D/2) * sin_signed`` exactly."""
        positions = torch.arange(self.max_len, device=self.device)[None]
        probe = torch.empty(0, dtype=self.dtype, device=self.device)
        with torch.inference_mode():
            cos, sin = rotary(probe, positions)
        cos, sin = cos[0].to(self.dtype).contiguous(), sin[0].to(self.dtype).clone()
        if cos.shape[-1] != self.head_dim:
            raise UnsupportedModel(f"the lean decode engine does not support partial rotary embeddings "
                                   f"({cos.shape[-1]} of {self.head_dim} dims)")
        sin[:, :self.head_dim // 2].neg_()
        return cos, sin

    def reset(self) -> None:
        self.position = 0

    def _room(self, n: int) -> None:
        if self.position + n > self.max_len:
            raise ContextFull(f"the KV cache holds max_len={self.max_len} positions; {self.position} are used and "
                              f"{n} more were asked for (build the engine with a larger max_len)")

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Run ``ids`` (one sequence: [n] or [1, n]) from the current position; the last position's logits."""
        ids = torch.as_tensor(ids, device=self.device)
        if ids.dim() == 2:
            if ids.shape[0] != 1:
                raise UnsupportedModel(f"the lean decode engine runs one sequence, not a batch of {ids.shape[0]}")
            ids = ids[0]
        ids = ids.reshape(-1)
        n = ids.numel()
        if n == 0:
            raise ValueError("prefill needs at least one token")
        if n == 1:
            return self.step(int(ids[0]))
        self._room(n)
        start, end = self.position, self.position + n
        heads, kv, d, half = self.heads, self.kv_heads, self.head_dim, self.head_dim // 2
        cos, sin = self.cos[start:end, None], self.sin[start:end, None]  # [n, 1, D]
        mask = torch.arange(end, device=self.device)[None] <= torch.arange(start, end, device=self.device)[:, None]
        norm = self._norm
        h = self._embed(ids.to(self.device))  # [n, hidden]
        for layer in self.layers:
            x = norm(h, *layer.in_norm)
            q = layer.q(x).view(n, heads, d)
            k = layer.k(x).view(n, kv, d)
            v = layer.v(x).view(n, kv, d)
            q = q * cos + q.roll(half, -1) * sin
            k = k * cos + k.roll(half, -1) * sin
            layer.k_cache[:, start:end] = k.transpose(0, 1)
            layer.v_cache[:, start:end] = v.transpose(0, 1)
            a = F.scaled_dot_product_attention(q.transpose(0, 1)[None], layer.k4[:, :, :end], layer.v4[:, :, :end],
                                               attn_mask=mask, scale=self.scale, enable_gqa=heads != kv)
            h = h + layer.o(a[0].transpose(0, 1).reshape(n, heads * d))
            x = norm(h, *layer.post_norm)
            g, u = layer.gate(x), layer.up(x)
            h = h + layer.down(F.silu(g) * u)
        self.position = end
        return self._lm_head(norm(h[-1], *self.final_norm))

    @torch.inference_mode()
    def step(self, token: int) -> torch.Tensor:
        """Append ``token`` at the current position; its logits ([vocab])."""
        p = self.position
        if p >= self.max_len:
            self._room(1)
        if self.numba_ops:
            if self._embed_np is not None:
                if not 0 <= token < len(self._embed_np):  # numpy would wrap a negative index
                    raise IndexError(f"token {token} is outside the vocabulary (0..{len(self._embed_np) - 1})")
                self._h[:] = self._embed_np[token]
            else:
                self._h[:] = self._embed(torch.tensor([token], device=self.device))[0].numpy()
            layers_step, h = self._layers_step_numba, None
        else:
            layers_step, h = self._layers_step, self._embed(torch.tensor([token], device=self.device))[0]
        threads = torch.get_num_threads()
        if self.layer_threads is not None and self.layer_threads != threads:
            torch.set_num_threads(self.layer_threads)
            try:
                h = layers_step(h, p)
            finally:
                torch.set_num_threads(threads)
        else:
            h = layers_step(h, p)
        self.position = p + 1
        if self.numba_ops:
            return self._lm_head(self._xt)  # the final norm is in _x already
        return self._lm_head(self._norm(h, *self.final_norm))

    def _layers_step_numba(self, _h: None, p: int) -> None:
        """The layers for one token with lean_ops between the linears; leaves the final norm's output in ``_x``."""
        ops = self._ops
        add_rms_norm, rope_attend, silu_mul = ops.add_rms_norm, ops.rope_attend, ops.silu_mul
        h, x, a, m, xt, at, mt = self._h, self._x, self._a, self._m, self._xt, self._at, self._mt
        cos, sin, scale, qrot, scores = self._cos_np[p], self._sin_np[p], self._scale_np, self._qrot, self._scores
        layers = self.layers
        w, eps = layers[0].np[:2]
        ops.rms_norm(h, w, eps, x)
        for i, layer in enumerate(layers):
            _, _, post_w, post_eps, kc, vc = layer.np
            q = layer.q(xt).numpy()  # q first, then k and v on the same tensor: fused siblings compute once
            k = layer.k(xt).numpy()
            v = layer.v(xt).numpy()
            rope_attend(q, k, v, cos, sin, kc, vc, p, scale, a, qrot, scores)
            add_rms_norm(h, layer.o(at).numpy(), post_w, post_eps, x)
            g = layer.gate(xt).numpy()
            silu_mul(g, layer.up(xt).numpy(), m)
            w, eps = layers[i + 1].np[:2] if i + 1 < len(layers) else self._final_np
            add_rms_norm(h, layer.down(mt).numpy(), w, eps, x)

    def _layers_step(self, h: torch.Tensor, p: int) -> torch.Tensor:
        n = p + 1
        kv, groups, d, half = self.kv_heads, self.heads // self.kv_heads, self.head_dim, self.head_dim // 2
        cos, sin, scale, norm = self.cos[p], self.sin[p], self.scale, self._norm
        sdpa, silu = F.scaled_dot_product_attention, F.silu
        for layer in self.layers:
            x = norm(h, *layer.in_norm)
            q = layer.q(x).view(1, kv, groups, d)  # the query heads of one KV head are its query rows
            k = layer.k(x).view(kv, d)
            v = layer.v(x).view(kv, d)
            q = q * cos + q.roll(half, -1) * sin
            kc, vc = layer.k_cache, layer.v_cache
            torch.add(k * cos, k.roll(half, -1) * sin, out=kc[:, p])
            vc[:, p] = v
            a = sdpa(q, layer.k4[:, :, :n], layer.v4[:, :, :n], scale=scale)  # [1, kv, groups, d]: heads in order
            h = h + layer.o(a.reshape(-1))
            x = norm(h, *layer.post_norm)
            g, u = layer.gate(x), layer.up(x)
            h = h + layer.down(silu(g) * u)
        return h

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, eos_token_id: int | Sequence[int] | None = None,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 generator: torch.Generator | None = None,
                 logits: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Prompt + up to ``max_new_tokens`` new tokens ([1, n]), from an empty cache; stops after an EOS token.
        ``logits``: a list that receives each new token's logits (before sampling)."""
        ids = input_ids if input_ids.dim() == 2 else input_ids[None]
        if ids.shape[0] != 1:
            raise UnsupportedModel(f"the lean decode engine runs one sequence, not a batch of {ids.shape[0]}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        self.reset()
        self._room(ids.shape[1] + max(max_new_tokens - 1, 0))  # the last new token is never fed back
        stop = set() if eos_token_id is None else ({eos_token_id} if isinstance(eos_token_id, int)
                                                   else set(eos_token_id))
        pick = (lambda z: _sample(z, temperature, top_k, top_p, generator)) if do_sample else _argmax
        new: list[int] = []
        if max_new_tokens:
            out = self.prefill(ids[0])
            while True:
                if logits is not None:
                    logits.append(out)
                token = pick(out)
                new.append(token)
                if len(new) >= max_new_tokens or token in stop:
                    break
                out = self.step(token)
        tail = torch.tensor([new], dtype=ids.dtype, device=ids.device)
        return torch.cat([ids, tail], dim=1)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm for fp32 activations, in its order: w * (x * rsqrt(mean(x^2) + eps))."""
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rms_norm_cast(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The same for 16-bit activations: computed in fp32, cast back before the weight, as transformers does."""
    x32 = x.to(torch.float32)
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _argmax(logits: torch.Tensor) -> int:
    return int(logits.argmax())


def _sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
            generator: torch.Generator | None) -> int:
    """transformers' warpers in its order (temperature, top-k, top-p; at least one token kept), then a draw."""
    z = logits.float()
    if temperature != 1.0:
        if temperature <= 0:
            return _argmax(logits)
        z = z / temperature
    if top_k and top_k < z.numel():
        z = z.masked_fill(z < torch.topk(z, top_k).values[-1], float("-inf"))
    if top_p < 1.0:
        ordered, order = torch.sort(z)
        drop = ordered.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[-1] = False
        z = z.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return int(torch.multinomial(z.softmax(-1), 1, generator=generator))


def generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, *, max_len: int | None = None,
             layer_threads: int | str | None = "auto", numba_ops: bool | None = None,
             **options: Any) -> torch.Tensor:
    """Prompt + new tokens ([1, n]) from the lean engine, with a cache of ``max_len`` positions (default: exactly
    what the prompt and ``max_new_tokens`` need; ``layer_threads``, ``numba_ops``: see :class:`DecodeEngine`).
    ``options``: see :meth:`DecodeEngine.generate` (``eos_token_id``, ``do_sample``, ``temperature``, ``top_k``,
    ``top_p``, ``generator``, ``logits``). Raises
    :class:`UnsupportedModel` where the engine does not apply (see :func:`why_unsupported`)."""
    prompt = input_ids.shape[-1]
    engine = DecodeEngine(model, max_len if max_len is not None else prompt + max(max_new_tokens, 1),
                          layer_threads=layer_threads, numba_ops=numba_ops)
    return engine.generate(input_ids, max_new_tokens, **options)
