"""Which lowered trees the Numba kernels run, decided from the record alone (no tensor data, no numba import).

The tree is lowered by :mod:`qformat.lowering` (the grammar is there). The Numba kernels run every term kind:
permutations and column scales become a gather and a multiplication of x, row and grid factors multiply into the
terms below them. A grid factor needs the columns of its term unpermuted and unscaled, and only code, codebook and
sparse terms take one; those two cases are refused (the torch reference path runs them). A ``concat`` part is a
gather of its block of x's columns (a :class:`~qformat.lowering.Columns` in the chain), its terms as wide as the part:
SliM-LLM's ``permute(concat(affine, ...))`` runs as one product per part.
"""

from __future__ import annotations

from qformat.lowering import Columns, Permute, Plan, Unsupported, plan


def refusal(lowered: Plan) -> str | None:
    """Why the Numba kernels cannot run these terms, or None."""
    for term in lowered.terms:
        below = False  # a permutation or column scale between the term and the transform at hand
        for transform in reversed(term.transforms):  # innermost first
            if isinstance(transform, (Permute, Columns)) or transform.kind == "column":
                below = True
            elif transform.kind == "grid":
                if below:
                    return f"{transform.path}: a grouped scale over a permuted or column-scaled input"
                if term.kind in ("lowrank", "signs"):
                    return f"{transform.path}: a grouped scale over {term.kind}"
    return None


def why_unsupported(record: dict) -> str | None:
    """None when the Numba kernels handle ``record``, else the reason."""
    try:
        return refusal(plan(record))
    except Unsupported as exc:
        return str(exc)



def stream_form(record: dict) -> bool:
    """Whether ``record`` is a lut over a ternary_dict stream (QMoE, sub-1-bit) with a per-row or global table and
    nothing else: ``numba_stream`` runs it from the codewords (the lowering, which expands codes, does not)."""
    node = record.get("weight")
    if not isinstance(node, dict) or node.get("codec") != "lut":
        return False
    codes, table = node.get("codes"), node.get("table")
    if not isinstance(codes, dict) or codes.get("codec") != "ternary_dict":
        return False
    if not isinstance(table, dict) or table.get("codec") != "tensor":
        return False
    group = node.get("group_shape")
    return group is None or (group[0] == 1 and group[1] == codes["shape"][1])
