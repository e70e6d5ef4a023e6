"""What a source's config.json and model card say about the model an importer rebuilds: the weight dtype of its
records, the [out, in] shape a standard linear must have, and the model it was quantized from."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

DTYPE_NAMES = {"float16": "F16", "half": "F16", "bfloat16": "BF16", "float32": "F32", "float": "F32"}
_ATTENTION = re.compile(r"(?:^|\.)self_attn\.([qkvo])_proj$")
_MLP = re.compile(r"(?:^|\.)mlp\.(gate|up|down)_proj$")
_FRONT_MATTER = re.compile(r"\A---\s*\n(.*?)\n---\s*(?:\n|\Z)", re.S)


def record_dtype(config: dict[str, Any], fallback: str = "F16") -> str:
    """The dtype the model computes in (``torch_dtype``, or transformers 5's ``dtype``) as a record dtype."""
    for key in ("torch_dtype", "dtype"):
        name = config.get(key)
        if isinstance(name, str) and name.removeprefix("torch.") in DTYPE_NAMES:
            return DTYPE_NAMES[name.removeprefix("torch.")]
    return fallback


def linear_shape(config: dict[str, Any], module: str) -> tuple[int, int] | None:
    """[out, in] of a standard decoder linear (``…self_attn.q_proj``, ``…mlp.down_proj``, ``lm_head``) as the
    config defines it, or None for a module the config does not pin down (experts, vision towers, other names)."""
    hidden, inter = config.get("hidden_size"), config.get("intermediate_size")
    heads = config.get("num_attention_heads")
    if not isinstance(hidden, int) or not isinstance(heads, int) or heads <= 0:
        return None
    head_dim = config.get("head_dim") if isinstance(config.get("head_dim"), int) else hidden // heads
    kv = config.get("num_key_value_heads") if isinstance(config.get("num_key_value_heads"), int) else heads
    if module == "lm_head":
        vocab = config.get("vocab_size")
        return (vocab, hidden) if isinstance(vocab, int) else None
    match = _ATTENTION.search(module)
    if match:
        return {"q": (heads * head_dim, hidden), "k": (kv * head_dim, hidden), "v": (kv * head_dim, hidden),
                "o": (hidden, heads * head_dim)}[match.group(1)]
    match = _MLP.search(module)
    if match and isinstance(inter, int):
        return {"gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter)}[match.group(1)]
    return None


def card_base_model(folder: Path) -> str | None:
    """``base_model`` of the folder's README.md card (YAML front matter: a string or the first of a list)."""
    try:
        text = (Path(folder) / "README.md").read_text(encoding="utf-8", errors="replace")[:200_000]
    except OSError:
        return None
    match = _FRONT_MATTER.match(text)
    if not match:
        return None
    lines = match.group(1).splitlines()
    for i, line in enumerate(lines):
        found = re.match(r"base_model\s*:\s*(.*)$", line)
        if not found:
            continue
        value = found.group(1).strip()
        if not value:  # a block list on the next lines
            for item in lines[i + 1:]:
                listed = re.match(r"\s*-\s*(\S.*)$", item)
                if listed:
                    value = listed.group(1).strip()
                    break
                if item.strip():
                    return None
        elif value.startswith("["):
            value = value.strip("[]").split(",")[0].strip()
        value = value.strip("'\"")
        return value or None
    return None
