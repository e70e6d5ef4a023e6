"""Helpers shared by several test modules (import them with ``from helpers import ...``; fixtures live in conftest.py).

A helper used by one module only stays in that module.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from qformat.format import FolderWriter, QuantizedTensor, RecordBuilder

HUB_TOKEN = "secret"  # the token the local Hub server (conftest's ``hub_server`` fixture) accepts


# -- records ----------------------------------------------------------------------------------------------------------


def make_affine_record(name: str = "model.layers.0.mlp.up_proj.weight", shape: tuple[int, int] = (4, 40),
                       bits: int = 4, group: int = 16, seed: int = 0) -> QuantizedTensor:
    """A small valid record: `bits`-bit codes, fp16 scale and zero per group of `group` input columns."""
    rng = np.random.default_rng(seed)
    rows, cols = shape
    groups = -(-cols // group)
    b = RecordBuilder(name, shape, "F16")
    codes = b.packed("codes", rng.integers(0, 1 << bits, size=shape), bits)
    scale = b.tensor("scale", (np.abs(rng.standard_normal((rows, groups))) * 0.02 + 0.01).astype(np.float16))
    zero = b.tensor("zero", rng.integers(0, 1 << bits, size=(rows, groups)).astype(np.float16))
    return b.finish(b.affine(codes, scale=scale, zero=zero, bits=bits, group_shape=(1, group)))


def rtn_record(name: str, weight: np.ndarray, bits: int = 4, group: int = 32) -> QuantizedTensor:
    """Asymmetric min-max round-to-nearest, the RTN plugin's layout: affine(packed codes, fp16 scale, packed zero)."""
    rows, cols = weight.shape
    maxq = (1 << bits) - 1
    tiles = weight.reshape(rows, cols // group, group)
    lo = np.minimum(tiles.min(-1), 0)
    hi = np.maximum(tiles.max(-1), 0)
    scale = np.maximum((hi - lo) / maxq, 1e-6).astype(np.float16)
    s32 = scale.astype(np.float32)
    zero = np.clip(np.round(-lo / s32), 0, maxq)
    codes = np.clip(np.round(tiles / s32[..., None]) + zero[..., None], 0, maxq).reshape(rows, cols)
    b = RecordBuilder(name, weight.shape, "F32")
    node = b.affine(b.packed("codes", codes.astype(np.uint8), bits), scale=b.tensor("scale", scale),
                    zero=b.packed("zero", zero.astype(np.uint8), bits), bits=bits, group_shape=(1, group))
    return b.finish(node, {"method": "test-rtn"})


# -- small qformat model folders (a tiny random Llama quantized with rtn_record) ---------------------------------------

TINY = dict(vocab_size=258, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, attention_bias=True, bos_token_id=256,
            eos_token_id=257, pad_token_id=None, tie_word_embeddings=True)


def byte_tokenizer():
    """A byte-level tokenizer with 256 byte tokens plus <s> and </s> (ids 256, 257)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab.update({"<s>": 256, "</s>": 257})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def tiny_model(seed: int = 0, **overrides):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**{**TINY, **overrides})
    model = LlamaForCausalLM(config).eval()
    return model


def write_folder(model, out: Path, *, bits: int = 4, group: int = 32, mutate=None, requires=None) -> Path:
    """Quantize every decoder Linear of ``model`` with RTN into a two-shard qformat folder (with a tokenizer)."""
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    records, plain = [], {}
    for name, array in state.items():
        if name.startswith("model.layers.") and name.endswith("_proj.weight"):
            records.append(rtn_record(name, array, bits, group))
        else:
            plain[name] = array
    if mutate:
        records = [mutate(qt) for qt in records]
    staging = out.with_name(out.name + ".tok")
    byte_tokenizer().save_pretrained(staging)
    writer = FolderWriter(out)
    layer0 = [qt for qt in records if qt.name.startswith("model.layers.0.")]
    writer.write_shard(1, {k: v for k, v in plain.items() if k.startswith("model.layers.0.")}, layer0)
    writer.write_shard(2, {k: v for k, v in plain.items() if not k.startswith("model.layers.0.")},
                       [qt for qt in records if qt not in layer0])
    config = json.loads(model.config.to_json_string())
    qconfig = {"method": "test-rtn", **({"codec_providers": requires} if requires else {})}
    writer.finalize(config, qconfig, copy_files=sorted(staging.iterdir()))
    shutil.rmtree(staging)
    return out


def rewrite_records(folder: Path, mutate, requires: dict | None = None, key: str = "codec_providers") -> None:
    """Rewrite every record with ``mutate``; ``requires`` goes to quantization_config[key] (the spec's
    codec_providers, or the legacy "requires")."""
    from qformat.format import open_file, write_file

    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"][key] = requires or {"acme.fancy_scale": "qformat-fancy"}
    config["quantization_config"].pop("files")  # checksums no longer hold
    (folder / "config.json").write_text(json.dumps(config))
    for shard in sorted(folder.glob("model-*.safetensors")):
        qfile = open_file(shard)
        plain = {n: np.array(qfile.tensor(n)) for n in qfile.plain_names}
        quantized = [mutate(QuantizedTensor(n, r, {t: np.array(a) for t, a in qfile.quantized(n).tensors.items()}))
                     for n, r in qfile.records.items()]
        qfile.close()
        write_file(shard, plain, quantized)


def input_ids(n: int = 24, seed: int = 1):
    import torch

    return torch.randint(0, 256, (2, n), generator=torch.Generator().manual_seed(seed))


# -- Hugging Face folders quantized by other tools (the importer tests) -----------------------------------------------

HF_TINY = dict(vocab_size=128, hidden_size=128, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64)


def hf_llama(dtype: str = "bfloat16", seed: int = 0, **overrides):
    """A tiny random LlamaForCausalLM (hidden 128, intermediate 192, 2 layers, vocab 128) in ``dtype``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**HF_TINY, **overrides})).eval()
    return model.to(getattr(torch, dtype))


