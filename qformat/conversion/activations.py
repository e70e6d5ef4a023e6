"""Calibration activations: capturing block inputs, running one block, and accumulating per-linear statistics.

Block inputs are captured GPTQ-style, but generically: every block is swapped for a recorder that stores what the model
passes it (hidden states for block 0; attention mask, position embeddings, ... for every block, so models whose blocks
get different masks, such as sliding-window layers, work) and the last recorder stops the forward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .source import Skeleton

TOKENS_PER_FORWARD = 4096  # micro-batch size in tokens: bounds attention memory at long sequence lengths


def micro_batches(samples: int, seqlen: int) -> list[tuple[int, int]]:
    """(start, stop) sample ranges; fixed by (samples, seqlen) so results are reproducible."""
    size = max(1, TOKENS_PER_FORWARD // seqlen)
    return [(s, min(s + size, samples)) for s in range(0, samples, size)]


class _Stop(Exception):
    pass


class _Recorder(nn.Module):
    def __init__(self, index: int, last: int, calls: BlockCalls) -> None:
        super().__init__()
        self.index, self.last, self.calls = index, last, calls

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.index == 0:
            self.calls.first_inputs.append(hidden.detach())
        self.calls.record(self.index, hidden.shape[0], args, kwargs)
        if self.index == self.last:
            raise _Stop
        return hidden


@dataclass
class BlockCalls:
    """What each block is called with besides its hidden states, per block and micro-batch size."""

    first_inputs: list[torch.Tensor] = field(default_factory=list)
    extra: dict[tuple[int, int], tuple[tuple, dict]] = field(default_factory=dict)

    def record(self, index: int, batch: int, args: tuple, kwargs: dict) -> None:
        self.extra.setdefault((index, batch), (args, {k: v for k, v in kwargs.items()}))

    def call(self, block: nn.Module, index: int, hidden: torch.Tensor) -> torch.Tensor:
        args, kwargs = self.extra[(index, hidden.shape[0])]
        out = block(hidden, *args, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out


@torch.inference_mode()
def capture_block_inputs(skeleton: Skeleton, windows: torch.Tensor) -> BlockCalls:
    """Block-0 hidden states for every micro-batch of calibration windows, and every block's call arguments.

    The modules before the blocks (embeddings, rotary tables) must be materialised; the blocks are not touched.
    """
    calls = BlockCalls()
    blocks = skeleton.blocks
    originals = list(blocks)
    last = len(blocks) - 1
    try:
        for index in range(len(blocks)):
            blocks[index] = _Recorder(index, last, calls)
        for start, stop in micro_batches(windows.shape[0], windows.shape[1]):
            try:
                skeleton.model.base_model(input_ids=windows[start:stop], use_cache=False)
            except _Stop:
                pass
    finally:
        for index, block in enumerate(originals):
            blocks[index] = block
    return calls


@torch.inference_mode()
def run_block(block: nn.Module, index: int, calls: BlockCalls, inputs: Iterable[torch.Tensor],
              keep: bool = True, on_batch: Callable[[], None] | None = None) -> list[torch.Tensor]:
    """Run one block over every micro-batch; return its outputs (or nothing when only hooks are wanted)."""
    outputs = []
    for hidden in inputs:
        out = calls.call(block, index, hidden)
        if keep:
            outputs.append(out)
        if on_batch is not None:
            on_batch()
    return outputs


class _StopBlock(Exception):
    """Raised by a statistics hook once every hooked linear has seen its input: the rest of the block is not needed."""


HESSIAN_ROW_CHUNK = 192  # rows of XᵀX computed per product: only the upper triangle is formed (~35% fewer FLOPs)


def accumulate_xtx_upper(acc: torch.Tensor, flat: torch.Tensor) -> None:
    """``acc += triu(flatᵀ flat)`` up to chunking: row chunk [s, e) gets columns s.. (the part below the diagonal
    inside each chunk is computed too, and ignored). Chunking is fixed by the width, so results are reproducible."""
    n = flat.shape[1]
    for s in range(0, n, HESSIAN_ROW_CHUNK):
        e = min(s + HESSIAN_ROW_CHUNK, n)
        acc[s:e, s:].addmm_(flat[:, s:e].T, flat[:, s:])


def symmetric_from_upper(upper: torch.Tensor) -> torch.Tensor:
    return upper.triu() + upper.triu(1).T


# What one input contributes: (x xᵀ upper triangle, Σ x², max |x| per channel, tokens); None where not wanted.
_Terms = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, int]
_NO_TERMS: _Terms = (None, None, None, 0)


class LinearStats:
    """Accumulates, per linear layer, ``sum(x xᵀ)`` (fp32), ``sum(x²)`` and ``max |x|`` per input channel over
    calibration tokens, each only if wanted.

    ``hessian`` returns ``2/N · Σ x xᵀ`` as the method contract defines it; ``act_norms`` the per-channel L2 norms;
    ``act_absmax`` the per-channel max |x| (LLM.int8()'s outlier features).
    Only the upper triangle of ``Σ x xᵀ`` is accumulated (it is symmetric). Inputs are taken by forward pre-hooks;
    :meth:`collect` runs the block and stops each forward as soon as every hooked linear has had its input (how many
    calls each linear gets per forward is learnt on the first micro-batch, which runs whole), so the linears after
    the last hooked one (and their FLOPs) are skipped: down_proj in a one-group pass, most of the block in the
    early ``--true-sequential`` passes.
    """

    def __init__(self, want_hessian: bool, want_norms: bool, want_absmax: bool = False) -> None:
        self.want_hessian, self.want_norms, self.want_absmax = want_hessian, want_norms, want_absmax
        self.xtx: dict[str, torch.Tensor] = {}
        self.sq: dict[str, torch.Tensor] = {}
        self.absmax: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self._hooks: list[Any] = []
        # Linears fed the same tensor (q/k/v, gate/up) share one product: computed once per forward.
        self._last_input: torch.Tensor | None = None
        self._last_terms: _Terms = _NO_TERMS
        self._calls: dict[str, int] = {}  # calls per hooked linear in the current forward
        self._expected: dict[str, int] | None = None  # calls per forward, once learnt

    @classmethod
    def for_method(cls, calibration: frozenset[str] | set[str]) -> LinearStats:
        """Statistics for a method's declared ``calibration`` (``Method.calibration``)."""
        return cls("hessian" in calibration, "act_norms" in calibration, "act_absmax" in calibration)

    def _terms(self, x: torch.Tensor) -> _Terms:
        if x is self._last_input:
            return self._last_terms
        flat = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
        xtx = None
        if self.want_hessian:
            xtx = torch.zeros(flat.shape[1], flat.shape[1])
            accumulate_xtx_upper(xtx, flat)
        sq = (flat * flat).sum(dim=0) if self.want_norms else None
        absmax = flat.abs().amax(dim=0) if self.want_absmax and flat.shape[0] else None
        self._last_input, self._last_terms = x, (xtx, sq, absmax, flat.shape[0])
        return self._last_terms

    def add(self, name: str, x: torch.Tensor) -> None:
        xtx, sq, absmax, tokens = self._terms(x)
        if xtx is not None:
            if name in self.xtx:
                self.xtx[name].add_(xtx)
            else:
                self.xtx[name] = xtx.clone()
        if sq is not None:
            if name in self.sq:
                self.sq[name].add_(sq)
            else:
                self.sq[name] = sq.clone()
        if absmax is not None:
            if name in self.absmax:
                torch.maximum(self.absmax[name], absmax, out=self.absmax[name])
            else:
                self.absmax[name] = absmax.clone()
        self.tokens[name] = self.tokens.get(name, 0) + tokens

    def attach(self, modules: dict[str, nn.Module]) -> None:
        for name, module in modules.items():
            def hook(_module: nn.Module, args: tuple, _name: str = name) -> None:
                self.add(_name, args[0])
                self._calls[_name] = self._calls.get(_name, 0) + 1
                expected = self._expected
                if expected is not None and all(self._calls.get(n, 0) >= c for n, c in expected.items()):
                    raise _StopBlock

            self._hooks.append(module.register_forward_pre_hook(hook))

    def detach(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self._last_input, self._last_terms = None, _NO_TERMS
        self._calls, self._expected = {}, None

    @torch.inference_mode()
    def collect(self, block: nn.Module, index: int, calls: BlockCalls, inputs: Iterable[torch.Tensor]) -> None:
        """Run the block over every micro-batch for its hooked linears' inputs (outputs are not needed)."""
        for hidden in inputs:
            self._calls = {}
            try:
                calls.call(block, index, hidden)
            except _StopBlock:
                pass
            if self._expected is None:
                self._expected = dict(self._calls)
            self._last_input, self._last_terms = None, _NO_TERMS

    def hessian(self, name: str) -> torch.Tensor | None:
        if name not in self.xtx:
            return None
        return symmetric_from_upper(self.xtx[name]) * (2.0 / max(self.tokens[name], 1))

    def act_norms(self, name: str) -> torch.Tensor | None:
        return self.sq[name].sqrt() if name in self.sq else None

    def act_absmax(self, name: str) -> torch.Tensor | None:
        return self.absmax.get(name)

    def pop(self, name: str) -> tuple[torch.Tensor | None, torch.Tensor | None, int]:
        """(hessian, act_norms, tokens) of a linear, whose statistics are then dropped (read act_absmax first)."""
        result = self.hessian(name), self.act_norms(name), self.tokens.get(name, 0)
        self.xtx.pop(name, None)
        self.sq.pop(name, None)
        self.absmax.pop(name, None)
        return result


@torch.inference_mode()
def input_groups(block: nn.Module, index: int, calls: BlockCalls, hidden: torch.Tensor,
                 names: list[str]) -> list[list[str]]:
    """Group linears that read the same input tensor (q/k/v, gate/up), in call order: ``--true-sequential`` order."""
    seen: list[tuple[torch.Tensor, str]] = []  # the inputs stay referenced, so no address is reused meanwhile
    hooks = []
    modules = dict(block.named_modules())
    for name in names:
        def hook(_m: nn.Module, args: tuple, _name: str = name) -> None:
            seen.append((args[0], _name))

        hooks.append(modules[name].register_forward_pre_hook(hook))
    try:
        calls.call(block, index, hidden)
    finally:
        for handle in hooks:
            handle.remove()
    groups: list[list[str]] = []
    group_of: dict[int, list[str]] = {}
    placed: set[str] = set()
    for tensor, name in seen:
        if name in placed:
            continue  # a module called twice keeps its first group
        key = tensor.data_ptr()
        if key not in group_of:
            group_of[key] = []
            groups.append(group_of[key])
        group_of[key].append(name)
        placed.add(name)
    missing = [n for n in names if n not in placed]
    return groups + ([missing] if missing else [])
