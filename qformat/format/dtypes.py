"""Safetensors dtype names and their numpy equivalents (BF16 through ml_dtypes)."""

from __future__ import annotations

import ml_dtypes
import numpy as np

NUMPY_BY_NAME: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
NAME_BY_NUMPY: dict[np.dtype, str] = {v: k for k, v in NUMPY_BY_NAME.items()}

FLOAT_NAMES = frozenset({"F64", "F32", "F16", "BF16"})
INT_NAMES = frozenset({"I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8"})
# Original-weight dtypes a record may declare (what a loader computes in).
WEIGHT_DTYPES = frozenset({"F32", "F16", "BF16"})


def dtype_name(array: np.ndarray) -> str:
    """The safetensors name of an array's dtype; raises for dtypes safetensors cannot hold."""
    try:
        return NAME_BY_NUMPY[np.dtype(array.dtype)]
    except KeyError:
        raise TypeError(f"dtype {array.dtype} has no safetensors equivalent") from None
