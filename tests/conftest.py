"""Fixtures shared by several test modules, and the test-run rules (kept small).

- Fixtures used by more than one module live here; shared plain helpers live in ``helpers.py`` (``from helpers
  import ...``); a helper or fixture one module uses stays in that module. Test modules never import each other.
- The run rules (``run_rules.py``): under CI (``CI`` set to a true value) a skipped test fails the run; the one
  declared exemption is the ``requires_gpu`` marker (deselected, not skipped, without a CUDA GPU).
"""

from __future__ import annotations

import os

# Before anything imports triton: without a GPU, Triton kernels run in the interpreter. Wide rich output so tests can
# match whole lines.
os.environ.setdefault("COLUMNS", "250")
# Decided without importing torch, which may import triton itself.
if not os.environ.get("TRITON_INTERPRET") and not os.path.exists("/dev/nvidiactl"):
    os.environ["TRITON_INTERPRET"] = "1"

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import run_rules
from helpers import HUB_TOKEN, make_affine_record

from qformat.format import QuantizedTensor


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def affine_record() -> QuantizedTensor:
    return make_affine_record()


# -- a local Hub ----------------------------------------------------------------------------------------------------


@pytest.fixture
def hub_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator:
    """A Hub on 127.0.0.1 (tests/hub_server.py) plus an isolated huggingface_hub: no Xet, private
    HF_HOME/cache/token, no stray credentials or endpoint from the environment, and no real sleeping in retry
    backoffs. It accepts the token ``helpers.HUB_TOKEN``."""
    import types

    import huggingface_hub.utils._http as hf_http
    from hub_server import start_hub_server
    from huggingface_hub import constants

    import qformat.hub as qhub

    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    # huggingface_hub reads these at import time, so patch the module constants too.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(hf_http, "time", types.SimpleNamespace(sleep=lambda s: None))
    monkeypatch.setattr(qhub, "BACKOFF_S", 0.0)
    server = start_hub_server(tmp_path, tokens={HUB_TOKEN})
    yield server
    server.stop()


@pytest.fixture
def hub_env(hub_server, monkeypatch: pytest.MonkeyPatch):
    """``hub_server`` reached the way users configure it (HF_ENDPOINT, HF_TOKEN), for code without endpoint/token
    parameters, e.g. ``qformat.load("user/repo")`` in an end-to-end test."""
    monkeypatch.setenv("HF_ENDPOINT", hub_server.endpoint)
    monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
    return hub_server


# -- run rules (tests/run_rules.py): under CI a skip fails the run; requires_gpu tests need a GPU ------------------


def pytest_configure(config: pytest.Config) -> None:
    run_rules.pytest_configure(config)
