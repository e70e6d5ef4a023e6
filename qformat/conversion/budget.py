"""A size budget: per-layer mixed precision across installed methods, chosen to minimise the estimated loss.

``qformat convert --target-bits 3.25`` (or ``--target-size 80MB``) quantizes every selected linear with every
candidate configuration on the original model's calibration activations, measures each one's bytes (as the file will
hold them) and its estimated loss, then picks one candidate per layer minimising the summed estimate under the budget:

- estimate ``output``: the layer's output error on the calibration tokens, ``e = tr(ΔW H ΔWᵀ)`` with H the layer's
  ``2/N Σ x xᵀ`` (what GPTQ minimises; HAWQ-V2 weighs ``‖ΔW‖²`` by the Hessian trace instead, here the activation
  Hessian plays that role exactly rather than through its trace);
- estimate ``relative``: ``e / tr(W H Wᵀ)``, every layer's relative output error counted alike;
- estimate ``loss`` (default): ``g · e`` with ``g`` the layer's measured gain from output error to model loss: each
  layer alone is given one probe candidate's error in the full-precision model and the rise of the calibration loss
  divided by the probe's ``e`` (one forward of a few calibration windows per layer, the whole model in memory once:
  the cost grows as layers x model size, so on large models use ``output`` or pass earlier ``--measurements``).
  Output errors of different layers are not worth the same: measured on all-MiniLM-L6-v2 and SmolLM2, allocating by
  ``output`` or ``relative`` alone lost to the best uniform configuration of the same size (bench/QUALITY_NOTES.md).

The choice is an exact multiple-choice knapsack by dynamic programming over bytes counted in units of
``budget / RESOLUTION`` (each candidate's bytes rounded *up* to whole units, so the chosen total is within the budget
by construction; it is asserted again on the true byte counts). The plan is a plain JSON document saved in the partial
conversion: a killed run reuses it instead of measuring again.

Candidates are ``METHOD[:key=value,...]`` specs, plus the pipeline's own keys ``sidecar_rank`` and ``sidecar_bits``
(a low-rank sidecar of the error, :mod:`qformat.sidecar`). Methods that rewrite whole blocks (a block transform, a
block tuning stage) cannot be mixed per layer and are refused as candidates.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import units
from ..errors import ParameterError
from ..methods import Method, MethodConfig
from ..sidecar import SIDECAR_BITS
from .transform_chain import parse_spec

RESOLUTION = 20000  # byte units of the knapsack: the allocation is optimal up to budget / RESOLUTION bytes
ESTIMATES = ("loss", "output", "relative")
DEFAULT_ESTIMATE = "loss"
PLAN_VERSION = 1
# The default grid: every installed built-in that quantizes one linear at a time at a few widths, group sizes the
# kernels run fast, and low-rank sidecars on the 2- and 3-bit bases. GPTQ dominates RTN at equal bytes on most layers
# but not all (measured: bench/quality.py budget rows), so both stay.
DEFAULT_CANDIDATES = (
    "rtn:bits=2,group_size=64", "rtn:bits=3,group_size=128", "rtn:bits=4,group_size=128", "rtn:bits=5,group_size=128",
    "rtn:bits=6,group_size=128", "rtn:bits=8,group_size=-1",
    "gptq:bits=2,group_size=64", "gptq:bits=3,group_size=128", "gptq:bits=3,group_size=64",
    "gptq:bits=4,group_size=128", "gptq:bits=4,group_size=64", "gptq:bits=5,group_size=128",
    "nf4:group_size=64", "hqq:bits=3,group_size=64", "hqq:bits=4,group_size=64",
    "gptq:bits=2,group_size=64,sidecar_rank=16", "gptq:bits=3,group_size=128,sidecar_rank=16",
)
SIDE_KEYS = ("sidecar_rank", "sidecar_bits")


@dataclass(frozen=True)
class Candidate:
    """One configuration a layer may get: a method, its config, and a sidecar rank (0: none)."""

    method: Method
    config: MethodConfig
    sidecar_rank: int = 0
    sidecar_bits: int = 16

    @property
    def label(self) -> str:
        defaults = {p.name: p.default for p in self.config.params()}
        shown = ("bits", "group_size")  # always said, so a label reads on its own ("rtn:bits=4,group_size=128")
        given = [f"{k}={v}" for k, v in self.config.to_params().items() if k in shown or defaults.get(k) != v]
        if self.sidecar_rank:
            given.append(f"sidecar_rank={self.sidecar_rank}")
            if self.sidecar_bits != 16:
                given.append(f"sidecar_bits={self.sidecar_bits}")
        return self.method.name + (":" + ",".join(given) if given else "")

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method.name, "params": self.config.to_params(), "version": self.config.version,
                "sidecar_rank": self.sidecar_rank, "sidecar_bits": self.sidecar_bits}


def parse_size(text: str | int) -> int:
    """``80MB``, ``1.5GiB``, ``123456`` → bytes (decimal units for kB/MB/GB, binary for KiB/MiB/GiB)."""
    try:
        return units.parse_size(text, "--target-size")
    except ValueError as exc:
        raise ParameterError(str(exc)) from None


def parse_candidate(spec: str | Candidate) -> Candidate:
    """``METHOD[:key=value,...]`` with the method's parameters and ``sidecar_rank`` / ``sidecar_bits``."""
    from ..plugins import get_method

    if isinstance(spec, Candidate):
        return spec
    name, params = parse_spec(spec, "--candidate")
    method = get_method(name)
    if method.transforms or method.tunes_blocks:
        raise ParameterError(f"--candidate {spec!r}: method {name!r} rewrites whole blocks (a block transform or a "
                             "block tuning stage), so it cannot be chosen layer by layer; use it alone with --method")
    rank = _side_int(spec, params.pop("sidecar_rank", "0"), "sidecar_rank", 0, 4096)
    bits = _side_int(spec, params.pop("sidecar_bits", "16"), "sidecar_bits", 8, 16)
    if bits not in SIDECAR_BITS:
        raise ParameterError(f"--candidate {spec!r}: sidecar_bits is 8 or 16, got {bits}")
    try:
        config = method.validate_params(params)
    except ParameterError as exc:
        raise ParameterError(f"--candidate {spec!r}: {exc}") from None
    return Candidate(method, config, rank, bits)


