"""AQLM (placeholder while the method is written; registers nothing yet)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qformat.plugin import hookimpl


@hookimpl
def qformat_register_methods(register: Callable[[Any], None]) -> None:
    del register
