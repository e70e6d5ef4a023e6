"""Numba-compiled per-layer ops of the lean decode engine's fp32 CPU step (one token at a time).

At batch 1 the ops between a decoder layer's linears are tiny (a few thousand floats), and as torch ops they cost
more in dispatch than in arithmetic (~190 us per layer for RMSNorm, RoPE, the cache write, sdpa, SiLU * up and the
residual adds). Here they are three single-threaded compiled functions working in place on preallocated numpy
buffers:

- :func:`add_rms_norm`: ``h += delta`` (the residual add), then ``out = w * (h * rsqrt(mean(h^2) + eps))``
  (transformers' RMSNorm order for fp32 activations).
- :func:`rope_attend`: RoPE on q and k from the engine's cos / sign-folded sin rows (``rotate_half(x) * sin ==
  roll(x, D/2) * sin_signed``), k and v written into the cache at position ``p``, then attention of every query head
  over the cache prefix ``[0, p]`` (GQA: query head ``i`` reads KV head ``i // (heads / kv_heads)``), fp32 scores,
  max-subtracted softmax and weighted sum, as sdpa does for fp32 inputs.
- :func:`silu_mul`: ``out = silu(gate) * up``.

``exp`` is a vectorisable polynomial (:func:`_exp`, ~2 ulp over the fp32 range; numba has no SVML here, and libm's
``expf`` one element at a time costs more than the rest of the layer's elementwise work). Each function is compiled
once, eagerly (cached on disk), for one signature: fp32 C-contiguous 1-D arrays (the caches 3-D), fp32 scalars, an
int64 position. Called through numba's dispatcher: ~0.3-0.8 us per call here. The compiled overload's own entry
point (``fn.overloads[sig].entry_point``) saves up to ~0.5 us but does not check layouts (a strided array is read as
if contiguous), so it is not used.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import ir
from numba import float32, int64, types, void
from numba.extending import intrinsic

_F1 = float32[::1]
_F3 = float32[:, :, ::1]
# fastmath without nnan/ninf: reductions may reassociate (so they vectorise) and fuse into FMAs, but infinities
# and NaNs keep their meaning (a NaN activation stays visible in the logits, as with torch's ops).
_FAST = {"reassoc", "contract", "arcp", "nsz"}
_OPTS = dict(nogil=True, cache=True, fastmath=_FAST, error_model="numpy", boundscheck=False)

_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)
_LN2_LO = np.float32(-2.12194440e-4)
_EXP_MAX = np.float32(88.0)  # 2**127 * e**0.34: k stays <= 127
_EXP_MIN = np.float32(-87.3365447504019)  # below: the smallest normal (results are weights, so ~0 is fine)
_ONE = np.float32(1.0)
_HALF = np.float32(0.5)
_ZERO = np.float32(0.0)


@intrinsic
def _bits_to_f32(typingctx, bits):
    """The fp32 whose bits are the int32 ``bits`` (an LLVM bitcast: vectorises)."""
    if bits != types.int32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@numba.njit(float32(float32), inline="always", **_OPTS)
def _exp(x):
    """e**x for fp32 (Cephes expf: range reduction by ln 2, degree-6 polynomial, 2**k by exponent bits): branch-free
    so that loops over it vectorise."""
    x = min(max(x, _EXP_MIN), _EXP_MAX)
    k = np.floor(x * _LOG2E + _HALF)
    r = x - k * _LN2_HI - k * _LN2_LO
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * r * r + r + _ONE
    # 2**k from its exponent bits: k in [-126, 127] after the clamp, so (k + 127) << 23 fits an int32
    bits = np.int32((k + np.float32(127.0)) * np.float32(8388608.0))
    return p * _bits_to_f32(bits)




@numba.njit(void(_F1, _F1, _F1, float32, _F1), **_OPTS)
def add_rms_norm(h, delta, weight, eps, out):
    """h += delta; out = weight * (h * rsqrt(mean(h^2) + eps)). ``delta`` may be ``h``'s zero buffer to skip the
    add (see :func:`rms_norm`)."""
    n = h.shape[0]
    ss = _ZERO
    for i in range(n):
        v = h[i] + delta[i]
        h[i] = v
        ss += v * v
    r = _ONE / math.sqrt(ss / np.float32(n) + eps)
    for i in range(n):
        out[i] = weight[i] * (h[i] * r)


@numba.njit(void(_F1, _F1, float32, _F1), **_OPTS)
def rms_norm(h, weight, eps, out):
    """out = weight * (h * rsqrt(mean(h^2) + eps))."""
    n = h.shape[0]
    ss = _ZERO
    for i in range(n):
        ss += h[i] * h[i]
    r = _ONE / math.sqrt(ss / np.float32(n) + eps)
    for i in range(n):
        out[i] = weight[i] * (h[i] * r)


@numba.njit(void(_F1, _F1, _F1), **_OPTS)
def silu_mul(gate, up, out):
    """out = gate * sigmoid(gate) * up."""
    for i in range(out.shape[0]):
        g = gate[i]
        out[i] = g / (_ONE + _exp(-g)) * up[i]


@numba.njit(void(_F1, _F1, _F1, _F1, _F1, _F3, _F3, int64, float32, _F1, _F1, _F1), **_OPTS)
def rope_attend(q, k, v, cos, sin, k_cache, v_cache, p, scale, out, qrot, scores):
    """One token's attention: RoPE on q [heads*D] and k [kv*D]; k, v into the caches [kv, max_len, D] at position
    ``p``; ``out`` [heads*D] = softmax(scale * q.K[:p+1]) @ V[:p+1] per query head. ``qrot`` [D] and ``scores``
    [>= p+1] are scratch. (Going through a KV head's cache rows once for all its query heads measured slower at
    every length up to 2048: the loops vectorise worse.)"""
    kv, _, d = k_cache.shape
    half = d // 2
    heads = q.shape[0] // d
    groups = heads // kv
    n = p + 1
    for g in range(kv):
        b = g * d
        for i in range(half):
            lo, hi = k[b + i], k[b + i + half]
            k_cache[g, p, i] = lo * cos[i] + hi * sin[i]
            k_cache[g, p, i + half] = hi * cos[i + half] + lo * sin[i + half]
        for i in range(d):
            v_cache[g, p, i] = v[b + i]
    for head in range(heads):
        g = head // groups
        b = head * d
        for i in range(half):
            lo, hi = q[b + i], q[b + i + half]
            qrot[i] = lo * cos[i] + hi * sin[i]
            qrot[i + half] = hi * cos[i + half] + lo * sin[i + half]
        top = np.float32(-np.inf)
        for j in range(n):
            s = _ZERO
            for i in range(d):
                s += qrot[i] * k_cache[g, j, i]
            s *= scale
            scores[j] = s
            top = max(top, s)
        total = _ZERO
        for j in range(n):
            e = _exp(scores[j] - top)
            scores[j] = e
            total += e
        for i in range(d):
            out[b + i] = _ZERO
        for j in range(n):
            w = scores[j]
            for i in range(d):
                out[b + i] += w * v_cache[g, j, i]
        inv = _ONE / total
        for i in range(d):
            out[b + i] *= inv
