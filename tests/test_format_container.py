"""Model folders: shard-by-shard atomic writing, reading across shards, verification with checksums."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import make_affine_record

from qformat.errors import FormatError
from qformat.format import FolderWriter, bits_by_layer_type, open_folder, sha256_file, verify_folder
from qformat.format.container import INDEX_NAME

CONFIG = {"architectures": ["LlamaForCausalLM"], "hidden_size": 40}
QCONFIG = {"method": "rtn", "params": {"bits": 4}}


def write_folder(out: Path, work: Path | None = None) -> Path:
    writer = FolderWriter(out, work)
    writer.write_shard(0, {"model.embed_tokens.weight": np.ones((8, 40), np.float16)},
                       [make_affine_record("model.layers.0.mlp.up_proj.weight")])
    writer.write_shard(1, {"model.norm.weight": np.ones(40, np.float32)},
                       [make_affine_record("model.layers.1.mlp.up_proj.weight", seed=1),
                        make_affine_record("model.layers.1.self_attn.q_proj.weight", (4, 37), bits=3, seed=2)])
    return writer.finalize(CONFIG, QCONFIG, extra_files={"README.md": "# test\n"})


@pytest.fixture
def folder(tmp_path) -> Path:
    return write_folder(tmp_path / "model")


def test_round_trip(folder):
    assert sorted(p.name for p in folder.iterdir()) == sorted([
        "config.json", INDEX_NAME, "README.md", "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors"])
    model = open_folder(folder)
    assert sorted(model.records) == ["model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight",
                                     "model.layers.1.self_attn.q_proj.weight"]
    assert sorted(model.plain_names) == ["model.embed_tokens.weight", "model.norm.weight"]
    expected = make_affine_record("model.layers.1.mlp.up_proj.weight", seed=1).decode()
    np.testing.assert_array_equal(model.decode("model.layers.1.mlp.up_proj.weight"), expected)
    np.testing.assert_array_equal(model.tensor("model.norm.weight"), np.ones(40, np.float32))
    qconfig = model.quantization_config
    assert qconfig["quant_method"] == "qformat" and qconfig["method"] == "rtn" and qconfig["format_version"] == 1
    for name, entry in qconfig["files"].items():
        assert entry["sha256"] == sha256_file(folder / name)
    index = json.loads((folder / INDEX_NAME).read_text())
    assert index["weight_map"]["model.layers.0.mlp.up_proj.weight.codes"] == "model-00001-of-00002.safetensors"
    assert index["metadata"]["total_size"] == sum((folder / n).stat().st_size for n in qconfig["files"])


def test_verify_summary(folder):
    summary = verify_folder(folder)
    assert summary["shards"] == 2 and summary["records"] == 3 and summary["plain"] == 2
    assert summary["checksums_verified"] == 2
    model = open_folder(folder)
    bits = sum(r["storage_bytes"] * 8 for r in model.records.values()) / sum(
        int(np.prod(r["shape"])) for r in model.records.values())
    assert summary["bits_per_weight"] == pytest.approx(bits)


def test_folder_bytes_are_deterministic(tmp_path):
    a, b = write_folder(tmp_path / "a"), write_folder(tmp_path / "b")
    for path in a.iterdir():
        assert sha256_file(path) == sha256_file(b / path.name), path.name


def test_bits_by_layer_type():
    records = {"m.layers.0.mlp.up_proj.weight": {"shape": [4, 8], "storage_bytes": 16},
               "m.layers.1.mlp.up_proj.weight": {"shape": [4, 8], "storage_bytes": 8},
               "m.layers.0.self_attn.q_proj.weight": {"shape": [2, 8], "storage_bytes": 2},
               "lm_head": {"shape": [2, 2], "storage_bytes": 4}}
    assert bits_by_layer_type(records) == {"lm_head": 8.0, "q_proj": 1.0, "up_proj": 3.0}


# -- atomicity -------------------------------------------------------------------------------------------------

def test_existing_output_is_refused_without_overwrite(folder):
    with pytest.raises(FormatError) as info:
        FolderWriter(folder)
    assert info.value.code == "output_exists"


def test_failure_before_finalize_leaves_no_output(tmp_path):
    out = tmp_path / "model"
    writer = FolderWriter(out)
    writer.write_shard(0, {"a": np.ones(2, np.float32)})
    with pytest.raises(TypeError):
        writer.write_shard(1, {"bad": np.ones(2, np.complex64)})
    assert not out.exists()
    assert not writer.shard_path(1).exists()  # no half-written shard either


def test_failed_finalize_keeps_an_existing_folder_intact(folder, tmp_path):
    before = {p.name: sha256_file(p) for p in folder.iterdir()}
    writer = FolderWriter(folder, tmp_path / "work", overwrite=True)
    writer.write_shard(0, {"a": np.ones(2, np.float32)})
    writer.shard_path(1).write_bytes(b"garbage")  # a corrupt shard: finalize must fail before touching the output
    with pytest.raises(FormatError):
        writer.finalize(CONFIG, QCONFIG)
    assert {p.name: sha256_file(p) for p in folder.iterdir()} == before
    assert not folder.with_name(folder.name + ".old").exists()


def test_overwrite_replaces_the_folder_in_one_step(folder, tmp_path):
    writer = FolderWriter(folder, tmp_path / "work", overwrite=True)
    writer.write_shard(0, {"only": np.ones(3, np.float32)})
    writer.finalize({"x": 1}, {"method": "none"})
    assert sorted(open_folder(folder).plain_names) == ["only"]
    assert not (tmp_path / "work").exists() and not folder.with_name(folder.name + ".old").exists()


def test_resume_keeps_written_shards(tmp_path):
    out, work = tmp_path / "model", tmp_path / "work"
    first = FolderWriter(out, work)
    first.write_shard(0, {"a": np.ones(2, np.float32)})
    second = FolderWriter(out, work)  # a new run after an interruption
    assert second.has_shard(0) and not second.has_shard(1)
    second.write_shard(1, {"b": np.ones(2, np.float32)})
    second.finalize(CONFIG, QCONFIG)
    assert sorted(open_folder(out).plain_names) == ["a", "b"]


def snapshot(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in folder.iterdir()}


def leave_backup(folder: Path, copy: bool = False) -> Path:
    """``<folder>.old`` as an interrupted swap leaves it: ``folder`` (or a copy of it) marked as qformat's backup of
    ``folder``. Any other ``.old`` is the user's and is never renamed or deleted."""
    from qformat.format import container

    backup = folder.with_name(folder.name + ".old")
    shutil.copytree(folder, backup) if copy else folder.rename(backup)
    container._mark_as_backup(backup, folder.name, "test-run")
    return backup