def _side_int(spec: str, value: Any, key: str, low: int, high: int) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ParameterError(f"--candidate {spec!r}: {key} must be an integer, got {value!r}") from None
    if not low <= number <= high:
        raise ParameterError(f"--candidate {spec!r}: {key} must lie in [{low}, {high}], got {number}")
    return number


def resolve_candidates(specs: Sequence[str | Candidate], method: str | None) -> list[Candidate]:
    """The candidate set: ``specs`` as given, else the default grid narrowed to ``method`` (a method outside the
    grid gets its default config at 2, 3, 4, 5, 6 and 8 bits where it has a ``bits`` parameter)."""
    from ..plugins import get_method

    if specs:
        chosen = [parse_candidate(s) for s in specs]
    elif method:
        chosen = [parse_candidate(s) for s in DEFAULT_CANDIDATES if parse_spec(s)[0] == method]
        if not chosen:
            declared = {p.name: p for p in get_method(method).params}
            bits = declared.get("bits")
            widths = [b for b in (2, 3, 4, 5, 6, 8) if bits is not None and (bits.min is None or b >= bits.min)
                      and (bits.max is None or b <= bits.max)]
            chosen = [parse_candidate(f"{method}:bits={b}") for b in widths] or [parse_candidate(method)]
    else:
        from ..plugins import get_plugins

        installed = set(get_plugins().methods)
        chosen = [parse_candidate(s) for s in DEFAULT_CANDIDATES if parse_spec(s)[0] in installed]
    labels = [c.label for c in chosen]
    if len(set(labels)) != len(labels):
        dup = next(label for label in labels if labels.count(label) > 1)
        raise ParameterError(f"--candidate {dup!r} is given twice")
    if not chosen:
        raise ParameterError("the budget allocation has no candidate configuration")
    return chosen


@dataclass
class LayerCosts:
    """Every candidate's stored bytes and estimated loss for one layer (same order as the candidates)."""

    name: str
    weights: int
    bytes: list[int]
    errors: list[float]  # tr(ΔW H ΔWᵀ) per candidate
    reference: float = 1.0  # tr(W H Wᵀ)
    gain: float | None = None  # loss per unit of output error (estimate "loss")

    def estimates(self, estimate: str) -> list[float]:
        """The estimated loss of each candidate under ``estimate`` (see the module docstring)."""
        if estimate == "output":
            factor = 1.0
        elif estimate == "relative":
            factor = 1.0 / max(self.reference, 1e-30)
        elif estimate == "loss":
            if self.gain is None:
                raise ParameterError(f"{self.name}: no measured loss gain for the 'loss' estimate")
            factor = self.gain
        else:
            raise ParameterError(f"unknown budget estimate {estimate!r}; one of {list(ESTIMATES)}")
        return [e * factor for e in self.errors]

    def scored(self, estimate: str) -> LayerCosts:
        return LayerCosts(self.name, self.weights, self.bytes, self.estimates(estimate), self.reference, self.gain)


