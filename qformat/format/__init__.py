"""The reference implementation of the qformat format (spec/): numpy only, no torch.

Public API: build records with :class:`RecordBuilder`, write files with :func:`write_file`, read them with
:func:`open_file` (or whole model folders with :func:`open_folder`), decode with ``QFile.decode``.
"""

from .builder import RecordBuilder
from .codecs import CORE_CODECS, Codec, CodecRegistry, Context, NodeInfo, TensorInfo, signature
from .container import FolderWriter, ModelFolder, bits_by_layer_type, open_folder, sha256_file, verify_folder
from .qfile import QFile, QuantizedTensor, open_file, write_file
from .record import (
    FORMAT_VERSION,
    bits_per_weight,
    check_record,
    decode_record,
    iter_nodes,
    total_bits_per_weight,
    validate_record,
)

__all__ = [
    "FORMAT_VERSION", "FolderWriter", "ModelFolder", "bits_by_layer_type", "open_folder", "sha256_file", "verify_folder", "CORE_CODECS", "Codec", "CodecRegistry", "Context", "NodeInfo", "QFile", "QuantizedTensor",
    "RecordBuilder", "TensorInfo", "bits_per_weight", "check_record", "decode_record", "iter_nodes",
    "total_bits_per_weight", "open_file", "signature",
    "validate_record",
    "write_file",
]
