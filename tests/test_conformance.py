"""The conformance vectors: complete, reproducible, passed by the reference, and usable by other implementations."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from qformat_conformance import generate, runner

from qformat.format import open_file
from qformat.kernel_api import Kernel, PreparedWeight

MANIFEST = runner.load_manifest()
VECTORS = {v["id"]: v for v in MANIFEST["vectors"]}
VECTORS_DIR = Path(MANIFEST["_dir"])

# Vectors the reference reader currently fails: each is a reader bug with a strict-xfail unit test of its own
# (tests/test_format_codecs.py, tests/test_format_files.py). Remove an id here once its bug is fixed.
KNOWN_READER_BUGS: dict[str, str] = {}


def by_reference(vector_id: str) -> runner.Result:
    return runner.check_decoder("reference", runner.reference_decode, VECTORS[vector_id], VECTORS_DIR)


def params(kind: str) -> list:
    return [pytest.param(vid, marks=pytest.mark.xfail(strict=True, reason=KNOWN_READER_BUGS[vid]))
            if vid in KNOWN_READER_BUGS else vid for vid, v in VECTORS.items() if v["kind"] == kind]


def test_manifest_is_complete():
    kinds = [v["kind"] for v in MANIFEST["vectors"]]
    assert kinds.count("valid") >= 30 and kinds.count("invalid") >= 20
    assert len(VECTORS) == len(kinds), "vector ids must be unique"
    covered = set().union(*(v["codecs"] for v in VECTORS.values() if v["kind"] == "valid"))
    from qformat.format.codecs import CORE_CODECS

    core = {n for n, (_, owner) in CORE_CODECS.names().items() if owner == "qformat"}
    assert core <= covered, f"codecs without a valid vector: {sorted(core - covered)}"
    codes = {v["error"]["code"] for v in VECTORS.values() if v["kind"] == "invalid"}
    assert {"truncated", "bad_dtype", "shape_mismatch", "index_out_of_range", "code_out_of_range",
            "unsupported_codec_version", "duplicate_name", "bad_accounting", "nonzero_padding", "bad_permutation",
            "missing_tensor", "bad_header", "limit_exceeded", "unknown_codec", "bad_offsets", "bad_index",
            "bad_field", "bad_record", "bad_kind", "bad_tensor_name", "shared_tensor",
            "unsupported_format_version"} <= codes
    total = sum(p.stat().st_size for p in VECTORS_DIR.iterdir())
    assert total < 2_000_000, f"vectors take {total} bytes"
    for v in VECTORS.values():
        assert (VECTORS_DIR / v["file"]).is_file() and v["description"]
        if v["kind"] == "invalid":
            assert v["error"]["stage"] in ("open", "decode")


def test_vectors_for_the_reader_hardening():
    """Files that crashed or exhausted readers have invalid vectors of their own (conformance/README.md)."""
    expected = {"row_ptr_wraps_around": ("bad_index", "decode"), "group_shape_over_2_40": ("bad_field", "open"),
                "lowrank_amplification": ("limit_exceeded", "open"),
                "inner_node_amplification": ("limit_exceeded", "open"),
                "reference_counted_each_use": ("limit_exceeded", "open"),
                "tensor_name_lone_surrogate": ("bad_header", "open"), "metadata_lone_surrogate": ("bad_header", "open"),
                "record_info_lone_surrogate": ("bad_header", "open"),
                "header_utf8_encoded_surrogate": ("bad_header", "open"), "empty_tensor_huge_dims": ("bad_header", "open")}
    for vid, (code, stage) in expected.items():
        assert (VECTORS[vid]["error"]["code"], VECTORS[vid]["error"]["stage"]) == (code, stage), vid
    assert VECTORS["group_larger_than_output"]["kind"] == "valid"


def test_vectors_for_reshape():
    """The reshape codec: valid layouts of HQQ axis 0 and blocks across rows, and each check a reader must make."""
    for vid in ("reshape_hqq_axis0", "reshape_blocks_across_rows", "reshape_int_input"):
        assert VECTORS[vid]["kind"] == "valid" and "reshape" in VECTORS[vid]["codecs"] and VECTORS[vid]["exact"]
    expected = {"reshape_count_mismatch": ("shape_mismatch", "weight/input"),
                "reshape_dim_zero": ("bad_field", "weight/shape"),
                "reshape_input_grid_mismatch": ("shape_mismatch", "weight/input/scale")}
    for vid, (code, fld) in expected.items():
        assert (VECTORS[vid]["error"]["code"], VECTORS[vid]["error"]["field"]) == (code, fld), vid


def test_vectors_for_concat():
    """The concat codec: two affine parts, SliM-LLM's permute(concat(...)), one part; and each check a reader makes."""
    for vid in ("concat_two_affine", "concat_slim_permuted", "concat_single_part"):
        assert VECTORS[vid]["kind"] == "valid" and "concat" in VECTORS[vid]["codecs"] and VECTORS[vid]["exact"]
    assert "permute" in VECTORS["concat_slim_permuted"]["codecs"]
    expected = {"concat_rows_mismatch": ("shape_mismatch", "weight/parts[1]"),
                "concat_axis_0": ("bad_field", "weight/axis"),
                "concat_axis_not_integer": ("bad_field", "weight/axis"),
                "concat_missing_axis": ("bad_record", "weight/axis"),
                "concat_parts_empty": ("bad_field", "weight/parts"),
                "concat_int_part": ("bad_kind", "weight/parts[1]")}
    for vid, (code, fld) in expected.items():
        assert (VECTORS[vid]["error"]["code"], VECTORS[vid]["error"]["field"]) == (code, fld), vid