def new_writer_for(out: Path, tmp_path: Path) -> FolderWriter:
    """The next run after a killed finalize: a writer for the same output, told to overwrite (as the killed run was)."""
    return FolderWriter(out, tmp_path / "work2", overwrite=True)


def test_kill_between_the_renames_restores_the_previous_output(folder, tmp_path):
    before = snapshot(folder)
    backup = leave_backup(folder)  # the state after `out -> out.old` and before `staging -> out`
    with pytest.raises(FormatError) as info:
        FolderWriter(folder)  # no overwrite: the restored output is refused, not replaced
    assert info.value.code == "output_exists"
    assert snapshot(folder) == before and not backup.exists()
    verify_folder(folder)


def test_kill_between_the_renames_then_a_new_finalize_replaces_the_output(folder, tmp_path):
    leave_backup(folder)
    writer = new_writer_for(folder, tmp_path)
    assert folder.is_dir()
    writer.write_shard(0, {"only": np.ones(3, np.float32)})
    writer.finalize(CONFIG, QCONFIG)
    assert open_folder(folder).plain_names == ["only"] and not folder.with_name(folder.name + ".old").exists()


def test_kill_while_deleting_the_backup_removes_the_stale_backup(folder, tmp_path):
    before = snapshot(folder)
    backup = leave_backup(folder, copy=True)
    (backup / "config.json").unlink()  # half deleted
    new_writer_for(folder, tmp_path)
    assert not backup.exists() and snapshot(folder) == before


