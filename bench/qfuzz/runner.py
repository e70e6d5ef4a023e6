"""Cases, targets and the fork server that runs each case in a child with a memory cap and a timeout.

The parent imports numpy and qformat once, generates each case (deterministic from seed, target and case id), writes
it under a scratch folder and ``fork()``s a child per case. The child caps its address space (RLIMIT_AS: what it
already maps plus ``mem_mb``), runs the target and reports the outcome as one JSON line through a pipe. The parent
kills a child that runs past ``timeout`` and reads a death by signal from ``waitpid``.

Outcomes: ``ok``; ``FormatError:<code>`` and ``QformatError:<class>`` (clean rejections); anything else is not clean:
``exception:<type>``, ``memory:<type>`` (the cap was hit), ``crash:<signal>``, ``timeout``, ``died:<status>``,
``seed-rejected:<outcome>`` (an unmutated valid seed did not decode), ``fuzzer-error:<type>`` (the case could not be
built), and for the kernel target ``mismatch:<what>`` (numba and the reference decoder disagree).
"""

from __future__ import annotations

import json
import os
import random
import resource
import selectors
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .corpus import file_corpus, folder_corpus
from .mutate_file import FileMutator
from .mutate_folder import FolderMutator
from .sample import FileSample, FolderSample
from .targets import TARGET_FUNCTIONS, preload

TARGETS = ("reader", "folder", "load", "kernel")
FILE_TARGETS = ("reader", "kernel")
MUTATION_COUNTS = [0] + [1] * 14 + [2] * 9 + [3] * 4 + [4] * 3  # 1 in 31 cases is an unmutated seed


@dataclass
class Options:
    target: str = "reader"
    seed: int = 0
    jobs: int = 2
    mem_mb: int = 1024
    timeout: float = 10.0
    folder_seeds: str = "synthetic"
    fs_special: bool = False


@dataclass
class Case:
    case_id: int
    seed_label: str
    mutations: list[str]
    sample: FileSample | FolderSample | None
    error: str | None = None  # the fuzzer itself failed to build this case
    expect_ok: bool = False  # an unmutated valid seed: anything but success is a finding

    def write(self, where: Path) -> Path:
        """Write the case under ``where``; return the path the target opens."""
        assert self.sample is not None
        if isinstance(self.sample, FileSample):
            where.mkdir(parents=True, exist_ok=True)
            path = where / "case.safetensors"
            path.write_bytes(self.sample.to_bytes())
            return path
        path = where / "folder"
        self.sample.write(path)
        return path


@dataclass
class Result:
    case_id: int
    seed_label: str
    mutations: list[str]
    outcome: str
    detail: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    peak_mb: float = 0.0  # the child's peak resident memory (it starts as a copy of the warm parent)

    @property
    def clean(self) -> bool:
        return is_clean(self.outcome)


def is_clean(outcome: str) -> bool:
    return outcome == "ok" or outcome.startswith(("FormatError:", "QformatError:"))


class CaseFactory:
    """Builds case ``i`` of a campaign: a seed from the corpus, cloned and mutated by ``random.Random(seed/target/i)``."""

    def __init__(self, options: Options) -> None:
        self.options = options
        if options.target in FILE_TARGETS:
            self.corpus: list[tuple[str, Any]] = file_corpus()
        else:
            kind = "tiny" if options.target == "load" else options.folder_seeds
            self.corpus = folder_corpus(kind)

    def make(self, case_id: int) -> Case:
        rng = random.Random(f"qformat-fuzz/{self.options.seed}/{self.options.target}/{case_id}")
        label, base = self.corpus[rng.randrange(len(self.corpus))]
        sample = base.clone()
        count = MUTATION_COUNTS[rng.randrange(len(MUTATION_COUNTS))]
        mutations: list[str] = []
        try:
            if isinstance(sample, FileSample):
                sample.fix_storage = rng.random() < 0.92
                # non-ASCII (lone surrogates too) raw in the qformat text: the header escapes it, the reader
                # gets a str with those characters; raw in the header: invalid UTF-8 bytes for surrogates
                sample.ascii_inner = rng.random() < 0.7
                sample.ascii_outer = rng.random() < 0.95
                mutations = FileMutator(rng, sample).run(count)
            else:
                mutations = FolderMutator(rng, sample, self.options.fs_special).run(count)
        except Exception as exc:
            return Case(case_id, label, mutations, None, f"{type(exc).__name__}: {exc}"[:300])
        return Case(case_id, label, mutations, sample, expect_ok=count == 0)


# ---------------------------------------------------------------------------------------------------------------
# the child

