"""GEMV timing of the Triton kernels (4- and 3-bit affine, groups of 128) against torch fp16/bf16 F.linear.

    python bench/gemv_triton.py [--batch 1 4] [--bits 4 3] [--group 128] [--json]

Shapes: 4096 x 4096 and the SmolLM2-135M linears (hidden 576, MLP 1536, 3 KV heads of 64, vocabulary 49152).
Weights are random codes (timing does not depend on their values). Each row reports the median time of
``prepared.matmul(x)`` (after autotuning) and of ``F.linear`` with a dense fp16 and bf16 weight, the weight bytes
each reads, and the packed kernel's effective bandwidth. Needs a CUDA device; prints "no CUDA device: skipped"
otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

SHAPES = [  # (name, out_features, in_features)
    ("square 4096x4096", 4096, 4096),
    ("smollm2 q/o_proj", 576, 576),
    ("smollm2 k/v_proj", 192, 576),
    ("smollm2 gate/up_proj", 1536, 576),
    ("smollm2 down_proj", 576, 1536),
    ("smollm2 lm_head", 49152, 576),
]


def affine_record(bits: int, out_features: int, in_features: int, group: int, seed: int = 0):
    from qformat.format import RecordBuilder

    rng = np.random.default_rng(seed)
    tiles = (out_features, -(-in_features // group))
    b = RecordBuilder("bench.weight", (out_features, in_features), dtype="F16")
    node = b.affine(b.packed("codes", rng.integers(0, 1 << bits, (out_features, in_features)), bits), bits=bits,
                    scale=b.tensor("scale", (rng.random(tiles) * 0.01).astype(np.float16)),
                    zero=b.tensor("zero", rng.integers(0, 1 << bits, tiles).astype(np.float16)),
                    group_shape=(1, group))
    return b.finish(node)


def time_us(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")) * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--json", action="store_true", help="print one JSON object per row")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: skipped")
        return 0

    import torch.nn.functional as F
    from qformat_kernels.triton_plugin import TritonKernel

    kernel = TritonKernel()
    device = torch.cuda.get_device_name()
    print(f"device: {device}; median of triton.testing.do_bench; weight MB read per call in brackets")
    header = f"{'shape':22s} {'bits':>4s} {'batch':>5s} {'triton us':>10s} {'fp16 us':>8s} {'bf16 us':>8s} " \
             f"{'vs fp16':>7s} {'GB/s':>6s}"
    if not args.json:
        print(header)
    for bits in args.bits:
        for name, n, k in SHAPES:
            qt = affine_record(bits, n, k, args.group)
            prepared = kernel.prepare(qt, "cuda")
            dense16 = prepared.dequantize().to(torch.float16)
            dense_bf = dense16.to(torch.bfloat16)
            for batch in args.batch:
                x = torch.randn(batch, k, device="cuda", dtype=torch.float16)
                y = prepared.matmul(x)  # autotunes on first call
                ref = F.linear(x.float(), prepared.dequantize())
                err = float((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
                t_q = time_us(lambda x=x, w=prepared: w.matmul(x))
                t_16 = time_us(lambda x=x, w=dense16: F.linear(x, w))
                x_bf = x.to(torch.bfloat16)
                t_bf = time_us(lambda x=x_bf, w=dense_bf: F.linear(x, w))
                gbps = prepared.nbytes() / (t_q * 1e-6) / 1e9
                row = {"shape": name, "out": n, "in": k, "bits": bits, "batch": batch, "triton_us": t_q,
                       "fp16_us": t_16, "bf16_us": t_bf, "speedup_vs_fp16": t_16 / t_q, "triton_GBps": gbps,
                       "packed_MB": prepared.nbytes() / 1e6, "fp16_MB": dense16.numel() * 2 / 1e6,
                       "max_rel_err": err, "device": device}
                if args.json:
                    print(json.dumps(row))
                else:
                    print(f"{name:22s} {bits:4d} {batch:5d} {t_q:10.1f} {t_16:8.1f} {t_bf:8.1f} "
                          f"{t_16 / t_q:6.2f}x {gbps:6.0f}   [{row['packed_MB']:.1f} vs {row['fp16_MB']:.1f} MB, "
                          f"rel err {err:.1e}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
