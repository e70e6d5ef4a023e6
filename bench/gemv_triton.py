"""GEMV timing of the Triton kernels (4- and 3-bit affine, groups of 128) against torch fp16/bf16 F.linear.

    python bench/gemv_triton.py [--batch 1 4] [--bits 4 3] [--group 128] [--trees nf4 fp8 mxfp4 ...] [--json]

``--trees`` adds the codec trees the built-in methods write (``qformat_kernels.method_trees``: nf4, nf4dq, fp8,
e2m1, mxfp4, nvfp4, int8, hqq4, hqq4a0, squeeze3, awq, ...); ``--bits`` with no value leaves out the affine rows.

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
    ("square 8192x8192", 8192, 8192),
    ("llama-7b up 11008x4096", 11008, 4096),
    ("llama-7b down 4096x11008", 4096, 11008),
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


# Every timed call reads a different copy of the weight, cycling through at least this many bytes, so that the
# timings measure device memory and not the 50 MB L2 cache (a 4096² fp16 weight fits in it).
ROTATE_BYTES = 256 << 20


def time_us(calls: list) -> float:
    """Median time of one call, each timed sample running all ``calls`` (distinct weights) once."""
    import triton.testing

    def run_all() -> None:
        for call in calls:
            call()

    return float(triton.testing.do_bench(run_all, warmup=25, rep=200, return_mode="median")) * 1000 / len(calls)


MAX_COPIES = 256  # small layers then stay partly cache-resident; they are bound by launch overhead anyway


def copies_for(nbytes: int) -> int:
    return min(MAX_COPIES, max(1, -(-ROTATE_BYTES // max(nbytes, 1))))


def copy_bandwidth() -> float:
    """Device-to-device copy of 1 GiB, in GB/s counting bytes read and written."""
    import triton.testing

    src = torch.empty(1 << 28, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=10, rep=100, return_mode="median")
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--bits", type=int, nargs="*", default=[4, 3])
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--trees", nargs="*", default=[], help="method codec trees (qformat_kernels.method_trees)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per row")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: skipped")
        return 0

    import torch.nn.functional as F
    from qformat_kernels import method_trees
    from qformat_kernels.triton_plugin import TritonKernel

    kernel = TritonKernel()
    device = torch.cuda.get_device_name()
    copy_gbps = copy_bandwidth()
    print(f"device: {device}; median of triton.testing.do_bench over weights rotated through "
          f"{ROTATE_BYTES >> 20} MiB (not L2-resident); device copy bandwidth {copy_gbps:.0f} GB/s (read+write); "
          f"weight MB read per call in brackets")
    header = f"{'shape':22s} {'codec':>8s} {'batch':>5s} {'triton us':>10s} {'fp16 us':>8s} {'bf16 us':>8s} " \
             f"{'vs fp16':>7s} {'GB/s':>6s}"
    if not args.json:
        print(header)
    codecs = [(f"affine{bits}", bits, lambda n, k, bits=bits: affine_record(bits, n, k, args.group))
              for bits in args.bits]
    codecs += [(tree, None, lambda n, k, tree=tree: method_trees.build(tree, n, k)) for tree in args.trees]
    for codec, bits, make in codecs:
        for name, n, k in SHAPES:
            qt = make(n, k)
            prepared = kernel.prepare(qt, "cuda")
            dense16 = prepared.dequantize().to(torch.float16)
            n_q, n_16 = copies_for(prepared.nbytes()), copies_for(dense16.numel() * 2)
            weights = [prepared] + [kernel.prepare(qt, "cuda") for _ in range(n_q - 1)]
            dense = [dense16] + [dense16.clone() for _ in range(n_16 - 1)]
            dense_bf = [w.to(torch.bfloat16) for w in dense]
            for batch in args.batch:
                x = torch.randn(batch, k, device="cuda", dtype=torch.float16)
                y = prepared.matmul(x)  # autotunes on first call
                ref = F.linear(x.float(), prepared.dequantize())
                err = float((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
                t_q = time_us([lambda x=x, w=w: w.matmul(x) for w in weights])
                t_16 = time_us([lambda x=x, w=w: F.linear(x, w) for w in dense])
                x_bf = x.to(torch.bfloat16)
                t_bf = time_us([lambda x=x_bf, w=w: F.linear(x, w) for w in dense_bf])
                gbps = prepared.nbytes() / (t_q * 1e-6) / 1e9
                row = {"shape": name, "out": n, "in": k, "codec": codec, "bits": bits, "batch": batch,
                       "triton_us": t_q,
                       "fp16_us": t_16, "bf16_us": t_bf, "speedup_vs_fp16": t_16 / t_q, "triton_GBps": gbps,
                       "packed_MB": prepared.nbytes() / 1e6, "fp16_MB": dense16.numel() * 2 / 1e6,
                       "max_rel_err": err, "device": device, "copy_GBps": copy_gbps}
                if args.json:
                    print(json.dumps(row))
                else:
                    print(f"{name:22s} {codec:>8s} {batch:5d} {t_q:10.1f} {t_16:8.1f} {t_bf:8.1f} "
                          f"{t_16 / t_q:6.2f}x {gbps:6.0f}   [{row['packed_MB']:.1f} vs {row['fp16_MB']:.1f} MB, "
                          f"rel err {err:.1e}]")
            del weights, dense, dense_bf
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
