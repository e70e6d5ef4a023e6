"""Progress bars, peak memory and the final summary table of a conversion."""

from __future__ import annotations

import ctypes
import gc
import resource
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..format import iter_nodes
from ..format.container import bits_by_layer_type, layer_type, rounded_bits


def reset_peak_rss() -> bool:
    """Start the peak-RSS count afresh, so that a conversion run inside a larger program (a notebook, a test
    session) reports its own peak. Linux >= 4.0 only (writing 5 to /proc/self/clear_refs resets ``VmHWM`` and
    nothing else); returns False where the peak cannot be reset and stays the program's peak so far."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident set size since exec or since the last :func:`reset_peak_rss`.

    Linux: ``VmHWM`` of /proc/self/status, which starts afresh at exec (``ru_maxrss`` does not: a process started
    by a large parent would report the parent's size). Elsewhere ``ru_maxrss`` (KiB on Linux, bytes on macOS).
    """
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def return_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it otherwise, so RSS would creep up block after block
    through fragmentation, although nothing is held)."""
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl, ...): nothing to do
            pass


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * resource.getpagesize()
    except OSError:
        return peak_rss_bytes()


class Progress:
    """tqdm bars per block and per layer (with ETA); silent when quiet or stderr is not a terminal."""

    def __init__(self, total_blocks: int, done_blocks: int, quiet: bool) -> None:
        self.enabled = not quiet and sys.stderr.isatty()
        self.blocks = None
        self.layers = None
        if self.enabled:
            from tqdm.auto import tqdm

            self._tqdm = tqdm
            self.blocks = tqdm(total=total_blocks, initial=done_blocks, desc="blocks", unit="block", position=0)

    def start_block(self, index: int, layers: int) -> None:
        if self.enabled:
            if self.layers is not None:
                self.layers.close()
            self.layers = self._tqdm(total=layers, desc=f"block {index} layers", unit="layer", position=1,
                                     leave=False)

    def layer_done(self, name: str) -> None:
        if self.layers is not None:
            self.layers.set_postfix_str(name.rsplit(".", 1)[-1], refresh=False)
            self.layers.update()

    def block_done(self) -> None:
        if self.blocks is not None:
            self.blocks.update()

    def note(self, text: str) -> None:
        if self.blocks is not None:
            self.blocks.set_postfix_str(text)

    def close(self) -> None:
        for bar in (self.layers, self.blocks):
            if bar is not None:
                bar.close()
        self.layers = self.blocks = None


def outlier_count(node: Any, tensor_len: Callable[[str], int]) -> int:
    """Stored outliers in a record's node tree: the entries of every ``sparse_csr`` node (length of its col_idx)."""
    return sum(tensor_len(n["col_idx"]) for n in iter_nodes(node) if n.get("codec") == "sparse_csr" and "col_idx" in n)


@dataclass
class Summary:
    method: str
    bits_by_layer_type: dict[str, float]
    bits_per_weight: float | None
    outlier_share_by_layer_type: dict[str, float]
    outlier_share: float | None
    quantized_weights: int
    records: int
    seconds: float
    peak_rss_bytes: int  # of this conversion where the OS lets the count be reset (Linux), else of the process
    resumed_blocks: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


def summarize(method: str, records: Mapping[str, dict], outliers: Mapping[str, int], seconds: float,
              peak: int, resumed_blocks: int) -> Summary:
    by_type = bits_by_layer_type(records)
    numel = {name: int(np.prod(r["shape"], dtype=np.int64)) for name, r in records.items()}
    total = sum(numel.values())
    share: dict[str, list[int]] = {}
    for name in records:
        acc = share.setdefault(layer_type(name), [0, 0])
        acc[0] += outliers.get(name, 0)
        acc[1] += numel[name]
    any_outliers = any(outliers.values())
    return Summary(method, by_type, rounded_bits(records.values()),
                   {k: a / n for k, (a, n) in sorted(share.items())} if any_outliers else {},
                   sum(outliers.values()) / total if any_outliers and total else None,
                   total, len(records), seconds, peak, resumed_blocks)


def print_summary(summary: Summary, out: str, file: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(file=file or sys.stderr, highlight=False)
    table = Table(title=f"qformat convert ({summary.method}) -> {out}", show_edge=True)
    table.add_column("layer type")
    table.add_column("bits/weight", justify="right")
    if summary.outlier_share is not None:
        table.add_column("outliers", justify="right")
    for kind, bits in summary.bits_by_layer_type.items():
        row = [kind, f"{bits:.3f}"]
        if summary.outlier_share is not None:
            row.append(f"{100 * summary.outlier_share_by_layer_type.get(kind, 0.0):.2f}%")
        table.add_row(*row)
    overall = ["overall", f"{summary.bits_per_weight:.3f}" if summary.bits_per_weight is not None else "-"]
    if summary.outlier_share is not None:
        overall.append(f"{100 * summary.outlier_share:.2f}%")
    table.add_row(*overall, style="bold")
    console.print(table)
    resumed = f", resumed after {summary.resumed_blocks} finished blocks" if summary.resumed_blocks else ""
    console.print(f"{summary.records} quantized tensors, {summary.quantized_weights:,} weights; time "
                  f"{format_seconds(summary.seconds)}{resumed}; peak RSS {summary.peak_rss_bytes / 2**20:,.0f} MiB")


def format_seconds(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s" if minutes else \
        f"{seconds:.1f}s"
