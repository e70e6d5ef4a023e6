"""Compile the Triton kernels ahead of time for a GPU architecture, without a GPU (ptxas ships with triton).

Catches what the CPU interpreter cannot: code that does not lower to PTX, register spills, failed vectorization.
Must run in a process where ``TRITON_INTERPRET`` is unset (interpreted kernels cannot be compiled), e.g.

    python -m qformat_kernels.triton_aot          # compiles a representative set for sm_90 and prints usage
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from typing import Any

import triton
from triton.backends.compiler import GPUTarget

from . import triton_ops as ops

KERNELS = {"gemv": ops.gemv_kernel, "matmul": ops.matmul_kernel, "dequant": ops.dequant_kernel}
LEADING = {
    "gemv": {"x_ptr": "*{x}", "y_ptr": "*fp32", "N": "i32", "K": "i32"},
    "matmul": {"x_ptr": "*{x}", "y_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32"},
    "dequant": {"out_ptr": "*fp32", "N": "i32", "K": "i32"},
}
WEIGHT_ARGS = {"codes": "*i32", "KW": "i32", "s_ptr": "*{p}", "z_ptr": "*{p}", "m_ptr": "*{p}", "s_across": "i32",
               "t_ptr": "*{p}", "t_across": "i32", "T": "i32", "f_ptr": "*{p}", "f_across": "i32"}
DEFAULTS = dict(BITS=4, PLANAR=False, KW4=True, PER=8, OFFSET=0, MAP=ops.MAP_AFFINE, HAS_ZERO=True, HAS_OFFSET=False,
                GR=1, GC=128, TILED=False, TGR=1, TGC=1, HAS_FACTOR=False, FGR=1, FGC=1, VQ_M=1, VQ_D=1, VQ_VEC=False)

# (kernel, constants that differ from DEFAULTS, launch meta incl. num_warps): one of each map and layout
REPRESENTATIVE: list[tuple[str, dict[str, Any], dict[str, int]]] = [
    ("gemv", {}, dict(BN=16, BK=256, SPLIT_K=1, num_warps=4)),
    ("gemv", {"BITS": 3}, dict(BN=16, BK=512, SPLIT_K=4, num_warps=4)),
    ("gemv", {"BITS": 2, "GC": 64}, dict(BN=32, BK=256, SPLIT_K=1, num_warps=8)),
    ("gemv", {"HAS_ZERO": False, "HAS_OFFSET": True, "GC": 32}, dict(BN=16, BK=256, SPLIT_K=1, num_warps=4)),  # Q4_1
    ("matmul", {"BITS": 3}, dict(BM=16, BN=64, BK=64, SPLIT_K=1, num_warps=4)),
    ("matmul", {"BITS": 4}, dict(BM=16, BN=64, BK=128, SPLIT_K=4, num_warps=4)),
    ("matmul", {"BITS": 7, "HAS_FACTOR": True, "FGC": 64}, dict(BM=32, BN=64, BK=128, SPLIT_K=2, num_warps=4)),
    ("dequant", {"BITS": 5, "PLANAR": True}, dict(BN=32, BK=128, num_warps=4)),
    ("gemv", {"MAP": ops.MAP_LUT, "HAS_FACTOR": True, "FGC": 64}, dict(BN=16, BK=256, SPLIT_K=1, num_warps=4)),
    ("gemv", {"MAP": ops.MAP_LUT, "TILED": True, "TGC": 64}, dict(BN=16, BK=256, SPLIT_K=1, num_warps=4)),
    ("gemv", {"MAP": ops.MAP_VQ, "BITS": 16, "VQ_M": 2, "VQ_D": 8, "VQ_VEC": True},
     dict(BN=16, BK=256, SPLIT_K=1, num_warps=4)),
    ("matmul", {"MAP": ops.MAP_VQ, "BITS": 12, "VQ_D": 6}, dict(BM=16, BN=32, BK=64, SPLIT_K=1, num_warps=4)),
    ("gemv", {"MAP": ops.MAP_CODES, "BITS": 2, "OFFSET": -1, "HAS_FACTOR": True, "FGR": 100, "FGC": 300},
     dict(BN=16, BK=256, SPLIT_K=1, num_warps=4)),
]


# Example runtime integers (a 4096 x 4096 weight, groups of 128): at launch triton specializes integers that are
# multiples of 16 (and every torch pointer, 16-byte aligned), so the compile sees the same facts.
EXAMPLE_INTS = {"M": 4, "N": 4096, "K": 4096, "stride_xm": 4096, "KW": 128, "s_across": 32, "t_across": 64, "T": 16,
                "f_across": 64}


def compile_for(kind: str, consts: dict[str, Any], meta: dict[str, int], x_dtype: str = "fp16",
                param_dtype: str = "fp16", arch: int = 90, ints: dict[str, int] | None = None) -> Any:
    if ops.INTERPRET:
        raise RuntimeError("unset TRITON_INTERPRET to compile kernels ahead of time")
    meta = dict(meta)
    num_warps = meta.pop("num_warps", 4)
    constants = {**DEFAULTS, **({"ACC": True} if kind == "gemv" else {}), **consts, **meta}
    if "PER" not in consts:  # codes per word of the widest slice
        constants["PER"] = 32 if constants["PLANAR"] else 32 >> (constants["BITS"].bit_length() - 1)
    signature = {k: v.format(x=x_dtype) for k, v in LEADING[kind].items()}
    signature |= {k: v.format(p=param_dtype) for k, v in WEIGHT_ARGS.items()}
    signature |= {k: "constexpr" for k in constants}
    values = {**EXAMPLE_INTS, **(ints or {})}
    names = KERNELS[kind].arg_names
    attrs = {(names.index(k),): [["tt.divisibility", 16]] for k, v in signature.items()
             if v.startswith("*") or (v == "i32" and values[k] % 16 == 0)}
    source = triton.compiler.ASTSource(fn=KERNELS[kind], signature=signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})


def usage(compiled: Any) -> dict[str, Any]:
    """Registers, spill stack and global loads by width, read from the cubin and PTX."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    found = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text))
    loads = Counter(re.findall(r"ld\.global(?:\.\w+)*", compiled.asm["ptx"]))
    return {"registers": int(found.get("REG", 0)), "stack": int(found.get("STACK", 0)),
            "shared": int(compiled.metadata.shared), "loads": dict(loads)}


def main() -> int:
    failures = 0
    for kind, consts, meta in REPRESENTATIVE:
        try:
            info = usage(compile_for(kind, consts, meta))
            print(f"ok   {kind:8s} {consts} {meta} {info}")
        except Exception as exc:  # report every variant, then fail
            failures += 1
            print(f"FAIL {kind:8s} {consts} {meta}: {type(exc).__name__}: {str(exc)[:500]}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
