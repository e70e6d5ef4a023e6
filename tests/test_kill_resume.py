"""A real ``qformat convert``, killed with SIGKILL at chosen points and run again, writes the same bytes as a run that
was never interrupted; after every kill the output folder is absent or complete, and no other file is touched.

The child processes are the installed ``qformat`` command; tests/kill_inject/sitecustomize.py (on the child's
PYTHONPATH) kills it at the Nth matching os.replace / os.link / shutil.copy2, so qformat carries no test hook. Each
chain below kills one output several times in a row, at later and later points, then lets the last run finish.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
from tiny_model import make_tiny_llama

from qformat.text import DEFAULT_CALIBRATION

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SIGKILL and hard links: Linux only")

INJECT = Path(__file__).resolve().parent / "kill_inject"
QFORMAT = Path(sys.executable).with_name("qformat")  # the console script of the installed package
LAYERS = 3  # shards 0..2 hold the blocks, shard 3 the embeddings and head; the output has model-0000k-of-00004
USER_FILE = "notes.txt"  # a file of the user's beside the output: it must survive everything
GPTQ = ("--method", "gptq")
SPQR = ("--method", "spqr", "--true-sequential")  # the method whose resume replays the most


class KillPoint(NamedTuple):
    name: str
    spec: str  # QFORMAT_TEST_KILL: "<op> <before|after> <nth> <glob of '<src> -> <dst>'>"
    present: list[str]  # globs under the output's parent that match after the kill: it happened at this point
    absent: list[str]  # globs that must not match


# In the order a conversion reaches them. "P" is the work folder.
P = "out.partial"
STATE_WRITTEN = KillPoint(  # the first file of a run (after the work folder's marker)
    "state-written", f"replace before 1 */{P}/.state.json.* -> */{P}/state.json",
    [f"{P}/.qformat-run.json"], ["out", f"{P}/state.json"])
SHARD_TEMP_WRITTEN = KillPoint(  # shard 1 written to its temp file and synced, not renamed
    "shard-temp-written", f"replace before 1 */{P}/.shard-00001.* -> */{P}/shard-00001.safetensors",
    [f"{P}/shard-00000.safetensors", f"{P}/.shard-00001.*"], ["out", f"{P}/shard-00001.safetensors"])
SHARD_RENAMED = KillPoint(  # shard 2 in place, its sources' digests not yet on record
    "shard-renamed", f"replace after 1 * -> */{P}/shard-00002.safetensors",
    [f"{P}/shard-00002.safetensors"], ["out", f"{P}/shard-00003.safetensors"])
STAGING_LINKED = KillPoint(  # finalize: two of four shards linked into the staging folder
    "staging-linked", f"link before 3 */{P}/shard-* -> *",
    [f"{P}/final/model-00002-of-00004.safetensors"],
    ["out", f"{P}/final/model-00003-of-00004.safetensors", f"{P}/final/config.json"])
SIDE_FILE_COPY = KillPoint(  # finalize: config written, tokenizer files being copied
    "side-file-copy", "copy2 before 2 */tiny/* -> *", [f"{P}/final/config.json"], ["out"])
BEFORE_SWAP = KillPoint(  # finalize: the staging folder complete, not yet renamed to the output
    "before-swap", f"replace before 1 */{P}/final -> */out", [f"{P}/final/config.json"], ["out"])
AFTER_SWAP = KillPoint(  # the output in place, the work folder not yet removed
    "after-swap", f"replace after 1 */{P}/final -> */out", ["out/config.json", P], [f"{P}/final"])
# With --overwrite and an earlier output in place:
BETWEEN_RENAMES = KillPoint(  # the earlier output moved to out.old, the new one not yet in place
    "between-renames", "replace after 1 */out -> */out.old", ["out.old/config.json", f"{P}/final"], ["out"])
BACKUP_KEPT = KillPoint(  # the new output in place, the earlier one not yet removed
    "backup-kept", f"replace after 1 */{P}/final -> */out", ["out/config.json", "out.old/config.json"], [])


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = make_tiny_llama(tmp_path_factory.mktemp("src") / "tiny", layers=LAYERS)
    (folder.parent / "calib.txt").write_text(DEFAULT_CALIBRATION.read_text(encoding="utf-8")[:30_000])
    return folder


def convert(source: Path, out: Path, *extra: str, kill: str | None = None) -> subprocess.CompletedProcess:
    assert QFORMAT.is_file(), f"{QFORMAT} missing: install the package (pip install -e .)"
    env = {k: v for k, v in os.environ.items() if k != "QFORMAT_TEST_KILL"}
    if kill:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(INJECT), env.get("PYTHONPATH")]))
        env["QFORMAT_TEST_KILL"] = kill
    command = [str(QFORMAT), "convert", str(source), "--out", str(out), "--calib", str(source.parent / "calib.txt"),
               "--calib-samples", "8", "--calib-seqlen", "64", "--quiet", *extra]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def converted(source: Path, parent: Path, *extra: str) -> dict[str, bytes]:
    parent.mkdir()
    proc = convert(source, parent / "out", *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tree_bytes(parent / "out")


@pytest.fixture(scope="module")
def gptq_reference(source: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    return converted(source, tmp_path_factory.mktemp("reference") / "whole", *GPTQ)


def kill_and_check(source: Path, parent: Path, point: KillPoint, extra: tuple[str, ...], reference: dict[str, bytes],
                   previous: dict[str, bytes] | None = None) -> None:
    """Run until killed at ``point``, then check: it was killed there; every finished file in the work folder already
    holds the reference's bytes (a shard is the output shard it becomes); the output is absent or complete (the
    reference or the ``previous`` output), and so is a backup (``out.old``, plus its marker); the user's file is
    intact and nothing else appeared."""
    spec = point.spec
    out, work = parent / "out", parent / "out.partial"
    user_file = (parent / USER_FILE).read_bytes()
    proc = convert(source, out, *extra, kill=spec)
    assert proc.returncode == -signal.SIGKILL and f"qformat-test-kill: {spec}" in proc.stderr, (
        f"not killed at {spec!r}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    for pattern in point.present:
        assert list(parent.glob(pattern)), f"after the kill at {spec!r}, nothing matches {pattern}"
    for pattern in point.absent:
        assert not list(parent.glob(pattern)), f"after the kill at {spec!r}, {pattern} exists"
    for shard in work.glob("shard-*.safetensors"):
        final_name = f"model-{int(shard.stem.split('-')[1]) + 1:05d}-of-{LAYERS + 1:05d}.safetensors"
        assert shard.read_bytes() == reference[final_name], f"after the kill at {spec!r}, {shard.name} differs"
    for staged in (work / "final").glob("*"):
        assert staged.read_bytes() == reference[staged.name], f"after the kill at {spec!r}, final/{staged.name} differs"
    complete = [reference, *([previous] if previous else [])]
    if out.exists():
        assert tree_bytes(out) in complete, f"after the kill at {spec!r}, {out} is neither absent nor complete"
    if (parent / "out.old").exists():
        kept = {k: v for k, v in tree_bytes(parent / "out.old").items() if k != ".qformat-run.json"}
        assert kept in complete, f"after the kill at {spec!r}, the backup out.old is not a complete output"
    assert {p.name for p in parent.iterdir()} <= {"out", "out.partial", "out.old", ".out.qformat.lock", USER_FILE}
    assert (parent / USER_FILE).read_bytes() == user_file


def finish_and_compare(source: Path, parent: Path, extra: tuple[str, ...], reference: dict[str, bytes]) -> None:
    proc = convert(source, parent / "out", *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert tree_bytes(parent / "out") == reference
    assert sorted(p.name for p in parent.iterdir()) == sorted(["out", USER_FILE])  # no work folder, backup or lock


def run_chain(source: Path, parent: Path, points: list[KillPoint], extra: tuple[str, ...], reference: dict[str, bytes],
              previous: dict[str, bytes] | None = None) -> None:
    """Kill one output at each point in turn, then run the same command to the end."""
    if not (parent / USER_FILE).exists():
        (parent / USER_FILE).write_text("mine\n")
    source_before = tree_bytes(source)
    for point in points:
        kill_and_check(source, parent, point, extra, reference, previous)
    finish_and_compare(source, parent, extra, reference)
    assert tree_bytes(source) == source_before



def test_killed_from_first_shard_to_finalize_resumes_byte_identical(source: Path, gptq_reference: dict,
                                                                    tmp_path: Path) -> None:
    run_chain(source, tmp_path, [SHARD_TEMP_WRITTEN, SHARD_RENAMED, STAGING_LINKED, SIDE_FILE_COPY, BEFORE_SWAP], GPTQ,
              gptq_reference)


def test_killed_after_the_swap_and_while_overwriting(source: Path, gptq_reference: dict, tmp_path: Path) -> None:
    """Killed once the output is in place: it is complete, and the work folder is left behind. Then, with the
    output's README edited (an earlier output that differs), --overwrite moves the earlier output to out.old and the
    new one into place: killed between the two renames, the earlier output is the only complete copy and the next
    run puts it back before replacing it again; killed with both in place; and run to the end."""
    (tmp_path / USER_FILE).write_text("mine\n")
    kill_and_check(source, tmp_path, AFTER_SWAP, GPTQ, gptq_reference)
    (tmp_path / "out" / "README.md").write_text("an earlier conversion\n")
    previous = tree_bytes(tmp_path / "out")
    run_chain(source, tmp_path, [BETWEEN_RENAMES, BACKUP_KEPT], (*GPTQ, "--overwrite"), gptq_reference, previous)


@pytest.fixture(scope="module")
def spqr_reference(source: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    return converted(source, tmp_path_factory.mktemp("reference") / "whole", *SPQR)


@pytest.mark.slow  # 13 conversions: ~1.5 min on 2 idle cores
@pytest.mark.parametrize("point", [STATE_WRITTEN, SHARD_TEMP_WRITTEN, SHARD_RENAMED, STAGING_LINKED, SIDE_FILE_COPY,
                                   BEFORE_SWAP], ids=lambda point: point.name)
def test_spqr_true_sequential_killed_once_resumes_byte_identical(source: Path, spqr_reference: dict, tmp_path: Path,
                                                                 point: KillPoint) -> None:
    """Each point on its own, with SpQR re-collecting statistics after each group of linears."""
    run_chain(source, tmp_path, [point], SPQR, spqr_reference)
