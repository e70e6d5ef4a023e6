"""Rules of a test run, as a pytest plugin (tests/conftest.py enables it; ``-p run_rules`` enables it anywhere).

- Under CI (the ``CI`` variable set to a true value, as CI services set it) a skip is a failure: a skipped check did
  not run, yet the run looks green. Every skip, of a test or of a whole module, is listed at the end and the session
  exits with status 1. An expected failure (xfail) is not a skip.
- The one declared exemption: a test marked ``requires_gpu`` is deselected, not skipped, where torch sees no CUDA
  GPU. Use it only for tests that cannot run on a CPU at all (Triton kernels run on the CPU in the interpreter).
"""

from __future__ import annotations

import os

import pytest

PLUGIN_NAME = "qformat-run-rules"
TRUE_WORDS = {"1", "true", "yes", "on"}


def ci_enabled() -> bool:
    return os.environ.get("CI", "").strip().lower() in TRUE_WORDS


def pytest_configure(config: pytest.Config) -> None:
    if not config.pluginmanager.has_plugin(PLUGIN_NAME):  # enabled both by conftest and by -p run_rules
        config.addinivalue_line("markers", "requires_gpu: needs a CUDA GPU; deselected (not skipped) without one")
        config.pluginmanager.register(RunRules(config), PLUGIN_NAME)


class RunRules:
    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.skips: list[tuple[str, str]] = []
        # Under pytest-xdist the controller receives every worker's reports and sets the exit status.
        self.controller = not hasattr(config, "workerinput")

    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        if not any(item.get_closest_marker("requires_gpu") for item in items):
            return
        import torch

        if not torch.cuda.is_available():
            gpu_only = [item for item in items if item.get_closest_marker("requires_gpu")]
            config.hook.pytest_deselected(items=gpu_only)
            items[:] = [item for item in items if not item.get_closest_marker("requires_gpu")]

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self._record(report)

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        self._record(report)

    def _record(self, report: pytest.TestReport | pytest.CollectReport) -> None:
        if not report.skipped or hasattr(report, "wasxfail"):
            return
        longrepr = report.longrepr
        if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (file, line, "Skipped: reason")
            reason = f"{longrepr[2]} ({longrepr[0]}:{longrepr[1]})"
        else:
            reason = str(longrepr)
        self.skips.append((report.nodeid, reason))

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.controller and ci_enabled() and self.skips and session.exitstatus in (
                pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not (self.controller and ci_enabled() and self.skips):
            return
        terminalreporter.section("skips are failures under CI", sep="=", red=True, bold=True)
        for nodeid, reason in self.skips:
            terminalreporter.line(f"SKIPPED {nodeid}: {reason}", red=True)
        terminalreporter.line(f"{len(self.skips)} skip(s) with CI={os.environ.get('CI')}: the run fails. Make the "
                              "test run here, or mark a GPU-only test requires_gpu (tests/run_rules.py).", red=True)
