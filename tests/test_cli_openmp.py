"""`qformat convert` makes OpenMP threads sleep at barriers (spinning costs minutes on a shared machine)."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = ("import os, sys; from qformat.cli.convert_cmds import quiet_openmp_waits; "
         "print(quiet_openmp_waits(), os.environ.get('OMP_WAIT_POLICY'))")


def _probe(env_policy: str | None, preimport_torch: bool = False) -> str:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if env_policy is not None:
        env["OMP_WAIT_POLICY"] = env_policy
    code = ("import torch; " if preimport_torch else "") + PROBE
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_passive_by_default_before_torch_loads() -> None:
    assert _probe(None) == "True PASSIVE"


def test_the_users_choice_wins() -> None:
    assert _probe("ACTIVE") == "True ACTIVE"


def test_too_late_once_torch_is_loaded() -> None:
    assert _probe(None, preimport_torch=True) == "False None"
