"""qformat: a specified, packed, quantized tensor format for Hugging Face models."""

__version__ = "0.1.0"
