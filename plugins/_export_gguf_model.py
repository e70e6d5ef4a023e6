"""The model around the tensors of a GGUF export, written as llama.cpp's ``convert_hf_to_gguf.py`` writes it for the
same Hugging Face model (llama-cpp-python 0.3.36's vendored llama.cpp: ``conversion/base.py`` ``TextModel``,
``conversion/llama.py`` ``LlamaModel``, ``conversion/qwen.py`` ``Qwen2Model``), so llama.cpp loads the file:

- **Architectures**: ``model_type`` llama and mistral (GGUF ``llama``, whose q/k projection rows llama.cpp wants in
  its own rotary order: ``LlamaModel.permute``), qwen2 (GGUF ``qwen2``, no permutation). Names: gguf-py's
  ``TensorNameMap`` (``get_tensor_name_map``). A tied embedding writes no ``output.weight``.
- **Hyperparameters**: ``TextModel.set_gguf_parameters`` from config.json (context, embedding and feed-forward
  length, head counts, rope base and scaling, RMS epsilon, key/value length), plus Llama's vocabulary size and rope
  dimension count; a ``llama3`` rope writes the ``rope_freqs`` tensor ``LlamaModel.generate_extra_tensors`` computes.
- **Tokenizer** (gguf-py's ``gguf.vocab``): a ``tokenizer.model`` with sentencepiece installed ->
  ``SentencePieceVocab`` (model ``llama``); a SentencePiece-style ``tokenizer.json`` (BPE with byte fallback) ->
  ``LlamaHfVocab`` (model ``llama``); any other BPE ``tokenizer.json`` -> ``gpt2`` with the pre-tokenizer named by
  the hash of its tokenization of ``CHKTXT`` (``get_vocab_base_pre``; unknown: ``default``, with a warning). Merges,
  special token ids, ``add_*_token`` and the chat template: ``SpecialVocab``. As ``LlamaModel.set_vocab`` does, a
  49152-token vocabulary (granite-small / SmolLM) gets ``add_bos_token`` false.
- **general.***: ``gguf.Metadata.load`` of the folder (model card, config), ``general.quantized_by`` qformat,
  ``general.base_model.0.*`` from ``quantization_config.base_model``, ``general.file_type`` from the types written
  (the source GGUF's own file type for a folder imported from one), ``general.quantization_version`` 2.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Any

import numpy as np

from qformat.plugin import SourceError

ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}  # config model_type -> GGUF architecture
PERMUTE_QK = {"llama"}
_BLOCK = re.compile(r"^blk\.(\d+)\.")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
FILE_TYPES = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q4_0": "MOSTLY_Q4_0",
              "Q4_1": "MOSTLY_Q4_1", "Q5_0": "MOSTLY_Q5_0", "Q5_1": "MOSTLY_Q5_1", "Q8_0": "MOSTLY_Q8_0",
              "Q2_K": "MOSTLY_Q2_K", "Q3_K": "MOSTLY_Q3_K_M", "Q4_K": "MOSTLY_Q4_K_M", "Q5_K": "MOSTLY_Q5_K_M",
              "Q6_K": "MOSTLY_Q6_K", "IQ4_NL": "MOSTLY_IQ4_NL", "IQ4_XS": "MOSTLY_IQ4_XS", "TQ1_0": "MOSTLY_TQ1_0",
              "TQ2_0": "MOSTLY_TQ2_0"}


@dataclass
class ModelPlan:
    """What the export needs to know of the model: its GGUF architecture, config and name map."""

    arch: str
    config: dict[str, Any]
    blocks: int
    n_head: int
    n_kv_head: int
    tied: bool
    name_map: Any  # gguf.TensorNameMap

    def gguf_name(self, name: str) -> str | None:
        """The GGUF name of the parameter ``name`` (``model.layers.0.self_attn.q_proj.weight`` ->
        ``blk.0.attn_q.weight``), None when gguf-py has none for this architecture."""
        return self.name_map.get_name(name, try_suffixes=(".weight", ".bias"))

    def row_order(self, name: str, rows: int) -> np.ndarray | None:
        """The rows of ``name`` in the order llama.cpp stores them (``LlamaModel.permute``), None when unchanged."""
        if self.arch not in PERMUTE_QK:
            return None
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            heads = self.n_head
        elif name.endswith(("k_proj.weight", "k_proj.bias")):
            heads = self.n_kv_head
        else:
            return None
        if rows % (2 * heads):
            raise SourceError(f"{rows} rows are not {heads} heads of an even size", tensor=name, field="shape")
        return np.arange(rows).reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(rows)


def plan(config: dict[str, Any], where: str) -> ModelPlan:
    import gguf

    model_type = config.get("model_type")
    arch = ARCHS.get(model_type)
    if arch is None:
        raise SourceError(f"model_type {model_type!r} is not one this exporter writes (supported: "
                          f"{', '.join(sorted(ARCHS))})", file=where, field="model_type")
    try:
        blocks = int(config["num_hidden_layers"])
        n_head = int(config["num_attention_heads"])
        n_kv = int(config.get("num_key_value_heads") or n_head)
    except (KeyError, TypeError, ValueError) as exc:
        raise SourceError(f"config.json lacks a usable {exc}", file=where, field=str(exc)) from None
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    return ModelPlan(arch, config, blocks, n_head, n_kv, bool(config.get("tie_word_embeddings", False)),
                     gguf.get_tensor_name_map(arch_id, blocks))


def order_key(gguf_name: str) -> tuple[int, int, str]:
    """token_embd first, the blocks in order, then the rest (output_norm, output)."""
    if gguf_name.startswith("token_embd"):
        return (0, 0, gguf_name)
    match = _BLOCK.match(gguf_name)
    if match:
        return (1, int(match.group(1)), gguf_name)
    return (2, 0, gguf_name)


def rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """transformers 5's ``rope_parameters``, or the older ``rope_theta`` + ``rope_scaling``."""
    params = config.get("rope_parameters")
    if isinstance(params, dict):
        return dict(params.get("full_attention", params))
    scaling = config.get("rope_scaling") or {}
    out = {**scaling, "rope_theta": config.get("rope_theta", 10000.0)}
    if "type" in scaling and "rope_type" not in scaling:
        out["rope_type"] = scaling["type"]
    return out


