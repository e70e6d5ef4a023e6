"""Importing one GGUF file of a Hub repository (``org/Model-GGUF``: several quantizations, no config.json), against
the local Hub server (tests/hub_server.py): ``qformat convert REPO --out DIR [-p gguf_file=NAME]`` and
``qformat.convert(REPO, DIR, "import", params={"gguf_file": NAME})`` fetch only the chosen file, record the repo, the
file and the commit as lineage, and refuse a missing or ambiguous choice before any download, leaving an existing
output as it was."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from gguf_fixtures import write_tiny_gguf
from huggingface_hub import constants

import qformat
from qformat.cli import main
from qformat.conversion.importing import import_checkpoint
from qformat.errors import ConversionError
from qformat.hub import HubError

SINGLE = "org/Tiny-GGUF"
MULTI = "org/Multi-GGUF"
CHOSEN = "tiny.Q4_K_M.gguf"
OTHER = "tiny.Q8_0.gguf"


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / CHOSEN, np.random.default_rng(7))


@pytest.fixture(scope="module")
def local_import(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same file imported from disk: what a Hub import must write, shard for shard."""
    out = tmp_path_factory.mktemp("local") / "out"
    import_checkpoint(tiny_gguf, out)
    return out


def seed_repo(hub, repo_id: str, files: dict[str, bytes]) -> str:
    hub.create_repo(repo_id)
    return hub.put_files(repo_id, {"README.md": b"---\nlicense: apache-2.0\n---\n# GGUF files\n", **files},
                         lfs=[name for name in files if name.endswith(".gguf")])


def multi_repo(hub, tiny_gguf: Path) -> str:
    """Two quantizations; the one never chosen is not even a valid GGUF, so fetching it would fail the import."""
    return seed_repo(hub, MULTI, {CHOSEN: tiny_gguf.read_bytes(), OTHER: b"GGUF" + b"\0" * 64})