@pytest.mark.parametrize("damage", ["no_config", "missing_shard", "size_differs", "not_qformat"])
def test_an_incomplete_output_beside_a_backup_is_left_for_the_user(folder, tmp_path, damage):
    backup = leave_backup(folder, copy=True)
    shard = folder / "model-00002-of-00002.safetensors"
    if damage == "no_config":
        (folder / "config.json").unlink()
    elif damage == "missing_shard":
        shard.unlink()
    elif damage == "size_differs":  # opens fine, but is not the shard the config recorded
        config = json.loads((folder / "config.json").read_text())
        config["quantization_config"]["files"][shard.name]["size"] += 1
        (folder / "config.json").write_text(json.dumps(config))
    else:
        (folder / "config.json").write_text(json.dumps({"x": 1}))
    before, kept = snapshot(folder), snapshot(backup)
    for overwrite in (False, True):
        with pytest.raises(FormatError) as info:
            FolderWriter(folder, tmp_path / "work2", overwrite=overwrite)
        assert info.value.code == "output_exists" and ".old" in str(info.value)
    assert snapshot(folder) == before and snapshot(backup) == kept  # nothing deleted either side


def test_a_users_old_folder_is_never_renamed_or_deleted(folder, tmp_path):
    backup = folder.with_name(folder.name + ".old")
    shutil.copytree(folder, backup)  # a copy the user made: no marker
    kept = snapshot(backup)
    with pytest.raises(FormatError, match="model.old exists and was not made by qformat"):
        new_writer_for(folder, tmp_path)  # overwriting would need the .old name
    folder.rename(tmp_path / "moved")
    FolderWriter(folder).write_shard(0, {"only": np.ones(3, np.float32)})  # not renamed back to the output
    assert not folder.exists() and snapshot(backup) == kept


def test_overwrite_replaces_only_a_qformat_output(folder, tmp_path):
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(FormatError, match=r"holds files a qformat output does not have \(notes.txt\)"):
        new_writer_for(folder, tmp_path)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text("{}")
    with pytest.raises(FormatError, match="is not a qformat output"):
        FolderWriter(mine, tmp_path / "work3", overwrite=True)
    assert (folder / "notes.txt").is_file() and (mine / "config.json").is_file()


def test_finalize_never_deletes_a_backup_it_cannot_prove_stale(folder, tmp_path):
    writer = new_writer_for(folder, tmp_path)
    writer.write_shard(0, {"only": np.ones(3, np.float32)})
    backup = folder.with_name(folder.name + ".old")
    shutil.copytree(folder, backup)  # appears after the writer started, beside a damaged output
    (folder / "config.json").unlink()
    kept = snapshot(backup)
    with pytest.raises(FormatError, match="output_exists"):
        writer.finalize(CONFIG, QCONFIG)
    assert snapshot(backup) == kept


# -- verification failures -------------------------------------------------------------------------------------

def expect(folder: Path, code: str) -> FormatError:
    with pytest.raises(FormatError) as info:
        verify_folder(folder)
    assert info.value.code == code, str(info.value)
    return info.value


def test_checksum_mismatch(folder):
    shard = folder / "model-00002-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # a flipped bit in plain tensor data: only the checksum can tell
    shard.write_bytes(bytes(data))
    exc = expect(folder, "checksum_mismatch")
    assert exc.file == str(shard)


def rehash(folder: Path) -> None:
    """Record the current shard checksums in config.json, as if the corruption happened before finalize."""
    config = json.loads((folder / "config.json").read_text())
    for name, entry in config["quantization_config"]["files"].items():
        entry.update(sha256=sha256_file(folder / name), size=(folder / name).stat().st_size)
    (folder / "config.json").write_text(json.dumps(config))


def test_corrupt_record_data_fails_only_the_deep_check(folder):
    name = "model.layers.1.self_attn.q_proj.weight"  # 3-bit codes over 37 columns: one padding bit per row
    model = open_folder(folder)
    shard = folder / model.record_shard[name]
    st = model.file(model.record_shard[name]).st
    entry, start = st.entries[f"{name}.codes"], st.data_start
    model.close()
    data = bytearray(shard.read_bytes())
    data[start + entry.end - 1] |= 0x80
    shard.write_bytes(bytes(data))
    rehash(folder)  # so the decode, not the checksum, must find the problem
    assert verify_folder(folder, deep=False)["records"] == 3
    exc = expect(folder, "nonzero_padding")
    assert (exc.file, exc.tensor, exc.field) == (str(shard), name, "weight/codes/tensor")