def _address_space() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _where(exc: BaseException) -> str:
    """The innermost frame in qformat code (else the innermost frame), as file:line function."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/qformat/" in f.filename or "/kernels/" in f.filename or "/plugins/" in f.filename]
    frame = (ours or frames or [None])[-1]
    if frame is None:
        return "?"
    parts = Path(frame.filename).parts
    short = "/".join(parts[-2:])
    return f"{short}:{frame.lineno} {frame.name}"


def classify(exc: BaseException) -> tuple[str, dict[str, Any]]:
    from qformat.errors import FormatError, QformatError

    if isinstance(exc, FormatError):
        return f"FormatError:{exc.code}", {"message": str(exc)[:300]}
    if isinstance(exc, QformatError):
        return f"QformatError:{type(exc).__name__}", {"message": str(exc)[:300]}
    detail = {"message": _safe_text(exc)[:300], "where": _where(exc)}
    if isinstance(exc, MemoryError):
        return f"memory:{type(exc).__name__}", detail
    return f"exception:{type(exc).__name__}", detail


def _safe_text(exc: BaseException) -> str:
    try:
        return str(exc).encode("utf-8", "backslashreplace").decode()
    except Exception:
        return f"<unprintable {type(exc).__name__}>"


def child_main(target: str, path: Path, report_fd: int, mem_mb: int, quiet: bool) -> None:
    """Never returns: runs the target and exits with os._exit."""
    try:
        if quiet:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
        if mem_mb:
            limit = _address_space() + mem_mb * 1024 * 1024
            hard = resource.getrlimit(resource.RLIMIT_AS)[1]
            limit = limit if hard == resource.RLIM_INFINITY else min(limit, hard)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        try:
            detail = TARGET_FUNCTIONS[target](path)
            outcome = f"mismatch:{detail['mismatch']}" if "mismatch" in detail else "ok"
        except BaseException as exc:
            outcome, detail = classify(exc)
            if not quiet and not is_clean(outcome):
                traceback.print_exc()
        message = json.dumps({"outcome": outcome, "detail": detail}, ensure_ascii=True).encode()
        os.write(report_fd, message[:60000])
    finally:
        os._exit(0)


# ---------------------------------------------------------------------------------------------------------------
# the parent

@dataclass
class _Running:
    case: Case
    pid: int
    fd: int
    deadline: float
    started: float
    workdir: Path
    chunks: list[bytes] = field(default_factory=list)


class ForkServer:
    def __init__(self, options: Options, scratch: Path, quiet: bool = True,
                 on_result: Callable[[Result, Case, Path], None] | None = None) -> None:
        self.options = options
        self.scratch = scratch
        self.quiet = quiet
        self.on_result = on_result

    def run(self, cases: Iterable[Case]) -> list[Result]:
        results: list[Result] = []
        pending = iter(cases)
        running: dict[int, _Running] = {}
        selector = selectors.DefaultSelector()
        exhausted = False
        try:
            while running or not exhausted:
                while not exhausted and len(running) < self.options.jobs:
                    case = next(pending, None)
                    if case is None:
                        exhausted = True
                        break
                    job = self._start(case)
                    if isinstance(job, Result):
                        results.append(job)
                        if self.on_result is not None:
                            self.on_result(job, case, self.scratch / f"case-{case.case_id}")
                        continue
                    running[job.fd] = job
                    selector.register(job.fd, selectors.EVENT_READ)
                if not running:
                    break
                now = time.monotonic()
                wait = max(0.0, min(job.deadline for job in running.values()) - now)
                for key, _ in selector.select(timeout=min(wait, 1.0)):
                    job = running[key.fd]
                    chunk = os.read(key.fd, 65536)
                    if chunk:
                        job.chunks.append(chunk)
                        continue
                    selector.unregister(key.fd)
                    del running[key.fd]
                    results.append(self._finish(job, timed_out=False))
                now = time.monotonic()
                for fd, job in list(running.items()):
                    if now >= job.deadline:
                        selector.unregister(fd)
                        del running[fd]
                        results.append(self._finish(job, timed_out=True))
        finally:
            for job in running.values():
                _kill(job.pid)
                os.close(job.fd)
            selector.close()
        return results

    def _start(self, case: Case) -> _Running | Result:
        workdir = self.scratch / f"case-{case.case_id}"
        try:
            if case.error:
                raise RuntimeError(case.error)
            path = case.write(workdir)
        except Exception as exc:
            shutil.rmtree(workdir, ignore_errors=True)
            return Result(case.case_id, case.seed_label, case.mutations, f"fuzzer-error:{type(exc).__name__}",
                          {"message": _safe_text(exc)[:300]})
        read_fd, write_fd = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            child_main(self.options.target, path, write_fd, self.options.mem_mb, self.quiet)
        os.close(write_fd)
        now = time.monotonic()
        return _Running(case, pid, read_fd, now + self.options.timeout, now, workdir)

    def _finish(self, job: _Running, timed_out: bool) -> Result:
        if timed_out:
            _kill(job.pid)
        _, status, usage = os.wait4(job.pid, 0)
        os.close(job.fd)
        seconds = time.monotonic() - job.started
        report = b"".join(job.chunks)
        if timed_out:
            outcome, detail = "timeout", {"message": f"killed after {self.options.timeout:g} s"}
        elif os.WIFSIGNALED(status):
            outcome, detail = f"crash:{signal.Signals(os.WTERMSIG(status)).name}", {}
        elif report:
            parsed = json.loads(report)
            outcome, detail = parsed["outcome"], parsed["detail"]
        else:
            outcome, detail = f"died:exit={os.WEXITSTATUS(status)}", {}
        if job.case.expect_ok and outcome != "ok":
            outcome = f"seed-rejected:{outcome}"  # a valid seed, unmutated: the serializer or the reader is wrong
        result = Result(job.case.case_id, job.case.seed_label, job.case.mutations, outcome, detail, seconds,
                        usage.ru_maxrss / 1024)
        if self.on_result is not None:
            self.on_result(result, job.case, job.workdir)
        shutil.rmtree(job.workdir, ignore_errors=True)
        return result


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def scratch_dir() -> Path:
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="qformat-fuzz-", dir=base))


# ---------------------------------------------------------------------------------------------------------------
# campaigns and reports

@dataclass
class Campaign:
    options: Options
    results: list[Result]
    seconds: float

    @property
    def counts(self) -> Counter:
        return Counter(r.outcome for r in self.results)

    @property
    def non_clean(self) -> list[Result]:
        return sorted((r for r in self.results if not r.clean), key=lambda r: r.case_id)

    def findings(self) -> dict[str, list[Result]]:
        """Non-clean results grouped by outcome and the code location that raised."""
        groups: dict[str, list[Result]] = {}
        for result in self.non_clean:
            key = result.outcome + (f" at {result.detail['where']}" if result.detail.get("where") else "")
            groups.setdefault(key, []).append(result)
        return groups

    def to_json(self) -> dict[str, Any]:
        return {
            "options": vars(self.options), "cases": len(self.results), "seconds": round(self.seconds, 2),
            "cases_per_second": round(len(self.results) / self.seconds, 2) if self.seconds else None,
            "counts": dict(sorted(self.counts.items())),
            "clean": sum(1 for r in self.results if r.clean),
            "non_clean": [vars(r) for r in self.non_clean],
            "slowest": [{"case_id": r.case_id, "seconds": round(r.seconds, 2), "outcome": r.outcome}
                        for r in self.slowest()],
            "largest": [{"case_id": r.case_id, "peak_mb": round(r.peak_mb), "outcome": r.outcome}
                        for r in self.largest()],
        }

    def slowest(self, n: int = 5) -> list[Result]:
        return sorted(self.results, key=lambda r: -r.seconds)[:n]

    def largest(self, n: int = 5) -> list[Result]:
        return sorted(self.results, key=lambda r: -r.peak_mb)[:n]


def cap_parent(extra_gb: int = 4) -> None:
    """A soft address-space cap on the fork server itself: a runaway case must not take the machine down.
    Children raise their soft limit again (up to the unchanged hard limit) before setting their own cap."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _address_space() + (extra_gb << 30)
    if soft == resource.RLIM_INFINITY or soft > limit:
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def run_campaign(options: Options, case_ids: Iterable[int], *, progress: Callable[[str], None] | None = None,
                 save_dir: Path | None = None) -> Campaign:
    preload(options.target)
    cap_parent()
    factory = CaseFactory(options)
    scratch = scratch_dir()
    if options.target == "kernel":
        warm_up(options, factory, scratch, progress)
    started = time.monotonic()
    done = [0, 0]
    last = [started]

    def on_result(result: Result, case: Case, workdir: Path) -> None:
        done[0] += 1
        done[1] += not result.clean
        if save_dir is not None and not result.clean:
            save_case(save_dir, result, workdir, options)
        now = time.monotonic()
        if progress is not None and now - last[0] >= 10:
            last[0] = now
            progress(f"[{now - started:6.0f} s] {done[0]} cases, {done[0] / (now - started):.1f}/s, "
                     f"{done[1]} not clean")

    try:
        results = ForkServer(options, scratch, on_result=on_result).run(factory.make(i) for i in case_ids)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return Campaign(options, sorted(results, key=lambda r: r.case_id), time.monotonic() - started)


