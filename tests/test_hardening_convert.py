"""Hardening of `qformat convert`: what a source may make it read, what it may delete or move around --out, resumes
from a changed source, concurrent conversions, the GGUF cache key, corrupt weights and out-of-range parameters."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import folder_bytes
from tiny_model import make_tiny_llama

from qformat.cli import main
from qformat.conversion import gguf
from qformat.conversion.pipeline import DIGESTS_NAME, Converter, ConvertOptions, convert
from qformat.errors import ConversionError
from qformat.format import verify_folder
from qformat.format.safetensors_io import SafetensorsFile
from qformat.hub import resolve_model_source
from qformat.text import DEFAULT_CALIBRATION

CALIB = {"calib_samples": 8, "calib_seqlen": 64}
SECRET = "TOP-SECRET-LOCAL-FILE"
SHORT_CALIB: list[Path] = []  # the first 30 KB of the default text, so tokenizing it costs nothing


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = make_tiny_llama(tmp_path_factory.mktemp("src") / "tiny", layers=2)
    calib = folder.parent / "calib.txt"
    calib.write_text(DEFAULT_CALIBRATION.read_text(encoding="utf-8")[:30_000])
    SHORT_CALIB[:] = [calib]
    return folder


def options(source: Path | str, out: Path, method: str = "rtn", **kw) -> ConvertOptions:
    return ConvertOptions(str(source), out, method, quiet=True, calib=SHORT_CALIB[0], resolve_hub=resolve_model_source,
                          **{**CALIB, **kw})


def copy_source(tiny: Path, dest: Path) -> Path:
    shutil.copytree(tiny, dest)
    return dest


def cli(capsys: pytest.CaptureFixture, *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def overwrite_tensor(file: Path, name: str, data: bytes | None = None, *, fill: bytes | None = None) -> None:
    """Replace the bytes of one tensor in a safetensors file in place (same size)."""
    st = SafetensorsFile(file)
    entry, start = st.entries[name], st.data_start
    size = entry.end - entry.begin
    payload = data if data is not None else (fill * size)[:size]
    assert len(payload) == size
    raw = bytearray(file.read_bytes())
    raw[start + entry.begin:start + entry.end] = payload
    file.write_bytes(bytes(raw))


# ------------------------------------------------------------------------------------------- 6. reading outside


@pytest.mark.parametrize("name", ["../outside.safetensors", "ABSOLUTE", "sub/model.safetensors",
                                  ".hidden.safetensors"])
def test_index_names_only_files_inside_the_source(tiny: Path, tmp_path: Path, name: str) -> None:
    outside = tmp_path / "outside.safetensors"
    shutil.copy(tiny / "model.safetensors", outside)
    src = copy_source(tiny, tmp_path / "src")
    if name == "ABSOLUTE":
        name = str(outside)
    elif name == "sub/model.safetensors":
        (src / "sub").mkdir()
        shutil.copy(tiny / "model.safetensors", src / "sub" / "model.safetensors")
    elif name.startswith("."):
        shutil.copy(tiny / "model.safetensors", src / name)
    (src / "model.safetensors").unlink()
    names = SafetensorsFile(outside).entries
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": dict.fromkeys(names, name)}))
    with pytest.raises(ConversionError, match="must be files inside the model folder.*not a plain file name"):
        convert(options(src, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_symlinked_weights_must_stay_inside_the_source(tiny: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere" / "model.safetensors"
    outside.parent.mkdir()
    shutil.copy(tiny / "model.safetensors", outside)
    src = copy_source(tiny, tmp_path / "src")
    (src / "model.safetensors").unlink()
    (src / "model.safetensors").symlink_to(outside)
    with pytest.raises(ConversionError, match="symbolic link to .*elsewhere.*outside the source folder"):
        convert(options(src, tmp_path / "out"))
    # a link that stays inside the folder is fine
    (src / "model.safetensors").unlink()
    (src / "weights").mkdir()
    shutil.copy(outside, src / "weights" / "w.safetensors")
    (src / "model.safetensors").symlink_to(Path("weights") / "w.safetensors")
    convert(options(src, tmp_path / "out"))
    verify_folder(tmp_path / "out")


def test_symlinked_config_leaving_the_source_is_refused(tiny: Path, tmp_path: Path) -> None:
    src = copy_source(tiny, tmp_path / "src")
    (tmp_path / "config.json").write_bytes((src / "config.json").read_bytes())
    (src / "config.json").unlink()
    (src / "config.json").symlink_to(tmp_path / "config.json")
    with pytest.raises(ConversionError, match="refusing to read config.json is a symbolic link"):
        convert(options(src, tmp_path / "out"))


def push_source(server, repo: str, files: dict[str, bytes]) -> None:
    server.create_repo(repo)
    server.put_files(repo, files, lfs=[n for n in files if n.endswith(".safetensors")])


def test_hub_index_naming_a_local_path_is_neither_read_nor_published(tiny: Path, tmp_path: Path, hub_env,
                                                                     capsys: pytest.CaptureFixture) -> None:
    """A Hub repo whose index names /abs/path/model.safetensors must not make convert read that local file (and with
    --push-to, publish it)."""
    private = tmp_path / "private" / "model.safetensors"
    private.parent.mkdir()
    shutil.copy(tiny / "model.safetensors", private)
    names = SafetensorsFile(private).entries
    files = {p.name: p.read_bytes() for p in tiny.iterdir() if p.name != "model.safetensors"}
    files["model.safetensors.index.json"] = json.dumps({"weight_map": dict.fromkeys(names, str(private))}).encode()
    push_source(hub_env, "evil/model", files)
    with pytest.raises(ConversionError, match="not a plain file name"):
        convert(options("evil/model", tmp_path / "out"))
    code, _, err = cli(capsys, "convert", "--method", "rtn", "evil/model", "--out", tmp_path / "out2", "--quiet",
                       "--push-to", "evil/leak")
    assert code == 1 and "not a plain file name" in err
    assert "evil/leak" not in hub_env.repos
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()


# ------------------------------------------------------------------------------------------- 7. symlinked side files


def test_side_files_linking_outside_the_source_are_not_copied(tiny: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text(SECRET)
    card = tmp_path / "other_readme.md"
    card.write_text(f"---\nlicense: other\nlicense_name: {SECRET.lower()}\n---\n# someone else's card\n")
    src = copy_source(tiny, tmp_path / "src")
    (src / "chat_template.jinja").symlink_to(secret)
    (src / "generation_config.json").unlink()
    (src / "generation_config.json").symlink_to(secret)
    (src / "README.md").symlink_to(card)
    (src / "inner").mkdir()  # a link that stays inside the folder is followed
    shutil.move(src / "tokenizer_config.json", src / "inner" / "tokenizer_config.json")
    (src / "tokenizer_config.json").symlink_to(Path("inner") / "tokenizer_config.json")
    out = tmp_path / "out"
    convert(options(src, out))
    assert not (out / "chat_template.jinja").exists() and not (out / "generation_config.json").exists()
    assert (out / "tokenizer_config.json").read_bytes() == (tiny / "tokenizer_config.json").read_bytes()
    assert not (out / "tokenizer_config.json").is_symlink()
    for path in out.iterdir():
        assert SECRET.encode() not in path.read_bytes() and SECRET.lower().encode() not in path.read_bytes(), path
    err = capsys.readouterr().err
    assert "not copying chat_template.jinja" in err and "outside the source folder" in err


def test_hub_cache_links_are_followed(tiny: Path, tmp_path: Path, hub_env) -> None:
    """A Hub source's snapshot files are links into the cache's blobs: they are inside the source and are copied."""
    push_source(hub_env, "org/tiny", {p.name: p.read_bytes() for p in tiny.iterdir()})
    out = tmp_path / "out"
    result = convert(options("org/tiny", out))
    snapshot = result.source.folder
    assert result.source.kind == "hub" and (snapshot / "tokenizer.json").is_symlink()
    assert (snapshot / "model.safetensors").is_symlink()
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (tiny / name).read_bytes(), name
    # the same snapshot named by its path (a local folder) is read the same way
    local = convert(options(snapshot, tmp_path / "out2"))
    assert local.source.kind == "folder" and (tmp_path / "out2" / "tokenizer.json").is_file()
    assert {n: b for n, b in folder_bytes(out).items() if n.endswith(".safetensors")} == \
        {n: b for n, b in folder_bytes(tmp_path / "out2").items() if n.endswith(".safetensors")}


# ------------------------------------------------------------------------------------------- 8. data loss around --out


@pytest.fixture(scope="module")
def earlier_rtn(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("earlier") / "rtn"
    convert(options(tiny, out))
    return out


@pytest.fixture
def earlier_out(earlier_rtn: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(earlier_rtn, out)
    return out


def user_folder(path: Path, *names: str) -> dict[str, bytes]:
    path.mkdir()
    for name in names or ("mine.txt",):
        (path / name).write_text(f"the user's {name}")
    return folder_bytes(path)


def test_overwrite_refuses_a_qformat_output_holding_user_files(tiny: Path, earlier_out: Path) -> None:
    (earlier_out / "my-notes.txt").write_text("notes")
    before = folder_bytes(earlier_out)
    with pytest.raises(ConversionError, match=r"holds files a qformat output does not have \(my-notes.txt\)"):
        convert(options(tiny, earlier_out, overwrite=True))
    assert folder_bytes(earlier_out) == before


def test_output_exists_error_keeps_the_users_old_folder(tiny: Path, earlier_out: Path) -> None:
    old = earlier_out.with_name("out.old")
    kept = user_folder(old)
    with pytest.raises(ConversionError, match="exists.*--overwrite"):
        convert(options(tiny, earlier_out))
    assert folder_bytes(old) == kept
    # nor does --overwrite move the output onto it
    with pytest.raises(ConversionError, match="out.old exists and was not made by qformat"):
        convert(options(tiny, earlier_out, overwrite=True))
    assert folder_bytes(old) == kept and (earlier_out / "config.json").is_file()


def test_users_old_folder_is_not_renamed_to_the_output(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    old = tmp_path / "out.old"
    kept = user_folder(old, "config.json", "model.safetensors")
    convert(options(tiny, out))
    assert folder_bytes(old) == kept
    assert verify_folder(out)["records"] == 15


def test_restart_keeps_a_users_partial_folder(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    partial = tmp_path / "out.partial"
    kept = user_folder(partial, "thesis.tex")
    for restart in (False, True):
        with pytest.raises(ConversionError, match="out.partial exists and was not made by qformat"):
            convert(options(tiny, out, restart=restart))
        assert folder_bytes(partial) == kept and not out.exists()


def test_partial_with_only_shard_like_names_is_not_deleted(tiny: Path, tmp_path: Path) -> None:
    partial = tmp_path / "out.partial"
    kept = user_folder(partial, "final-report.pdf", "shard-notes.txt")
    with pytest.raises(ConversionError, match="not made by qformat"):
        convert(options(tiny, tmp_path / "out"))
    assert folder_bytes(partial) == kept


def test_empty_partial_folder_is_adopted(tiny: Path, tmp_path: Path) -> None:
    (tmp_path / "out.partial").mkdir()
    convert(options(tiny, tmp_path / "out"))
    assert not (tmp_path / "out.partial").exists() and verify_folder(tmp_path / "out")


def test_partial_of_an_earlier_qformat_version_needs_restart(tiny: Path, tmp_path: Path) -> None:
    partial = tmp_path / "out.partial"
    partial.mkdir()
    (partial / "state.json").write_text(json.dumps({"state_version": 1, "method": "rtn"}))
    (partial / "shard-00000.safetensors").write_bytes(b"x")
    with pytest.raises(ConversionError, match="another version of qformat.*--restart"):
        convert(options(tiny, tmp_path / "out"))
    assert (partial / "shard-00000.safetensors").exists()
    convert(options(tiny, tmp_path / "out", restart=True))
    assert not partial.exists() and verify_folder(tmp_path / "out")


@pytest.mark.parametrize("target", [".", "..", "CWD", "PARENT_OF_CWD", "/", "SOURCE_PARENT"])
def test_out_naming_the_cwd_a_parent_or_root_is_a_clean_error(tiny: Path, tmp_path: Path, target: str,
                                                              capsys: pytest.CaptureFixture,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "work" / "here"
    work.mkdir(parents=True)
    src = copy_source(tiny, tmp_path / "models" / "tiny")
    monkeypatch.chdir(work)
    out = {"CWD": work, "PARENT_OF_CWD": work.parent, "SOURCE_PARENT": src.parent}.get(target, target)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code, _, err = cli(capsys, "convert", "--method", "rtn", src, "--out", out, "--overwrite", "--quiet")
    assert code == 1, err
    assert err.startswith("qformat: error: --out") and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_symlinked_out_is_refused(tiny: Path, earlier_out: Path, tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(earlier_out)
    with pytest.raises(ConversionError, match="symbolic link"):
        convert(options(tiny, link, overwrite=True))
    assert link.is_symlink() and (earlier_out / "config.json").is_file()


def test_no_marker_or_lock_is_left_behind(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    convert(options(tiny, out))
    convert(options(tiny, out, overwrite=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert not any(p.name.startswith(".") for p in out.iterdir())


# ------------------------------------------------------------------------------------------- 9. stale resume


class Killed(Exception):
    pass


def kill_after(block: int):
    def hook(index: int) -> None:
        if index == block:
            raise Killed(f"killed after block {index}")
    return hook


def replace_weights(src: Path, tmp_path: Path, seed: int) -> None:
    """Another checkpoint with the same shapes (and so the same safetensors header) in place of the source's."""
    other = make_tiny_llama(tmp_path / f"other{seed}", layers=2, seed=seed)
    assert SafetensorsFile(other / "model.safetensors").entries == SafetensorsFile(src / "model.safetensors").entries
    shutil.copy(other / "model.safetensors", src / "model.safetensors")


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_resume_refuses_a_replaced_source(tiny: Path, tmp_path: Path, method: str) -> None:
    src = copy_source(tiny, tmp_path / "src")
    out = tmp_path / "out"
    with pytest.raises(Killed):
        convert(options(src, out, method), on_block_done=kill_after(0))
    replace_weights(src, tmp_path, seed=1)
    with pytest.raises(ConversionError, match=r"source changed since the partial conversion was made: model\.\S+ in "
                       r"model\.safetensors differs .*resuming would mix two models.*--restart"):
        convert(options(src, out, method))
    assert not out.exists() and (tmp_path / "out.partial" / "shard-00000.safetensors").is_file()
    result = convert(options(src, out, method, restart=True))
    assert result.summary.resumed_blocks == 0
    fresh = tmp_path / "fresh"
    convert(options(src, fresh, method))
    assert {n: b for n, b in folder_bytes(out).items() if n.endswith(".safetensors")} == \
        {n: b for n, b in folder_bytes(fresh).items() if n.endswith(".safetensors")}