def test_missing_shard(folder):
    (folder / "model-00001-of-00002.safetensors").unlink()
    assert expect(folder, "missing_shard").file.endswith(INDEX_NAME)


def test_index_disagrees_with_shards(folder):
    index = json.loads((folder / INDEX_NAME).read_text())
    index["weight_map"]["model.norm.weight"] = "model-00001-of-00002.safetensors"
    (folder / INDEX_NAME).write_text(json.dumps(index))
    exc = expect(folder, "bad_index")
    assert exc.tensor == "model.norm.weight"


def test_index_names_an_absent_tensor(folder):
    index = json.loads((folder / INDEX_NAME).read_text())
    index["weight_map"]["ghost"] = "model-00001-of-00002.safetensors"
    (folder / INDEX_NAME).write_text(json.dumps(index))
    assert expect(folder, "bad_index").tensor == "ghost"


@pytest.mark.parametrize("shard", ["../model-00001-of-00002.safetensors", ".hidden", "a/b"])
def test_index_shard_names_must_be_plain(folder, shard):
    index = json.loads((folder / INDEX_NAME).read_text())
    index["weight_map"]["model.norm.weight"] = shard
    (folder / INDEX_NAME).write_text(json.dumps(index))
    expect(folder, "bad_index")


def test_duplicate_name_across_shards(folder):
    first = folder / "model-00001-of-00002.safetensors"
    shutil.copy(first, folder / "copy.safetensors")
    index = json.loads((folder / INDEX_NAME).read_text())
    index["weight_map"]["zzz"] = "copy.safetensors"
    (folder / INDEX_NAME).write_text(json.dumps(index))
    assert expect(folder, "duplicate_name").tensor


@pytest.mark.parametrize("edit,code", [
    (lambda c: c["quantization_config"].update(quant_method="gptq"), "bad_config"),
    (lambda c: c["quantization_config"].update(format_version=2), "unsupported_format_version"),
    (lambda c: c.pop("quantization_config"), "bad_config"),
])
def test_config_checks(folder, edit, code):
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    expect(folder, code)


def test_config_not_json(folder):
    (folder / "config.json").write_text("{")
    assert expect(folder, "bad_header").file == str(folder / "config.json")


def test_config_size_limit(folder, monkeypatch):
    from qformat.format import container

    monkeypatch.setattr(container, "MAX_JSON_BYTES", 10)
    expect(folder, "limit_exceeded")


def test_single_file_and_missing_path(folder, tmp_path):
    shard = folder / "model-00001-of-00002.safetensors"
    assert verify_folder(shard)["records"] == 1
    with pytest.raises(FormatError) as info:
        open_folder(tmp_path / "nothing")
    assert info.value.code == "unreadable"
    (tmp_path / "empty").mkdir()
    with pytest.raises(FormatError) as info:
        open_folder(tmp_path / "empty")
    assert info.value.code == "missing_shard"


def test_files_must_list_exactly_the_shards(folder):
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["files"].pop("model-00002-of-00002.safetensors")
    (folder / "config.json").write_text(json.dumps(config))
    assert expect(folder, "checksum_mismatch").field == "quantization_config.files"


def test_malformed_files_entry(folder):
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["files"]["model-00001-of-00002.safetensors"] = "0" * 64
    (folder / "config.json").write_text(json.dumps(config))
    expect(folder, "bad_config")


def test_quantization_config_not_an_object(folder):
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = "qformat"
    (folder / "config.json").write_text(json.dumps(config))
    expect(folder, "bad_config")


def test_files_entry_outside_the_folder_is_not_read(folder, tmp_path, monkeypatch):
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"secret")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["files"]["../outside.bin"] = {"sha256": sha256_file(outside), "size": 6}
    (folder / "config.json").write_text(json.dumps(config))
    from qformat.format import container

    hashed = []
    monkeypatch.setattr(container, "sha256_file", lambda path, *a: hashed.append(Path(path)) or "x")
    expect(folder, "checksum_mismatch")
    assert outside not in [p.resolve() for p in hashed]
