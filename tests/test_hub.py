"""Hub push/download through the real huggingface_hub client against the local Hub-protocol server."""

from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path

import huggingface_hub.utils._http as hf_http
import numpy as np
import pytest
from helpers import HUB_TOKEN
from hub_server import HubServer
from huggingface_hub import HfApi, ModelCard, constants, hf_hub_download
from safetensors.numpy import save_file

import qformat.hub as qhub
from qformat.hub import HubError, download_model, push_folder, resolve_model_source
from qformat.model_card import render_model_card

# huggingface_hub streams LFS uploads with httpx's `data=<file>`, which httpx deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")
TOKEN = HUB_TOKEN
QCONFIG = {
    "quant_method": "qformat", "format_version": 1, "method": "rtn",
    "method_params": {"bits": 4, "group_size": 32, "symmetric": False},
    "bits_per_weight": 4.5, "bits_by_layer_type": {"q_proj": 4.5, "lm_head": 4.5},
    "source": {"id": "org/base", "revision": "0" * 40},
}


def make_model_folder(path: Path, seed: int = 0) -> Path:
    """A small but structurally complete qformat folder: two shards + index, config, tokenizer files."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    shards = {
        "model-00001-of-00002.safetensors": {
            "model.layers.0.self_attn.q_proj.codes": rng.integers(0, 255, (64, 32), dtype=np.uint8),
            "model.layers.0.self_attn.q_proj.scales": rng.standard_normal((64, 4)).astype(np.float16),
        },
        "model-00002-of-00002.safetensors": {"lm_head.weight": rng.standard_normal((32, 16)).astype(np.float32)},
    }
    for name, tensors in shards.items():
        save_file(tensors, str(path / name))
    weight_map = {t: name for name, tensors in shards.items() for t in tensors}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(
        {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "quantization_config": QCONFIG}))
    (path / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0}}}))
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
    return path


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def closed_port_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def push(folder: Path, server: HubServer, repo: str = "user/tiny", **kw: object) -> qhub.PushResult:
    kw.setdefault("token", TOKEN)
    return push_folder(folder, repo, endpoint=server.endpoint, **kw)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------------ push


def test_push_creates_repo_uploads_and_verifies(hub_server: HubServer, tmp_path: Path) -> None:
    folder = make_model_folder(tmp_path / "model")
    before = snapshot(folder)
    result = push(folder, hub_server)

    local = sorted(before)
    assert sorted(result.uploaded) == sorted([*local, "README.md"])  # card generated in memory
    assert result.skipped == () and result.revision == "main" and len(result.commit_sha) == 40
    tree = hub_server.tree("user/tiny")
    assert sorted(tree) == sorted([*local, "README.md", ".gitattributes"])
    for name in local:
        entry = tree[name]
        if name.endswith(".safetensors"):
            assert entry.sha256 == sha256(folder / name)  # stored as LFS, verified by content hash
        else:
            assert entry.sha256 is None and hub_server.read("user/tiny", name) == (folder / name).read_bytes()
    assert hub_server.stats["lfs_uploaded"] == 2 and hub_server.stats["commits"] == 1
    assert snapshot(folder) == before  # nothing written, not even a README

    api = HfApi(endpoint=hub_server.endpoint, token=TOKEN)
    assert sorted(api.list_repo_files("user/tiny")) == sorted(tree)
    info = api.model_info("user/tiny")
    assert info.sha == result.commit_sha
    assert info.card_data.base_model == "org/base" and "qformat" in info.tags


def test_repush_skips_unchanged_and_sends_only_changes(hub_server: HubServer, tmp_path: Path) -> None:
    folder = make_model_folder(tmp_path / "model")
    first = push(folder, hub_server)
    lfs, commits = hub_server.stats["lfs_uploaded"], hub_server.stats["commits"]

    again = push(folder, hub_server)
    assert again.uploaded == () and again.commit_url is None and again.commit_sha == first.commit_sha
    assert (hub_server.stats["lfs_uploaded"], hub_server.stats["commits"]) == (lfs, commits)

    shard = "model-00002-of-00002.safetensors"
    save_file({"lm_head.weight": np.ones((32, 16), np.float32)}, str(folder / shard))
    third = push(folder, hub_server)
    assert third.uploaded == (shard,)
    assert hub_server.stats["lfs_uploaded"] == lfs + 1
    assert hub_server.tree("user/tiny")[shard].sha256 == sha256(folder / shard)


def test_interrupted_push_fails_cleanly_and_resumes(hub_server: HubServer, tmp_path: Path) -> None:
    folder = make_model_folder(tmp_path / "model")
    before = snapshot(folder)
    hub_server.inject("lfs_put", count=1000, skip=1)  # the storage accepts one object, then keeps failing
    with pytest.raises(HubError, match="interrupted.*run the same push again"):
        push(folder, hub_server)
    assert snapshot(folder) == before
    assert hub_server.stats["lfs_uploaded"] == 1 and hub_server.stats["commits"] == 0
    assert not any(p.endswith(".safetensors") for p in hub_server.tree("user/tiny"))

    hub_server.clear_faults()
    result = push(folder, hub_server)
    assert hub_server.stats["lfs_uploaded"] == 2  # only the missing object was sent on retry
    assert {p for p in result.uploaded if p.endswith(".safetensors")} == {p for p in before if p.endswith(".safetensors")}
    assert snapshot(folder) == before


def test_transient_failures_are_retried(hub_server: HubServer, tmp_path: Path) -> None:
    folder = make_model_folder(tmp_path / "model")
    hub_server.inject("lfs_put", count=1, drop=True)  # connection cut mid-upload: the client retries the PUT
    hub_server.inject("commit", count=1, status=503)  # commit POST is not retried by the client; push_folder is
    result = push(folder, hub_server)
    assert hub_server.stats["commits"] == 1 and hub_server.stats["requests:commit"] == 2
    assert hub_server.stats["lfs_uploaded"] == 2 and result.commit_url


def test_checksum_mismatch_after_commit_is_reported(hub_server: HubServer, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    real = qhub._remote_hashes
    calls: list[str] = []

    def tampered(api: HfApi, repo_id: str, revision: str) -> dict[str, tuple[str | None, str]]:
        out = real(api, repo_id, revision)
        calls.append(revision)
        if len(calls) == 2:  # the post-commit verification listing: pretend storage returned other bytes
            out["model-00001-of-00002.safetensors"] = ("0" * 64, "0" * 40)
        return out

    monkeypatch.setattr(qhub, "_remote_hashes", tampered)
    with pytest.raises(HubError, match="checksum verification failed.*model-00001-of-00002.safetensors"):
        push(make_model_folder(tmp_path / "model"), hub_server)


def test_server_rejects_what_the_hub_rejects(hub_server: HubServer) -> None:
    """The fake Hub is not a rubber stamp: unknown LFS objects, bad uploads and anonymous writes are refused."""
    session = hf_http.get_session()
    hub_server.create_repo("user/r")
    auth = {"authorization": f"Bearer {TOKEN}"}
    lines = [{"key": "header", "value": {"summary": "x"}},
             {"key": "lfsFile", "value": {"path": "w.safetensors", "algo": "sha256", "oid": "a" * 64, "size": 3}}]
    body = b"".join(json.dumps(x).encode() + b"\n" for x in lines)
    url = f"{hub_server.endpoint}/api/models/user/r/commit/main"
    assert session.post(url, content=body, headers=auth).status_code == 422
    assert session.post(url, content=body).status_code == 401
    put = f"{hub_server.endpoint}/lfs-upload/user/r/{'a' * 64}?size=3&sig={hub_server.sign('user/r', 'a' * 64)}"
    assert session.put(put, content=b"abc").status_code == 400  # content does not hash to the oid
    assert session.put(put.replace("sig=", "sig=0"), content=b"abc").status_code == 403
    assert hub_server.stats["lfs_uploaded"] == 0 and hub_server.stats["commits"] == 0


def test_missing_token_is_a_clear_error(hub_server: HubServer, tmp_path: Path) -> None:
    folder = make_model_folder(tmp_path / "model")
    with pytest.raises(HubError, match=r"no Hugging Face token.*HF_TOKEN.*login"):
        push(folder, hub_server, token=None)
    assert sum(v for k, v in hub_server.stats.items() if k.startswith("requests:")) == 0


def test_token_from_env_and_login_cache(hub_server: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = make_model_folder(tmp_path / "model")
    Path(constants.HF_TOKEN_PATH).parent.mkdir(parents=True, exist_ok=True)
    Path(constants.HF_TOKEN_PATH).write_text(TOKEN)
    assert push(folder, hub_server, repo="user/from-cache", token=None).uploaded
    Path(constants.HF_TOKEN_PATH).unlink()
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert push(folder, hub_server, repo="user/from-env", token=None).uploaded


def test_refused_token(hub_server: HubServer, tmp_path: Path) -> None:
    with pytest.raises(HubError, match=r"refused the credentials.*HTTP 401"):
        push(make_model_folder(tmp_path / "model"), hub_server, token="wrong")


def test_missing_repo_with_revision(hub_server: HubServer, tmp_path: Path) -> None:
    with pytest.raises(HubError, match=r"user/nope does not exist.*without --revision"):
        push(make_model_folder(tmp_path / "model"), hub_server, repo="user/nope", revision="v1")
    assert "user/nope" not in hub_server.repos


def test_unreachable_endpoint(hub_server: HubServer, tmp_path: Path) -> None:
    folder = make_model_folder(tmp_path / "model")
    before = snapshot(folder)
    endpoint = closed_port_endpoint()
    with pytest.raises(HubError, match=f"could not reach {endpoint}"):
        push_folder(folder, "user/tiny", token=TOKEN, endpoint=endpoint)
    assert snapshot(folder) == before
    with pytest.raises(HubError, match=rf"could not reach {endpoint} to download user/tiny; pass a local folder"):
        download_model("user/tiny", endpoint=endpoint)


def test_endpoint_and_token_from_env(hub_env: HubServer, tmp_path: Path) -> None:
    folder = make_model_folder(tmp_path / "model")
    assert push_folder(folder, "user/env").uploaded and "user/env" in hub_env.repos
    assert (resolve_model_source("user/env") / "config.json").read_bytes() == (folder / "config.json").read_bytes()


def test_incomplete_folder_is_rejected_before_any_request(hub_server: HubServer, tmp_path: Path) -> None:
    folder = make_model_folder(tmp_path / "model")
    shard = folder / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(HubError, match="truncated"):
        push(folder, hub_server)
    shard.unlink()
    with pytest.raises(HubError, match="missing weight file"):
        push(folder, hub_server)
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(HubError, match="expected 'qformat'"):
        push(plain, hub_server)
    assert not hub_server.repos


def test_create_pr_and_revision_branch(hub_server: HubServer, tmp_path: Path) -> None:
    folder = make_model_folder(tmp_path / "model")
    push(folder, hub_server)
    main_before = hub_server.tree("user/tiny")
    shard = "model-00002-of-00002.safetensors"
    save_file({"lm_head.weight": np.zeros((32, 16), np.float32)}, str(folder / shard))

    pr = push(folder, hub_server, create_pr=True, message="requantize lm_head")
    assert pr.revision == "refs/pr/1" and pr.pr_url and pr.uploaded == (shard,)
    assert hub_server.tree("user/tiny") == main_before  # main untouched
    assert hub_server.tree("user/tiny", "refs/pr/1")[shard].sha256 == sha256(folder / shard)
    refs = HfApi(endpoint=hub_server.endpoint, token=TOKEN).list_repo_refs("user/tiny", include_pull_requests=True)
    assert [r.ref for r in refs.pull_requests] == ["refs/pr/1"]
    got = download_model("user/tiny", revision="refs/pr/1", endpoint=hub_server.endpoint)
    assert (got / shard).read_bytes() == (folder / shard).read_bytes()

    branch = push(folder, hub_server, revision="v2")
    assert branch.revision == "v2" and hub_server.tree("user/tiny") == main_before
    assert hub_server.tree("user/tiny", "v2")[shard].sha256 == sha256(folder / shard)


# ------------------------------------------------------------------------------------------------------ load


def test_download_fetches_only_needed_files(hub_server: HubServer, tmp_path: Path) -> None:
    folder = make_model_folder(tmp_path / "model")
    push(folder, hub_server)
    hub_server.put_files("user/tiny", {"pytorch_model.bin": b"\0" * 3_000_000, "notes/extra.txt": b"x"},
                         lfs=["pytorch_model.bin"])
    got = download_model("user/tiny", endpoint=hub_server.endpoint, cache_dir=tmp_path / "cache")
    files = sorted(p.relative_to(got).as_posix() for p in got.rglob("*") if p.is_file())
    assert files == sorted([*snapshot(folder), "README.md"])
    for name in snapshot(folder):
        assert (got / name).read_bytes() == (folder / name).read_bytes()
    downloaded = {path for _, path in hub_server.downloads}
    assert "pytorch_model.bin" not in downloaded and "notes/extra.txt" not in downloaded


def test_private_repo_download_requires_token(hub_server: HubServer, tmp_path: Path) -> None:
    folder = make_model_folder(tmp_path / "model")
    push(folder, hub_server, repo="user/secret-model", private=True)
    assert hub_server.repos["user/secret-model"].private
    with pytest.raises(HubError, match="not found.*private"):
        download_model("user/secret-model", endpoint=hub_server.endpoint)
    got = download_model("user/secret-model", token=TOKEN, endpoint=hub_server.endpoint)
    assert (got / "config.json").read_bytes() == (folder / "config.json").read_bytes()


def test_offline_uses_cache(hub_server: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    push(make_model_folder(tmp_path / "model"), hub_server)
    online = download_model("user/tiny", endpoint=hub_server.endpoint)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    served = len(hub_server.downloads)
    assert download_model("user/tiny", endpoint=hub_server.endpoint) == online
    assert len(hub_server.downloads) == served
    with pytest.raises(HubError, match="HF_HUB_OFFLINE is set"):
        download_model("user/other", endpoint=hub_server.endpoint)


def test_resolve_model_source(hub_server: HubServer, tmp_path: Path) -> None:
    folder = make_model_folder(tmp_path / "model")
    assert resolve_model_source(str(folder)) == folder
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_model_source(gguf) == gguf
    with pytest.raises(HubError, match="neither an existing local path"):
        resolve_model_source(str(tmp_path / "missing.gguf"))
    push(folder, hub_server)
    got = resolve_model_source("user/tiny", endpoint=hub_server.endpoint)
    assert (got / "config.json").is_file()
    with pytest.raises(HubError, match="revision 'nope' not found"):
        resolve_model_source("user/tiny", "nope", endpoint=hub_server.endpoint)


# ------------------------------------------------------------------------------------------------------ card


def test_model_card_metadata_round_trips() -> None:
    config = {"architectures": ["LlamaForCausalLM"], "quantization_config": QCONFIG}
    text = render_model_card(config, source_card_metadata={"license": "apache-2.0", "language": ["en"]},
                             eval_results={"perplexity": {"before": 8.1, "after": 8.4}, "dataset": "wikitext-2"},
                             repo_id="user/tiny", command="qformat convert org/base out --method rtn")
    data = ModelCard(text).data
    assert data.base_model == "org/base" and data.base_model_relation == "quantized"
    assert data.library_name == "qformat" and data.license == "apache-2.0" and data.language == ["en"]
    assert data.pipeline_tag == "text-generation"
    assert {"qformat", "rtn", "4bit"} <= set(data.tags)
    for needle in ("| q_proj | 4.5 |", "| perplexity | 8.1 | 8.4 |", 'qformat.load("user/tiny")',
                   "AutoModelForCausalLM.from_pretrained", "group_size", "qformat convert org/base"):
        assert needle in text
    bare = ModelCard(render_model_card({"quantization_config": {"quant_method": "qformat"}})).data
    assert bare.library_name == "qformat" and bare.base_model is None


def test_pushed_card_carries_source_license(hub_server: HubServer, tmp_path: Path) -> None:
    hub_server.create_repo("org/base")
    sha = hub_server.put_files("org/base", {"README.md": b"---\nlicense: mit\n---\n# base\n"})
    folder = make_model_folder(tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["source"]["revision"] = sha  # the card is read at the converted revision
    (folder / "config.json").write_text(json.dumps(config))
    push(folder, hub_server)
    path = hf_hub_download("user/tiny", "README.md", endpoint=hub_server.endpoint, cache_dir=tmp_path / "c")
    data = ModelCard.load(path).data
    assert data.license == "mit" and data.base_model == "org/base" and data.base_model_relation == "quantized"
