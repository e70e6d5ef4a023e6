"""Checkpoint folders whose shards hold FP8 tensors (compressed-tensors' FP8 weights, NVFP4's E4M3 block scales, MX
E8M0 scales): :class:`SafetensorsFile` refuses dtypes the qformat container does not allow, so importers read those
shards through :class:`ForeignSafetensorsFile`, which maps them to their ml_dtypes types (same bytes, no conversion).
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

from qformat.format.safetensors_io import SafetensorsFile, TensorEntry

from ._import_folder import CheckpointFolder

# safetensors dtype names outside the container's set -> numpy dtype (one byte each)
FOREIGN_DTYPES: dict[str, np.dtype] = {
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
}


class ForeignSafetensorsFile(SafetensorsFile):
    """A safetensors file that may also hold the one-byte float dtypes of :data:`FOREIGN_DTYPES`."""

    @staticmethod
    def _entry(name: str, raw: Any, where: str) -> TensorEntry:
        dtype = raw.get("dtype") if isinstance(raw, dict) else None
        if dtype not in FOREIGN_DTYPES:
            return SafetensorsFile._entry(name, raw, where)
        entry = SafetensorsFile._entry(name, {**raw, "dtype": "U8"}, where)  # same item size: same checks
        return TensorEntry(entry.name, dtype, entry.shape, entry.begin, entry.end)

    def get(self, name: str) -> np.ndarray:
        entry = self.entries.get(name)
        if entry is None or entry.dtype not in FOREIGN_DTYPES:
            return super().get(name)
        dtype = FOREIGN_DTYPES[entry.dtype]
        if entry.begin == entry.end:
            return np.zeros(entry.shape, dtype=dtype)
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._mmap[self.data_start + entry.begin: self.data_start + entry.end].view(dtype).reshape(entry.shape)


class ImportFolder(CheckpointFolder):
    """:class:`CheckpointFolder` whose shards may hold FP8 tensors."""

    file_class = ForeignSafetensorsFile

    def nbytes(self, name: str) -> int:
        """Stored bytes of tensor ``name`` (from the header, nothing read)."""
        info = self._file(self.shard_of(name)).entries[name]
        return info.end - info.begin
