"""`qformat convert` on the command line: flags map onto method parameters, errors are one clear line, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_model import make_tiny_llama

from qformat.cli import main
from qformat.format import open_folder
from qformat.text import DEFAULT_CALIBRATION


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = make_tiny_llama(tmp_path_factory.mktemp("cli") / "tiny", layers=2)
    (folder.parent / "calib.txt").write_text(DEFAULT_CALIBRATION.read_text(encoding="utf-8")[:30_000])
    return folder


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def calib_args(tiny: Path) -> list[str]:
    return ["--calib", str(tiny.parent / "calib.txt"), "--calib-samples", "4", "--calib-seqlen", "64"]


def test_convert_with_bits_group_size_and_param(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "convert", "--method", "gptq", tiny, "--out", out, "--bits", "3",
                            "--group-size", "32", "-p", "act_order=true", "-p", "damp=0.05", *calib_args(tiny),
                            "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["out"] == str(out) and report["summary"]["records"] == 15  # 14 linears + the 8-bit lm_head
    params = json.loads((out / "config.json").read_text())["quantization_config"]["method_params"]
    assert params["bits"] == 3 and params["group_size"] == 32 and params["act_order"] is True
    assert params["damp"] == 0.05
    assert "-p act_order=True" in (out / "README.md").read_text()


def test_summary_table_is_printed(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run(capsys, "convert", "--method", "spqr", tiny, "--out", tmp_path / "out", *calib_args(tiny))
    assert code == 0
    for text in ("bits/weight", "down_proj", "overall", "outliers", "peak RSS", "time"):
        assert text in err, text


@pytest.mark.parametrize("argv, message", [
    (["--method", "nosuch"], "unknown method 'nosuch'"),
    (["--method", "spqr", "--bits", "12"], "parameter 'bits': 12 is above the maximum 8"),
    (["--method", "spqr", "-p", "outlier_threshold=-1"], "'outlier_threshold': -1.0 is below the minimum 0"),
    (["--method", "spqr", "-p", "outlier_threshold=abc"], "'abc' is not a valid float"),
    (["--method", "spqr", "-p", "nonsense=1"], "no parameter 'nonsense'"),
    (["--method", "spqr", "-p", "bits"], "-p expects KEY=VALUE"),
    (["--method", "rtn", "--bits", "3", "-p", "bits=4"], "--bits and -p bits= both"),
    (["--method", "gptq", "--calib", "/nonexistent/calib.txt"], "cannot read the calibration text"),
    (["--method", "rtn", "--eval", "/nonexistent/eval.txt"], "cannot read the evaluation text"),
])
def test_bad_arguments_fail_before_any_work(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                            argv: list[str], message: str) -> None:
    out = tmp_path / "out"
    code, _, err = run(capsys, "convert", tiny, "--out", out, *argv)
    assert code == 1
    assert err.startswith("qformat: error: ") and message in err, err
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_flag_for_a_parameter_the_method_lacks(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import types
    from dataclasses import dataclass

    from qformat import plugins
    from qformat.hookspecs import hookimpl
    from qformat.methods import Method, MethodConfig, param

    @dataclass(frozen=True)
    class NoBitsConfig(MethodConfig):
        method = "nobits"
        levels: int = param(3, "levels", min=2, max=5)

    class NoBits(Method):
        config = NoBitsConfig

    module = types.ModuleType("nobits_plugin")
    module.qformat_register_methods = hookimpl(lambda register: register(NoBits()))
    with plugins.use_plugins(plugins.build_plugins(extra=[("test", module)])):
        code, _, err = run(capsys, "convert", tiny, "--out", tmp_path / "o", "--method", "nobits", "--group-size", "64")
    assert code == 1 and "method 'nobits' has no 'group_size' parameter, so --group-size does not apply" in err


def test_existing_output_is_refused_then_overwritten(tiny: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    code, _, err = run(capsys, "convert", "--method", "rtn", tiny, "--out", out, "--quiet", "--bits", "3")
    assert code == 0, err
    code, _, err = run(capsys, "convert", "--method", "rtn", tiny, "--out", out, "--quiet")
    assert code == 1 and "exists" in err and "--overwrite" in err
    code, stdout, _ = run(capsys, "convert", "--method", "rtn", tiny, "--out", out, "--quiet", "--overwrite")
    assert code == 0 and stdout.strip() == str(out)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["method_params"]["bits"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no backup, work folder or lock file left


def test_overwrite_never_replaces_a_folder_qformat_did_not_write(tiny: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    code, _, err = run(capsys, "convert", "--method", "rtn", tiny, "--out", out, "--quiet", "--overwrite")
    assert code == 1 and err.count("\n") == 1
    assert "--overwrite replaces only a folder qformat wrote" in err and "not a qformat output" in err
    assert (out / "mine.txt").read_text() == "keep" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_missing_source_and_unsupported_architecture(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from transformers import BertConfig, BertModel

    code, _, err = run(capsys, "convert", "--method", "rtn", tmp_path / "absent", "--out", tmp_path / "o")
    assert code == 1 and "absent" in err
    bert = tmp_path / "bert"
    BertModel(BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                         vocab_size=100)).save_pretrained(bert)
    code, _, err = run(capsys, "convert", "--method", "rtn", bert, "--out", tmp_path / "o")
    assert code == 1 and "unsupported architecture BertModel" in err


def test_include_exclude_on_the_command_line(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    code, _, err = run(capsys, "convert", "--method", "rtn", tiny, "--out", out, "--include", "mlp.*", "lm_head",
                       "--exclude", "layers.1.*", "--quiet")
    assert code == 0, err
    folder = open_folder(out)
    assert sorted(folder.records) == ["lm_head.weight", "model.layers.0.mlp.down_proj.weight",
                                      "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"]
    folder.close()


def test_eval_prints_perplexity_and_sample_and_fills_the_card(tiny: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "convert", "--method", "rtn", tiny, "--out", out, "--quiet", "--eval",
                            "--eval-windows", "2", "--eval-seqlen", "128", "--prompt", "The river")
    assert code == 0, err
    assert "perplexity on qformat default eval text (2 x 128 tokens): before " in stdout
    assert "prompt: 'The river'" in stdout and "quantized:" in stdout
    card = (out / "README.md").read_text()
    assert "perplexity (qformat default eval text, 2 x 128 tokens)" in card


def test_push_to_calls_the_hub_after_finalizing(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from qformat import hub

    calls = []

    def fake_push(folder, repo_id, **kw):
        calls.append((Path(folder), repo_id, kw))
        assert (Path(folder) / "config.json").is_file()
        return hub.PushResult(repo_id, "main", "0" * 40, "https://hub/commit", None, ("config.json",), ())

    monkeypatch.setattr(hub, "push_folder", fake_push)
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "convert", "--method", "rtn", tiny, "--out", out, "--push-to", "me/tiny-rtn",
                            "--private")
    assert code == 0, err
    assert calls == [(out, "me/tiny-rtn", {"private": True, "create_pr": False})]
    assert "pushed to me/tiny-rtn@main" in stdout


def test_resume_message(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                        monkeypatch: pytest.MonkeyPatch) -> None:
    from qformat.conversion import pipeline

    def killed(self, *args, **kwargs):
        raise KeyboardInterrupt

    out = tmp_path / "out"
    monkeypatch.setattr(pipeline.Converter, "_convert_outside", killed)
    code, _, err = run(capsys, "convert", "--method", "gptq", tiny, "--out", out, *calib_args(tiny))
    assert code == 130 and "interrupted" in err
    monkeypatch.undo()
    code, _, err = run(capsys, "convert", "--method", "gptq", tiny, "--out", out, *calib_args(tiny))
    assert code == 0 and "resuming the partial conversion" in err and "resumed after 2 finished blocks" in err
