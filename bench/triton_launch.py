"""Host cost of one batch-1 Triton call (what bounds a small model's decode step on a GPU), against F.linear.

    python bench/triton_launch.py [--calls 2000]

For SmolLM2's 576x576 and a 4096x4096 4-bit g128 weight, fp16 x: the wall time per call of back-to-back calls
(synchronized at the end), for F.linear fp16, the autotuned launch with its zero fill and cast (the path before
the launch is frozen), the frozen launch, and a CUDA graph replay of the frozen call.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def per_call_us(fn, calls: int) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def measure(kernel, n: int, k: int, calls: int) -> None:
    import torch.nn.functional as F
    from gemv_triton import affine_record
    from qformat_kernels import triton_ops as ops

    prepared = kernel.prepare(affine_record(4, n, k, 128), "cuda")
    dense = prepared.dequantize().half()
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    prepared.matmul(x)  # autotunes, then freezes
    frozen = prepared._gemv

    def old_path() -> torch.Tensor:
        y = torch.zeros(1, n, dtype=torch.float32, device="cuda")
        ops.matmul_into(prepared.root, x, y)
        return y.to(torch.float16)

    t_lin = per_call_us(lambda: F.linear(x, dense), calls)
    t_old = per_call_us(old_path, calls)
    t_frozen = per_call_us(lambda: prepared.matmul(x), calls) if frozen is not None else float("nan")
    t_graph = float("nan")
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            prepared.matmul(x)
        t_graph = per_call_us(graph.replay, calls)
    except Exception as exc:  # report, do not fail the session
        print(f"graph capture failed: {type(exc).__name__}: {exc}")
    err = float((prepared.matmul(x).float() - F.linear(x.float(), dense.float())).abs().max())
    print(f"{n}x{k:<7d} {t_lin:14.1f} {t_old:20.1f} {t_frozen:8.1f} {t_graph:13.1f}  (max |err| {err:.1e}, "
          f"frozen={frozen is not None}, direct={getattr(frozen, 'direct', None)}, runner={ops._RUNNER_OK} "
          f"{ops.RUNNER_PROBLEM or ''})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: skipped")
        return 0
    from qformat_kernels import triton_ops as ops
    from qformat_kernels.triton_plugin import TritonKernel

    kernel = TritonKernel()
    print(f"{'shape':12s} {'F.linear fp16':>14s} {'autotuned+fill+cast':>20s} {'frozen':>8s} {'graph replay':>13s}"
          f"  (us per call; runner={ops._RUNNER_OK})")
    for n, k in ((576, 576), (4096, 4096)):
        measure(kernel, n, k, args.calls)
    return 0


if __name__ == "__main__":
    sys.exit(main())
