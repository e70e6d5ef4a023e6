"""GEMV benchmark: fused Numba kernels vs torch's int4 CPU kernel and F.linear (fp32, bf16), one process, one table.

    python bench/gemv.py                      # affine4/affine3 g128 + torch int4 at 4096^2 and the SmolLM2-135M shapes
    python bench/gemv.py --shapes 4096x4096 11008x4096 --group-size 32 --batch 1 8 64 --governor both
    python bench/gemv.py --shapes 4096x4096 --codecs affine4 nf4 fp4 e2m1 mxfp4 nvfp4 fp8 int8 hqq4 squeeze3 awq
    QFORMAT_THREAD_GOVERNOR=on python bench/gemv.py       # the governor on (as --governor on)
    python bench/gemv.py --shapes 4096x4096 576x1536 --batch 1 --codecs aqlm2x8 aqlm1x16 vptq8 vptq8r
    python bench/gemv.py --shapes 4096x4096 --batch 1 --codecs affine4 bcq2 bcq3 bcq4 ternary qmoe bitstack1 bitstack2

The commands of the full measurement (all shapes, g32 and g128, batches 1 8 64, governor both) are in
bench/GEMV_NOTES.md.

Rows. ``affineN`` (N = 2..8) is round-to-nearest with asymmetric min/max statistics per group of ``--group-size``
columns (fp16 scales, N-bit packed zeros: RTN's layout), quantized from the same random weight that the torch rows use;
the other codecs are the trees the built-in methods write, with their own groups, from random codes (speed does not
depend on the values; ``qformat_kernels.method_trees``: NF4, FP4, FP8, E2M1, MXFP4, NVFP4, LLM.int8, HQQ, SqueezeLLM,
AWQ, AQLM 2x8 and 1x16, VPTQ v8 with and without a residual codebook; issue 18: BCQ with 2-4 sign planes
``bcq2``..``bcq4`` (``bcq4u`` with the uniform form's offset), BitNet ternary per tensor / per row, QMoE ternary,
BitStack with one or two sign x rank-16 blocks ``bitstack1`` / ``bitstack2``). ``aqlm-pkg`` (after an ``aqlm2x8`` row) is
the ``aqlm`` package's own CPU kernel (``aqlm.inference_kernels.numba_kernel.numba_gemm_lut``, called as its
``QuantizedLinear`` calls it: codes permuted to [in groups, out groups, M] as int8, fp32 codebooks [M, K, 1, g] and
scales) on the same codes, codebooks and scales; it takes 256-entry codebooks only (not 1x16), and its relative error
is printed under the table (its parallel loop adds into shared outputs, so with several threads it may be wrong).
``torch-int4`` is ``aten._weight_int4pack_mm_for_cpu`` (packed by ``aten._convert_weight_to_int4pack_for_cpu``,
bf16 activations and bf16 [groups, N, 2] scales-and-zeros as that kernel takes them, the same group size) holding the
same 4-bit weight as ``affine4``: torch computes ``(q - 8) * scale + zero`` with ``zero = (8 - z) * scale``. Once per
shape both kernels are checked against ``x @ W_deq.T`` (W_deq: the reference decoder's weight; the relative errors
are printed under the table); a mismatch stops the run. Torch's kernel needs K divisible by the group (not so for the
SmolLM2 shapes at g128: "n/a").

Timing. Each time is the best of ``--repeat`` rounds of calls (the machine may be shared; the best round is the one
least disturbed), qformat's end to end through ``prepared.matmul(x)`` (fp32 torch in and out), torch's through the
op. bf16 F.linear and torch-int4 run on ``--threads`` threads and on one thread, and the faster counts (torch's bf16
kernels can be slower on two). "warm" repeats the same weight, which then sits in the caches when it fits (4-bit
4096^2 is 9 MB, under a 32 MB L3); "cold" evicts the caches (a 128 MB sweep) before each timed call, as when a whole
model streams from memory. ``--governor both`` times qformat's kernels with the thread governor
(``qformat_kernels.numba_threads``) on and off, in alternating rounds so both see the same disturbances.

Bandwidth. The header gives the machine's read bandwidth: a sum over a 256 MB array (a Numba parallel sum and
torch.sum) on ``--threads`` threads and on one, the best of 5 rounds; "%bw" is against the faster reader on
``--threads`` threads. Each row's GB/s is the bytes its kernel must read (the prepared weight
arrays, or torch's packed weight and scales-and-zeros, plus x) over its time, and "%bw" that over the read bandwidth.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numba
import numpy as np
import torch
import torch.nn.functional as F
from qformat_kernels import method_trees
from qformat_kernels.numba_plugin import NumbaKernel
from qformat_kernels.numba_threads import GOVERNOR

from qformat.format import QuantizedTensor, RecordBuilder, bitpack

SHAPES = {  # name: (out_features, in_features)
    "4096x4096": (4096, 4096),
    "11008x4096": (11008, 4096),  # Llama-7B MLP gate/up
    "4096x11008": (4096, 11008),  # Llama-7B MLP down
    "q/o 576x576": (576, 576),  # SmolLM2-135M
    "k/v 192x576": (192, 576),
    "gate/up 1536x576": (1536, 576),
    "down 576x1536": (576, 1536),
}
TORCH_INT4 = "torch-int4"
AQLM_PKG = "aqlm-pkg"
CHECK_TOLERANCE = {"qformat": 1e-4, TORCH_INT4: 2e-2}  # relative error norms: fp32 kernel; bf16 x, zeros and y
COLD_MARK = " | cold:"
GOVERNOR_MODES = {"on": (True,), "off": (False,), "both": (False, True)}  # "on" last: "thr" reads its final state




def shape_name(text: str) -> str:
    """A key of SHAPES, or "RxC" for the one key that ends in it ("576x1536" -> "down 576x1536")."""
    if text in SHAPES:
        return text
    found = [name for name in SHAPES if name.split()[-1] == text]
    if len(found) != 1:
        raise argparse.ArgumentTypeError(f"unknown shape {text!r}; known: {', '.join(SHAPES)}")
    return found[0]


# ---------------------------------------------------------------------------------------------------------------
# weights


def rtn(w: np.ndarray, bits: int, group: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Round-to-nearest with asymmetric min/max statistics per [1, group] tile (a ragged last tile allowed):
    codes [R, C], fp16 scales and integer zeros [R, ceil(C / group)]; w ~ (codes - zero) * scale. The scales are
    rounded to bf16 first, so that torch's bf16 scales hold exactly the same values."""
    rows, cols = w.shape
    groups = -(-cols // group)
    tiles = np.pad(w, ((0, 0), (0, groups * group - cols)), mode="edge").reshape(rows, groups, group)
    low, high = tiles.min(axis=2), tiles.max(axis=2)
    top = (1 << bits) - 1
    scale32 = np.maximum((high - low) / top, 1e-6).astype(np.float32)
    scale = torch.from_numpy(scale32).to(torch.bfloat16).to(torch.float16).numpy()
    s = scale.astype(np.float32)
    zero = np.clip(np.rint(-low / s), 0, top)
    codes = np.clip(np.rint(tiles / s[..., None]) + zero[..., None], 0, top).reshape(rows, groups * group)
    return codes[:, :cols].astype(np.uint8), scale, zero.astype(np.uint8)


def build(codec: str, w: np.ndarray, group: int) -> QuantizedTensor:
    """``affineN``: RTN of ``w`` with ``group``; otherwise the method tree ``codec`` (its own groups, random codes)."""
    rows, cols = w.shape
    if not codec.startswith("affine"):
        return method_trees.build(codec, rows, cols, 0)
    bits = int(codec[len("affine"):])
    codes, scale, zero = rtn(w, bits, group)
    b = RecordBuilder("bench.weight", (rows, cols), "BF16")
    node = b.affine(b.packed("codes", codes, bits), scale=b.tensor("scale", scale),
                    zero=b.packed("zero", zero, bits), bits=bits, group_shape=(1, group))
    return b.finish(node)


@dataclass
class TorchInt4:
    """The same 4-bit weight in the layout of torch's CPU int4 kernel."""

    packed: torch.Tensor  # uint8 [N, K / 2]
    scales_and_zeros: torch.Tensor  # bf16 [K / group, N, 2]
    group: int

    @staticmethod
    def from_rtn(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray, group: int) -> TorchInt4:
        """torch dequantizes (q - 8) * scale + zero: zero = (8 - z) * scale gives (q - z) * scale."""
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.from_numpy(codes.astype(np.int32)), 1)
        s = torch.from_numpy(scale.astype(np.float32))
        z = (8.0 - torch.from_numpy(zero.astype(np.float32))) * s
        scales_and_zeros = torch.stack([s.t(), z.t()], dim=2).contiguous().to(torch.bfloat16)
        return TorchInt4(packed, scales_and_zeros, group)

    def matmul(self, x16: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x16, self.packed, self.group, self.scales_and_zeros)

    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales_and_zeros.nbytes


