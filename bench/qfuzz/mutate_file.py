"""Structure-aware mutations of one qformat file (a :class:`FileSample`).

Four families, picked by weight and stacked 1-4 per case:

* JSON: integers to extremes, type swaps, deleted/added/duplicated keys, deep nesting, node chains, codec and version
  changes, tensor references redirected, subtrees copied or repeated, nodes wrapped in new ones, records renamed
  (consistently, with lone surrogates and odd unicode), metadata and format_version edits.
* Semantics: ``group_shape`` / shapes / ranks made huge with the parameter tensors resized to still match, CSR
  ``row_ptr`` patterns that wrap around int64, permutations with duplicates and extremes, generated records whose
  decode is much larger than the file (low rank, empty CSR, vector codebooks, sums of repeated subtrees).
* Tensor data: flipped bytes, integer extremes, NaN/Inf, dtype changes, reshapes, dropped and duplicated tensors.
* Container: data_offsets, header length, truncation, trailing bytes, corrupted header bytes.

Every choice comes from the case's ``random.Random``, so a case id reproduces its bytes.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from .mutate_base import EXTREME_INTS, NEST_DEPTHS, ODD_VALUES
from .mutate_data import DataMutations
from .mutate_json import JsonMutations
from .mutate_semantic import SemanticMutations
from .sample import FileSample

__all__ = ["EXTREME_INTS", "NEST_DEPTHS", "ODD_VALUES", "FileMutator"]


class FileMutator(JsonMutations, SemanticMutations, DataMutations):
    """Applies weighted random mutations to a sample; :meth:`run` returns what it did, one line per mutation."""

    def __init__(self, rng: random.Random, sample: FileSample) -> None:
        super().__init__(rng, sample)
        self.table: list[tuple[float, Callable[[], str | None]]] = [
            (6, self.m_int_extreme), (4, self.m_type_swap), (3, self.m_delete_key), (3, self.m_add_key),
            (2, self.m_duplicate_key), (1.5, self.m_deep_nest), (1.5, self.m_node_chain), (3, self.m_codec),
            (4, self.m_tensor_ref), (3, self.m_copy_subtree), (2, self.m_repeat_refs), (4, self.m_wrap_node),
            (3, self.m_rename_record), (2, self.m_rename_tensor), (1, self.m_unicode_mode), (2, self.m_record_fields),
            (2, self.m_qmeta), (2, self.m_metadata),
            (6, self.m_group_shape), (4, self.m_node_shape), (5, self.m_csr), (3, self.m_perm),
            (2, self.m_gen_lowrank), (2, self.m_gen_empty_csr), (1.5, self.m_gen_vq), (1.5, self.m_gen_sum),
            (6, self.m_flip_bytes), (5, self.m_int_values), (3, self.m_float_specials), (4, self.m_retype),
            (3, self.m_reshape), (2, self.m_tensor_set),
            (2, self.m_entry), (2, self.m_offsets), (2, self.m_container),
        ]
        self.total = sum(w for w, _ in self.table)

    def pick_mutation(self) -> Callable[[], str | None]:
        x = self.rng.random() * self.total
        for weight, fn in self.table:
            x -= weight
            if x < 0:
                return fn
        return self.table[-1][1]

    def run(self, count: int) -> list[str]:
        done = []
        for _ in range(count):
            for _attempt in range(12):
                fn = self.pick_mutation()
                try:
                    what = fn()
                except Exception as exc:
                    what = f"MUTATOR ERROR {type(exc).__name__}: {exc}"[:200]
                if what:
                    done.append(f"{fn.__name__[2:]}: {what}")
                    break
        return done