def run(capsys: pytest.CaptureFixture, *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def qconfig(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())["quantization_config"]


def shard_hashes(folder: Path) -> dict[str, str]:
    return {name: entry["sha256"] for name, entry in qconfig(folder)["files"].items()}


def snapshot(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_repo_with_one_gguf_is_imported_without_naming_it(hub_env, tiny_gguf, local_import, tmp_path, capsys,
                                                            monkeypatch) -> None:
    commit = seed_repo(hub_env, SINGLE, {CHOSEN: tiny_gguf.read_bytes()})
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "convert", SINGLE, "--out", out, "--json")  # no --method: detected
    assert code == 0, err
    assert json.loads(stdout)["importer"] == "gguf"
    assert [path for _, path in hub_env.downloads] == [CHOSEN]
    assert shard_hashes(out) == shard_hashes(local_import)  # bit for bit what the local file gives
    qc = qconfig(out)
    assert qc["source"]["id"] == SINGLE and qc["source"]["file"] == CHOSEN and qc["source"]["revision"] == commit
    assert "local" not in qc["source"] and qc["base_model"] == SINGLE
    assert qc["command"] == f"qformat convert --method import {SINGLE} --out out -p gguf_file={CHOSEN}"
    card = (out / "README.md").read_text()
    assert f"base_model: {SINGLE}" in card and f"gguf_file={CHOSEN}" in card and commit in card
    # offline, the cached snapshot is listed instead of the repo: the same file, nothing fetched again
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    code, _, err = run(capsys, "convert", SINGLE, "--out", out, "--overwrite", "--quiet")
    assert code == 0, err
    assert len(hub_env.downloads) == 1 and shard_hashes(out) == shard_hashes(local_import)


def test_the_chosen_file_of_several_is_the_only_download(hub_env, tiny_gguf, local_import, tmp_path,
                                                         capsys) -> None:
    commit = multi_repo(hub_env, tiny_gguf)
    out = tmp_path / "out"
    code, _, err = run(capsys, "convert", MULTI, "--out", out, "-p", f"gguf_file={CHOSEN}", "--quiet")
    assert code == 0, err
    assert [path for _, path in hub_env.downloads] == [CHOSEN]
    assert shard_hashes(out) == shard_hashes(local_import)
    source = qconfig(out)["source"]
    assert (source["id"], source["file"], source["revision"]) == (MULTI, CHOSEN, commit)
    assert f"-p gguf_file={CHOSEN}" in qconfig(out)["command"]


def test_python_api_takes_gguf_file(hub_env, tiny_gguf, local_import, tmp_path) -> None:
    multi_repo(hub_env, tiny_gguf)
    result = qformat.convert(MULTI, tmp_path / "out", "import", params={"gguf_file": CHOSEN})
    assert result.importer == "gguf" and result.records == 13
    assert [path for _, path in hub_env.downloads] == [CHOSEN]
    assert result.quantization_config["source"]["file"] == CHOSEN
    assert shard_hashes(tmp_path / "out") == shard_hashes(local_import)
    with pytest.raises(TypeError, match="parameter 'bits' does not apply to an import"):
        qformat.convert(MULTI, tmp_path / "out2", "import", params={"bits": 4})


def test_several_ggufs_and_no_choice_is_refused_before_any_download(hub_env, tiny_gguf, local_import, tmp_path,
                                                                    capsys) -> None:
    multi_repo(hub_env, tiny_gguf)
    out = tmp_path / "out"
    code, _, err = run(capsys, "convert", MULTI, "--out", out)
    assert code != 0
    assert f"{MULTI} (revision " in err and "holds 2 .gguf files; choose one with -p gguf_file=NAME" in err
    assert f"{CHOSEN}, {OTHER}" in err
    with pytest.raises(HubError, match=f"holds 2 .gguf files.*{CHOSEN}, {OTHER}"):
        qformat.convert(MULTI, out, "import")
    assert hub_env.downloads == [] and not out.exists()


def test_a_gguf_file_the_repo_lacks_is_named_and_the_output_kept(hub_env, tiny_gguf, local_import, tmp_path,
                                                                 capsys) -> None:
    import shutil

    multi_repo(hub_env, tiny_gguf)
    out = tmp_path / "out"
    shutil.copytree(local_import, out)  # a qformat output --overwrite would replace
    before = snapshot(out)
    code, _, err = run(capsys, "convert", MULTI, "--out", out, "--overwrite", "-p", "gguf_file=tiny.Q5_K_M.gguf")
    assert code != 0
    assert f"gguf_file 'tiny.Q5_K_M.gguf' is not in {MULTI}" in err and f"its .gguf files: {CHOSEN}, {OTHER}" in err
    with pytest.raises(HubError, match="gguf_file 'nope.gguf' is not in org/Multi-GGUF"):
        qformat.convert(MULTI, out, "import", params={"gguf_file": "nope.gguf"}, overwrite=True)
    assert hub_env.downloads == [] and snapshot(out) == before


def test_an_output_that_cannot_be_written_is_refused_before_the_download(hub_env, tiny_gguf, tmp_path,
                                                                         capsys) -> None:
    seed_repo(hub_env, SINGLE, {CHOSEN: tiny_gguf.read_bytes()})
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = run(capsys, "convert", SINGLE, "--out", out)
    assert code != 0 and "the output folder exists" in err
    code, _, err = run(capsys, "convert", SINGLE, "--out", out, "--overwrite")
    assert code != 0 and "only a qformat output folder is ever replaced" in err
    assert hub_env.downloads == [] and (out / "notes.txt").read_text() == "mine" and len(list(out.iterdir())) == 1


def test_gguf_file_is_for_imports_only(tmp_path, capsys) -> None:
    code, _, err = run(capsys, "convert", "--method", "rtn", "org/Model-GGUF", "--out", tmp_path / "out",
                       "-p", "gguf_file=model.Q4_0.gguf")
    assert code != 0 and "-p gguf_file= picks the GGUF file of a repository to import" in err
    code, _, err = run(capsys, "convert", "--method", "import", "org/Model-GGUF", "--out", tmp_path / "out",
                       "-p", "bits=4")
    assert code != 0 and "--method import takes only -p format=NAME" in err and "-p gguf_file=NAME" in err
    assert not (tmp_path / "out").exists()


def test_gguf_file_picks_a_file_of_a_local_folder(tiny_gguf, tmp_path) -> None:
    folder = tmp_path / "ggufs"
    folder.mkdir()
    (folder / OTHER).write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ConversionError, match=f"gguf_file 'nope.gguf' is not a file in .*{OTHER}"):
        qformat.convert(folder, tmp_path / "out", "import", params={"gguf_file": "nope.gguf"})
    with pytest.raises(ConversionError, match="picks a file in a folder or Hub repository"):
        qformat.convert(tiny_gguf, tmp_path / "out", "import", params={"gguf_file": CHOSEN})
    assert not (tmp_path / "out").exists()