def warm_up(options: Options, factory: CaseFactory, scratch: Path,
            progress: Callable[[str], None] | None) -> None:
    """Run every unmutated seed once (long timeout, results dropped) so numba compiles into its on-disk cache
    before the timed cases: a child's compilation dies with the child."""
    if progress is not None:
        progress(f"warming up numba on {len(factory.corpus)} seeds")
    seeds = [Case(-1 - i, label, [], base.clone()) for i, (label, base) in enumerate(factory.corpus)]
    ForkServer(Options(**{**vars(options), "timeout": 600.0}), scratch).run(seeds)


def save_case(save_dir: Path, result: Result, workdir: Path, options: Options) -> None:
    out = save_dir / f"{options.target}-seed{options.seed}-case{result.case_id}"
    shutil.rmtree(out, ignore_errors=True)
    if workdir.exists():
        shutil.copytree(workdir, out, symlinks=True, ignore_dangling_symlinks=True,
                        ignore=lambda d, names: [n for n in names if _is_special(Path(d) / n)])
    out.mkdir(parents=True, exist_ok=True)
    (out / "case.json").write_text(json.dumps({**vars(result), "options": vars(options)}, indent=1,
                                              ensure_ascii=True) + "\n")


def _is_special(path: Path) -> bool:
    return not path.is_symlink() and path.exists() and not (path.is_file() or path.is_dir())


