"""GEMV benchmark: fused Numba kernels vs torch F.linear (fp32 and bf16) on the CPU, one process, one table.

    python bench/gemv.py                      # 4-bit and 3-bit affine g128 at 4096^2 and the SmolLM2-135M shapes
    python bench/gemv.py --batch 1 4 8 --codecs affine4 affine3 nf4 --repeat 9
    python bench/gemv.py --shapes 4096x4096 --codecs affine4 nf4 nf4dq fp8 e2m1 mxfp4 nvfp4 int8 hqq4 hqq4a0 squeeze3 awq

Each time is the best of ``--repeat`` rounds of calls (the machine may be shared; the best round is the one least
disturbed), measured end to end through ``prepared.matmul(x)`` (torch in, torch out). Ratios compare times from the
same run; bf16 is the faster of torch on ``--threads`` threads and on one thread (its bf16 GEMV can be slower on
two). "warm" repeats the same weight, which then sits in the caches when it fits (4-bit 4096^2 is 9 MB, under a
32 MB L3, while its fp32 copy is 64 MB); "cold" evicts the caches (a 128 MB sweep) before each timed call, as when a
whole model streams from memory. Bandwidth is the bytes of packed weight the kernel reads (the prepared arrays) over
its time, next to the machine's copy bandwidth (numpy copy of a 256 MB array: bytes read + written per second, one
thread). "thr" is the threads the kernel ran on at the end of its warm measurement: 1 when it stalled on a busy
machine and fell back (see ``qformat_kernels.numba_threads``). Records are built like RTN's (fp16 scales, packed
zeros, group 128) from random codes: speed does not depend on the values; the other codecs are the trees the
built-in methods write (``qformat_kernels.method_trees``: NF4, FP8, MXFP4, NVFP4, LLM.int8, HQQ, SqueezeLLM, AWQ).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from qformat_kernels import method_trees
from qformat_kernels.numba_plugin import NumbaKernel
from qformat_kernels.numba_threads import GOVERNOR

from qformat.format import QuantizedTensor, RecordBuilder

SHAPES = {
    "4096x4096": (4096, 4096),
    "q/o 576x576": (576, 576),
    "k/v 192x576": (192, 576),
    "gate/up 1536x576": (1536, 576),
    "down 576x1536": (576, 1536),
}


def build(codec: str, rows: int, cols: int, seed: int = 0) -> QuantizedTensor:
    rng = np.random.default_rng(seed)
    b = RecordBuilder("bench.weight", (rows, cols), "BF16")
    if codec.startswith("affine"):
        bits = int(codec[len("affine"):])
        groups = -(-cols // 128)
        node = b.affine(b.packed("codes", rng.integers(0, 1 << bits, (rows, cols)), bits),
                        scale=b.tensor("scale", (rng.random((rows, groups)) * 0.01).astype(np.float16)),
                        zero=b.packed("zero", rng.integers(0, 1 << bits, (rows, groups)), bits), bits=bits,
                        group_shape=(1, 128))
    else:
        return method_trees.build(codec, rows, cols, seed)
    return b.finish(node)


def best_time(fn: Callable[[], object], calls: int, repeat: int) -> float:
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def best_cold_time(fn: Callable[[], object], sweep: np.ndarray, repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        sweep += 1.0  # read and write 128 MB: nothing of the weight stays cached
        best = min(best, _timed(fn))
    return best


def copy_bandwidth(nbytes: int = 256 << 20, repeat: int = 5) -> float:
    src = np.ones(nbytes // 8)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(repeat))
    return 2 * src.nbytes / best


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--codecs", nargs="+", default=["affine4", "affine3"],
                        help=f"affine2..affine8 (RTN-like g128) or a method tree: {' '.join(method_trees.TREES)}")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--batch", nargs="+", type=int, default=[1])
    parser.add_argument("--repeat", type=int, default=7, help="rounds per measurement (best is kept)")
    parser.add_argument("--budget", type=float, default=0.05, help="seconds per round (sets calls per round)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-cold", action="store_true", help="skip the cache-cold measurements")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    import numba

    numba.set_num_threads(args.threads)
    kernel = NumbaKernel()
    copy_bw = copy_bandwidth()
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), numba {numba.__version__} ({numba.get_num_threads()} threads, "
          f"{numba.threading_layer() if hasattr(numba, 'threading_layer') else '?'} layer)")
    print(f"# copy bandwidth (numpy, 256 MB, read+write): {copy_bw / 1e9:.1f} GB/s; load average "
          f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    sweep = np.zeros((128 << 20) // 8)
    header = (f"{'shape':<17} {'codec':<8} {'B':>1} {'bits/w':>6} | {'warm: numba':>11} {'thr':>3} {'fp32':>7} "
              f"{'bf16':>7} {'x fp32':>6} {'x bf16':>6} {'GB/s':>5} | {'cold: numba':>11} {'fp32':>7} {'x fp32':>6} "
              f"{'GB/s':>5}")
    print(header)
    print("-" * len(header))
    for shape_name in args.shapes:
        rows, cols = SHAPES[shape_name]
        w32 = torch.randn(rows, cols) * 0.02
        w16 = w32.to(torch.bfloat16)
        for codec in args.codecs:
            qt = build(codec, rows, cols)
            prepared = kernel.prepare(qt)
            nbytes = prepared.nbytes()
            for batch in args.batch:
                x32 = torch.randn(batch, cols)
                x16 = x32.to(torch.bfloat16)
                prepared.matmul(x32)  # compile / load from cache outside the timing
                probe = _timed(lambda: prepared.matmul(x32))  # noqa: B023
                calls = max(3, int(args.budget / max(probe, 1e-6)))
                t_k = best_time(lambda: prepared.matmul(x32), calls, args.repeat)  # noqa: B023
                # threads the kernel ran on at the end: 1 when it had stalled and fell back (numba_threads)
                threads = 1 if GOVERNOR.backing_off() else numba.get_num_threads()
                t_32 = best_time(lambda: F.linear(x32, w32), calls, args.repeat)  # noqa: B023
                t_16 = best_time(lambda: F.linear(x16, w16), max(3, calls // 4), args.repeat)  # noqa: B023
                if args.threads > 1:  # compare with torch's best bf16
                    torch.set_num_threads(1)
                    one = best_time(lambda: F.linear(x16, w16), max(3, calls // 4), args.repeat)  # noqa: B023
                    t_16 = min(t_16, one)
                    torch.set_num_threads(args.threads)
                line = (f"{shape_name:<17} {codec:<8} {batch:>1} {nbytes * 8 / (rows * cols):>6.2f} | "
                        f"{t_k * 1e6:>11.1f} {threads:>3} {t_32 * 1e6:>7.1f} {t_16 * 1e6:>7.1f} {t_32 / t_k:>6.2f} "
                        f"{t_16 / t_k:>6.2f} {nbytes / t_k / 1e9:>5.1f} |")
                if not args.no_cold:
                    c_k = best_cold_time(lambda: prepared.matmul(x32), sweep, args.repeat)  # noqa: B023
                    c_32 = best_cold_time(lambda: F.linear(x32, w32), sweep, args.repeat)  # noqa: B023
                    line += f" {c_k * 1e6:>11.1f} {c_32 * 1e6:>7.1f} {c_32 / c_k:>6.2f} {nbytes / c_k / 1e9:>5.1f}"
                print(line, flush=True)


if __name__ == "__main__":
    main()
