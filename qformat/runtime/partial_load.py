"""Which prefix of a folder to load (spec/partial.md): a memory budget or a fixed number of stack terms.

    plan = plan_partial(folder, max_memory="60MB")   # BitStack: the most blocks that fit
    plan = plan_partial(folder, keep_terms=2)        # BCQ: the first 2 planes of every weight

Sizes are the bytes of the folder's tensors a load reads (packed weights, statistics, plain tensors such as the
embedding), not Python and activation memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .. import units
from ..errors import LoadError
from ..format import ModelFolder, iter_nodes, partial


def parse_size(value: int | str) -> int:
    """Bytes from ``123456``, ``"60MB"``, ``"1.5 GiB"`` (decimal kB/MB/GB, binary KiB/MiB/GiB)."""
    try:
        return units.parse_size(value, "max_memory")
    except ValueError as exc:
        raise LoadError(str(exc)) from None


@dataclass
class PartialPlan:
    """What a partial load keeps: terms per stacked record, and the bytes read against the folder's total."""

    terms: dict[str, int] = field(default_factory=dict)
    loaded_bytes: int = 0
    full_bytes: int = 0
    smallest_bytes: int = 0
    budget: int | None = None
    planes: int | None = None  # every bit-plane code read at this many planes (records in ``plane_records``)
    plane_records: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        kept = sum(self.terms.values())
        return {"stacked_records": len(self.terms), "terms_kept": kept, "loaded_bytes": self.loaded_bytes,
                "full_bytes": self.full_bytes, "smallest_bytes": self.smallest_bytes, "budget": self.budget,
                "planes": self.planes, "plane_records": len(self.plane_records)}


def plan_partial(folder: ModelFolder, max_memory: int | str | None = None, keep_terms: int | None = None,
                 planes: int | None = None) -> PartialPlan | None:
    """The plan for ``max_memory`` (the largest prefix of the file's stack order that fits), ``keep_terms`` (the
    same count for every stack) or ``planes`` (every bit-plane code read at that many planes); None when none is
    given. A folder without stacks loads whole (a budget it exceeds is an error naming both sizes)."""
    given = [name for name, value in (("max_memory", max_memory), ("keep_terms", keep_terms), ("planes", planes))
             if value is not None]
    if not given:
        return None
    if len(given) > 1:
        raise LoadError(f"give one of max_memory, keep_terms, planes, not {' and '.join(given)}")
    if planes is not None:
        return _plan_planes(folder, planes)
    records = folder.records
    sizes = {}
    for name, record in records.items():
        qt = folder.quantized(name)  # memory-mapped: sizes without reading
        sizes[name] = partial.term_bytes(record, qt.tensor_info, folder.registry)
    plain = sum(int(folder.tensor(n).nbytes) for n in folder.plain_names)
    base = plain + sum(s[0] for s in sizes.values())
    full = plain + sum(sum(s) for s in sizes.values())
    stacked = {name: r for name, r in records.items() if partial.stack_node(r) is not None}
    if keep_terms is not None:
        if isinstance(keep_terms, bool) or not isinstance(keep_terms, int) or keep_terms < 1:
            raise LoadError(f"keep_terms must be an integer >= 1, got {keep_terms!r}")
        terms = {name: min(keep_terms, len(sizes[name])) for name in stacked}
        loaded = plain + sum(sum(sizes[n][:terms.get(n, len(sizes[n]))]) for n in records)
        return PartialPlan(terms, loaded, full, base)
    budget = parse_size(max_memory)  # type: ignore[arg-type]
    try:
        terms, loaded = partial.plan_terms(stacked, lambda name, i: sizes[name][i], base, budget)
    except ValueError as exc:
        raise LoadError(f"{folder.root}: {exc}") from None
    return PartialPlan(terms, loaded, full, base, budget)


def _plan_planes(folder: ModelFolder, planes: int) -> PartialPlan:
    if isinstance(planes, bool) or not isinstance(planes, int) or planes < 1:
        raise LoadError(f"planes must be an integer >= 1, got {planes!r}")
    plain = sum(int(folder.tensor(n).nbytes) for n in folder.plain_names)
    loaded = full = plain
    cut = []
    for name, record in folder.records.items():
        qt = folder.quantized(name)
        size = sum(int(a.nbytes) for a in qt.tensors.values())
        full += size
        cut_planes = [n for n in iter_nodes(record.get("weight")) if n.get("codec") == "bitplanes" and n.get("bits", 0) > planes]
        if cut_planes:  # bytes read from the file: the kept planes' prefix and the statistics as stored
            qt.use_planes(planes)  # refuses here, before any model is built, a record it cannot rewrite
            cut.append(name)
            size -= sum(int(qt.tensors[n["tensor"]].nbytes) * (n["bits"] - planes) // n["bits"] for n in cut_planes)
        loaded += size
    if not cut:
        raise LoadError(f"{folder.root}: planes={planes}: no record stores codes as more than {planes} bit-planes "
                        "(convert with -p planes=true)")
    return PartialPlan({}, loaded, full, loaded, None, planes, cut)
