"""The thread governor's switch (off by default) (kernels/numba_threads.py): set_enabled and QFORMAT_THREAD_GOVERNOR."""

from __future__ import annotations

import os
import subprocess
import sys

import numba
import pytest
from qformat_kernels.numba_threads import ENV_SWITCH, GOVERNOR, ThreadGovernor, enabled_by_env

needs_two_threads = pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs at least two numba threads")


def _fake_clock_governor() -> tuple[ThreadGovernor, list[float]]:
    now = [0.0]
    return ThreadGovernor(backoff_s=2.0, clock=lambda: now[0]), now


@needs_two_threads
def test_an_off_governor_judges_nothing_and_keeps_all_threads() -> None:
    governor, now = _fake_clock_governor()

    def kernel(seconds: float) -> None:
        now[0] += seconds

    numba.set_num_threads(2)
    try:
        governor.set_enabled(False)
        best, budget = [float("inf"), 0], 1e-3
        for seconds in (5.0, 2e-4, 8e-3, 8e-3):  # the two last would be stalls with the governor on
            governor.run(best, budget, kernel, seconds)
        assert numba.get_num_threads() == 2 and not governor.backing_off()
        assert best == [float("inf"), 0]  # nothing recorded while off
        governor.set_enabled(True)
        governor.run(best, budget, kernel, 2e-4)  # first judged call: never judged
        governor.run(best, budget, kernel, 8e-3)  # on again: a stall backs off
        assert numba.get_num_threads() == 1 and governor.backing_off()
    finally:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)


@needs_two_threads
def test_switching_off_while_backing_off_restores_the_threads() -> None:
    governor, now = _fake_clock_governor()

    def kernel(seconds: float) -> None:
        now[0] += seconds

    numba.set_num_threads(2)
    try:
        best, budget = [float("inf"), 0], 1e-3
        for seconds in (5.0, 2e-4, 8e-3):
            governor.run(best, budget, kernel, seconds)
        assert numba.get_num_threads() == 1 and governor.backing_off()
        governor.set_enabled(False)  # the calling thread returns to its threads at once
        assert numba.get_num_threads() == 2 and not governor.backing_off()
        governor.run(best, budget, kernel, 8e-3)
        assert numba.get_num_threads() == 2
    finally:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)


@needs_two_threads
def test_off_returns_a_backing_off_thread_to_its_threads_on_its_next_call() -> None:
    governor, now = _fake_clock_governor()

    def kernel(seconds: float) -> None:
        now[0] += seconds

    numba.set_num_threads(2)
    try:
        best, budget = [float("inf"), 0], 1e-3
        for seconds in (5.0, 2e-4, 8e-3):
            governor.run(best, budget, kernel, seconds)
        assert numba.get_num_threads() == 1
        governor.enabled = False  # as another thread's set_enabled(False) leaves this one
        governor.run(best, budget, kernel, 2e-4)  # still inside the backoff window
        assert numba.get_num_threads() == 2 and not governor.backing_off()
    finally:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)


@pytest.mark.parametrize(("value", "enabled"), [
    (None, False), ("on", True), ("ON", True), (" 1 ", True), ("true", True), ("yes", True), ("", False),
    ("off", False), ("0", False), ("no", False),
])
def test_the_environment_switch(value: str | None, enabled: bool) -> None:
    environ = {} if value is None else {ENV_SWITCH: value}
    assert enabled_by_env(environ) is enabled


def test_the_default_governor_follows_the_environment_at_import() -> None:
    assert GOVERNOR.enabled is enabled_by_env()
    code = "from qformat_kernels.numba_threads import GOVERNOR; print(GOVERNOR.enabled)"
    for value, expected in (("off", "False"), ("on", "True")):
        env = {**os.environ, ENV_SWITCH: value}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == expected