def test_resume_refuses_changed_embeddings_used_for_calibration(tiny: Path, tmp_path: Path) -> None:
    """Embeddings are read for the calibration inputs of every block, long before their own (last) shard."""
    src = copy_source(tiny, tmp_path / "src")
    out = tmp_path / "out"
    with pytest.raises(Killed):
        convert(options(src, out, "gptq"), on_block_done=kill_after(0))
    overwrite_tensor(src / "model.safetensors", "model.embed_tokens.weight", fill=struct.pack("<f", 0.01))
    with pytest.raises(ConversionError, match=r"model\.embed_tokens\.weight in model\.safetensors differs"):
        convert(options(src, out, "gptq"))


def test_shard_without_recorded_digests_is_redone(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kill between writing a shard and recording its sources' digests: the shard counts as unfinished."""
    whole = tmp_path / "a" / "out"
    whole.parent.mkdir()
    convert(options(tiny, whole, "gptq"))
    resumed = tmp_path / "b" / "out"
    resumed.parent.mkdir()
    real_save = Converter._save_digests
    saves = []

    def killed_on_second_save(self: Converter) -> None:
        saves.append(1)
        if len(saves) == 2:
            raise Killed("killed before the digests of block 1 were recorded")
        real_save(self)

    monkeypatch.setattr(Converter, "_save_digests", killed_on_second_save)
    with pytest.raises(Killed):
        convert(options(tiny, resumed, "gptq"))
    monkeypatch.undo()
    partial = resumed.with_name("out.partial")
    assert (partial / "shard-00001.safetensors").is_file()
    recorded = json.loads((partial / DIGESTS_NAME).read_text())["sha256"]
    assert "model.layers.0.mlp.up_proj.weight" in recorded and "model.layers.1.mlp.up_proj.weight" not in recorded
    result = convert(options(tiny, resumed, "gptq"))
    assert result.summary.resumed_blocks == 1
    assert folder_bytes(resumed) == folder_bytes(whole)


# ------------------------------------------------------------------------------------------- 10. one writer per --out

HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from qformat.conversion.pipeline import ConvertOptions, convert
    ready, go = Path(sys.argv[3]), Path(sys.argv[4])

    def hold(index):
        if index == 0:
            ready.write_text("holding")
            deadline = time.time() + 300
            while not go.exists() and time.time() < deadline:
                time.sleep(0.05)

    convert(ConvertOptions(sys.argv[1], sys.argv[2], "rtn", quiet=True), on_block_done=hold)
    print("finished")
""")


def test_a_second_convert_into_the_same_out_is_refused(tiny: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    out, ready, go = tmp_path / "out", tmp_path / "ready", tmp_path / "go"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tiny), str(out), str(ready), str(go)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not ready.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline
            time.sleep(0.05)
        partial = folder_bytes(tmp_path / "out.partial")
        with pytest.raises(ConversionError, match=rf"another qformat convert is writing {out} \(pid {proc.pid}\)"):
            convert(options(tiny, out))
        for flags in ([], ["--restart"], ["--overwrite"]):
            code, _, err = cli(capsys, "convert", "--method", "rtn", tiny, "--out", out, "--quiet", *flags)
            assert code == 1 and f"(pid {proc.pid})" in err and err.count("\n") == 1, err
        assert folder_bytes(tmp_path / "out.partial") == partial  # the loser touched nothing
    finally:
        go.write_text("go")
        stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "finished" in stdout, stderr[-2000:]
    verify_folder(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["go", "out", "ready"]


def test_the_lock_is_held_until_the_output_is_pushed(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """No other convert can replace the folder between its finalize and the end of --eval/--push-to."""
    from qformat import hub
    from qformat.conversion.lock import OutputLock, lock_path

    pushed = []

    def fake_push(folder, repo_id, **kw):
        with pytest.raises(ConversionError, match=f"another qformat convert is writing {folder} \\(pid {os.getpid()}"):
            OutputLock(Path(folder)).acquire()
        pushed.append(Path(folder))
        return hub.PushResult(repo_id, "main", "0" * 40, "https://hub/commit", None, ("config.json",), ())

    monkeypatch.setattr(hub, "push_folder", fake_push)
    out = tmp_path / "out"
    code, _, err = cli(capsys, "convert", "--method", "rtn", tiny, "--out", out, "--quiet", "--push-to", "me/tiny")
    assert code == 0 and pushed == [out], err
    assert not lock_path(out).exists()


# ------------------------------------------------------------------------------------------- 11. GGUF cache key


def test_gguf_key_covers_the_whole_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QFORMAT_CACHE", str(tmp_path / "cache"))
    body = np.random.default_rng(0).integers(0, 256, (16 << 20) + 4096, dtype=np.uint8).tobytes()
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    a.write_bytes(body)
    b.write_bytes(body[:-1] + bytes([body[-1] ^ 1]))  # same first 16 MiB, same size, another model
    assert gguf.gguf_key(a) != gguf.gguf_key(b)
    import hashlib

    assert gguf.gguf_key(a) == hashlib.sha256(body).hexdigest()


def test_gguf_digest_is_remembered_until_the_file_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QFORMAT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(gguf, "SETTLED_NS", 0)
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF" + bytes(1000))
    opened = []
    real_open = open
    monkeypatch.setattr(gguf, "open", lambda p, *a, **k: opened.append(p) or real_open(p, *a, **k), raising=False)
    first = gguf.gguf_key(path)
    assert gguf.gguf_key(path) == first and len(opened) == 1  # remembered: not hashed again
    time.sleep(0.05)  # past the file system's timestamp tick
    stat = path.stat()
    path.write_bytes(b"GGUF" + bytes(999) + b"\1")  # same size; mtime set back as a copy tool might
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert gguf.gguf_key(path) != first and len(opened) == 2


# ------------------------------------------------------------------------------------------- corrupt sources


@pytest.mark.parametrize("damage", ["nan", "inf", "garbage"])
def test_corrupt_weights_are_a_source_error_naming_tensor_and_file(tiny: Path, tmp_path: Path, damage: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from qformat.plugins import get_method

    src = copy_source(tiny, tmp_path / "src")
    name = "model.layers.1.mlp.up_proj.weight"
    if damage == "nan":
        overwrite_tensor(src / "model.safetensors", name, fill=struct.pack("<f", float("nan")))
    elif damage == "inf":
        overwrite_tensor(src / "model.safetensors", name,
                         fill=struct.pack("<f", 0.01) * 100 + struct.pack("<f", float("inf")))
    else:
        size = np.prod(SafetensorsFile(src / "model.safetensors").entries[name].shape) * 4
        overwrite_tensor(src / "model.safetensors", name,
                         np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8).tobytes())
    quantized: list[str] = []
    method = type(get_method("gptq"))
    real = method.quantize
    monkeypatch.setattr(method, "quantize", lambda self, layer, params: quantized.append(layer.name) or
                        real(self, layer, params))
    with pytest.raises(ConversionError, match=rf"source model is corrupt: {name} in model\.safetensors .*(NaN or Inf|"
                       r"magnitude)") as info:
        convert(options(src, tmp_path / "out", "gptq"))
    assert "Hessian" not in str(info.value)
    assert not any(q.startswith("model.layers.1.") for q in quantized)  # found before block 1 was quantized


# ------------------------------------------------------------------------------------------- parameter ranges


@pytest.mark.parametrize("argv, message", [
    (["--method", "rtn", "--group-size", "99999999999999999999"],
     "parameter 'group_size': 99999999999999999999 is above the maximum 1048576"),
    (["--method", "gptq", "-p", "block_size=1e400"], "parameter 'block_size': '1e400' is not a valid int"),
    (["--method", "gptq", "-p", "damp=nan"], "'damp': NaN is not allowed"),
    (["--method", "rtn", "--bits", "inf"], "parameter 'bits': 'inf' is not a valid int"),
    (["--method", "rtn", "--seed", "99999999999999999999"], "--seed must be an integer from 0 to 4294967295"),
    (["--method", "gptq", "--calib-samples", "99999999999"], "--calib-samples must be an integer from 1 to"),
    (["--method", "gptq", "--calib-seqlen", "1"], "--calib-seqlen must be an integer from 2 to"),
    (["--method", "rtn", "--eval", "--eval-seqlen", "99999999999999"], "--eval-seqlen must be an integer from 2"),
])
def test_integer_options_are_bounded(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture, argv: list[str],
                                     message: str) -> None:
    code, _, err = cli(capsys, "convert", tiny, "--out", tmp_path / "out", "--quiet", *argv)
    assert code == 1 and err.startswith("qformat: error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []
