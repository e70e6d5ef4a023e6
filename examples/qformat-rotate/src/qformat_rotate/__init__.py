"""qformat-rotate: an example qformat plugin (codec ``rotate.hadamard`` v1, block transform ``hadamard``)."""

__version__ = "0.1.0"
