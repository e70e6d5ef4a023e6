"""AWQ's scale search on one decoder block (mit-han-lab/llm-awq `auto_scale.py`: `auto_scale_block`, `apply_scale`).

For each scale pair of the block layout (norm → q/k/v, v → o where the shapes match, norm → gate/up, up → down), the
search scores the output of the pair's ``inspect`` module, as the reference does: the whole attention for q/k/v, the
whole MLP for gate/up, the linear itself for o and down. The attention output is what the block passes on, so its
error weighs q, k and v by their effect (an error in k matters through the softmax, one in v linearly), which the
linears' own output errors would not. Every pair is searched on the block as it came in (the trial weights are put back
after each trial), then all scales are folded, as the reference's `auto_scale_block` followed by `apply_scale`.

Calibration: x_max (mean |x| per channel) is taken over every calibration token; the inspected outputs are compared on
the first micro-batches of the pipeline's calibration windows (which are already a seeded random draw from the text)
up to ``max_tokens`` tokens, whole micro-batches only, because attention needs whole sequences. The reference compares
on all 128 x 512 tokens on a GPU; 4096 tokens keep a CPU conversion sane.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qformat.plugin import BlockInput, ScalePair, scale_columns

from ._awq_search import search_scale


@dataclass
class _Calls:
    """The recorded calls of one inspected module (kept ones only) and the running sum of |x| of the pair's input."""

    kept: list[tuple[tuple, dict[str, Any]]] = field(default_factory=list)
    tokens: int = 0
    abs_sum: torch.Tensor | None = None
    count: int = 0


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(_detach(v) for v in value)
    return value


def record_calls(block: BlockInput, pairs: list[ScalePair], max_tokens: int) -> list[_Calls]:
    """One forward of the block over the calibration windows: per pair, x_max statistics of its linears' input and the
    inspected module's calls (args, kwargs) of the first micro-batches up to ``max_tokens`` tokens."""
    modules = dict(block.block.named_modules())
    calls = [_Calls() for _ in pairs]
    handles = []

    def on_input(index: int):
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32)
            record = calls[index]
            total = x.abs().sum(0)
            record.abs_sum = total if record.abs_sum is None else record.abs_sum + total
            record.count += x.shape[0]
        return hook

    def on_inspect(index: int):
        def hook(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            record = calls[index]
            if record.tokens >= max_tokens:
                return
            hidden = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values()), None))
            kept = {k: _detach(v) for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value",
                                                                           "use_cache")}
            record.kept.append((tuple(_detach(a) for a in args), kept))
            record.tokens += hidden.shape[:-1].numel()
        return hook

    try:
        for i, pair in enumerate(pairs):
            handles.append(modules[pair.linears[0]].register_forward_pre_hook(on_input(i)))
            if pair.inspect not in pair.linears:  # a linear's own input is what on_input sees
                handles.append(modules[pair.inspect].register_forward_pre_hook(on_inspect(i), with_kwargs=True))
            else:
                def keep_linear(_module: nn.Module, args: tuple, _i: int = i) -> None:
                    record = calls[_i]
                    if record.tokens < max_tokens:
                        x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32)
                        record.kept.append(((x,), {}))
                        record.tokens += x.shape[0]
                handles.append(modules[pair.inspect].register_forward_pre_hook(keep_linear))
        block.capture([])  # runs the block over the calibration windows; the hooks above record what is needed
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _output(result: Any) -> torch.Tensor:
    return result[0] if isinstance(result, tuple) else result


class _Inspector:
    """The inspected output over the kept calls with trial weights in place of the pair's linears' weights."""

    def __init__(self, block: nn.Module, pair: ScalePair, calls: _Calls) -> None:
        self.module = block.get_submodule(pair.inspect)
        self.linears = [block.get_submodule(name) for name in pair.linears]
        self.is_linear = pair.inspect in pair.linears
        self.calls = calls.kept
        self.reference = [self._run(call) for call in self.calls]
        self.elements = sum(r.numel() for r in self.reference)

    def _run(self, call: tuple[tuple, dict[str, Any]]) -> torch.Tensor:
        args, kwargs = call
        if self.is_linear:
            # The recorded input is already past any input-transform hook of the linear: apply the weight directly.
            return F.linear(args[0], self.module.weight, self.module.bias)
        return _output(self.module(*args, **kwargs)).to(torch.float32)

    def error(self, trial: list[torch.Tensor]) -> float:
        """Mean squared error of the inspected output (the reference's mean over all its elements)."""
        saved = [linear.weight for linear in self.linears]
        try:
            for linear, weight in zip(self.linears, trial, strict=True):
                linear._parameters["weight"] = nn.Parameter(weight, requires_grad=False)
            total = 0.0
            for call, reference in zip(self.calls, self.reference, strict=True):
                total += float((self._run(call) - reference).double().square().sum())
        finally:
            for linear, weight in zip(self.linears, saved, strict=True):
                linear._parameters["weight"] = weight
        return total / max(self.elements, 1)


def scale_block(block: BlockInput, bits: int, group: int, n_grid: int, max_tokens: int) -> list[dict[str, Any]]:
    """Search and fold AWQ scales for every pair of the block's layout whose linears are selected; returns per pair
    what was found (prev, linears, ratio, errors at ratio 0 and at the best)."""
    selected = set(block.linears)
    pairs = [p for p in block.layout if any(name in selected for name in p.linears)]
    if not pairs:
        return []
    calls = record_calls(block, pairs, max_tokens)
    found = []
    with torch.no_grad():
        for pair, record in zip(pairs, calls, strict=True):
            if record.count == 0 or not record.kept:
                continue  # the pair never ran (no calibration tokens reached it)
            x_max = record.abs_sum / record.count
            inspector = _Inspector(block.block, pair, record)
            linears = inspector.linears
            quantized = [name in selected for name in pair.linears]

            def error(trial: list[torch.Tensor], _linears: list[nn.Module] = linears,
                      _quantized: list[bool] = quantized, _inspector: _Inspector = inspector) -> float:
                # A linear of the pair that is not selected keeps its fp32 weight (scaled and unscaled: the same).
                weights = [t if q else m.weight for t, q, m in zip(trial, _quantized, _linears, strict=True)]
                return _inspector.error(weights)

            s, ratio, history = search_scale(x_max, [m.weight.detach() for m in linears], error, bits, group, n_grid)
            found.append((pair, s, {"prev": pair.prev, "linears": list(pair.linears), "ratio": ratio,
                                    "error_ratio0": history[0], "error": min(history)}))
            del inspector
        for pair, s, _ in found:  # fold all at once, after every search saw the block as it came in
            pair.fold(block.block, s)
            for name in pair.linears:
                scale_columns(block.block.get_submodule(name), s)
    return [info for _, _, info in found]
