"""The run rules (tests/run_rules.py): under CI a skip fails the session; requires_gpu tests are deselected without
a GPU. Each case runs pytest in a subprocess on a few small test files."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

FILES = {
    "test_plain.py": """
        import pytest

        def test_passes():
            pass

        def test_skipped():
            pytest.skip("no data here")

        @pytest.mark.xfail(reason="known", strict=True)
        def test_expected_failure():
            assert False
    """,
    "test_module_skip.py": """
        import pytest

        pytest.skip("module needs something missing", allow_module_level=True)

        def test_never_collected():
            pass
    """,
    "test_clean.py": """
        import pytest

        def test_passes():
            pass

        @pytest.mark.xfail(reason="known", strict=True)
        def test_expected_failure():
            assert False

        @pytest.mark.requires_gpu
        def test_on_a_gpu():
            import torch
            assert torch.cuda.is_available()
    """,
}


def run_pytest(tmp_path: Path, *args: str, ci: str | None) -> subprocess.CompletedProcess:
    for name, text in FILES.items():
        (tmp_path / name).write_text(textwrap.dedent(text))
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # this folder is the root: none of the project's options
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_") and k != "CI"}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "run_rules", "-p", "no:cacheprovider", *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("value, on", [("true", True), ("1", True), ("True", True), ("yes", True), ("false", False),
                                       ("0", False), ("", False), (None, False)])
def test_ci_words(monkeypatch: pytest.MonkeyPatch, value: str | None, on: bool) -> None:
    import run_rules

    monkeypatch.delenv("CI", raising=False)
    if value is not None:
        monkeypatch.setenv("CI", value)
    assert run_rules.ci_enabled() is on


def test_a_skip_fails_the_run_under_ci_and_is_listed(tmp_path: Path) -> None:
    proc = run_pytest(tmp_path, "test_plain.py", "test_module_skip.py", ci="true")
    assert proc.returncode == 1, proc.stdout
    assert "skips are failures under CI" in proc.stdout
    assert "SKIPPED test_plain.py::test_skipped: Skipped: no data here" in proc.stdout
    assert "SKIPPED test_module_skip.py: Skipped: module needs something missing" in proc.stdout
    assert "test_expected_failure" not in proc.stdout.split("skips are failures under CI")[1]  # xfail is no skip


def test_a_skip_is_a_skip_outside_ci(tmp_path: Path) -> None:
    proc = run_pytest(tmp_path, "test_plain.py", "test_module_skip.py", ci="false")
    assert proc.returncode == 0, proc.stdout
    assert "skips are failures under CI" not in proc.stdout and "2 skipped" in proc.stdout


def test_a_skip_on_an_xdist_worker_fails_the_run(tmp_path: Path) -> None:
    proc = run_pytest(tmp_path, "-n", "2", "test_plain.py", "test_module_skip.py", ci="true")
    assert proc.returncode == 1, proc.stdout
    assert "SKIPPED test_plain.py::test_skipped: Skipped: no data here" in proc.stdout
    assert "SKIPPED test_module_skip.py: Skipped: module needs something missing" in proc.stdout


def test_gpu_only_tests_are_deselected_not_skipped(tmp_path: Path) -> None:
    import torch

    proc = run_pytest(tmp_path, "test_clean.py", ci="true")
    assert proc.returncode == 0, proc.stdout
    if torch.cuda.is_available():
        assert "2 passed, 1 xfailed" in proc.stdout, proc.stdout
    else:
        assert "1 passed, 1 deselected, 1 xfailed" in proc.stdout, proc.stdout
