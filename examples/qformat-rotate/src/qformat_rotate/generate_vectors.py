"""Generate the conformance vectors of codec ``rotate.hadamard`` v1 (spec/hadamard.md), seeded and reproducible.

    python -m qformat_rotate.generate_vectors            # (re)write src/qformat_rotate/vectors/
    python -m qformat_rotate.generate_vectors --check    # fail unless a fresh generation is byte-identical

The layout is qformat's own (conformance/README.md): ``manifest.json``, ``<id>.safetensors``, and for valid vectors
``<id>.expected.safetensors`` (plus ``<id>.tolerance.safetensors`` where the spec allows rounding). Expected values
are computed here from the generating arrays with the spec's formula in float64, never with the codec's decoder.
Run them with ``qformat.testing.check_codec_vectors`` or ``qformat conformance --vectors <dir>``.
"""

from __future__ import annotations

import argparse
import copy
import filecmp
import hashlib
import json
import sys
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save

from qformat.format import signature, write_file
from qformat.plugin import QuantizedTensor, RecordBuilder

from .codec import CODECS

SEED = 20250701
VECTORS_DIR = Path(__file__).resolve().parent / "vectors"
NAME = "layer.weight"
UNIT = 2.0 ** -24  # fp32 unit roundoff
# bitsandbytes functional.get_4bit_type("nf4"): the codebook of the NF4 tree a rotation typically wraps
NF4_TABLE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=np.float32)


@dataclass
class Valid:
    id: str
    description: str
    qt: QuantizedTensor
    expected: np.ndarray  # fp32, the record's shape
    bound: np.ndarray | None  # the spec's product bound 2 * gamma_b * (|X| @ |H s|), float64; None when exact


@dataclass
class Invalid:
    id: str
    description: str
    qt: QuantizedTensor
    code: str
    stage: str  # "open" (structure) or "decode" (data)
    field: str


def rng_for(vector_id: str) -> np.random.Generator:
    return np.random.default_rng([SEED, zlib.crc32(vector_id.encode())])


