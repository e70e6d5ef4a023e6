"""Calibration data: a text tokenized once, cut into N seeded random windows of L tokens (GPTQ's protocol)."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConversionError
from ..text import DEFAULT_CALIBRATION

if TYPE_CHECKING:  # torch loads when windows are made, not when the CLI reads DEFAULT_SAMPLES
    import torch

# Sized for a 2-core CPU: 64 x 512 = 32k tokens per block forward.
DEFAULT_SAMPLES = 64
DEFAULT_SEQLEN = 512


@dataclass(frozen=True)
class CalibrationText:
    path: Path
    text: str
    sha256: str
    is_default: bool

    @property
    def label(self) -> str:
        return "qformat default (Wikipedia lead sections, CC BY-SA 4.0)" if self.is_default else self.path.name


def read_text(path: str | Path | None) -> CalibrationText:
    """Read a UTF-8 calibration text (the shipped default when ``path`` is None)."""
    file = Path(path) if path is not None else DEFAULT_CALIBRATION
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise ConversionError(f"cannot read the calibration text {file}: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConversionError(f"the calibration text {file} is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    if not text.strip():
        raise ConversionError(f"the calibration text {file} is empty")
    return CalibrationText(file, text, hashlib.sha256(data).hexdigest(), path is None)


def sample_windows(ids: torch.Tensor, samples: int, seqlen: int, seed: int, *, source: str = "the text") -> torch.Tensor:
    """``samples`` non-overlapping windows of ``seqlen`` tokens at seeded random offsets, shape [samples, seqlen].

    Non-overlapping windows need ``samples * seqlen`` tokens; a shorter text is an error that says by how much.
    """
    if samples < 1 or seqlen < 2:
        raise ConversionError(f"calibration needs at least 1 sample of at least 2 tokens (got {samples} x {seqlen})")
    needed = samples * seqlen
    total = int(ids.numel())
    if total < needed:
        raise ConversionError(f"calibration text too short: {source} has {total:,} tokens, but {samples} samples x "
                              f"{seqlen} tokens need {needed:,}; give a longer --calib text or lower --calib-samples "
                              f"/ --calib-seqlen")
    # Uniform random placement of non-overlapping windows: split the slack into samples+1 random gaps.
    rng = random.Random(seed)
    slack = total - needed
    gaps = sorted(rng.randint(0, slack) for _ in range(samples))
    starts = [gap + k * seqlen for k, gap in enumerate(gaps)]
    import torch

    return torch.stack([ids[s: s + seqlen] for s in starts])
