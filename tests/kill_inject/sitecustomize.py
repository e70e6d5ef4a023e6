"""SIGKILL injection for tests/test_kill_resume.py: a child Python started with this folder on PYTHONPATH kills itself
at a chosen file operation, with no hook in qformat's code.

``QFORMAT_TEST_KILL="<op> <when> <nth> <pattern>"``: on the ``nth`` call of ``op`` whose paths, written
``"<src> -> <dst>"``, match the glob ``pattern``, the process sends itself SIGKILL ``before`` or ``after`` the call.
``op`` is ``replace`` (os.replace), ``link`` (os.link) or ``copy2`` (shutil.copy2): qformat calls them through their
module, so replacing the module attribute reaches every call. A line naming the point goes to stderr first, so the
test can tell this kill from any other death.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import signal
import sys


def _install(spec: str) -> None:
    op, when, nth, pattern = spec.split(" ", 3)
    assert when in ("before", "after"), spec
    owner, name = {"replace": (os, "replace"), "link": (os, "link"), "copy2": (shutil, "copy2")}[op]
    original = getattr(owner, name)
    seen = 0

    def die() -> None:
        sys.stderr.write(f"qformat-test-kill: {spec}\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    def wrapper(*args, **kwargs):
        nonlocal seen
        if fnmatch.fnmatchcase(" -> ".join(os.fspath(a) for a in args[:2]), pattern):
            seen += 1
            if seen == int(nth):
                if when == "before":
                    die()
                result = original(*args, **kwargs)
                die()
                return result
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)


if os.environ.get("QFORMAT_TEST_KILL"):
    _install(os.environ["QFORMAT_TEST_KILL"])
