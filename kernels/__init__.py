"""Kernels: fused dequantize-and-multiply (Numba on CPU, Triton on GPU) and the dispatcher that picks one."""
