"""Block tuning (``Method.tune_block``): the pipeline hands a method each quantized decoder block with its original
outputs, the method tunes it (AQLM's fine-tuning stage), and the shard holds exactly what was tuned.

The methods here are test-only: RTN 3-bit records, then Adam on the block's norm weights towards the original
block outputs ("normtune"), or a tuning that returns records for the wrong modules ("badtune")."""

from __future__ import annotations

import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import decoded_logits, folder_bytes
from tiny_model import make_tiny_llama

from qformat.conversion.pipeline import Converter, ConvertOptions, convert
from qformat.errors import PluginError
from qformat.format import open_folder
from qformat.hub import resolve_model_source
from qformat.plugin import BlockTuning, Method, hookimpl, param
from qformat.plugins import build_plugins, get_method, use_plugins
from qformat.text import DEFAULT_CALIBRATION

CALIB = {"calib_samples": 4, "calib_seqlen": 32}


def _rtn_config_class():
    return type(get_method("rtn").validate_params({}))


def _tuning_methods() -> list[Method]:
    base = _rtn_config_class()

    @dataclass(frozen=True)
    class NormTuneConfig(base):
        method = "normtune"
        steps: int = param(30, "Adam steps on the norm weights", min=1, max=1000)

    class NormTune(Method):
        config = NormTuneConfig
        calibration = frozenset({"hessian"})
        seen: list[tuple[int, float, float]] = []  # (block, loss before, loss after), for the test to read

        def quantize(self, layer, config):
            rtn = get_method("rtn")
            return rtn.quantize(layer, rtn.validate_params({"bits": config.bits, "group_size": config.group_size}))

        def tune_block(self, block: BlockTuning, config):
            norms = [p for n, p in block.block.named_parameters() if n.endswith("layernorm.weight")]
            for p in norms:
                p.requires_grad_(True)
            opt = torch.optim.Adam(norms, lr=1e-2)

            def loss() -> torch.Tensor:
                return sum(torch.nn.functional.mse_loss(block.forward(i), block.target(i))
                           for i in range(block.batches)) / block.batches

            before = float(loss().detach())
            for _ in range(config.steps):
                opt.zero_grad()
                value = loss()
                value.backward()
                opt.step()
            self.seen.append((block.index, before, float(loss().detach())))
            return block.records  # codes untouched: only the float parameters were tuned

    @dataclass(frozen=True)
    class BadTuneConfig(base):
        method = "badtune"

    class BadTune(NormTune):
        config = BadTuneConfig

        def tune_block(self, block: BlockTuning, config):
            return {"self_attn.nope": next(iter(block.records.values()))}

    return [NormTune(), BadTune()]


@pytest.fixture(scope="module")
def plugin_set():
    module = types.ModuleType("qformat_test_tuning")
    methods = _tuning_methods()
    module.qformat_register_methods = hookimpl(lambda register: [register(m) for m in methods])
    plugins = build_plugins(extra=[("testtuning", module)])
    with use_plugins(plugins):
        yield plugins


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = make_tiny_llama(tmp_path_factory.mktemp("src") / "tiny", layers=3, heads=4, kv_heads=4)
    (folder.parent / "calib.txt").write_text(DEFAULT_CALIBRATION.read_text(encoding="utf-8")[:30_000])
    return folder


def options(source: Path, out: Path, method: str, **kw) -> ConvertOptions:
    return ConvertOptions(str(source), out, method, quiet=True, resolve_hub=resolve_model_source,
                          calib=source.parent / "calib.txt", params={"bits": 3, "group_size": 32}, **{**CALIB, **kw})


def test_tuning_lowers_the_block_error_and_the_shard_holds_the_tuned_block(plugin_set, tiny: Path,
                                                                          tmp_path: Path) -> None:
    method = get_method("normtune")
    method.seen.clear()
    convert(options(tiny, tmp_path / "tuned", "normtune"))
    convert(options(tiny, tmp_path / "plain", "rtn"))
    assert [b for b, _, _ in method.seen] == [0, 1, 2]
    assert all(after < before for _, before, after in method.seen), method.seen
    tuned, plain = open_folder(tmp_path / "tuned"), open_folder(tmp_path / "plain")
    try:
        # the same codes (the tuning kept the records), different norms (the tuned ones were written)
        assert set(tuned.records) == set(plain.records)
        for name in tuned.records:
            np.testing.assert_array_equal(np.array(tuned.decode(name)), np.array(plain.decode(name)))
        norm = "model.layers.1.post_attention_layernorm.weight"
        assert not np.array_equal(np.array(tuned.tensor(norm)), np.array(plain.tensor(norm)))
        assert np.array(tuned.tensor(norm)).dtype == np.array(plain.tensor(norm)).dtype
    finally:
        tuned.close()
        plain.close()
    # what runs is what was tuned: the loaded folder computes the decoded state's logits
    import qformat

    model = qformat.load(tmp_path / "tuned")
    with torch.no_grad():
        loaded = model(torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))).logits
    torch.testing.assert_close(loaded, decoded_logits(tiny, tmp_path / "tuned"), rtol=1e-3, atol=1e-3)


def test_resume_of_a_tuned_conversion_is_byte_identical(plugin_set, tiny: Path, tmp_path: Path) -> None:
    whole = tmp_path / "a" / "out"
    convert(options(tiny, whole, "normtune"))
    resumed = tmp_path / "b" / "out"

    def kill(index: int) -> None:
        if index == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(options(tiny, resumed, "normtune"), on_block_done=kill)
    converter = Converter(options(tiny, resumed, "normtune"))
    converter.prepare()
    assert converter.resuming
    assert converter.run().summary.resumed_blocks == 2
    assert folder_bytes(resumed) == folder_bytes(whole)


def test_a_tuning_that_returns_other_modules_is_refused(plugin_set, tiny: Path, tmp_path: Path) -> None:
    with pytest.raises(PluginError, match=r"method 'badtune' .*tuned block 0 into records for \['self_attn.nope'\], "
                                          r"not for its quantized linears"):
        convert(options(tiny, tmp_path / "out", "badtune"))


def test_methods_without_tuning_say_so(plugin_set) -> None:
    assert get_method("normtune").tunes_blocks
    assert not get_method("rtn").tunes_blocks and not get_method("gptq").tunes_blocks


def test_harness_checks_a_tuning_method(plugin_set) -> None:
    from qformat.testing import PluginCheckError, check_block_tuning

    report = check_block_tuning(get_method("normtune"), {"bits": 3, "group_size": 32, "steps": 20})
    assert report.tuned and report.error_after < report.error_before
    assert set(report.records) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    with pytest.raises(PluginCheckError, match=r"returned \['self_attn.nope'\], not records keyed by the block's"):
        check_block_tuning(get_method("badtune"), {"bits": 3, "group_size": 32})
    worse = get_method("normtune")
    tune = type(worse).tune_block

    def spoil(self, block, config):  # tunes, then pushes every norm weight away from its tuned value
        records = tune(self, block, config)
        with torch.no_grad():
            for name, p in block.block.named_parameters():
                if name.endswith("layernorm.weight"):
                    p.mul_(3.0)
        return records

    type(worse).tune_block = spoil
    try:
        with pytest.raises(PluginCheckError, match="made the block's output error worse"):
            check_block_tuning(worse, {"bits": 3, "group_size": 32, "steps": 5})
    finally:
        type(worse).tune_block = tune
    with pytest.raises(PluginCheckError, match="method 'rtn' does not implement tune_block"):
        check_block_tuning(get_method("rtn"))
