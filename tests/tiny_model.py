"""A tiny random-weight Llama model folder (config, safetensors, tokenizer), for tests and quick experiments.

    python tests/tiny_model.py /tmp/tiny --layers 2
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from qformat.text import DEFAULT_CALIBRATION

TOKENIZER_TEXT_BYTES = 20_000


def make_tokenizer(folder: Path, vocab_size: int = 512) -> None:
    """A byte-level BPE trained on the start of the shipped calibration text, saved as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = DEFAULT_CALIBRATION.read_text(encoding="utf-8")[:TOKENIZER_TEXT_BYTES]
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(text.split("\n\n"), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(folder))


def make_tiny_llama(folder: str | Path, *, layers: int = 2, hidden: int = 64, intermediate: int = 128,
                    heads: int = 4, kv_heads: int = 2, vocab_size: int = 512, seed: int = 0,
                    dtype: torch.dtype = torch.float32, tie_word_embeddings: bool = False) -> Path:
    """Write a random-weight Llama (weights ~ N(0, 0.02), norms near 1) with its tokenizer into ``folder``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab_size,
                         max_position_embeddings=2048, tie_word_embeddings=tie_word_embeddings,
                         bos_token_id=0, eos_token_id=1)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
    model.to(dtype).save_pretrained(str(folder))
    make_tokenizer(folder, vocab_size)
    return folder


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--intermediate", type=int, default=128)
    args = parser.parse_args()
    print(make_tiny_llama(args.folder, layers=args.layers, hidden=args.hidden, intermediate=args.intermediate))
