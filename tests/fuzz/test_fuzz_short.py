"""The fuzzer in CI: a fixed-seed batch of mutated files and folders must end in clean outcomes only.

Clean: the reader succeeds or raises a qformat error (``FormatError`` with a spec code, or another ``QformatError``).
Not clean: a crash (signal), a timeout, the memory cap, or any other exception. The batches run in a subprocess
(``bench/fuzz.py``): it forks a child per case, and pytest's own process may hold threads (torch) that make forking
it unsafe. A failure lists each case with the command that replays it. The long run is by hand:
``python bench/fuzz.py --cases 100000 --jobs 2`` (and ``-m slow`` runs 10,000 cases here).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

from qfuzz.jsontext import Pairs, Raw, dumps, nested  # noqa: E402
from qfuzz.runner import CaseFactory, Options  # noqa: E402

# Codes only the decode stage (tensor data) raises: the batch must reach them, not stop at headers.
DECODE_CODES = {"nonzero_padding", "code_out_of_range", "index_out_of_range", "bad_permutation", "bad_index"}


def fuzz(tmp_path: Path, *args: str, timeout: float = 300) -> dict:
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, str(BENCH / "fuzz.py"), "--jobs", "2", "--json", str(out), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=BENCH.parent)
    assert out.exists(), f"the fuzzer did not finish:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(out.read_text())


def describe(result: dict, flags: str) -> str:
    lines = [f"{len(result['non_clean'])} of {result['cases']} cases are not clean (replay one with "
             f"`python bench/fuzz.py {flags} --replay CASE`):"]
    for case in result["non_clean"]:
        where = case["detail"].get("where") or ""
        lines.append(f"  case {case['case_id']}: {case['outcome']} {where} -- {case['seed_label']}: "
                     + " | ".join(case["mutations"])[:300])
    return "\n".join(lines)


READER_FLAGS = "--target reader --seed 0 --mem-mb 1024 --timeout 10"


@pytest.fixture(scope="module")
def reader_batch(tmp_path_factory) -> dict:
    return fuzz(tmp_path_factory.mktemp("reader"), "--cases", "400", *READER_FLAGS.split())


def test_reader_batch_is_clean(reader_batch):
    assert reader_batch["cases"] == 400
    assert not reader_batch["non_clean"], describe(reader_batch, READER_FLAGS)


def test_reader_batch_reaches_decoding(reader_batch):
    """Structure-aware mutations get past the header: many cases decode, and data checks fire."""
    counts = reader_batch["counts"]
    reached = {outcome.split(":", 1)[1] for outcome in counts if outcome.startswith("FormatError:")} & DECODE_CODES
    assert counts.get("ok", 0) >= 40, counts
    assert len(reached) >= 3, counts


def test_folder_batch_is_clean(tmp_path):
    flags = "--target folder --seed 0 --mem-mb 1024 --timeout 10 --folder-seeds synthetic"
    result = fuzz(tmp_path, "--cases", "400", *flags.split())
    assert result["cases"] == 400
    assert not result["non_clean"], describe(result, flags)


HARNESS = textwrap.dedent("""
    import json, shutil, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    from qfuzz import runner
    from qfuzz.sample import FileSample

    def behave(path):
        what = Path(path).read_text()
        if what == "ok":
            return {}
        if what == "format":
            from qformat.errors import FormatError
            raise FormatError("bad_header", "planted")
        if what == "value":
            raise ValueError("planted")
        if what == "memory":
            return {"big": bytearray(8 << 30)}
        if what == "segv":
            import ctypes
            ctypes.string_at(0)
        if what == "sleep":
            import time
            time.sleep(60)

    class Planted(runner.Case):
        def write(self, where):
            where.mkdir(parents=True)
            (where / "case").write_text(self.seed_label)
            return where / "case"

    runner.TARGET_FUNCTIONS["planted"] = behave
    options = runner.Options(target="planted", jobs=2, mem_mb=512, timeout=3)
    kinds = ["ok", "format", "value", "memory", "segv", "sleep"]
    cases = [Planted(i, kind, [], None) for i, kind in enumerate(kinds)]
    scratch = runner.scratch_dir()
    try:
        results = runner.ForkServer(options, scratch).run(cases)
    finally:
        shutil.rmtree(scratch)
    print(json.dumps({r.seed_label: [r.outcome, r.clean] for r in results}))
""")


def test_harness_classifies_every_outcome():
    """The fork server tells clean rejections from crashes, timeouts, the memory cap and other exceptions."""
    proc = subprocess.run([sys.executable, "-c", HARNESS, str(BENCH)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == {
        "ok": ["ok", True], "format": ["FormatError:bad_header", True], "value": ["exception:ValueError", False],
        "memory": ["memory:MemoryError", False], "segv": ["crash:SIGSEGV", False], "sleep": ["timeout", False],
    }


def test_cases_are_reproducible():
    first, again = CaseFactory(Options(seed=0)), CaseFactory(Options(seed=0))
    other = CaseFactory(Options(seed=1))
    same = differ = 0
    for case_id in range(40):
        a, b, c = first.make(case_id), again.make(case_id), other.make(case_id)
        assert a.mutations == b.mutations and a.seed_label == b.seed_label
        assert a.sample.to_bytes() == b.sample.to_bytes()
        same += 1
        differ += a.sample.to_bytes() != c.sample.to_bytes()
    assert differ > 30


def test_json_writer_writes_what_parsers_refuse():
    text = dumps({"a": Pairs([("k", 1), ("k", Raw("1e400"))]), "s": "\ud800", "n": None}, ascii_only=True)
    assert text == '{"a":{"k":1,"k":1e400},"s":"\\ud800","n":null}'
    raw = dumps({"s": "\ud800"}, ascii_only=False)
    assert raw.encode("utf-8", "surrogatepass") == b'{"s":"\xed\xa0\x80"}'
    assert len(dumps(nested(200_000))) == 400_000  # no recursion limit


@pytest.mark.slow
def test_long_reader_campaign(tmp_path):
    cases = os.environ.get("QFORMAT_FUZZ_CASES", "10000")
    flags = "--target reader --seed 0 --mem-mb 1024 --timeout 10"
    result = fuzz(tmp_path, "--cases", cases, *flags.split(), timeout=36000)
    assert not result["non_clean"], describe(result, flags)