def write_hparams(writer: Any, p: ModelPlan, file_type: str) -> None:
    """``TextModel.set_gguf_parameters`` (+ ``LlamaModel``'s vocab size and rope dimension count)."""
    import gguf

    c = p.config
    writer.add_block_count(p.blocks)
    for add, keys in ((writer.add_context_length, ("max_position_embeddings", "n_ctx", "n_positions")),
                      (writer.add_embedding_length, ("hidden_size", "n_embd")),
                      (writer.add_feed_forward_length, ("intermediate_size", "n_inner"))):
        value = next((c[k] for k in keys if c.get(k) is not None), None)
        if value is not None:
            add(int(value))
    writer.add_head_count(p.n_head)
    writer.add_head_count_kv(p.n_kv_head)
    rope = rope_parameters(c)
    rope_type = str(rope.get("rope_type") or "default").lower()
    factor = rope.get("factor")
    if rope_type == "linear" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(factor))
    elif rope_type == "yarn" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(factor))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    if rope.get("rope_theta") is not None:
        writer.add_rope_freq_base(float(rope["rope_theta"]))
    eps = c.get("rms_norm_eps")
    if eps is not None:
        writer.add_layer_norm_rms_eps(float(eps))
    if c.get("head_dim") is not None:
        writer.add_key_length(int(c["head_dim"]))
        writer.add_value_length(int(c["head_dim"]))
    writer.add_file_type(int(getattr(gguf.LlamaFileType, file_type)))
    if p.arch == "llama":
        writer.add_vocab_size(int(c["vocab_size"]))
        writer.add_rope_dimension_count(head_dim(c))


def head_dim(c: dict[str, Any]) -> int:
    return int(c["head_dim"]) if c.get("head_dim") is not None else int(c["hidden_size"]) // int(
        c["num_attention_heads"])


def rope_freqs(c: dict[str, Any]) -> np.ndarray | None:
    """``LlamaModel.generate_extra_tensors``: the per-frequency factors of a ``llama3`` rope, else None."""
    rope = rope_parameters(c)
    if str(rope.get("rope_type") or "").lower() != "llama3":
        return None
    import torch

    base = rope.get("rope_theta", 10000.0)
    dim = head_dim(c)
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old / low, old / high
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32).numpy()


# -- tokenizer ----------------------------------------------------------------------------------------------------


def write_vocab(writer: Any, folder: Path, config: dict[str, Any]) -> list[str]:
    """The tokenizer of ``folder`` as ``LlamaModel.set_vocab`` writes it; returns warnings."""
    import gguf

    warnings: list[str] = []
    config_path = folder / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    if (prefix := tokenizer_config.get("add_prefix_space")) is not None:
        writer.add_add_space_prefix(bool(prefix))
    vocab_size = int(config.get("vocab_size") or 0)
    kind = _sentencepiece(writer, folder, vocab_size) or _llama_hf(writer, folder)
    if kind is None:
        if not (folder / "tokenizer.json").is_file():
            raise SourceError("the folder has no tokenizer (tokenizer.json or tokenizer.model); llama.cpp needs one",
                              file=str(folder), field="tokenizer.json")
        warnings += _gpt2(writer, folder, vocab_size)
        kind = "gpt2"
    special = gguf.SpecialVocab(folder, load_merges=kind == "gpt2", n_vocab=vocab_size or None)
    special.add_to_gguf(writer, quiet=True)
    if vocab_size == 49152:  # LlamaModel.set_vocab: "Apply to granite small models only" (SmolLM's vocabulary too)
        writer.add_add_bos_token(False)
    return warnings