def write_hf_folder(folder: Path, model, tensors: dict, quantization_config: dict, base_model: str | None = None) -> Path:
    """A Hugging Face checkpoint folder as the quantizing tool saves it: config.json (the model's config plus the
    tool's ``quantization_config``), model.safetensors holding ``tensors`` (torch), and a model card naming
    ``base_model`` when given."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = json.loads(model.config.to_json_string())
    config["architectures"] = [type(model).__name__]
    config["quantization_config"] = quantization_config
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    if base_model:
        (folder / "README.md").write_text(f"---\nbase_model: {base_model}\nlibrary_name: transformers\n---\n# model\n")
    return folder


# -- converted folders ------------------------------------------------------------------------------------------------


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file of a folder by name: two conversions are identical when these are equal."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def decoded_logits(source: Path, folder: Path | None):
    """Logits of the transformers model at ``source`` on fixed random ids, with every tensor of the qformat ``folder``
    (records decoded by the reference decoder, plain tensors as stored) loaded over it when given."""
    import torch
    from transformers import AutoModelForCausalLM

    from qformat.format import open_folder

    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32).eval()
    if folder is not None:
        qfolder = open_folder(folder)
        state = {n: torch.from_numpy(np.array(qfolder.decode(n), dtype=np.float32))
                 for n in [*qfolder.records, *qfolder.plain_names]}
        qfolder.close()
        model.load_state_dict(state, strict=False)
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(ids).logits


# -- method layers (qformat.testing.sample_layers) ------------------------------------------------------------------


def layer_input(sample, hessian: bool = True):
    """A method's LayerInput for a sampled real layer, with its calibration Hessian unless ``hessian`` is False."""
    import torch

    from qformat.methods import LayerInput

    return LayerInput(sample.name, torch.from_numpy(sample.weight.copy()), "F32",
                      torch.from_numpy(sample.hessian()) if hessian else None)


def hessian_weighted_error(sample, deq) -> float:
    """tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) of a decoded weight ``deq`` (torch) against the sampled layer: the relative output
    error the GPTQ-family and VQ methods minimise."""
    import torch

    w, h = torch.from_numpy(sample.weight).double(), torch.from_numpy(sample.hessian()).double()
    dw = w - deq.double()
    return float(((dw @ h) * dw).sum() / ((w @ h) * w).sum())
