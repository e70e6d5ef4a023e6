"""``qformat convert --eval``: perplexity of the source and the converted model on a text, and a short generation.

The converted model is loaded through :func:`qformat.runtime.loader.load_dequantized` (the format's reference decode), so the
numbers describe what the written folder holds. Both models are loaded whole: this runs after the streaming
conversion and its peak memory is reported separately.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ConversionError
from ..text import DEFAULT_EVAL
from .source import ModelSource

DEFAULT_PROMPT = "The history of the city begins"


@dataclass
class EvalReport:
    text: str  # label of the evaluation text
    seqlen: int
    windows: int
    ppl_before: float
    ppl_after: float
    prompt: str
    sample_before: str
    sample_after: str

    def card_results(self) -> dict[str, Any]:
        return {f"perplexity ({self.text}, {self.windows} x {self.seqlen} tokens)":
                {"before": round(self.ppl_before, 4), "after": round(self.ppl_after, 4)}}


def resolve_eval_text(path: str | os.PathLike | None) -> Path:
    file = Path(path) if path not in (None, "default") else DEFAULT_EVAL
    if not file.is_file() or not os.access(file, os.R_OK):
        raise ConversionError(f"cannot read the evaluation text {file}")
    return file


def _generate(model: Any, tokenizer: Any, prompt: str, tokens: int) -> str:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def evaluate_conversion(source: ModelSource, out: Path, text: Path, *, windows: int | None = 8, seqlen: int = 2048,
                        prompt: str = DEFAULT_PROMPT, new_tokens: int = 32) -> EvalReport:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..runtime.evaluate import perplexity, tokenize_file
    from ..runtime.loader import load_dequantized

    tokenizer = AutoTokenizer.from_pretrained(str(out))
    seqlen = min(seqlen, int(source.config.get("max_position_embeddings") or seqlen))
    ids = tokenize_file(tokenizer, text)
    if ids.numel() < seqlen:
        raise ConversionError(f"the evaluation text {text} has {ids.numel()} tokens, fewer than one {seqlen}-token "
                              "window")
    before_model = AutoModelForCausalLM.from_pretrained(str(source.folder), dtype=torch.float32).eval()
    before = perplexity(before_model, ids, seqlen, windows)
    sample_before = _generate(before_model, tokenizer, prompt, new_tokens)
    del before_model
    after_model = load_dequantized(out).eval()
    after = perplexity(after_model, ids, seqlen, windows)
    sample_after = _generate(after_model, tokenizer, prompt, new_tokens)
    label = "qformat default eval text" if text == DEFAULT_EVAL else text.name
    return EvalReport(label, seqlen, before.windows, before.ppl, after.ppl, prompt, sample_before, sample_after)


def add_results_to_card(out: Path, source: ModelSource, report: EvalReport) -> None:
    """Re-render the folder's README.md with the measured quality (one atomic file replace)."""
    try:
        from ..model_card import render_model_card
    except ImportError:
        return
    text = render_model_card(out, source_card_metadata=source.card_metadata(), eval_results=report.card_results())
    fd, tmp = tempfile.mkstemp(prefix=".README.md.", dir=out)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, out / "README.md")
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