def test_generator_reproduces_the_checked_in_vectors_byte_for_byte():
    assert generate.check() == []


def test_generator_check_notices_a_changed_vector(tmp_path):
    copy = tmp_path / "vectors"
    shutil.copytree(VECTORS_DIR, copy)
    target = copy / "spqr_like.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 1
    target.write_bytes(bytes(data))
    (copy / "stale.safetensors").write_bytes(b"")
    assert generate.check(copy) == ["spqr_like.safetensors", "stale.safetensors"]


def test_generator_script_runs_standalone(tmp_path):
    out = tmp_path / "v"
    proc = subprocess.run([sys.executable, str(Path(generate.__file__)), "--out", str(out)], capture_output=True,
                          text=True, check=True)
    assert "valid" in proc.stdout
    assert json.loads((out / "manifest.json").read_text()) == {k: v for k, v in MANIFEST.items() if k != "_dir"}


@pytest.mark.parametrize("vector_id", params("valid"))
def test_reference_decodes_valid_vector(vector_id):
    result = by_reference(vector_id)
    assert result.status == runner.PASS, result


# Vectors that crashed the reader process (a segmentation fault) before it was fixed: checked in a child process,
# so a regression fails the test instead of killing pytest.
CRASHED_READERS = {"row_ptr_wraps_around"}


def rejected_in_a_child(path: Path) -> runner.Rejected:
    code = textwrap.dedent("""
        import json, sys
        from pathlib import Path
        from qformat_conformance import runner
        try:
            runner.reference_decode(Path(sys.argv[1]), {})
            print(json.dumps(None))
        except runner.Rejected as exc:
            print(json.dumps([exc.code, exc.tensor, exc.field, exc.stage, str(exc)]))
        """)
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"the reader crashed (exit {done.returncode}): {done.stderr[-1000:]}"
    got = json.loads(done.stdout)
    assert got is not None, "the reader accepted the file"
    return runner.Rejected(got[0], got[1], got[2], got[3], got[4])


@pytest.mark.parametrize("vector_id", params("invalid"))
def test_reference_rejects_invalid_vector_with_its_error(vector_id):
    """Code, tensor, field and stage all as the manifest says; the message names the file."""
    error = VECTORS[vector_id]["error"]
    path = VECTORS_DIR / VECTORS[vector_id]["file"]
    if vector_id in CRASHED_READERS:
        exc = rejected_in_a_child(path)
    else:
        with pytest.raises(runner.Rejected) as info:
            runner.reference_decode(path, {})
        exc = info.value
    assert (exc.code, exc.stage) == (error["code"], error["stage"]), str(exc)
    assert exc.tensor == error.get("tensor") or "tensor" not in error
    assert exc.field == error.get("field") or "field" not in error
    assert str(path) in str(exc)