def _sentencepiece(writer: Any, folder: Path, vocab_size: int) -> str | None:
    if not (folder / "tokenizer.model").is_file():
        return None
    try:
        import sentencepiece  # noqa: F401
    except ImportError:
        return None  # the tokenizer.json path below reads the same vocabulary
    import gguf

    vocab = gguf.SentencePieceVocab(folder)
    tokens, scores, types = [], [], []
    for text, score, toktype in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(toktype)
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    _add_tokens(writer, "llama", "default", tokens, types, scores)
    return "llama"


def _llama_hf(writer: Any, folder: Path) -> str | None:
    import gguf

    try:
        vocab = gguf.LlamaHfVocab(folder)
    except (FileNotFoundError, TypeError, KeyError):
        return None
    tokens, scores, types = [], [], []
    for text, score, toktype in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(toktype)
    _add_tokens(writer, "llama", "default", tokens, types, scores)
    return "llama"


def _gpt2(writer: Any, folder: Path, vocab_size: int) -> list[str]:
    """``TextModel.get_vocab_base`` + ``_set_vocab_gpt2``."""
    import gguf
    from transformers import AutoTokenizer

    from ._export_gguf_pretok import CHKTXT, PRE_TOKENIZERS

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    vocab = tokenizer.vocab
    vocab_size = vocab_size or len(vocab)
    beyond = sorted((i, t) for t, i in vocab.items() if i >= vocab_size)
    warnings = [f"tokens beyond the model's {vocab_size}-token vocabulary are left out (llama.cpp sizes the "
                f"embedding by the token list): {', '.join(f'{t!r} ({i})' for i, t in beyond[:5])}"] if beyond else []
    digest = sha256(str(tokenizer.encode(CHKTXT)).encode()).hexdigest()
    pre = PRE_TOKENIZERS.get(digest)
    warnings += [] if pre else [f"the tokenizer's pre-tokenizer is not one llama.cpp knows (chkhsh {digest}); "
                               "written as 'default', which may tokenize some text differently"]
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            if not decoder[i].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if decoder[i].special or _looks_special(token):
                types.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    _add_tokens(writer, "gpt2", pre or "default", tokens, types)
    return warnings


def _looks_special(token: str) -> bool:
    """``TextModel.does_token_look_special``."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
            or (token.startswith("<unused") and token.endswith(">")))


def _add_tokens(writer: Any, model: str, pre: str, tokens: list, types: list, scores: list | None = None) -> None:
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    if scores is not None:
        writer.add_token_scores(scores)
    writer.add_token_types([int(t) for t in types])


# -- general.* -----------------------------------------------------------------------------------------------------


def write_general(writer: Any, folder: Path, config: dict[str, Any], qconfig: dict[str, Any],
                  total_params: int) -> None:
    """``ModelBase.prepare_metadata``'s ``general.*`` (``gguf.Metadata.load`` of the folder), with qformat as the
    quantizer and the base model of ``quantization_config.base_model``."""
    import gguf

    metadata = gguf.Metadata.load(None, folder, None, total_params)
    named = config.get("_model_name_or_path")  # what transformers keeps of an imported GGUF's general.name
    if isinstance(named, str) and named.strip():
        metadata.name = named.strip()
    if metadata.name is None:
        metadata.name = folder.name
    metadata.quantized_by = "qformat"
    base = qconfig.get("base_model")
    if isinstance(base, str) and _HUB_ID.match(base):
        org, name = base.split("/", 1)
        metadata.base_models = [{"name": name, "organization": org, "repo_url": f"https://huggingface.co/{base}"}]
    if metadata.size_label is None and total_params > 0:
        metadata.size_label = gguf.size_label(total_params, 0, 0, 0)
    writer.add_type(gguf.GGUFType.MODEL)
    metadata.set_gguf_meta_model(writer)


def file_type(counts: dict[str, int], qconfig: dict[str, Any]) -> str:
    """The ``LlamaFileType`` name: a GGUF source's own (``source.details.file_type``), else that of the type holding
    the most quantized tensors (all plain: F32, F16 or BF16 by the most common)."""
    details = (qconfig.get("source") or {}).get("details") or {}
    source = str((qconfig.get("source") or {}).get("format") or "")
    named = details.get("file_type")
    if source.startswith("gguf") and isinstance(named, str):
        import gguf

        for prefix in ("MOSTLY_", "ALL_", ""):
            if hasattr(gguf.LlamaFileType, prefix + named):
                return prefix + named
    quantized = {k: v for k, v in counts.items() if k not in ("F32", "F16", "BF16")}
    pool = quantized or counts
    top = max(pool, key=lambda k: (pool[k], k)) if pool else "F32"
    return FILE_TYPES.get(top, "MOSTLY_Q4_0")