def dyadic(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """fp16 values on a 2**-6 grid in [-4, 4]: blockwise products with s = 2**-k are exact in any order."""
    return (np.round(np.clip(rng.standard_normal(shape), -4, 4) * 64) / 64).astype(np.float16)


def sylvester(size: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < size:
        h = np.block([[h, h], [h, -h]])
    return h


def rotation(inner: np.ndarray, signs: np.ndarray, block: int, grid: bool) -> tuple[np.ndarray, np.ndarray, bool]:
    """W per spec/hadamard.md in float64 from the fp32 input X, rounded once to fp32; the product bound; whether any
    summation order gives these bits (inputs on a coarse grid (``grid``) and s a power of two)."""
    rows, cols = inner.shape
    s = np.float64(np.float32(1.0) / np.float32(np.sqrt(block)))  # H_b[i, j] * s, rounded to fp32, is +-s32
    hs = sylvester(block) * s
    x = inner.astype(np.float64).reshape(rows, cols // block, block)
    y = (x @ hs).reshape(rows, cols) * signs.astype(np.float64)[None, :]
    gamma = block * UNIT / (1 - block * UNIT)
    bound = (2 * gamma * (np.abs(x) @ np.abs(hs))).reshape(rows, cols)
    exact = grid and s == 2.0 ** round(np.log2(s))  # then every partial sum is exact in fp32
    return y.astype(np.float32), bound, bool(exact)


def signs_for(rng: np.random.Generator, cols: int) -> np.ndarray:
    return rng.choice(np.array([-1, 1], dtype=np.int8), size=cols)


def over_tensor(vid: str, rows: int, cols: int, block: int, description: str) -> Valid:
    rng = rng_for(vid)
    inner = dyadic(rng, (rows, cols))
    signs = signs_for(rng, cols)
    b = RecordBuilder(NAME, (rows, cols), "F16", registry=CODECS)
    node = b.node("rotate.hadamard", 1, input=b.tensor("inner", inner), signs=b.store("signs", signs), block=block)
    expected, bound, exact = rotation(inner.astype(np.float32), signs, block, grid=True)
    return Valid(vid, description, b.finish(node), expected, None if exact else bound)


def over_nf4(vid: str, rows: int, cols: int, block: int, group: int, description: str) -> Valid:
    """An NF4 tree (absmax blocks, no double quantization) under a rotation, as ``--transform hadamard --method nf4``
    writes: rotate(scale(lut(packed4, table), absmax))."""
    rng = rng_for(vid)
    codes = rng.integers(0, 16, size=(rows, cols), dtype=np.uint8)
    absmax = (rng.integers(1, 64, size=(rows, cols // group)) / 32).astype(np.float32)
    signs = signs_for(rng, cols)
    b = RecordBuilder(NAME, (rows, cols), "BF16", registry=CODECS)
    inner_node = b.scale(b.lut(b.packed("codes", codes, 4), b.tensor("nf4_table", NF4_TABLE)),
                         b.tensor("absmax", absmax), group_shape=(1, group))
    node = b.node("rotate.hadamard", 1, input=inner_node, signs=b.store("signs", signs), block=block)
    inner = NF4_TABLE[codes] * np.repeat(absmax, group, axis=1)  # fp32: one rounding, as the scale codec fixes
    expected, bound, exact = rotation(inner, signs, block, grid=False)
    return Valid(vid, description, b.finish(node), expected, None if exact else bound)


def valid_vectors() -> list[Valid]:
    return [
        over_tensor("hadamard_b4_tensor", 4, 16, 4, "rotate.hadamard block 4 over an fp16 tensor (s = 1/2: exact)"),
        over_tensor("hadamard_b1_signs_only", 3, 8, 1, "block 1: H_1 = [1], only the signs apply"),
        over_tensor("hadamard_b8_tensor", 5, 24, 8,
                    "block 8 (s = 1/sqrt(8) rounded to fp32): within the product bound of spec/hadamard.md"),
        over_nf4("hadamard_b64_nf4", 6, 128, 64, 32,
                 "an NF4 tree under a rotation, as --transform hadamard --method nf4 writes: block 64 over "
                 "scale(lut(packed 4-bit, NF4), absmax)"),
    ]


def _base(vid: str) -> QuantizedTensor:
    return over_tensor(vid, 2, 8, 4, "").qt


def _edited(vid: str, edit: Callable[[dict, dict], None]) -> QuantizedTensor:
    qt = _base(vid)
    record, tensors = copy.deepcopy(qt.record), dict(qt.tensors)
    edit(record, tensors)
    return QuantizedTensor(qt.name, record, tensors)


def _set(key: str, value: Any) -> Callable[[dict, dict], None]:
    def edit(record: dict, tensors: dict) -> None:
        record["weight"][key] = value
    return edit


def _drop(key: str) -> Callable[[dict, dict], None]:
    def edit(record: dict, tensors: dict) -> None:
        del record["weight"][key]
    return edit


def _signs(array_of: Callable[[np.ndarray], np.ndarray]) -> Callable[[dict, dict], None]:
    def edit(record: dict, tensors: dict) -> None:
        key = record["weight"]["signs"]
        old = tensors[key]
        tensors[key] = array_of(old)
        record["storage_bytes"] += tensors[key].nbytes - old.nbytes
    return edit


def invalid_vectors() -> list[Invalid]:
    def inv(vid: str, description: str, edit: Callable[[dict, dict], None], code: str, field: str,
            stage: str = "open") -> Invalid:
        return Invalid(vid, description, _edited(vid, edit), code, stage, field)

    return [
        inv("hadamard_block_not_power_of_two", "block 3 is not a power of two", _set("block", 3), "bad_field",
            "weight/block"),
        inv("hadamard_block_zero", "block 0 is below the range [1, 32768]", _set("block", 0), "bad_field",
            "weight/block"),
        inv("hadamard_block_not_integer", "block given as the string \"4\"", _set("block", "4"), "bad_field",
            "weight/block"),
        inv("hadamard_columns_not_multiple", "8 columns are not a multiple of block 16", _set("block", 16),
            "shape_mismatch", "weight/input"),
        inv("hadamard_signs_wrong_dtype", "signs stored as I16 instead of I8",
            _signs(lambda s: s.astype(np.int16)), "shape_mismatch", "weight/signs"),
        inv("hadamard_signs_wrong_length", "signs hold one entry per column plus one",
            _signs(lambda s: np.concatenate([s, s[:1]])), "shape_mismatch", "weight/signs"),
        inv("hadamard_sign_zero", "a sign of 0 (only -1 and +1 are allowed)",
            _signs(lambda s: np.where(np.arange(s.size) == 3, 0, s).astype(np.int8)), "code_out_of_range",
            "weight/signs", "decode"),
        inv("hadamard_missing_block", "the required field block is absent", _drop("block"), "bad_record",
            "weight/block"),
        inv("hadamard_unknown_field", "an extra field the codec does not define", _set("seed", 7), "bad_field",
            "weight/seed"),
        inv("hadamard_version_2", "version 2 of the codec does not exist", _set("version", 2),
            "unsupported_codec_version", "weight/version"),
    ]


# ---------------------------------------------------------------------------------------------------------------
# writing

def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_plain(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.write_bytes(save({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sorted(arrays.items())}))


def tolerance(expected: np.ndarray, bound: np.ndarray) -> np.ndarray:
    """The product bound plus 4 ulp of the expected value, rounded up to fp32 (conformance/README.md)."""
    tau = bound + 4 * np.spacing(np.abs(expected)).astype(np.float64)
    tau32 = tau.astype(np.float32)
    return np.where(tau32.astype(np.float64) < tau, np.nextafter(tau32, np.float32(np.inf)), tau32)


def codecs_used(node: Any) -> set[str]:
    if isinstance(node, dict):
        own = {node["codec"]} if isinstance(node.get("codec"), str) else set()
        return own.union(*(codecs_used(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(codecs_used(v) for v in node))
    return set()


def generate(out_dir: Path) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.safetensors"):
        old.unlink()
    entries: list[dict[str, Any]] = []
    for v in valid_vectors():
        path = write_file(out_dir / f"{v.id}.safetensors", None, [v.qt])
        expected_name = f"{v.id}.expected.safetensors"
        write_plain(out_dir / expected_name, {NAME: v.expected})
        entry = {"id": v.id, "kind": "valid", "description": v.description, "file": path.name, "sha256": sha256(path),
                 "expected": expected_name, "expected_sha256": sha256(out_dir / expected_name), "records": [NAME],
                 "plain": [], "signatures": {NAME: signature(v.qt.record["weight"])},
                 "codecs": sorted(codecs_used(v.qt.record["weight"])), "exact": v.bound is None, "options": {}}
        if v.bound is not None:
            name = f"{v.id}.tolerance.safetensors"
            write_plain(out_dir / name, {NAME: tolerance(v.expected, v.bound)})
            entry.update(tolerance=name, tolerance_sha256=sha256(out_dir / name))
        entries.append(entry)
    for inv in invalid_vectors():
        path = write_file(out_dir / f"{inv.id}.safetensors", None, [inv.qt])
        entries.append({"id": inv.id, "kind": "invalid", "description": inv.description, "file": path.name,
                        "sha256": sha256(path),
                        "error": {"code": inv.code, "stage": inv.stage, "tensor": NAME, "field": inv.field}})
    manifest = {"manifest_version": 1, "format_version": 1, "generator": "qformat_rotate.generate_vectors",
                "seed": SEED, "vectors": entries}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def check(reference: Path = VECTORS_DIR) -> list[str]:
    """Regenerate into a temp dir; return the files that differ from (or are missing in) ``reference``."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        names = sorted({p.name for p in fresh.iterdir()} | {p.name for p in reference.glob("*.safetensors")}
                       | {"manifest.json"})
        return [n for n in names if not (fresh / n).is_file() or not (reference / n).is_file()
                or not filecmp.cmp(fresh / n, reference / n, shallow=False)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=VECTORS_DIR, help="output folder (default: the package's)")
    parser.add_argument("--check", action="store_true", help="verify the vectors are reproduced byte for byte")
    args = parser.parse_args(argv)
    if args.check:
        differing = check(args.out)
        if differing:
            print("vectors differ from a fresh generation: " + ", ".join(differing), file=sys.stderr)
            return 1
        print(f"ok: {args.out} matches a fresh generation byte for byte")
        return 0
    kinds = [v["kind"] for v in generate(args.out)["vectors"]]
    print(f"wrote {kinds.count('valid')} valid and {kinds.count('invalid')} invalid vectors to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
