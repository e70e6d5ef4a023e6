"""Built-in quantization methods, each registered through the `qformat` entry-point group like any third-party plugin."""
