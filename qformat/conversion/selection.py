"""Which modules are quantized: decoder-block linears by default; ``--include`` / ``--exclude`` glob patterns.

A pattern is an ``fnmatch`` glob over module names; it matches a module if it matches the full name
(``model.layers.0.mlp.down_proj``) or any dotted suffix of it (``down_proj``, ``mlp.*``, ``layers.1*.self_attn.*``).
Candidates are every ``nn.Linear`` inside the decoder blocks plus the ``nn.Linear`` / ``nn.Embedding`` modules outside
them (``lm_head``, ``model.embed_tokens``); the latter are quantized only when an ``--include`` names them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from torch import nn

from ..errors import ConversionError
from .source import Skeleton


@dataclass(frozen=True)
class Selection:
    block_linears: dict[int, list[str]]  # block index -> module names relative to the block, in module order
    outside: list[str]  # full names of selected modules outside the blocks (lm_head, embeddings)

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.block_linears.values()) + len(self.outside)

    def names(self, blocks_prefix: str) -> list[str]:
        inside = [f"{blocks_prefix}.{i}.{n}" for i, names in sorted(self.block_linears.items()) for n in names]
        return inside + self.outside


def matches(name: str, pattern: str) -> bool:
    parts = name.split(".")
    return any(fnmatchcase(".".join(parts[i:]), pattern) for i in range(len(parts)))


def select_modules(skeleton: Skeleton, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> Selection:
    inside: list[tuple[int, str, str]] = []  # (block, relative, full)
    for index, block in enumerate(skeleton.blocks):
        for rel, module in block.named_modules():
            if isinstance(module, nn.Linear):
                inside.append((index, rel, f"{skeleton.blocks_prefix}.{index}.{rel}"))
    block_ids = {id(m) for b in skeleton.blocks for m in b.modules()}
    outside = [name for name, module in skeleton.model.named_modules()
               if isinstance(module, (nn.Linear, nn.Embedding)) and id(module) not in block_ids]
    candidates = [full for _, _, full in inside] + outside
    for kind, patterns in (("--include", include), ("--exclude", exclude)):
        for pattern in patterns:
            if not any(matches(name, pattern) for name in candidates):
                examples = ", ".join(candidates[:3] + outside)
                raise ConversionError(f"{kind} {pattern!r} matches no quantizable module (modules look like: "
                                      f"{examples})")

    def chosen(name: str, default: bool) -> bool:
        picked = any(matches(name, p) for p in include) if include else default
        return picked and not any(matches(name, p) for p in exclude)

    blocks: dict[int, list[str]] = {}
    for index, rel, full in inside:
        if chosen(full, True):
            blocks.setdefault(index, []).append(rel)
    selection = Selection(blocks, [name for name in outside if chosen(name, False)])
    if not selection.count:
        raise ConversionError("the --include/--exclude patterns select no module to quantize")
    return selection
