"""Keep numba's parallel kernels from stalling on a busy machine.

Numba's OpenMP pool waits actively at the end of a parallel region. On a 2-core machine that another process keeps
busy, the scheduler may stack our two threads on one core: each then spins while the other needs that core, and a
250 us product takes 7-10 ms (measured here, with other jobs running). Waiting passively instead
(GOMP_SPINCOUNT=0) avoids the stall but costs a few microseconds per call even on an idle machine, and runs no
faster than one thread when the other core is taken.

So kernels run on all of numba's threads, and a call that takes far longer than it should counts as a stall: more
than ``STALL_FACTOR`` times the best seen for the same kernel and shape, and more than a budget that even one
thread meets easily (1 ms plus the bytes read at 4 GB/s; the budget alone decides while no good time has been seen,
for a run may start stalled). The calling thread then runs single-threaded for ``BACKOFF_S`` seconds (no barrier,
nothing to stall) and tries parallel again afterwards.

It is **off by default**, decided by measurement (issue 16): on a quiet 2-core machine it never helps a kernel
(``bench/gemv.py --governor both``: off/on 0.92-1.06 at 4096^2) and it hurts end to end, because a decode step's
many short calls get judged stalled and sent to one thread for seconds (``QFORMAT_THREAD_GOVERNOR=on`` vs ``off``,
``bench/llama_race.py --engine lean``, SmolLM2 Q4_1, load 1.3, two runs two minutes apart: 45.5 vs 62.1 tokens/s, llama.cpp 85.5 and 93.5 beside them). Where other
processes keep the cores busy it does rescue stalled calls (the loaded smoke run in bench/GEMV_NOTES.md: off/on up to
2.6 at 4096^2 cold and ~150 at 192x576), so turn it on there: ``QFORMAT_THREAD_GOVERNOR=on`` (also ``1``, ``true``,
``yes``) read at import, or ``GOVERNOR.set_enabled(True)``. Off, every call runs on numba's current thread count and
nothing is judged.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import numba

BACKOFF_S = 2.0
STALL_FACTOR = 6.0
STALL_FIXED_S = 1e-3
STALL_BYTES_PER_S = 4e9
ENV_SWITCH = "QFORMAT_THREAD_GOVERNOR"
_ON_VALUES = frozenset({"on", "1", "true", "yes"})


def enabled_by_env(environ: Mapping[str, str] = os.environ) -> bool:
    """True when ``QFORMAT_THREAD_GOVERNOR`` says on (on, 1, true, yes; any case); False otherwise (the default)."""
    return environ.get(ENV_SWITCH, "off").strip().lower() in _ON_VALUES


def stall_budget(nbytes: int) -> float:
    """Seconds beyond which a call reading ``nbytes`` of weights has stalled, whatever the thread count."""
    return STALL_FIXED_S + nbytes / STALL_BYTES_PER_S


class ThreadGovernor:
    """Per calling thread (numba's thread count is thread-local): parallel unless recent calls stalled."""

    def __init__(self, backoff_s: float = BACKOFF_S, clock: Callable[[], float] = time.perf_counter,
                 enabled: bool = True) -> None:
        self.backoff_s = backoff_s
        self.clock = clock
        self.enabled = enabled
        self._local = threading.local()

    def set_enabled(self, enabled: bool) -> None:
        """Switch the governor on or off for all threads. Off, a thread backing off returns to its thread count on
        its next call (the calling thread at once)."""
        self.enabled = bool(enabled)
        state = self._state()
        if not self.enabled and state.restore:
            numba.set_num_threads(state.restore)
            state.restore = 0

    def _state(self) -> Any:
        state = self._local
        try:
            state.restore  # noqa: B018  (set on first use in each thread)
        except AttributeError:
            state.restore = 0  # thread count to return to after a backoff (0: not backing off)
            state.until = 0.0
        return state

    def run(self, best: list[float], budget: float, kernel: Callable[..., None], *args: Any) -> None:
        """Call ``kernel(*args)``. ``best`` is the caller's record [fastest parallel time, parallel calls made]
        (the first call, which may compile, is never judged); ``budget`` its :func:`stall_budget`.

        Decoding calls this a few hundred times per token, so the common case costs two clock reads and no call into
        numba: the thread count is only asked for when a call looks stalled."""
        state = self._state()
        clock = self.clock
        if state.restore:
            if clock() < state.until and self.enabled:
                kernel(*args)  # backing off: single-threaded, nothing to judge
                return
            numba.set_num_threads(state.restore)
            state.restore = 0
        if not self.enabled:
            kernel(*args)
            return
        start = clock()
        kernel(*args)
        elapsed = clock() - start
        best[1] += 1
        if best[1] <= 1:
            return
        if elapsed > budget and (elapsed > STALL_FACTOR * best[0] or best[0] > budget):
            threads = numba.get_num_threads()
            if threads > 1:
                state.restore = threads
                state.until = clock() + self.backoff_s
                numba.set_num_threads(1)
        elif elapsed < best[0]:
            best[0] = elapsed

    def backing_off(self) -> bool:
        return bool(self._state().restore)


GOVERNOR = ThreadGovernor(enabled=enabled_by_env())
