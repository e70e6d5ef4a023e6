"""Quality measurements with the standard protocol (GPTQ's): non-overlapping windows, exp of mean token cross-entropy."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..text import read_text_file, tokenize


def tokenize_text(tokenizer: Any, text: str) -> torch.Tensor:
    """The ids of a whole text (no special tokens) as the protocol prescribes: one tokenization of the whole text,
    computed in pieces checked to concatenate to it (less memory; see :func:`qformat.text.tokenize`)."""
    return tokenize(tokenizer, text)


def tokenize_file(tokenizer: Any, path: str | Path) -> torch.Tensor:
    """The ids of a whole UTF-8 text file (see :func:`tokenize_text`; file errors as :func:`read_text_file`)."""
    return tokenize_text(tokenizer, read_text_file(path))


def windows(ids: torch.Tensor, seqlen: int, limit: int | None = None) -> Iterator[torch.Tensor]:
    """Non-overlapping windows of ``seqlen`` tokens; the remainder is dropped."""
    if seqlen < 2:  # a one-token window predicts nothing: its loss is the mean of nothing
        raise ValueError(f"a window needs at least 2 tokens, got seqlen={seqlen}")
    count = ids.numel() // seqlen
    if limit is not None:
        count = min(count, limit)
    for i in range(count):
        yield ids[i * seqlen: (i + 1) * seqlen]


@dataclass
class Perplexity:
    ppl: float
    mean_nll: float
    windows: int
    tokens: int


@torch.inference_mode()
def perplexity(model: Any, ids: torch.Tensor, seqlen: int = 2048, limit: int | None = None) -> Perplexity:
    """exp of the mean per-window loss, each loss = CE(logits[:-1], ids[1:])."""
    losses = []
    device = next(model.parameters()).device
    for window in windows(ids, seqlen, limit):
        logits = model(window[None].to(device)).logits[0].float()
        losses.append(F.cross_entropy(logits[:-1], window[1:].to(device)).item())
    if not losses:
        raise ValueError(f"text has fewer than {seqlen} tokens: no evaluation window")
    mean = sum(losses) / len(losses)
    return Perplexity(math.exp(mean), mean, len(losses), len(losses) * seqlen)


@dataclass
class Agreement:
    kl_divergence: float  # mean over tokens of KL(source || quantized)
    top1_agreement: float
    tokens: int


@torch.inference_mode()
def compare_to_source(model: Any, source: Any, ids: torch.Tensor, seqlen: int = 2048,
                      limit: int | None = None) -> Agreement:
    """KL divergence of the quantized model's next-token distribution from the source's, and top-1 agreement."""
    kl_sum, agree, tokens = 0.0, 0, 0
    device = next(model.parameters()).device
    for window in windows(ids, seqlen, limit):
        batch = window[None].to(device)
        log_q = F.log_softmax(model(batch).logits[0].float(), dim=-1)
        log_p = F.log_softmax(source(batch).logits[0].float(), dim=-1)
        kl_sum += F.kl_div(log_q, log_p, log_target=True, reduction="sum").item()
        agree += (log_q.argmax(-1) == log_p.argmax(-1)).sum().item()
        tokens += window.numel()
    if not tokens:
        raise ValueError(f"text has fewer than {seqlen} tokens: no evaluation window")
    return Agreement(kl_sum / tokens, agree / tokens, tokens)


def folder_perplexity(folder: str | Path, text: str | Path, *, windows: int | None = 8,
                      seqlen: int = 2048) -> dict[str, Any]:
    """Perplexity of a qformat folder through the kernels the dispatcher picks, on a UTF-8 text file, with the
    folder's own tokenizer (``qformat convert --method import --eval``: an import has no unquantized source)."""
    from transformers import AutoTokenizer

    from .loader import load

    model = load(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenize_file(tokenizer, text)
    result = perplexity(model, ids, seqlen=seqlen, limit=windows)
    return {"ppl": result.ppl, "windows": result.windows, "seqlen": seqlen, "text": Path(text).name}
