"""Shared fixtures (kept small; ask the conformance/format-tooling owner to add more)."""

from __future__ import annotations

import os

# Before anything imports triton: without a GPU, Triton kernels run in the interpreter. Wide rich output so tests can
# match whole lines.
os.environ.setdefault("COLUMNS", "250")
# Decided without importing torch, which may import triton itself.
if not os.environ.get("TRITON_INTERPRET") and not os.path.exists("/dev/nvidiactl"):
    os.environ["TRITON_INTERPRET"] = "1"

import numpy as np
import pytest

from qformat.format import QuantizedTensor, RecordBuilder


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def make_affine_record(name: str = "model.layers.0.mlp.up_proj.weight", shape: tuple[int, int] = (4, 40),
                       bits: int = 4, group: int = 16, seed: int = 0) -> QuantizedTensor:
    """A small valid record: `bits`-bit codes, fp16 scale and zero per group of `group` input columns."""
    rng = np.random.default_rng(seed)
    rows, cols = shape
    groups = -(-cols // group)
    b = RecordBuilder(name, shape, "F16")
    codes = b.packed("codes", rng.integers(0, 1 << bits, size=shape), bits)
    scale = b.tensor("scale", (np.abs(rng.standard_normal((rows, groups))) * 0.02 + 0.01).astype(np.float16))
    zero = b.tensor("zero", rng.integers(0, 1 << bits, size=(rows, groups)).astype(np.float16))
    return b.finish(b.affine(codes, scale=scale, zero=zero, bits=bits, group_shape=(1, group)))


@pytest.fixture
def affine_record() -> QuantizedTensor:
    return make_affine_record()
