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
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import numba

BACKOFF_S = 2.0
STALL_FACTOR = 6.0
STALL_FIXED_S = 1e-3
STALL_BYTES_PER_S = 4e9


def stall_budget(nbytes: int) -> float:
    """Seconds beyond which a call reading ``nbytes`` of weights has stalled, whatever the thread count."""
    return STALL_FIXED_S + nbytes / STALL_BYTES_PER_S


class ThreadGovernor:
    """Per calling thread (numba's thread count is thread-local): parallel unless recent calls stalled."""

    def __init__(self, backoff_s: float = BACKOFF_S, clock: Callable[[], float] = time.perf_counter) -> None:
        self.backoff_s = backoff_s
        self.clock = clock
        self._local = threading.local()

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
            if clock() < state.until:
                kernel(*args)  # backing off: single-threaded, nothing to judge
                return
            numba.set_num_threads(state.restore)
            state.restore = 0
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


GOVERNOR = ThreadGovernor()