def test_expected_values_are_independent_of_the_decoder():
    """Spot-check a few expectations against hand-computed numbers, not the decoder."""
    one = runner._load_expected(VECTORS_DIR, VECTORS["one_by_one"])
    assert one["head.weight"].tolist() == [[1.5]]  # (5 - 2) * 0.5
    packed = open_file(VECTORS_DIR / VECTORS["packed_w3"]["file"])
    codes = packed.tensor("layer.weight.codes")
    first = int(codes[0, 0]) & 0b111  # the first 3-bit code is the low bits of byte 0
    assert runner._load_expected(VECTORS_DIR, VECTORS["packed_w3"])["layer.weight"][0, 0] == first


def test_compare():
    a = np.array([1.0, 2.0], np.float32)
    assert runner.compare(a, a.copy()) is None
    assert runner.compare(np.array([-0.0, 2.0], np.float32), np.array([0.0, 2.0], np.float32)) is None
    assert "2 values differ" in runner.compare(a + np.float32(1e-6), a)
    assert runner.compare(a + np.float32(1e-6), a, np.full(2, 2e-6)) is None
    assert "1 values differ, first at [1]" in runner.compare(a + np.float32(1e-6), a, np.array([2e-6, 1e-7]))
    assert "differ" in runner.compare(np.array([np.nan, 2.0], np.float32), a, np.full(2, 1.0))
    assert "shape" in runner.compare(a[:1], a)


def test_product_tolerances_follow_the_spec_bound():
    """tau = 2 gamma_k (|a| |b|) + 4 ulp(expected) (spec/composition.md#arithmetic), on the lowrank_only vector."""
    entry = VECTORS["lowrank_only"]
    assert entry["exact"] is False and entry["tolerance"] == "lowrank_only.tolerance.safetensors"
    qfile = open_file(VECTORS_DIR / entry["file"])
    a = np.asarray(qfile.tensor("layer.weight.a"), np.float64)
    b = np.asarray(qfile.tensor("layer.weight.b"), np.float64)
    k, u = a.shape[1], 2.0 ** -24
    expected = runner._load_expected(VECTORS_DIR, entry)["layer.weight"]
    tau = 2 * k * u / (1 - k * u) * (np.abs(a) @ np.abs(b)) + 4 * np.spacing(np.abs(expected)).astype(np.float64)
    got = runner._load_tolerance(VECTORS_DIR, entry)["layer.weight"]
    assert np.all(got >= tau) and np.all(got <= tau * (1 + 2.0 ** -20))
    assert all(v["exact"] == (not {"lowrank", "sign_lowrank"} & set(v["codecs"]))
               for v in VECTORS.values() if v["kind"] == "valid")


def test_run_reports_every_vector():
    results = runner.run("reference")
    assert [r.vector_id for r in results] == list(VECTORS)
    failed = {r.vector_id for r in results if r.status == runner.FAIL}
    assert failed == set(KNOWN_READER_BUGS)


def test_a_corrupted_vector_file_is_reported(tmp_path):
    copy = tmp_path / "vectors"
    shutil.copytree(VECTORS_DIR, copy)
    (copy / "packed_w4.safetensors").write_bytes(b"changed")
    results = {r.vector_id: r for r in runner.run("reference", copy, only=["packed_w4", "packed_w5"])}
    assert results["packed_w4"].status == runner.FAIL and "sha256" in results["packed_w4"].detail
    assert results["packed_w5"].status == runner.PASS


def test_a_wrong_decoder_fails():
    def off_by_one(path, options):
        decoded = runner.reference_decode(path, options)
        return {k: v + 1 for k, v in decoded.items()}

    assert runner.check_decoder("bad", off_by_one, VECTORS["packed_w4"], VECTORS_DIR).status == runner.FAIL

    def accepts_everything(path, options):
        return {}

    result = runner.check_decoder("lax", accepts_everything, VECTORS["nonzero_padding"], VECTORS_DIR)
    assert (result.status, result.got) == (runner.FAIL, "accepted")


# -- adapters for other implementations -------------------------------------------------------------------------

