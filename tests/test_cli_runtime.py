"""`qformat eval` and `qformat generate` on a tiny quantized model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import byte_tokenizer, tiny_model, write_folder

from qformat.cli import main

TEXT = ("The quick brown fox jumps over the lazy dog. " * 12 + "Pack my box with five dozen liquor jugs. " * 12)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("cli")
    source = tiny_model()
    plain = root / "source"
    source.save_pretrained(plain)
    byte_tokenizer().save_pretrained(plain)
    text = root / "text.txt"
    text.write_text(TEXT)
    return write_folder(source, root / "model"), plain, text


def _expected_ppl(model, tokenizer, text: str, seqlen: int) -> float:
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    losses = []
    with torch.inference_mode():
        for i in range(ids.numel() // seqlen):
            window = ids[i * seqlen:(i + 1) * seqlen]
            logits = model(window[None]).logits[0]
            losses.append(torch.nn.functional.cross_entropy(logits[:-1], window[1:]).item())
    return math.exp(sum(losses) / len(losses))


def test_eval_json(folders, capsys):
    import qformat

    folder, plain, text = folders
    assert main(["eval", str(folder), "--text", str(text), "--seqlen", "64", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["windows"] == len(TEXT) // 64 and result["tokens"] == result["windows"] * 64
    want = _expected_ppl(qformat.load_dequantized(folder), byte_tokenizer(), TEXT, 64)
    assert result["perplexity"] == pytest.approx(want, rel=1e-4)
    assert sum(result["kernels"].values()) == 14


def test_eval_against_source_and_limit(folders, capsys):
    folder, plain, text = folders
    assert main(["eval", str(folder), "--text", str(text), "--seqlen", "64", "--limit", "2", "--against", str(plain),
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["windows"] == 2
    assert 0 < result["kl_divergence"] < 0.5 and 0.5 < result["top1_agreement"] <= 1
    # the source against itself: no divergence, full agreement
    assert main(["eval", str(plain), "--text", str(text), "--seqlen", "64", "--limit", "1", "--against", str(plain),
                 "--json"]) == 0
    same = json.loads(capsys.readouterr().out)
    assert same["kl_divergence"] == pytest.approx(0, abs=1e-6) and same["top1_agreement"] == 1


def test_eval_human_output_and_reference(folders, capsys):
    folder, _, text = folders
    assert main(["eval", str(folder), "--text", str(text), "--seqlen", "64"]) == 0
    kernels = capsys.readouterr().out
    assert main(["eval", str(folder), "--text", str(text), "--seqlen", "64", "--reference"]) == 0
    reference = capsys.readouterr().out
    assert kernels.startswith("perplexity ") and "kernels:" in kernels and "kernels:" not in reference
    assert float(kernels.split()[1]) == pytest.approx(float(reference.split()[1]), rel=1e-4)


def test_eval_text_too_short(folders, capsys, tmp_path):
    folder, _, _ = folders
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    assert main(["eval", str(folder), "--text", str(short), "--seqlen", "64"]) == 1
    assert "fewer than 64 tokens" in capsys.readouterr().err


def test_generate(folders, capsys):
    folder, _, _ = folders
    assert main(["generate", str(folder), "hello", "--max-new-tokens", "5"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("hello")
    assert lines[-1].startswith("[5 new tokens in ") and lines[-1].endswith("tokens/s]")


def test_missing_model_is_a_clean_error(capsys, tmp_path):
    assert main(["generate", str(tmp_path / "nope"), "hi"]) == 1
    assert "qformat: error:" in capsys.readouterr().err
