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