ADAPTER = textwrap.dedent("""
    import json, sys
    import numpy as np
    from safetensors.numpy import save_file
    from qformat.errors import FormatError
    from qformat.format import open_file

    src, dst, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    try:
        f = open_file(src)
        out = {n: f.decode(n, **options) for n in f.records}
        out.update({n: np.asarray(f.tensor(n), dtype=np.float32) for n in f.plain_names})
    except FormatError as exc:
        print("some log line")
        print(json.dumps({"code": exc.code, "tensor": exc.tensor, "field": exc.field}))
        sys.exit(1)
    save_file({k: np.ascontiguousarray(v) for k, v in out.items()}, dst)
""")


def test_exec_adapter(tmp_path):
    script = tmp_path / "decoder.py"
    script.write_text(ADAPTER)
    only = ["spqr_like", "bitplanes_w4_use2", "multi_record_with_plain", "nonzero_padding", "duplicate_tensor_key"]
    results = runner.run(f"exec:{sys.executable} {script}", only=only)
    assert [r.status for r in results] == [runner.PASS] * len(only), results


def test_exec_adapter_that_crashes(tmp_path):
    script = tmp_path / "crash.py"
    script.write_text("import sys; sys.exit(3)")
    result = runner.run(f"exec:{sys.executable} {script}", only=["packed_w1"])[0]
    assert result.status == runner.FAIL and result.got == "crash"


class PyError(Exception):
    def __init__(self, code):
        super().__init__(code)
        self.code = code


def python_decoder(path, options):
    try:
        return runner.reference_decode(Path(path), options)
    except runner.Rejected as exc:
        raise PyError(exc.code) from None


def test_python_adapter():
    results = runner.run(f"py:{__name__}:python_decoder", only=["lut_nf4_absmax", "bad_permutation"])
    assert [r.status for r in results] == [runner.PASS, runner.PASS]


def test_unknown_implementation():
    from qformat.errors import PluginError

    with with_kernels(), pytest.raises(PluginError, match="unknown implementation"):
        runner.run("no-such-kernel")


# -- kernels ----------------------------------------------------------------------------------------------------

class DecodingPrepared(PreparedWeight):
    def __init__(self, weight: np.ndarray, scale: float) -> None:
        self.weight = torch.from_numpy(weight.reshape(weight.shape[0], -1).copy()) * scale
        self.out_features, self.in_features = self.weight.shape

    def matmul(self, x):
        return x @ self.weight.T

    def dequantize(self):
        return self.weight

    def nbytes(self) -> int:
        return self.weight.numel() * 4


class AffineOnlyKernel(Kernel):
    """A fake CPU kernel: supports only plain affine-over-packed records; optionally wrong by a factor."""

    name = "fake-affine"
    device = "cpu"

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale

    def supports(self, record: dict) -> bool:
        weight = record["weight"]
        return weight["codec"] == "affine" and weight["codes"]["codec"] == "packed"

    def prepare(self, qt, device="cpu"):
        return DecodingPrepared(qt.decode(), self.scale)


def with_kernels(**kernels):
    """A plugin set holding only ``kernels`` (and the core codecs), made the process-wide one inside a with block."""
    from qformat import plugins

    return plugins.use_plugins(plugins.Plugins(None, {}, {}, dict(kernels), {}, {}))


def test_kernel_check():
    with with_kernels(**{"fake-affine": AffineOnlyKernel()}):
        results = {r.vector_id: r for r in runner.run("fake-affine")}
    assert results["affine_asym_g32"].status == runner.PASS
    assert results["lut_nf4_absmax"].status == runner.NA  # not supported
    assert results["bitplanes_w4_use2"].status == runner.NA  # decode options
    assert results["nonzero_padding"].status == runner.NA  # invalid vectors are the reader's job
    assert not [r for r in results.values() if r.status == runner.FAIL]


def test_kernel_check_catches_a_wrong_kernel():
    with with_kernels(**{"fake-affine": AffineOnlyKernel(scale=1.01)}):
        result = runner.run("fake-affine", only=["affine_asym_g32"])[0]
    assert result.status == runner.FAIL and "mismatch" in result.got


def test_cuda_kernel_is_skipped_without_a_gpu(monkeypatch):
    kernel = AffineOnlyKernel()
    kernel.device = "cuda"
    monkeypatch.setattr(runner, "_cuda_available", lambda: False)
    with with_kernels(gpu=kernel):
        results = runner.run("all", only=["affine_asym_g32"])
    assert [(r.impl, r.status) for r in results] == [("reference", runner.PASS), ("gpu", runner.SKIP)]
