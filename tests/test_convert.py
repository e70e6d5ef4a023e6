"""The conversion pipeline on tiny random-weight Llama models: methods, resume, selection, bad input, memory."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import folder_bytes
from tiny_model import make_tiny_llama

from qformat.conversion.pipeline import Converter, ConvertOptions, convert
from qformat.errors import ConversionError, ParameterError, PluginError, QformatError
from qformat.format import FolderWriter, open_folder, verify_folder
from qformat.hub import resolve_model_source
from qformat.text import DEFAULT_CALIBRATION

CALIB = {"calib_samples": 8, "calib_seqlen": 64}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = make_tiny_llama(tmp_path_factory.mktemp("src") / "tiny", layers=3)
    # A short calibration text (the first 30 KB of the default), so tokenizing it costs nothing.
    (folder.parent / "calib.txt").write_text(DEFAULT_CALIBRATION.read_text(encoding="utf-8")[:30_000])
    return folder


def options(source: Path, out: Path, method: str = "gptq", **kw) -> ConvertOptions:
    calib = {"calib": source.parent / "calib.txt"} if (source.parent / "calib.txt").is_file() else {}
    return ConvertOptions(str(source), out, method, quiet=True, resolve_hub=resolve_model_source, **{**CALIB, **calib, **kw})


def dequantized(source: Path, folder: Path) -> torch.nn.Module:
    """The source model with every quantized weight replaced by the record's reference decode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32).eval()
    qfolder = open_folder(folder)
    state = {name: torch.from_numpy(np.array(qfolder.decode(name))) for name in qfolder.records}
    missing = set(state) - set(model.state_dict())
    assert not missing, missing
    model.load_state_dict(state, strict=False)
    qfolder.close()
    return model


def relative_logit_error(source: Path, folder: Path) -> float:
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    ref = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32).eval()
    with torch.no_grad():
        a = ref(ids).logits
        b = dequantized(source, folder)(ids).logits
    a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
    return float((a - b).norm() / a.norm())


# ------------------------------------------------------------------------------------------------------ methods