def allocate(layers: Sequence[LayerCosts], budget: int, resolution: int = RESOLUTION) -> list[int]:
    """One candidate index per layer minimising the summed error with the summed bytes at most ``budget``
    (multiple-choice knapsack, exact on bytes rounded up to ``budget / resolution`` units)."""
    if not layers:
        return []
    smallest = sum(min(layer.bytes) for layer in layers)
    if smallest > budget:
        raise ParameterError(f"the budget of {budget} bytes is below the smallest candidate of every layer "
                             f"({smallest} bytes); raise the target or add smaller candidates")
    unit = max(1, math.ceil(budget / resolution))
    capacity = budget // unit
    best = np.zeros(capacity + 1)  # best[u]: least error with at most u units, over the layers so far
    choices = np.zeros((len(layers), capacity + 1), dtype=np.int16)
    for i, layer in enumerate(layers):
        row = np.full(capacity + 1, np.inf)
        for c, (size, error) in enumerate(zip(layer.bytes, layer.errors, strict=True)):
            cost = math.ceil(size / unit)
            if cost > capacity or not math.isfinite(error):
                continue
            trial = np.full(capacity + 1, np.inf)
            trial[cost:] = best[: capacity + 1 - cost] + error
            better = trial < row
            row[better] = trial[better]
            choices[i, better] = c
        best = row
    for layer in layers:
        if not any(math.isfinite(e) for e in layer.errors):
            raise ParameterError(f"{layer.name}: no candidate has a finite estimate ({layer.errors[:3]}...)")
    if not math.isfinite(best[capacity]):  # rounding up made the smallest total exceed the budget: one unit per layer
        raise ParameterError(f"the budget of {budget} bytes is too tight to allocate in {unit}-byte units across "
                             f"{len(layers)} layers; raise the target")
    picked, units_left = [0] * len(layers), capacity
    for i in range(len(layers) - 1, -1, -1):
        c = int(choices[i, units_left])
        picked[i] = c
        units_left -= math.ceil(layers[i].bytes[c] / unit)
    total = sum(layer.bytes[c] for layer, c in zip(layers, picked, strict=True))
    assert total <= budget, (total, budget)  # each pick's bytes were rounded up: the true total cannot exceed it
    return picked


def uniform_errors(layers: Sequence[LayerCosts], index: int) -> tuple[int, float]:
    """(bytes, summed error) of giving every layer candidate ``index``: the uniform configuration it competes with."""
    return sum(layer.bytes[index] for layer in layers), float(sum(layer.errors[index] for layer in layers))


def make_plan(candidates: Sequence[Candidate], layers: Sequence[LayerCosts], budget: int, target: Mapping[str, Any],
              estimate: str) -> dict[str, Any]:
    """The allocation as a JSON document: what was measured (raw output errors, references, gains), the budget, and
    the choice per layer under ``estimate``."""
    scored = [layer.scored(estimate) for layer in layers]
    picked = allocate(scored, budget)
    chosen_bytes = sum(layer.bytes[c] for layer, c in zip(layers, picked, strict=True))
    weights = sum(layer.weights for layer in layers)
    return {
        "plan_version": PLAN_VERSION, "target": dict(target), "estimate": estimate, "budget_bytes": budget,
        "candidates": [c.to_dict() | {"label": c.label} for c in candidates],
        "layers": {layer.name: {"choice": candidates[c].label, "bytes": layer.bytes, "errors": layer.errors,
                                "weights": layer.weights, "reference": layer.reference, "gain": layer.gain}
                   for layer, c in zip(layers, picked, strict=True)},
        "chosen_bytes": chosen_bytes, "bits_per_weight": 8 * chosen_bytes / max(weights, 1),
        "estimated_error": float(sum(layer.errors[c] for layer, c in zip(scored, picked, strict=True))),
    }


def plan_choices(plan: Mapping[str, Any], candidates: Sequence[Candidate]) -> dict[str, Candidate]:
    """Weight name → candidate, from a saved plan; a plan naming a candidate not in ``candidates`` is refused."""
    by_label = {c.label: c for c in candidates}
    out = {}
    for name, entry in plan["layers"].items():
        label = entry.get("choice")
        if label not in by_label:
            raise ParameterError(f"the saved allocation gives {name} the candidate {label!r}, which is not among "
                                 "this run's candidates; pass --restart")
        out[name] = by_label[label]
    return out


def allocation_summary(plan: Mapping[str, Any]) -> dict[str, Any]:
    """What quantization_config and the model card say of an allocation: the target, the estimate, the bits reached
    and the configuration per module (weight name without ``.weight``)."""
    return {"target": plan["target"], "estimate": plan["estimate"], "budget_bytes": plan["budget_bytes"],
            "allocated_bits_per_weight": round(plan["bits_per_weight"], 4),
            "candidates": [c["label"] for c in plan["candidates"]],
            "layers": {name.removesuffix(".weight"): entry["choice"] for name, entry in plan["layers"].items()}}
