"""qformat-rotate: an example qformat plugin (codec ``rotate.hadamard`` v1, method ``nf4``)."""

__version__ = "0.1.0"