@pytest.mark.parametrize("method, params, max_error", [
    ("rtn", {"bits": 4, "group_size": 32}, 0.25),
    ("gptq", {"bits": 4, "group_size": 32}, 0.25),
    ("spqr", {"bits": 3}, 0.25),
])
def test_methods_convert_verify_and_stay_close(tiny: Path, tmp_path: Path, method: str, params: dict,
                                               max_error: float) -> None:
    out = tmp_path / "out"
    result = convert(options(tiny, out, method, params=params))
    summary = verify_folder(out)
    assert summary["records"] == 3 * 7 + 1 and summary["checksums_verified"] == summary["shards"] == 4
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["method"] == method and qc["method_params"]["bits"] == params["bits"]
    assert set(qc["bits_by_layer_type"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj", "lm_head"}
    assert qc["output_layer"]["method"] == "rtn" and qc["output_layer"]["params"]["bits"] == 8
    assert len(qc["quantized_modules"]) == 22 and qc["source"]["id"] == tiny.name and qc["source"]["local"]
    assert str(tiny.parent) not in (out / "config.json").read_text()  # no path of the converting machine
    assert (qc["calibration"] is None) == (method == "rtn")
    assert config["num_hidden_layers"] == 3 and config["hidden_size"] == 64
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "README.md"):
        assert (out / name).is_file(), name
    assert (out / "tokenizer.json").read_bytes() == (tiny / "tokenizer.json").read_bytes()
    assert not out.with_name("out.partial").exists()
    assert result.summary.bits_per_weight == qc["bits_per_weight"]
    assert result.summary.peak_rss_bytes > 0
    # Plain tensors are the source's, untouched; quantized ones decode close to the source.
    folder = open_folder(out)
    from safetensors.torch import load_file

    src = load_file(str(tiny / "model.safetensors"))
    assert set(folder.records) | set(folder.plain_names) >= set(src) - set()  # every source tensor is present
    for name in folder.plain_names:
        if name in src:
            assert np.array_equal(folder.tensor(name), src[name].numpy()), name
    folder.close()
    error = relative_logit_error(tiny, out)
    assert error < max_error, error


def test_infinite_parameter_is_written_as_strict_json(tiny: Path, tmp_path: Path) -> None:
    """outlier_threshold=inf (no outliers) must not put the non-standard `Infinity` token into config.json."""
    out = tmp_path / "out"
    convert(options(tiny, out, "spqr", params={"outlier_threshold": float("inf")}))
    text = (out / "config.json").read_text()
    qc = json.loads(text, parse_constant=lambda token: pytest.fail(f"config.json holds {token}"))["quantization_config"]
    assert qc["method_params"]["outlier_threshold"] == "inf"
    assert verify_folder(out)["records"] == 3 * 7 + 1  # + the default 8-bit lm_head


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the peak can be reset only on Linux")
def test_summary_peak_is_this_conversions_not_the_process(tiny: Path, tmp_path: Path) -> None:
    """A conversion inside a program that once held much more memory reports its own peak, not the program's."""
    from qformat.conversion.report import peak_rss_bytes

    ballast = np.ones(600 * 2**20 // 8)  # 600 MiB, touched: the process peak now exceeds anything the tiny model needs
    process_peak = peak_rss_bytes()
    del ballast
    result = convert(options(tiny, tmp_path / "out", "rtn"))
    assert 0 < result.summary.peak_rss_bytes < process_peak - 300 * 2**20, (result.summary.peak_rss_bytes,
                                                                           process_peak)


def test_gptq_beats_rtn_on_layer_output_error(tiny: Path, tmp_path: Path) -> None:
    """Calibration statistics reach the method: GPTQ's output error on calibration-like inputs is below RTN's."""
    for method in ("rtn", "gptq"):
        convert(options(tiny, tmp_path / method, method, params={"bits": 3, "group_size": 64}))
    assert relative_logit_error(tiny, tmp_path / "gptq") < relative_logit_error(tiny, tmp_path / "rtn")


def test_bf16_source_keeps_dtypes(tmp_path: Path) -> None:
    src = make_tiny_llama(tmp_path / "bf16", layers=1, dtype=torch.bfloat16)
    out = tmp_path / "out"
    convert(options(src, out, "rtn"))
    folder = open_folder(out)
    assert {r["dtype"] for r in folder.records.values()} == {"BF16"}
    assert {folder.file(folder.tensor_shard[n]).st.entries[n].dtype for n in folder.plain_names} == {"BF16"}
    folder.close()


# ------------------------------------------------------------------------------------------------------ resume


class Killed(Exception):
    pass


def kill_after(block: int):
    def hook(index: int) -> None:
        if index == block:
            raise Killed(f"killed after block {index}")
    return hook


@pytest.mark.parametrize("method, extra", [("gptq", {}), ("spqr", {"true_sequential": True})])
def test_kill_and_resume_is_byte_identical(tiny: Path, tmp_path: Path, method: str, extra: dict) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    whole = tmp_path / "a" / "out"
    convert(options(tiny, whole, method, **extra))
    resumed = tmp_path / "b" / "out"
    with pytest.raises(Killed):
        convert(options(tiny, resumed, method, **extra), on_block_done=kill_after(1))
    partial = resumed.with_name("out.partial")
    assert not resumed.exists()
    assert sorted(p.name for p in partial.glob("shard-*")) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    converter = Converter(options(tiny, resumed, method, **extra))
    converter.prepare()
    assert converter.resuming
    result = converter.run()
    assert result.summary.resumed_blocks == 2
    assert folder_bytes(resumed) == folder_bytes(whole)
    assert not partial.exists()


def test_damaged_last_shard_is_redone(tiny: Path, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    whole = tmp_path / "a" / "out"
    convert(options(tiny, whole))
    resumed = tmp_path / "b" / "out"
    with pytest.raises(Killed):
        convert(options(tiny, resumed), on_block_done=kill_after(1))
    shard = resumed.with_name("out.partial") / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated, e.g. by a copy cut short
    result = convert(options(tiny, resumed))
    assert result.summary.resumed_blocks == 1
    assert folder_bytes(resumed) == folder_bytes(whole)


def test_resume_refuses_other_options_until_restart(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(Killed):
        convert(options(tiny, out), on_block_done=kill_after(0))
    with pytest.raises(ConversionError, match=r"different options \(method_params\).*--restart"):
        convert(options(tiny, out, params={"bits": 3}))
    with pytest.raises(ConversionError, match="calibration"):
        convert(options(tiny, out, seed=1))
    result = convert(options(tiny, out, params={"bits": 3}, restart=True))
    assert result.summary.resumed_blocks == 0
    assert json.loads((out / "config.json").read_text())["quantization_config"]["method_params"]["bits"] == 3


# ------------------------------------------------------------------------------------------------------ selection


def test_exclude_keeps_layers_plain(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    convert(options(tiny, out, "rtn", exclude=["down_proj", "layers.0.self_attn.*"]))
    folder = open_folder(out)
    assert not any("down_proj" in n or n.startswith("model.layers.0.self_attn") for n in folder.records)
    assert len(folder.records) == 3 * 7 - 3 - 4 + 1  # + the default 8-bit lm_head
    assert "model.layers.1.mlp.down_proj.weight" in folder.plain_names
    folder.close()


def test_include_selects_only_matching(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    convert(options(tiny, out, "gptq", include=["mlp.*", "lm_head"]))
    folder = open_folder(out)
    kinds = {n.split(".")[-2] for n in folder.records}
    assert kinds == {"gate_proj", "up_proj", "down_proj", "lm_head"}
    assert "model.embed_tokens.weight" in folder.plain_names
    folder.close()
    assert relative_logit_error(tiny, out) < 0.25


def test_blocks_without_selected_linears_only_propagate(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    convert(options(tiny, out, "gptq", include=["model.layers.1.self_attn.*"]))
    folder = open_folder(out)
    assert {n.rsplit(".", 2)[0] for n in folder.records} == {"model.layers.1.self_attn"}
    assert len(folder.records) == 4 and "model.layers.2.mlp.down_proj.weight" in folder.plain_names
    folder.close()
    assert relative_logit_error(tiny, out) < 0.25


def test_tied_lm_head_is_untied_when_quantized(tmp_path: Path) -> None:
    src = make_tiny_llama(tmp_path / "tied", layers=1, tie_word_embeddings=True)
    out = tmp_path / "out"
    convert(options(src, out, "rtn", include=["lm_head"]))
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    folder = open_folder(out)
    assert list(folder.records) == ["lm_head.weight"] and "model.embed_tokens.weight" in folder.plain_names
    folder.close()


def test_true_sequential_groups_linears_by_shared_input(tiny: Path) -> None:
    from qformat.conversion.activations import capture_block_inputs, input_groups

    converter = Converter(options(tiny, tiny.parent / "unused", true_sequential=True))
    converter.prepare()
    calls = converter._capture()
    converter._load_block(0)
    names = converter.selection.block_linears[0]
    groups = input_groups(converter.skeleton.blocks[0], 0, calls, calls.first_inputs[0], names)
    assert groups == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                      ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    converter.close()  # prepare() took the output's lock; run() is not called
    del capture_block_inputs


@pytest.mark.parametrize("width", [5, 192, 500])
def test_hessian_upper_triangle_accumulation(width: int) -> None:
    from qformat.conversion.activations import accumulate_xtx_upper, symmetric_from_upper

    x = torch.randn(300, width, generator=torch.Generator().manual_seed(width))
    acc = torch.zeros(width, width)
    accumulate_xtx_upper(acc, x)
    accumulate_xtx_upper(acc, 2 * x)
    full = symmetric_from_upper(acc).double()
    expected = 5 * x.double().T @ x.double()
    assert torch.allclose(full, expected, rtol=1e-4, atol=1e-3)
    assert torch.equal(full, full.T)


def test_statistics_pass_stops_after_the_last_hooked_linear(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The statistics pass skips what follows the last hooked linear, and its Hessians (accumulated as the upper
    triangle) equal full forwards' sum(x xᵀ), symmetric."""
    from qformat.conversion import activations
    from qformat.conversion.activations import LinearStats, run_block

    monkeypatch.setattr(activations, "TOKENS_PER_FORWARD", 128)  # 2 windows of 64 tokens per micro-batch
    converter = Converter(options(tiny, tiny.parent / "unused"))
    converter.prepare()
    converter.close()  # only its capture is used; prepare() took the output's lock
    calls = converter._capture()
    inputs = calls.first_inputs
    assert len(inputs) == 4
    converter._load_block(0)
    block = converter.skeleton.blocks[0]
    modules = dict(block.named_modules())
    group = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
    reference: dict[str, torch.Tensor] = {}

    def record(name: str):
        def hook(_m: torch.nn.Module, args: tuple) -> None:
            flat = args[0].reshape(-1, args[0].shape[-1]).double()
            reference[name] = reference.get(name, 0) + flat.T @ flat
        return hook

    handles = [modules[n].register_forward_pre_hook(record(n)) for n in group]
    run_block(block, 0, calls, inputs, keep=False)
    for handle in handles:
        handle.remove()
    ran: list[str] = []
    for name in ("mlp.gate_proj", "mlp.down_proj"):
        modules[name].register_forward_pre_hook(lambda _m, _a, _n=name: ran.append(_n))
    stats = LinearStats(True, True)
    stats.attach({n: modules[n] for n in group})
    stats.collect(block, 0, calls, inputs)
    stats.detach()
    assert ran == ["mlp.gate_proj", "mlp.down_proj"]  # the first micro-batch runs whole, the others stop early
    tokens = 8 * 64
    for name in group:
        hessian, norms, count = stats.pop(name)
        assert count == tokens
        assert torch.equal(hessian, hessian.T)
        expected = reference[name] * (2.0 / tokens)
        assert torch.allclose(hessian.double(), expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
        assert torch.allclose(norms.double().square(), torch.diag(reference[name]), rtol=1e-4)


# ------------------------------------------------------------------------------------------------------ bad input


@pytest.fixture
def existing_out(tmp_path: Path) -> Path:
    """A user's folder at --out: qformat never deletes it, not even with --overwrite."""
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    return out


def assert_untouched(out: Path) -> None:
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "precious"


@pytest.fixture(scope="module")
def earlier_rtn(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("earlier") / "rtn"
    convert(options(tiny, out, "rtn"))
    return out


@pytest.fixture
def earlier_out(earlier_rtn: Path, tmp_path: Path) -> Path:
    """An earlier conversion's output at --out: what --overwrite may replace."""
    import shutil

    out = tmp_path / "previous"
    shutil.copytree(earlier_rtn, out)
    return out


def gpt2_folder(path: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=64)).save_pretrained(path)
    return path


def truncated_folder(tiny: Path, path: Path) -> Path:
    path.mkdir()
    for f in tiny.iterdir():
        (path / f.name).write_bytes(f.read_bytes())
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    return path


@pytest.mark.parametrize("case, error, pattern", [
    ("missing", QformatError, "nowhere.* neither an existing local path nor a Hub model id"),
    ("no_config", ConversionError, "config.json is missing"),
    ("truncated", ConversionError, "unreadable.*truncated"),
    ("gpt2", ConversionError, "unsupported architecture GPT2LMHeadModel"),
    ("out_of_range", ParameterError, "'bits'.*above the maximum 8"),
    ("unknown_param", ParameterError, "no parameter 'wbits'"),
    ("unknown_method", PluginError, "unknown method 'nosuch'.*gptq"),
    ("short_calib", ConversionError, r"calibration text too short: .* has \d+ tokens, but 8 samples x 64"),
    ("no_calib_file", ConversionError, "cannot read the calibration text"),
    ("bad_pattern", ConversionError, "--include 'attn_nothing' matches no"),
    ("embedding_gptq", ConversionError, "embed_tokens is an embedding"),
])
def test_bad_input_is_a_clear_error_and_leaves_output_alone(tiny: Path, tmp_path: Path, earlier_out: Path,
                                                            case: str, error: type, pattern: str) -> None:
    source, kw, method = tiny, {}, "gptq"
    if case == "missing":
        source = tmp_path / "nowhere"
    elif case == "no_config":
        source = tmp_path / "empty"
        source.mkdir()
    elif case == "truncated":
        source = truncated_folder(tiny, tmp_path / "trunc")
    elif case == "gpt2":
        source = gpt2_folder(tmp_path / "gpt2")
    elif case == "out_of_range":
        kw = {"params": {"bits": 9}}
    elif case == "unknown_param":
        kw = {"params": {"wbits": 3}}
    elif case == "unknown_method":
        method = "nosuch"
    elif case == "short_calib":
        (tmp_path / "short.txt").write_text("A short text. " * 20)
        kw = {"calib": tmp_path / "short.txt"}
    elif case == "no_calib_file":
        kw = {"calib": tmp_path / "absent.txt"}
    elif case == "bad_pattern":
        kw = {"include": ["attn_nothing"]}
    elif case == "embedding_gptq":
        kw = {"include": ["embed_tokens"]}
    before = folder_bytes(earlier_out)
    with pytest.raises(error, match=pattern) as info:
        convert(options(source, earlier_out, method, overwrite=True, **kw))
    assert isinstance(info.value, QformatError)
    assert folder_bytes(earlier_out) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("previous", ".previous"))) == ["previous"]


def test_existing_output_needs_overwrite(tiny: Path, existing_out: Path, earlier_out: Path) -> None:
    with pytest.raises(ConversionError, match="exists.*--overwrite"):
        convert(options(tiny, existing_out, "rtn"))
    assert_untouched(existing_out)
    # --overwrite replaces an earlier output, never a folder holding anything else
    with pytest.raises(ConversionError, match="--overwrite replaces only a folder qformat wrote.*not a qformat output"):
        convert(options(tiny, existing_out, "rtn", overwrite=True))
    assert_untouched(existing_out)
    result = convert(options(tiny, earlier_out, "rtn", overwrite=True, params={"bits": 3}))
    assert result.quantization_config["method_params"]["bits"] == 3
    assert json.loads((earlier_out / "config.json").read_text())["quantization_config"]["method_params"]["bits"] == 3


def test_output_left_by_an_interrupted_swap_is_restored_not_replaced(tiny: Path, earlier_out: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """An --overwrite finalize killed between its renames leaves only <out>.old (the previous output): a rerun
    without --overwrite puts it back and refuses, instead of converting over the only copy."""
    from qformat.format import container

    before = folder_bytes(earlier_out)
    real_replace = os.replace

    def killed_after_first_rename(src, dst):
        if Path(src).name == "final":  # staging -> out: the kill lands between the two renames
            raise Killed("killed between the renames")
        return real_replace(src, dst)

    monkeypatch.setattr(container.os, "replace", killed_after_first_rename)
    with pytest.raises(Killed):
        convert(options(tiny, earlier_out, "rtn", overwrite=True, params={"bits": 3}))
    monkeypatch.setattr(container.os, "replace", real_replace)
    backup = earlier_out.with_name(earlier_out.name + ".old")
    assert not earlier_out.exists() and backup.is_dir()
    with pytest.raises(ConversionError, match="exists.*--overwrite"):
        convert(options(tiny, earlier_out, "rtn"))
    assert not backup.exists()
    assert folder_bytes(earlier_out) == before  # restored as it was, without the marker the swap had added


def test_disk_full_is_clear_resumable_and_leaves_output_alone(tiny: Path, earlier_out: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = FolderWriter.write_shard

    def full_disk(self: FolderWriter, index: int, *args, **kwargs) -> Path:
        if index == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(self, index, *args, **kwargs)

    monkeypatch.setattr(FolderWriter, "write_shard", full_disk)
    before = folder_bytes(earlier_out)
    with pytest.raises(ConversionError, match=r"disk full while writing .*shard-00002.*previous\.partial.*can be "
                       r"resumed.*previous was not touched"):
        convert(options(tiny, earlier_out, overwrite=True))
    assert folder_bytes(earlier_out) == before
    monkeypatch.setattr(FolderWriter, "write_shard", real_write)
    result = convert(options(tiny, earlier_out, overwrite=True))
    assert result.summary.resumed_blocks == 2
    verify_folder(earlier_out)


def test_disk_full_while_finalizing(tiny: Path, earlier_out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(FolderWriter, "finalize", full_disk)
    before = folder_bytes(earlier_out)
    with pytest.raises(ConversionError, match="disk full"):
        convert(options(tiny, earlier_out, "rtn", overwrite=True))
    assert folder_bytes(earlier_out) == before


def test_calibration_windows_are_seeded_and_disjoint() -> None:
    from qformat.conversion.calibration import sample_windows

    ids = torch.arange(1000)
    a = sample_windows(ids, 10, 50, seed=3)
    assert torch.equal(a, sample_windows(ids, 10, 50, seed=3))
    assert not torch.equal(a, sample_windows(ids, 10, 50, seed=4))
    starts = a[:, 0].tolist()
    assert all(b - s >= 50 for s, b in zip(starts, starts[1:], strict=False))
    assert torch.equal(a, torch.stack([torch.arange(s, s + 50) for s in starts]))
    with pytest.raises(ConversionError, match="has 1,000 tokens, but 21 samples x 50 tokens need 1,050"):
        sample_windows(ids, 21, 50, seed=0)


# ------------------------------------------------------------------------------------------------------ memory

MEASURE = textwrap.dedent("""
    import json, sys
    from qformat.conversion.pipeline import ConvertOptions, convert
    result = convert(ConvertOptions(sys.argv[1], sys.argv[2], "gptq", calib=sys.argv[3], calib_samples=4,
                                    calib_seqlen=64, quiet=True))
    print(json.dumps({"peak": result.summary.peak_rss_bytes, "trace": result.summary.extra["rss_after_block"]}))
""")


@pytest.mark.slow  # two subprocess conversions of 512-wide models: ~30 s on 2 idle cores, minutes on busy ones
def test_peak_memory_does_not_grow_with_layers(tiny: Path, tmp_path: Path) -> None:
    """2 vs 8 blocks of 4.2 M fp32 weights (16.8 MB each): a converter holding every block would grow by > 100 MB
    (weights alone; their decoded copies and statistics come on top). Each conversion runs in its own process;
    the peak of such a process varies by up to ~25 MB from run to run (allocator arenas), hence the slack."""
    block_bytes = 4 * (4 * 512 * 512 + 3 * 512 * 2048)
    runs = {}
    for layers in (2, 8):
        src = make_tiny_llama(tmp_path / f"m{layers}", layers=layers, hidden=512, intermediate=2048)
        # A fixed mmap threshold makes glibc return large freed buffers at once, so RSS follows live memory
        # rather than the allocator's fragmentation.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
        proc = subprocess.run([sys.executable, "-c", MEASURE, str(src), str(tmp_path / f"out{layers}"),
                               str(tiny.parent / "calib.txt")], capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[layers] = json.loads(proc.stdout.strip().splitlines()[-1])
    growth = runs[8]["peak"] - runs[2]["peak"]
    assert growth < block_bytes + 24 * 2**20, (growth / 2**20, runs)
    trace = runs[8]["trace"]  # resident memory after each block: flat
    assert max(trace) - min(trace) < 8 * 2**20, [t / 2**20 for t in trace]
