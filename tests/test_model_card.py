"""The model card links a Hub source as ``base_model`` and never turns a local folder or file into a Hub link or
leaks its absolute path."""

from __future__ import annotations

from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from qformat.model_card import render_model_card


def card_for(source, command: str | None = None) -> tuple[str, ModelCard]:
    qconfig = {"quant_method": "qformat", "format_version": 1, "method": "rtn", "method_params": {"bits": 4},
               "source": source, **({"command": command} if command else {})}
    text = render_model_card({"architectures": ["LlamaForCausalLM"], "quantization_config": qconfig})
    return text, ModelCard(text)


def test_hub_source_is_the_base_model_with_a_link_and_revision() -> None:
    text, card = card_for({"id": "org/base", "revision": "abc123", "format": "safetensors"})
    assert card.data.base_model == "org/base" and card.data.base_model_relation == "quantized"
    assert "[org/base](https://huggingface.co/org/base) (revision `abc123`)" in text
    assert "from `org/base`." in text and text.split("\n---\n", 1)[1].startswith("\n# base (rtn)")


@pytest.mark.parametrize("source", [
    {"id": "/home/me/models/tiny", "revision": None, "format": "safetensors", "local": True},
    {"id": "tiny", "revision": None, "format": "safetensors", "local": True},  # a valid-looking repo id, but local
    {"id": "./checkpoints/tiny/", "format": "safetensors"},  # no `local` flag: a path is still no repo id
    "/home/me/models/tiny",  # a bare string source, from older files
    {"id": "C:\\models\\tiny", "local": True},
])
def test_local_source_is_named_but_not_linked(source) -> None:
    path = source if isinstance(source, str) else source["id"]
    text, card = card_for(source, command=f"qformat convert --method rtn {path} --out q")
    assert not {"base_model", "base_model_relation"} & set(card.data.to_dict())
    assert "huggingface.co" not in text and "/home/me" not in text and "checkpoints" not in text and "C:" not in text
    assert "the local model `tiny`" in text and "# tiny (rtn)" in text and "from `tiny`." in text
    assert "qformat convert --method rtn tiny --out q" in text


def test_local_gguf_is_named_by_its_file() -> None:
    text, card = card_for({"id": "/data/SmolLM2.Q4_1.gguf", "format": "gguf", "local": True, "file": "SmolLM2.Q4_1.gguf"})
    assert card.data.base_model is None and "/data" not in text and "`SmolLM2.Q4_1.gguf`" in text


def test_no_source_at_all() -> None:
    text, card = card_for({})
    assert card.data.base_model is None and "huggingface.co" not in text and "A model stored in" in text


def test_converting_a_local_folder_by_absolute_path_writes_a_card_without_it(tmp_path: Path) -> None:
    from tiny_model import make_tiny_llama

    from qformat.conversion import ConvertOptions, convert

    folder = make_tiny_llama(tmp_path / "deep" / "where" / "tiny", layers=1)
    convert(ConvertOptions(str(folder.resolve()), str(tmp_path / "out"), "rtn", quiet=True))
    text = (tmp_path / "out" / "README.md").read_text()
    card = ModelCard(text)
    assert not {"base_model", "base_model_relation"} & set(card.data.to_dict())
    assert str(tmp_path) not in text and "huggingface.co" not in text
    assert "the local model `tiny`" in text
