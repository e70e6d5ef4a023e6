"""The seed corpus: valid files and folders that mutations start from.

Files: every valid conformance vector plus small records built here with ``RecordBuilder`` for every core codec and
for the layouts that reach the edge cases (parameters with one row of tiles, I64 ``row_ptr``, per-tile tables, plain
tensors beside records). Folders: a small synthetic folder written with ``FolderWriter`` and, optionally, a tiny
converted Llama (``qformat convert --method rtn``), cached on disk. Everything here is deterministic.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np

from qformat.format import FolderWriter, QuantizedTensor, RecordBuilder, write_file

from .sample import FileSample, FolderSample

REPO = Path(__file__).resolve().parents[2]
VECTORS = REPO / "conformance" / "vectors"
F16, F32, BF16 = np.float16, np.float32, ml_dtypes.bfloat16


def conformance_seeds() -> dict[str, bytes]:
    manifest = json.loads((VECTORS / "manifest.json").read_text())
    files = sorted({v["file"] for v in manifest["vectors"] if v["kind"] == "valid"})
    return {f"vector:{name}": (VECTORS / name).read_bytes() for name in files}


def _codes(rng: np.random.Generator, shape: tuple[int, int], bits: int) -> np.ndarray:
    return rng.integers(0, 1 << bits, size=shape)


def _pos(rng: np.random.Generator, shape: tuple[int, ...], scale: float = 0.05, dtype=F16) -> np.ndarray:
    return (np.abs(rng.standard_normal(shape)) * scale + scale / 4).astype(dtype)


def _records(name: str, rng: np.random.Generator) -> dict[str, Callable[[], QuantizedTensor]]:
    """One builder per seed record; each returns a validated QuantizedTensor named ``name``."""

    def packed_affine() -> QuantizedTensor:
        b = RecordBuilder(name, (6, 40), "F16")
        codes = b.packed("codes", _codes(rng, (6, 40), 3), 3)
        return b.finish(b.affine(codes, scale=b.tensor("scale", _pos(rng, (6, 3))),
                                 zero=b.tensor("zero", rng.integers(0, 8, (6, 3)).astype(F16)), bits=3,
                                 group_shape=(1, 16)))

    def column_groups() -> QuantizedTensor:  # one row of tiles: a huge group height still matches the grid
        b = RecordBuilder(name, (4, 32), "F32")
        codes = b.packed("codes", _codes(rng, (4, 32), 4), 4)
        return b.finish(b.affine(codes, scale=b.tensor("scale", _pos(rng, (1, 4))), zero=8, bits=4,
                                 group_shape=(4, 8)))

    def bitplanes_lut() -> QuantizedTensor:
        b = RecordBuilder(name, (5, 24), "BF16")
        codes = b.bitplanes("codes", _codes(rng, (5, 24), 3), 3)
        return b.finish(b.lut(codes, b.tensor("table", np.linspace(-1, 1, 8).astype(F16))))

    def ternary_scale() -> QuantizedTensor:
        b = RecordBuilder(name, (4, 17))
        trits = b.ternary("trits", rng.integers(-1, 2, (4, 17)))
        return b.finish(b.scale(trits, b.tensor("factor", _pos(rng, (4, 1))), (1, 17)))

    def quantized_stats() -> QuantizedTensor:  # SpQR-like: scale and zero are themselves 3-bit affine
        b = RecordBuilder(name, (8, 32), "F16")
        codes = b.packed("codes", _codes(rng, (8, 32), 3), 3)
        s = b.affine(b.packed("scale.codes", _codes(rng, (8, 2), 3), 3), scale=b.tensor("scale.scale",
                     _pos(rng, (1, 2))), zero=b.tensor("scale.zero", np.full((1, 2), 4, F16)), bits=3,
                     group_shape=(8, 1))
        z = b.affine(b.packed("zero.codes", _codes(rng, (8, 2), 3), 3), scale=0.5, zero=2, bits=3,
                     group_shape=(8, 2))
        return b.finish(b.affine(codes, scale=s, zero=z, bits=3, group_shape=(1, 16)))

    def lut_per_tile() -> QuantizedTensor:
        b = RecordBuilder(name, (6, 20))
        codes = b.packed("codes", _codes(rng, (6, 20), 2), 2)
        table = b.tensor("table", rng.standard_normal((2, 3, 4)).astype(F16))
        return b.finish(b.lut(codes, table, group_shape=(3, 7)))

    def lut_tile_rowband() -> QuantizedTensor:  # one tile row
        b = RecordBuilder(name, (3, 16))
        codes = b.packed("codes", _codes(rng, (3, 16), 2), 2)
        return b.finish(b.lut(codes, b.tensor("table", rng.standard_normal((1, 2, 4)).astype(F32)),
                              group_shape=(3, 8)))

    def nf4_absmax() -> QuantizedTensor:
        b = RecordBuilder(name, (4, 64), "BF16")
        codes = b.packed("codes", _codes(rng, (4, 64), 4), 4)
        inner = b.lut(codes, b.tensor("table", np.linspace(-1, 1, 16).astype(F32)))
        return b.finish(b.scale(inner, b.tensor("absmax", _pos(rng, (4, 2), dtype=F32)), (1, 32)))

    def vq_books() -> QuantizedTensor:
        b = RecordBuilder(name, (4, 16))
        codes = b.packed("codes", _codes(rng, (4, 8), 3), 3)  # 16 / d=4 vectors x M=2 books
        books = b.tensor("codebooks", rng.standard_normal((2, 8, 4)).astype(F16))
        return b.finish(b.vq(codes, books))

    def sparse_outliers() -> QuantizedTensor:
        b = RecordBuilder(name, (5, 12))
        dense = np.where(rng.random((5, 12)) < 0.2, rng.standard_normal((5, 12)), 0).astype(F16)
        base = b.affine(b.packed("codes", _codes(rng, (5, 12), 2), 2), scale=0.1, zero=1.5, bits=2,
                        group_shape=(1, 12))
        return b.finish(b.sum([base, b.sparse_from_dense("outliers", dense)]))

    def sparse_i64() -> QuantizedTensor:
        b = RecordBuilder(name, (4, 9))
        ptr = np.array([0, 1, 1, 3, 4], np.int64)
        idx = np.array([2, 0, 8, 5], np.int32)
        node = b.sparse_csr("outliers", ptr, idx, rng.standard_normal(4).astype(F32))
        b.tensors[f"{name}.outliers.row_ptr"] = ptr  # keep I64 (the builder stores I32)
        return b.finish(node)

    def lowrank_sidecar() -> QuantizedTensor:
        b = RecordBuilder(name, (6, 10))
        base = b.affine(b.packed("codes", _codes(rng, (6, 10), 4), 4), scale=b.tensor("scale", _pos(rng, (6, 1))),
                        zero=8, bits=4, group_shape=(1, 10))
        side = b.lowrank(b.tensor("a", rng.standard_normal((6, 2)).astype(F16)),
                         b.tensor("b", rng.standard_normal((2, 10)).astype(F16)))
        return b.finish(b.sum([base, side]))

    def sign_lowrank() -> QuantizedTensor:
        b = RecordBuilder(name, (4, 12))
        sign = b.packed("sign", _codes(rng, (4, 12), 1), 1)
        return b.finish(b.sign_lowrank(sign, b.tensor("u", rng.standard_normal((4, 1)).astype(F16)),
                                       b.tensor("v", rng.standard_normal((1, 12)).astype(F16))))

    def permuted() -> QuantizedTensor:
        b = RecordBuilder(name, (3, 10), "F16")
        inner = b.affine(b.packed("codes", _codes(rng, (3, 10), 8), 8), scale=b.tensor("scale", _pos(rng, (3, 1))),
                         zero=128, bits=8, group_shape=(1, 10))
        return b.finish(b.permute(inner, rng.permutation(10)))

    def permuted_i64() -> QuantizedTensor:
        b = RecordBuilder(name, (2, 6))
        node = b.permute(b.tensor("w", rng.standard_normal((2, 6)).astype(F16)), rng.permutation(6))
        b.tensors[f"{name}.perm"] = rng.permutation(6).astype(np.int64)
        return b.finish(node)

    def integer_codes() -> QuantizedTensor:  # codes as a plain U16 tensor (no width bound at open)
        b = RecordBuilder(name, (3, 8))
        codes = b.tensor("codes", rng.integers(0, 1 << 12, (3, 8)).astype(np.uint16))
        return b.finish(b.affine(codes, scale=b.tensor("scale", _pos(rng, (3, 1), dtype=F32)), zero=2048, bits=12,
                                 group_shape=(1, 8)))

    def one_row() -> QuantizedTensor:
        b = RecordBuilder(name, (1, 33))
        codes = b.packed("codes", _codes(rng, (1, 33), 5), 5)
        return b.finish(b.affine(codes, scale=b.tensor("scale", _pos(rng, (1, 3))), zero=16, bits=5,
                                 group_shape=(1, 16)))

    return {k: v for k, v in locals().items() if callable(v)}


def synthetic_records() -> dict[str, QuantizedTensor]:
    rng = np.random.default_rng(20240611)
    return {label: build() for label, build in _records("model.layers.0.mlp.up_proj.weight", rng).items()}


def _renamed(qt: QuantizedTensor, name: str) -> QuantizedTensor:
    text = json.dumps(qt.record).replace(json.dumps(qt.name)[:-1] + ".", json.dumps(name)[:-1] + ".")
    tensors = {name + key[len(qt.name):]: value for key, value in qt.tensors.items()}
    return QuantizedTensor(name, json.loads(text), tensors)


def synthetic_seeds(tmp: Path) -> dict[str, bytes]:
    """One file per synthetic record, plus one file with three records and plain tensors."""
    records = synthetic_records()
    out = {}
    for label, qt in records.items():
        path = write_file(tmp / f"{label}.safetensors", quantized=[qt])
        out[f"synthetic:{label}"] = path.read_bytes()
    rng = np.random.default_rng(7)
    mixed = [_renamed(records[label], f"model.layers.{i}.self_attn.{proj}.weight")
             for i, (label, proj) in enumerate((("packed_affine", "q_proj"), ("sparse_outliers", "k_proj"),
                                                ("lowrank_sidecar", "v_proj")))]
    plain = {"model.embed_tokens.weight": rng.standard_normal((8, 6)).astype(F16),
             "model.norm.weight": np.ones(6, F32), "lm_head.bias": rng.standard_normal(8).astype(BF16)}
    out["synthetic:mixed"] = write_file(tmp / "mixed.safetensors", plain, mixed).read_bytes()
    return out


def file_corpus() -> list[tuple[str, FileSample]]:
    with tempfile.TemporaryDirectory() as tmp:
        raw = {**conformance_seeds(), **synthetic_seeds(Path(tmp))}
    return [(label, FileSample.parse(data)) for label, data in sorted(raw.items())]


def synthetic_folder(out: Path) -> Path:
    """Two shards: four records of different codecs and plain tensors, with config.json and the index."""
    records = synthetic_records()
    names = {"packed_affine": "model.layers.0.self_attn.q_proj.weight",
             "sparse_outliers": "model.layers.0.self_attn.k_proj.weight",
             "permuted": "model.layers.0.self_attn.v_proj.weight",
             "quantized_stats": "model.layers.1.mlp.down_proj.weight",
             "column_groups": "model.layers.1.mlp.up_proj.weight",
             "lowrank_sidecar": "model.layers.1.mlp.gate_proj.weight"}
    qts = [_renamed(records[label], name) for label, name in names.items()]
    rng = np.random.default_rng(3)
    writer = FolderWriter(out, work_dir=out.with_name(out.name + ".work"))
    writer.write_shard(1, {"model.embed_tokens.weight": rng.standard_normal((8, 6)).astype(F16)}, qts[:3])
    writer.write_shard(2, {"model.norm.weight": np.ones(6, F32)}, qts[3:])
    return writer.finalize({"architectures": ["LlamaForCausalLM"], "model_type": "llama"},
                           {"method": "fuzz-seed"})


def tiny_converted_folder(cache: Path | None = None) -> Path:
    """A one-layer tiny Llama converted with rtn (made once with the CLI, in a child process, then cached)."""
    cache = cache or Path(tempfile.gettempdir()) / "qformat-fuzz-cache"
    out = cache / "tiny_rtn_l1"
    if (out / "config.json").exists():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    src = cache / "tiny_src"
    shutil.rmtree(src, ignore_errors=True)
    env = {**os.environ, "TQDM_DISABLE": "1"}
    tiny = Path(__file__).resolve().parents[2] / "tests" / "tiny_model.py"  # the test model factory (not shipped)
    subprocess.run([sys.executable, str(tiny), str(src), "--layers", "1"], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    partial = cache / "tiny_rtn_l1.tmp"
    shutil.rmtree(partial, ignore_errors=True)
    convert = "import sys; from qformat.cli import main; sys.exit(main(sys.argv[1:]))"
    subprocess.run([sys.executable, "-c", convert, "convert", str(src), "--method", "rtn", "--out", str(partial),
                    "--quiet"], check=True, env=env, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    os.replace(partial, out)
    return out


def folder_corpus(kind: str) -> list[tuple[str, FolderSample]]:
    """``kind``: "synthetic", "tiny" or "both"."""
    out = []
    if kind in ("synthetic", "both"):
        with tempfile.TemporaryDirectory() as tmp:
            out.append(("folder:synthetic", FolderSample.load(synthetic_folder(Path(tmp) / "seed"))))
    if kind in ("tiny", "both"):
        out.append(("folder:tiny_rtn", FolderSample.load(tiny_converted_folder())))
    return out
