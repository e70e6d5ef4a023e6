"""--output-layer: the output layer (lm_head) quantized with a method of its own, as llama.cpp keeps it at 8 bits
while the decoder's linears go to 4."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_model import make_tiny_llama

import qformat
from qformat.cli import main
from qformat.conversion.pipeline import ConvertOptions, convert
from qformat.errors import ConversionError, ParameterError, PluginError
from qformat.format import open_folder
from qformat.hub import resolve_model_source
from qformat.text import DEFAULT_CALIBRATION

CALIB = {"calib_samples": 4, "calib_seqlen": 32}


@pytest.fixture(scope="module")
def tied(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = make_tiny_llama(tmp_path_factory.mktemp("src") / "tied", layers=2, tie_word_embeddings=True)
    (folder.parent / "calib.txt").write_text(DEFAULT_CALIBRATION.read_text(encoding="utf-8")[:30_000])
    return folder


def options(source: Path, out: Path, method: str = "rtn", **kw) -> ConvertOptions:
    return ConvertOptions(str(source), out, method, quiet=True, resolve_hub=resolve_model_source,
                          calib=source.parent / "calib.txt", params={"bits": 4, "group_size": 32}, **{**CALIB, **kw})


def info(folder: Path, name: str) -> dict:
    qfolder = open_folder(folder)
    try:
        return qfolder.records[name].get("info") or {}
    finally:
        qfolder.close()


def test_the_output_layer_gets_its_own_method_and_the_rest_the_main_one(tied: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["convert", str(tied), "--out", str(out), "--method", "rtn", "--bits", "4", "--group-size", "32",
                 "--output-layer", "rtn:bits=8,group_size=32", "--quiet"]) == 0
    config = json.loads((out / "config.json").read_text())
    qconfig = config["quantization_config"]
    assert qconfig["output_layer"] == {"module": "lm_head", "method": "rtn",
                                       "params": {**qconfig["method_params"], "bits": 8}, "version": 1}
    assert "--output-layer rtn:bits=8,group_size=32" in qconfig["command"]
    assert config["tie_word_embeddings"] is False  # the output layer has its own (quantized) weight now
    assert "The output layer (`lm_head`) has a method of its own: `rtn`" in (out / "README.md").read_text()
    assert info(out, "lm_head.weight")["params"]["bits"] == 8
    assert info(out, "model.layers.0.mlp.down_proj.weight")["params"]["bits"] == 4
    assert qconfig["bits_by_layer_type"]["lm_head"] > 8 > qconfig["bits_by_layer_type"]["down_proj"]
    # it runs, and the 8-bit output layer is what the logits use
    qfolder = open_folder(out)
    head = np.array(qfolder.decode("lm_head.weight"))
    qfolder.close()
    model = qformat.load(out)
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model.model(ids).last_hidden_state
        logits = model(ids).logits
    torch.testing.assert_close(logits, hidden @ torch.from_numpy(head).T, rtol=1e-4, atol=1e-4)


def test_a_calibrating_output_method_calibrates_even_after_rtn(tied: Path, tmp_path: Path) -> None:
    result = convert(options(tied, tmp_path / "out", output_layer="int8"))
    assert result.quantization_config["output_layer"]["method"] == "int8"
    assert result.quantization_config["calibration"] is not None  # int8 needs the activations' absmax
    assert info(tmp_path / "out", "lm_head.weight")["method"] == "int8"


def test_by_default_the_output_layer_goes_to_8_bits_per_channel(tied: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["convert", str(tied), "--out", str(out), "--method", "rtn", "--bits", "4", "--group-size", "32",
                 "--quiet"]) == 0
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qconfig["output_layer"]["module"] == "lm_head"
    assert qconfig["output_layer"]["params"] == {**qconfig["method_params"], "bits": 8, "group_size": -1, "sym": True}
    assert "--output-layer rtn:bits=8,group_size=-1,sym=True" in qconfig["command"]
    assert "The output layer (`lm_head`) has a method of its own: `rtn`" in (out / "README.md").read_text()
    # one scale per output channel: the head's rows decode to at most 256 levels each, the rest stays 4-bit g32
    head = info(out, "lm_head.weight")
    assert head["params"]["bits"] == 8 and head["params"]["group_size"] == -1
    assert 8 < qconfig["bits_by_layer_type"]["lm_head"] < 8.5


def test_the_default_needs_no_final_hidden_states_for_a_calibrating_method(tied: Path, tmp_path: Path) -> None:
    """gptq calibrates the blocks; the default output layer (rtn) needs no statistics, so the pipeline does not run
    the last block and the final norm for it, and the output is the same as naming the default explicitly."""
    auto = convert(options(tied, tmp_path / "auto", method="gptq"))
    named = convert(options(tied, tmp_path / "named", method="gptq", output_layer="rtn:bits=8,group_size=-1,sym=true"))
    assert auto.quantization_config["output_layer"] == named.quantization_config["output_layer"]
    for name in ("lm_head.weight", "model.layers.1.mlp.down_proj.weight"):
        first, second = open_folder(tmp_path / "auto"), open_folder(tmp_path / "named")
        try:
            assert np.array_equal(np.array(first.decode(name)), np.array(second.decode(name)))
        finally:
            first.close()
            second.close()


def test_the_default_steps_back_where_include_gives_the_output_layer_the_main_method(tied: Path,
                                                                                     tmp_path: Path) -> None:
    result = convert(options(tied, tmp_path / "out", include=("model.layers.*", "lm_head")))
    assert "output_layer" not in result.quantization_config
    assert info(tmp_path / "out", "lm_head.weight")["params"]["bits"] == 4


def test_the_default_leaves_an_excluded_output_layer_alone(tied: Path, tmp_path: Path) -> None:
    result = convert(options(tied, tmp_path / "out", exclude=("lm_head",)))
    assert "output_layer" not in result.quantization_config
    assert "lm_head" not in result.quantization_config["quantized_modules"]


def test_keep_is_the_old_behaviour(tied: Path, tmp_path: Path) -> None:
    result = convert(options(tied, tmp_path / "out", output_layer="keep"))
    assert "output_layer" not in result.quantization_config
    assert "lm_head" not in result.quantization_config["quantized_modules"]


@pytest.mark.parametrize(("spec", "error", "message"), [
    ("nope", PluginError, "unknown method 'nope'"),
    ("rtn:bits=99", ParameterError, r"--output-layer 'rtn:bits=99': .*bits.*99"),
    ("rtn:bits", ParameterError, "--output-layer 'rtn:bits': expected key=value"),
])
def test_bad_output_layer_specs_fail_before_any_work(tied: Path, tmp_path: Path, spec, error, message) -> None:
    with pytest.raises(error, match=message):
        convert(options(tied, tmp_path / "out", output_layer=spec))
    assert not (tmp_path / "out").exists()


def test_a_resume_with_another_output_layer_is_refused(tied: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"

    def kill(index: int) -> None:
        if index == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(options(tied, out, output_layer="rtn:bits=8"), on_block_done=kill)
    with pytest.raises(ConversionError, match=r"different options \(output_layer\)"):
        convert(options(tied, out, output_layer="rtn:bits=6"))


def test_an_import_refuses_output_layer(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["convert", "--method", "import", str(tmp_path / "x.gguf"), "--out", str(tmp_path / "o"),
                 "--output-layer", "rtn:bits=8"]) != 0
    assert "--output-layer does not apply to --method import" in capsys.readouterr().err