class SavedCase(Case):
    """A file or folder already on disk (e.g. kept by --save-crashes): the target opens it where it is."""

    def __init__(self, path: Path) -> None:
        super().__init__(-1, str(path), [], None)
        self.path = path

    def write(self, where: Path) -> Path:
        where.mkdir(parents=True, exist_ok=True)
        return self.path


def replay(options: Options, case_id: int | Path, save_dir: Path | None = None) -> Result:
    """Run one case again (an id, or a saved file or folder), in a child with the same caps, printing its
    traceback."""
    preload(options.target)
    cap_parent()
    case = SavedCase(case_id) if isinstance(case_id, Path) else CaseFactory(options).make(case_id)
    scratch = scratch_dir()
    saved: list[Result] = []

    def keep(result: Result, case: Case, workdir: Path) -> None:
        saved.append(result)
        if save_dir is not None:
            save_case(save_dir, result, workdir, options)

    try:
        ForkServer(Options(**{**vars(options), "jobs": 1}), scratch, quiet=False, on_result=keep).run([case])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return saved[0]


def format_report(campaign: Campaign, replay_hint: str) -> str:
    counts = campaign.counts
    total = len(campaign.results)
    clean = sum(n for outcome, n in counts.items() if is_clean(outcome))
    rate = total / campaign.seconds if campaign.seconds else 0.0
    lines = [f"target {campaign.options.target}, seed {campaign.options.seed}: {total} cases in "
             f"{campaign.seconds:.1f} s ({rate:.1f} cases/s, {campaign.options.jobs} jobs, cap "
             f"{campaign.options.mem_mb} MiB, timeout {campaign.options.timeout:g} s)", "",
             f"{'outcome':<52} {'cases':>7}  clean"]
    for outcome, n in sorted(counts.items(), key=lambda kv: (not is_clean(kv[0]), -kv[1], kv[0])):
        lines.append(f"{outcome:<52} {n:>7}  {'yes' if is_clean(outcome) else 'NO'}")
    lines += ["", f"clean: {clean}/{total}   not clean: {total - clean}   slowest: "
              + ", ".join(f"case {r.case_id} {r.seconds:.2f} s" for r in campaign.slowest(3))
              + "   peak RSS: " + ", ".join(f"case {r.case_id} {r.peak_mb:.0f} MB ({r.outcome})"
                                          for r in campaign.largest(3))]
    findings = campaign.findings()
    if findings:
        lines += ["", "Non-clean findings (grouped; replay one with " + replay_hint + "):"]
        for key, results in sorted(findings.items(), key=lambda kv: -len(kv[1])):
            first = results[0]
            ids = ", ".join(str(r.case_id) for r in results[:8]) + (" ..." if len(results) > 8 else "")
            lines.append(f"- {key}  [{len(results)} cases: {ids}]")
            if first.detail.get("message"):
                lines.append(f"    message: {first.detail['message'][:200]}")
            lines.append(f"    case {first.case_id} seed {first.seed_label}: " + " | ".join(first.mutations)[:400])
    return "\n".join(lines)
