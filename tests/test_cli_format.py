"""`qformat inspect`, `qformat verify` and `qformat conformance`, run through the real entry point."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import make_affine_record
from qformat_conformance import runner

from qformat.cli import main
from qformat.format import FolderWriter, write_file

MANIFEST = runner.load_manifest()
VECTORS_DIR = Path(MANIFEST["_dir"])


@pytest.fixture
def qfile(tmp_path) -> Path:
    records = [make_affine_record("model.layers.0.mlp.up_proj.weight"),
               make_affine_record("model.layers.10.mlp.up_proj.weight", seed=1),
               make_affine_record("model.layers.2.self_attn.q_proj.weight", (4, 37), bits=3, group=8)]
    return write_file(tmp_path / "model.safetensors", {"model.norm.weight": np.ones(40, np.float32)}, records)


@pytest.fixture
def folder(tmp_path) -> Path:
    writer = FolderWriter(tmp_path / "model-q")
    writer.write_shard(0, {"model.embed_tokens.weight": np.ones((6, 40), np.float16)},
                       [make_affine_record("model.layers.0.mlp.up_proj.weight")])
    writer.write_shard(1, None, [make_affine_record("model.layers.1.mlp.up_proj.weight", seed=3)])
    return writer.finalize({"model_type": "llama"}, {"method": "rtn", "params": {"bits": 4}})


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


# -- inspect ---------------------------------------------------------------------------------------------------

def test_inspect_file_table(capsys, qfile):
    code, out, _ = run(capsys, "inspect", str(qfile))
    assert code == 0
    for text in ("model.layers.10.mlp.up_proj.weight", "affine[4](packed[4],tensor,tensor)", "codes U8[4, 20]",
                 "model.norm.weight", "bits/weight (quantized)", "bits/weight up_proj", "bits/weight q_proj"):
        assert text in out, text
    # natural order: layer 2 before layer 10
    assert out.index("model.layers.2.") < out.index("model.layers.10.")


def test_inspect_json(capsys, qfile):
    code, out, _ = run(capsys, "inspect", str(qfile), "--json")
    assert code == 0
    summary = json.loads(out)
    names = [r["name"] for r in summary["records"]]
    assert names == ["model.layers.0.mlp.up_proj.weight", "model.layers.2.self_attn.q_proj.weight",
                     "model.layers.10.mlp.up_proj.weight"]
    q_proj = summary["records"][1]
    assert q_proj["signature"] == "affine[3](packed[3],tensor,tensor)"
    roles = {c["role"]: c for c in q_proj["components"]}
    assert roles["codes"] == {"role": "codes", "dtype": "U8", "shape": [4, 14], "bytes": 56}
    assert roles["scale"]["shape"] == [4, 5] and roles["scale"]["dtype"] == "F16"
    assert q_proj["storage_bytes"] == 56 + 40 + 40
    assert q_proj["bits_per_weight"] == pytest.approx(136 * 8 / (4 * 37))
    totals = summary["totals"]
    assert totals["records"] == 3 and totals["plain_tensors"] == 1 and totals["plain_bytes"] == 160
    assert totals["quantized_bytes"] == sum(r["storage_bytes"] for r in summary["records"])
    assert totals["bits_per_weight"] == pytest.approx(totals["quantized_bytes"] * 8 / totals["quantized_weights"])
    assert totals["file_bytes"] == qfile.stat().st_size
    assert set(totals["bits_by_layer_type"]) == {"up_proj", "q_proj"}


def test_inspect_folder(capsys, folder):
    code, out, _ = run(capsys, "inspect", str(folder), "--json")
    summary = json.loads(out)
    assert code == 0 and summary["kind"] == "folder" and summary["method"] == "rtn"
    assert summary["totals"]["shards"] == 2
    assert {r["shard"] for r in summary["records"]} == {"model-00001-of-00002.safetensors",
                                                        "model-00002-of-00002.safetensors"}
    code, out, _ = run(capsys, "inspect", str(folder))
    assert code == 0 and "method" in out and "rtn" in out


def test_inspect_a_plain_safetensors_file(capsys, tmp_path):
    path = write_file(tmp_path / "plain.safetensors", {"x": np.ones(3, np.float32)})
    code, out, _ = run(capsys, "inspect", str(path))
    assert code == 0 and "plain tensors" in out and "quantized records in" not in out


def test_inspect_bad_file(capsys):
    bad = VECTORS_DIR / "bad_accounting.safetensors"
    code, out, err = run(capsys, "inspect", str(bad))
    assert code == 1 and "[bad_accounting]" in err and "storage_bytes" in err and str(bad) in err


# -- verify ----------------------------------------------------------------------------------------------------

def test_verify_ok(capsys, folder):
    code, out, _ = run(capsys, "verify", str(folder))
    assert code == 0 and out.startswith("OK") and "2 checksum(s) verified" in out and "every decode" in out
    code, out, _ = run(capsys, "verify", str(folder), "--json", "--shallow")
    summary = json.loads(out)
    assert code == 0 and summary["ok"] and summary["records"] == 2 and summary["checksums_verified"] == 2


def test_verify_names_the_problem(capsys, folder):
    shard = folder / "model-00002-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    code, out, _ = run(capsys, "verify", str(folder))
    assert code == 1 and "FAILED" in out and "[checksum_mismatch]" in out and shard.name in out
    code, out, _ = run(capsys, "verify", str(folder), "--json")
    report = json.loads(out)
    assert code == 1 and report == {**report, "ok": False, "code": "checksum_mismatch", "file": str(shard)}


def test_verify_single_file_with_data_error(capsys):
    path = VECTORS_DIR / "outlier_index_out_of_range.safetensors"
    code, out, _ = run(capsys, "verify", str(path), "--json")
    report = json.loads(out)
    assert code == 1
    assert (report["code"], report["tensor"], report["field"]) == (
        "index_out_of_range", "model.layers.0.mlp.up_proj.weight", "weight/terms[1]/col_idx")
    assert run(capsys, "verify", str(path), "--shallow")[0] == 0  # data checks need the decode


# -- conformance -----------------------------------------------------------------------------------------------

def subset(tmp_path: Path, ids: list[str]) -> Path:
    out = tmp_path / "vectors"
    out.mkdir()
    entries = [v for v in MANIFEST["vectors"] if v["id"] in ids]
    for v in entries:
        for key in ("file", "expected", "tolerance"):
            if key in v:
                shutil.copy(VECTORS_DIR / v[key], out / v[key])
    manifest = {k: v for k, v in MANIFEST.items() if k != "_dir"}
    (out / "manifest.json").write_text(json.dumps({**manifest, "vectors": entries}))
    return out


def test_conformance_list(capsys):
    code, out, _ = run(capsys, "conformance", "--list")
    assert code == 0 and "spqr_like" in out and "rejects: nonzero_padding" in out and "reference" in out
    code, out, _ = run(capsys, "conformance", "--list", "--json")
    assert code == 0 and len(json.loads(out)["vectors"]) == len(MANIFEST["vectors"])


def test_conformance_passes_on_a_subset(capsys, tmp_path):
    folder = subset(tmp_path, ["spqr_like", "nf4_double_quant", "truncated_data", "bad_permutation"])
    code, out, _ = run(capsys, "conformance", "--vectors", str(folder))
    assert code == 0 and "4 passed, 0 failed" in out and out.count("PASS") == 4


def test_conformance_fails_and_says_why(capsys, tmp_path):
    folder = subset(tmp_path, ["packed_w3", "truncated_data"])
    (folder / "packed_w3.expected.safetensors").write_bytes(b"x")  # breaks its checksum
    code, out, _ = run(capsys, "conformance", "--vectors", str(folder), "--failures-only")
    assert code == 1 and "packed_w3" in out and "truncated_data" not in out and "1 passed, 1 failed" in out
    code, out, _ = run(capsys, "conformance", "--vectors", str(folder), "--json")
    report = json.loads(out)
    assert code == 1 and report["summary"]["FAIL"] == 1
    assert {r["vector_id"]: r["status"] for r in report["results"]} == {"packed_w3": "FAIL", "truncated_data": "PASS"}


def test_conformance_unknown_impl(capsys):
    code, _, err = run(capsys, "conformance", "--impl", "no-such-kernel")
    assert code == 1 and "unknown implementation" in err


def test_conformance_passes_on_every_vector(capsys):
    code, out, _ = run(capsys, "conformance")
    assert code == 0, out