class AqlmPackage:
    """The ``aqlm`` package's CPU GEMV on the codes, codebooks and scales of a ``method_trees`` AQLM record, in the
    layout its ``QuantizedLinear`` hands to ``numba_gemm_lut``; ``why_not`` says why it cannot run, if so."""

    def __init__(self, qt: QuantizedTensor) -> None:
        self.why_not = None
        try:
            from aqlm.inference_kernels.numba_kernel import numba_gemm_lut
        except ImportError as exc:
            self.why_not = f"aqlm not importable ({exc})"
            return
        weight = qt.record["weight"]
        books = np.asarray(qt.tensors[weight["input"]["codebooks"]["tensor"]], dtype=np.float32)  # [M, K, g]
        books_n, entries, group = books.shape
        if entries != 256:
            self.why_not = f"its CPU kernel takes 256-entry codebooks only (this one has {entries})"
            return
        rows, cols = qt.record["shape"]
        node = weight["input"]["codes"]  # packed 8-bit codes [R, C / g * M]
        codes = bitpack.unpack_codes(np.asarray(qt.tensors[node["tensor"]]), 8, node["shape"][1], np.uint8)
        codes = torch.from_numpy(codes.astype(np.uint8).reshape(rows, cols // group, books_n)).view(torch.int8)
        self.codes = codes.permute(1, 0, 2).contiguous()  # what QuantizedLinear.prepare_matmul_op does on CPU
        self.books = torch.from_numpy(books.reshape(books_n, entries, 1, group).copy())
        self.scales = torch.from_numpy(np.asarray(qt.tensors[weight["factor"]["tensor"]], dtype=np.float32)
                                       .reshape(rows, 1, 1, 1).copy())
        self.kernel = numba_gemm_lut
        self.nbytes = self.codes.nbytes + self.books.nbytes + self.scales.nbytes

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel(x, self.codes, self.books, self.scales, None)


def relative_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    return float((y.double() - reference).norm() / reference.norm())


# ---------------------------------------------------------------------------------------------------------------
# timing


def best_times(fn: Callable[[], object], calls: int, repeat: int,
               settings: Sequence[Callable[[], None] | None] = (None,)) -> list[float]:
    """Best seconds per call of ``fn`` under each setting (run before each of its rounds; None: nothing), the
    settings' rounds interleaved so that all see the same disturbances. After a setting one call is left untimed:
    the governor's state restarts with the switch, and its first judged call would otherwise fall in the round."""
    for setting in settings:
        if setting:
            setting()
        for _ in range(3):
            fn()
    best = [float("inf")] * len(settings)
    for _ in range(repeat):
        for i, setting in enumerate(settings):
            if setting:
                setting()
                fn()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            best[i] = min(best[i], (time.perf_counter() - start) / calls)
    return best


def best_cold_times(fn: Callable[[], object], sweep: np.ndarray, repeat: int,
                    settings: Sequence[Callable[[], None] | None] = (None,)) -> list[float]:
    """As :func:`best_times`, one call per round, each after evicting the caches."""
    fn()
    best = [float("inf")] * len(settings)
    for _ in range(repeat):
        for i, setting in enumerate(settings):
            if setting:
                setting()
                fn()
            sweep += 1.0  # read and write 128 MB: nothing of the weight stays cached
            best[i] = min(best[i], _timed(fn))
    return best


def fastest_threads(fn: Callable[[], object], calls: int, repeat: int, threads: int) -> tuple[float, int]:
    """Best time of a torch op on ``threads`` threads and on one, and the thread count that gave it."""
    t_n = best_times(fn, calls, repeat)[0]
    if threads == 1:
        return t_n, 1
    torch.set_num_threads(1)
    try:
        t_1 = best_times(fn, calls, repeat)[0]
    finally:
        torch.set_num_threads(threads)
    return (t_n, threads) if t_n <= t_1 else (t_1, 1)


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _calls(fn: Callable[[], object], budget: float) -> int:
    fn()  # compile / load from cache outside the probe
    return max(3, int(budget / max(_timed(fn), 1e-6)))


# ---------------------------------------------------------------------------------------------------------------
# bandwidth


@numba.njit(parallel=True, fastmath=True)
def _numba_sum(blocks: np.ndarray) -> float:  # pragma: no cover - compiled
    """Sum of a [chunks, m, 8] array: eight independent sums per chunk, so that the loop is not one chain of
    dependent additions (a single running sum reads at a few GB/s here, slower than memory)."""
    total = 0.0
    for c in numba.prange(blocks.shape[0]):
        block = blocks[c]
        s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = np.float32(0.0)
        for i in range(block.shape[0]):
            s0 += block[i, 0]
            s1 += block[i, 1]
            s2 += block[i, 2]
            s3 += block[i, 3]
            s4 += block[i, 4]
            s5 += block[i, 5]
            s6 += block[i, 6]
            s7 += block[i, 7]
        total += s0 + s1 + s2 + s3 + s4 + s5 + s6 + s7
    return total


def read_bandwidth(threads: int, nbytes: int = 256 << 20, repeat: int = 5) -> dict[str, float]:
    """Bytes per second read by a sum over a 256 MB array (never cached) on ``threads`` threads: a Numba parallel
    sum and torch.sum, each the best of ``repeat`` rounds."""
    data = np.ones(nbytes // 4, dtype=np.float32)
    blocks, tensor = data.reshape(64 * threads, -1, 8), torch.from_numpy(data)
    numba_threads, torch_threads = numba.get_num_threads(), torch.get_num_threads()
    numba.set_num_threads(threads)
    torch.set_num_threads(threads)
    try:
        _numba_sum(blocks)
        tensor.sum()
        return {name: data.nbytes / min(_timed(fn) for _ in range(repeat))
                for name, fn in (("numba", lambda: _numba_sum(blocks)), ("torch", lambda: tensor.sum()))}
    finally:
        numba.set_num_threads(numba_threads)
        torch.set_num_threads(torch_threads)


def copy_bandwidth(nbytes: int = 256 << 20, repeat: int = 5) -> float:
    src = np.ones(nbytes // 8)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(repeat))
    return 2 * src.nbytes / best


# ---------------------------------------------------------------------------------------------------------------
# table


@dataclass
class Row:
    shape: str
    codec: str
    batch: int
    bits: float | None  # bits per weight its kernel reads
    warm: dict[bool, float]  # governor setting (True for torch-int4) -> seconds
    cold: dict[bool, float]
    threads: int
    read_bytes: int


def columns(modes: Sequence[bool], cold: bool) -> str:
    """The header line of the table."""
    both = len(modes) == 2
    section = ["kernel", *(["gov off", "off/on"] if both else [])]
    warm = [*section, "thr", "fp32", "bf16", "x fp32", "x bf16", "x int4", "GB/s", "%bw"]
    head = f"{'shape':<17} {'codec':<10} {'B':>2} {'bits/w':>6} |" + "".join(f" {c:>7}" for c in warm)
    if cold:
        head += COLD_MARK + "".join(f" {c:>7}" for c in [*section, "fp32", "x fp32", "GB/s", "%bw"])
    return head


def _num(value: float | None, digits: int = 2) -> str:
    return f" {'-':>7}" if value is None else f" {value:>7.{digits}f}"


def format_row(row: Row, primary: bool, both: bool, base: dict, int4: float | None, read_bw: float,
               cold: bool) -> str:
    """One table line; ``base``: torch F.linear times for this shape and batch; ``int4``: torch-int4's warm time for
    an affine4 row (None elsewhere)."""
    bits = "n/a" if row.bits is None else f"{row.bits:.2f}"
    line = f"{row.shape:<17} {row.codec:<10} {row.batch:>2} {bits:>6} |"
    if not row.warm:  # torch-int4 where its kernel does not apply
        return line + " n/a: K not divisible by the group"

    def section(times: dict[bool, float]) -> tuple[float, str]:
        t = times[primary] if primary in times else next(iter(times.values()))
        text = _num(t * 1e6, 1)
        if both:
            off = times.get(False) if len(times) == 2 else None
            text += _num(None if off is None else off * 1e6, 1) + _num(None if off is None else off / t)
        return t, text

    t, text = section(row.warm)
    gbs = row.read_bytes / t / 1e9
    line += (f"{text} {row.threads:>7}{_num(base['fp32'] * 1e6, 1)}{_num(base['bf16'] * 1e6, 1)}"
             f"{_num(base['fp32'] / t)}{_num(base['bf16'] / t)}{_num(None if int4 is None else int4 / t)}"
             f"{_num(gbs, 1)}{_num(100 * gbs * 1e9 / read_bw, 0)}")
    if cold:
        c, text = section(row.cold)
        gbs = row.read_bytes / c / 1e9
        line += (f"{' |':<{len(COLD_MARK)}}{text}{_num(base['cold fp32'] * 1e6, 1)}{_num(base['cold fp32'] / c)}"
                 f"{_num(gbs, 1)}{_num(100 * gbs * 1e9 / read_bw, 0)}")
    return line


def explain(threads: int, both: bool, cold: bool) -> list[str]:
    lines = [
        "columns: B rows of x; bits/w: bits per weight the kernel reads (qformat: its prepared arrays);",
        "  kernel: us per call (qformat: prepared.matmul, fp32; torch-int4: aten._weight_int4pack_mm_for_cpu, bf16)"
        f"{'' if not both else ', governor on'};",
        "  thr: threads the kernel ran on at the end (1: the governor backed off; torch: the faster of "
        f"{threads} and 1); fp32, bf16: torch F.linear on the dense weight;",
        "  x fp32 / x bf16 / x int4: their time over the kernel's (>1: the kernel is faster; x int4 on affine4 rows, "
        "against torch-int4 at the same batch);",
        "  GB/s: bytes the kernel reads (weight arrays + x) per second; %bw: that over the read bandwidth (warm can "
        "pass 100 when the weight fits the caches)",
    ]
    if both:
        lines.append("  gov off: qformat's kernel with the thread governor off; off/on: its time over the governor-on "
                     "time (>1: the governor helps, <1: it hurts)")
    if cold:
        lines.append("  cold: the same, the caches evicted before each call")
    return ["# " + line for line in lines]


# ---------------------------------------------------------------------------------------------------------------


class Bench:
    """One run: the options, the cache sweep, the read bandwidth; prints the rows of each shape."""

    def __init__(self, args: argparse.Namespace, read_bw: float) -> None:
        self.args, self.read_bw = args, read_bw
        self.modes = GOVERNOR_MODES[args.governor]
        self.primary, self.both, self.cold = self.modes[-1], len(self.modes) == 2, not args.no_cold
        self.settings = [lambda on=on: GOVERNOR.set_enabled(on) for on in self.modes]
        self.kernel = NumbaKernel()
        self.sweep = np.zeros((128 << 20) // 8)
        self.checks: list[str] = []

    def shape(self, name: str) -> None:
        rows, cols = SHAPES[name]
        self.name = name
        self.w32 = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows * 100003 + cols)) * 0.02
        self.w16 = self.w32.to(torch.bfloat16)
        self.xs = {b: torch.randn(b, cols, generator=torch.Generator().manual_seed(b)) for b in self.args.batch}
        self.bases: dict[int, dict[str, float]] = {}
        int4_times = {} if self.args.no_torch_int4 else self.torch_int4_rows()
        for codec in self.args.codecs:
            self.codec_rows(codec, int4_times if codec == "affine4" else {})

    def print_row(self, row: Row, int4: float | None = None, primary: bool | None = None) -> None:
        print(format_row(row, self.primary if primary is None else primary, self.both, self.base(row.batch), int4,
                         self.read_bw, self.cold), flush=True)

    def base(self, batch: int) -> dict[str, float]:
        """torch F.linear on the dense weight, once per shape and batch."""
        if batch not in self.bases:
            args, w32, w16 = self.args, self.w32, self.w16
            x32, x16 = self.xs[batch], self.xs[batch].to(torch.bfloat16)
            calls = _calls(lambda: F.linear(x32, w32), args.budget)
            entry = {"fp32": best_times(lambda: F.linear(x32, w32), calls, args.repeat)[0],
                     "bf16": fastest_threads(lambda: F.linear(x16, w16), max(3, calls // 4), args.repeat,
                                             args.threads)[0]}
            if self.cold:
                entry["cold fp32"] = best_cold_times(lambda: F.linear(x32, w32), self.sweep, args.repeat)[0]
            self.bases[batch] = entry
        return self.bases[batch]

    def codec_rows(self, codec: str, int4_times: dict[int, float]) -> None:
        args, rows, cols = self.args, *self.w32.shape
        prepared = self.kernel.prepare(build(codec, self.w32.numpy(), args.group_size))
        bits = prepared.nbytes() * 8 / (rows * cols)
        for batch in args.batch:
            x32 = self.xs[batch]

            def run(x32: torch.Tensor = x32) -> torch.Tensor:
                return prepared.matmul(x32)

            calls = _calls(run, args.budget)
            warm = best_times(run, calls, args.repeat, self.settings)
            # threads the kernel ran on at the end: 1 when it had stalled and fell back (numba_threads)
            threads = 1 if GOVERNOR.backing_off() else numba.get_num_threads()
            cold = best_cold_times(run, self.sweep, args.repeat, self.settings) if self.cold else []
            row = Row(self.name, codec, batch, bits, dict(zip(self.modes, warm, strict=True)),
                      dict(zip(self.modes, cold, strict=False)), threads, prepared.nbytes() + x32.nbytes)
            self.print_row(row, int4_times.get(batch) if codec == "affine4" else None)
        if codec.startswith("aqlm"):
            self.aqlm_package_rows(codec)

    def aqlm_package_rows(self, codec: str) -> None:
        """The aqlm package's own CPU kernel on the same record (``AqlmPackage``), checked against x @ W_deq.T."""
        args, (rows, cols) = self.args, self.w32.shape
        qt = build(codec, self.w32.numpy(), args.group_size)
        package = AqlmPackage(qt)
        if package.why_not:
            print(f"{self.name:<17} {AQLM_PKG:<10}  n/a: {package.why_not}", flush=True)
            return
        x = torch.randn(3, cols, generator=torch.Generator().manual_seed(7))
        err = relative_error(package.matmul(x), x.double() @ torch.from_numpy(qt.decode()).double().T)
        self.checks.append(f"# check {self.name} {codec}: {AQLM_PKG} relative error against x @ W_deq.T: {err:.1e}"
                           f" on {numba.get_num_threads()} threads")
        for batch in args.batch:
            x32 = self.xs[batch]

            def run(x32: torch.Tensor = x32) -> torch.Tensor:
                return package.matmul(x32)

            warm = best_times(run, _calls(run, args.budget), args.repeat)[0]
            cold = {True: best_cold_times(run, self.sweep, args.repeat)[0]} if self.cold else {}
            row = Row(self.name, AQLM_PKG, batch, package.nbytes * 8 / (rows * cols), {True: warm}, cold,
                      numba.get_num_threads(), package.nbytes + x32.nbytes)
            self.print_row(row, primary=True)

    def torch_int4_rows(self) -> dict[int, float]:
        """Print torch-int4's rows for this shape after checking it and qformat's affine4 against x @ W_deq.T;
        return its warm time per batch."""
        args, (rows, cols), group = self.args, self.w32.shape, self.args.group_size
        if cols % group:
            for batch in args.batch:
                self.print_row(Row(self.name, TORCH_INT4, batch, None, {}, {}, 0, 0))
            self.checks.append(f"# check {self.name} g{group}: torch-int4 n/a (K={cols} not divisible by the group)")
            return {}
        w = self.w32.numpy()
        int4 = TorchInt4.from_rtn(*rtn(w, 4, group), group)
        qt = build("affine4", w, group)
        w_deq = torch.from_numpy(qt.decode()).double()  # the reference decoder's weight
        x = torch.randn(4, cols, generator=torch.Generator().manual_seed(7))
        x16 = x.to(torch.bfloat16)
        errors = {"qformat": relative_error(self.kernel.prepare(qt).matmul(x), x.double() @ w_deq.T),
                  TORCH_INT4: relative_error(int4.matmul(x16), x16.double() @ w_deq.T)}
        del w_deq, qt
        text = ", ".join(f"{name} {err:.1e}" for name, err in errors.items())
        self.checks.append(f"# check {self.name} g{group}: relative error against x @ W_deq.T: {text}")
        bad = [name for name, err in errors.items() if not err < CHECK_TOLERANCE[name]]
        if bad:
            raise SystemExit(f"{self.name}: {', '.join(bad)} do not compute x @ W_deq.T ({text})")
        times = {}
        for batch in args.batch:
            x16 = self.xs[batch].to(torch.bfloat16)

            def run(x16: torch.Tensor = x16) -> torch.Tensor:
                return int4.matmul(x16)

            t, threads = fastest_threads(run, _calls(run, args.budget), args.repeat, args.threads)
            cold = {}
            if self.cold:
                torch.set_num_threads(threads)
                cold = {True: best_cold_times(run, self.sweep, args.repeat)[0]}
                torch.set_num_threads(args.threads)
            row = Row(self.name, TORCH_INT4, batch, int4.nbytes() * 8 / (rows * cols), {True: t}, cold, threads,
                      int4.nbytes() + x16.nbytes)
            self.print_row(row, primary=True)
            times[batch] = t
        return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--codecs", nargs="+", default=["affine4", "affine3"],
                        help=f"affine2..affine8 (RTN, --group-size) or a method tree: {' '.join(method_trees.TREES)}")
    parser.add_argument("--shapes", nargs="+", type=shape_name, default=["4096x4096", "q/o 576x576", "k/v 192x576",
                                                                         "gate/up 1536x576", "down 576x1536"],
                        help=f"shapes by name or by RxC: {', '.join(SHAPES)}")
    parser.add_argument("--group-size", type=int, default=128, choices=[32, 64, 128, 256],
                        help="group of the affine codecs and of torch-int4 (the method trees keep their own)")
    parser.add_argument("--batch", nargs="+", type=int, default=[1])
    parser.add_argument("--governor", choices=list(GOVERNOR_MODES), default="on" if GOVERNOR.enabled else "off",
                        help="qformat's thread governor on, off, or both (each row timed with both); default: off, "
                             "unless QFORMAT_THREAD_GOVERNOR=on")
    parser.add_argument("--no-torch-int4", action="store_true", help="skip torch's int4 kernel and its check")
    parser.add_argument("--repeat", type=int, default=7, help="rounds per measurement (best is kept)")
    parser.add_argument("--budget", type=float, default=0.05, help="seconds per round (sets calls per round)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-cold", action="store_true", help="skip the cache-cold measurements")
    args = parser.parse_args()
    for codec in args.codecs:
        if not (codec in method_trees.TREES or codec in {f"affine{b}" for b in range(2, 9)}):
            parser.error(f"unknown codec {codec!r}")

    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    read = {n: read_bandwidth(n) for n in sorted({args.threads, 1}, reverse=True)}
    read_bw = max(read[args.threads].values())  # the machine reads at least this fast: the best reader counts
    bench = Bench(args, read_bw)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), numba {numba.__version__} ({numba.get_num_threads()} threads, "
          f"{numba.threading_layer()} layer); group {args.group_size}; governor {args.governor}; load average "
          f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    sums = "; ".join(f"{n} thread{'s' if n > 1 else ''}: " + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in r.items())
                     for n, r in read.items())
    print(f"# read bandwidth (sum over 256 MB, best of 5 rounds, GB/s): {sums}; %bw is against "
          f"{read_bw / 1e9:.1f} GB/s; copy bandwidth (numpy, read+write, 1 thread): {copy_bandwidth() / 1e9:.1f} GB/s")
    for line in explain(args.threads, bench.both, bench.cold):
        print(line)
    header = columns(bench.modes, bench.cold)
    print(header)
    print("-" * len(header))
    for name in args.shapes:
        bench.shape(name)
    for line in bench.checks:
        print(line)


if __name__ == "__main__":
    main()
