"""The reader against hostile files ("Hardening" issue, format layer): wrapping CSR row pointers, decode-work
amplification, lone surrogates, memory-bounded verification, and `verify` of a folder without config.json.

Files are crafted here. Whatever crashed the process before the fix (a segmentation fault, a multi-GiB allocation)
runs in a subprocess, under an address-space limit where memory is the point, so a regression fails the test instead
of killing pytest.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from qformat_conformance.generate import parts_of, qformat_meta, raw_file, raw_header

from qformat.errors import FormatError
from qformat.format import RecordBuilder, open_file, record, verify_folder, write_file
from qformat.format.codecs import CORE_CODECS, apply_tiles
from qformat.format.sparse import validate_csr

NAME = "model.layers.0.mlp.up_proj.weight"
ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, *args: str, limit_bytes: int | None = None, timeout: int = 300,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (optionally under an address-space limit); never raises on failure."""
    prelude = ""
    if limit_bytes:
        prelude = f"import resource; resource.setrlimit(resource.RLIMIT_AS, ({limit_bytes}, {limit_bytes}))\n"
    full_env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code), *args], capture_output=True,
                          text=True, timeout=timeout, env=full_env, cwd=ROOT)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """The real `qformat` entry point with real (strict UTF-8) stdout, unlike capsys."""
    return run_python("import sys\nfrom qformat.cli import main\nsys.exit(main(sys.argv[1:]))", *args,
                      env={"PYTHONIOENCODING": "utf-8"})


def run_cli_many(*commands: list[str]) -> list[tuple[int | str, str]]:
    """Several `qformat` commands in one interpreter (plugins load once): (exit code or crash, stdout) for each."""
    done = run_python("""
        import json, sys, traceback
        from qformat.cli import main
        for argv in json.loads(sys.argv[1]):
            try:
                code = main(argv)
            except BaseException as exc:  # what a user would see as a traceback
                code = "crash: " + type(exc).__name__
                traceback.print_exc()
            sys.stdout.flush()
            print(f"\\n@@@ {code}", flush=True)
        """, json.dumps([list(c) for c in commands]), env={"PYTHONIOENCODING": "utf-8"})
    assert done.returncode == 0, done.stderr[-2000:]
    pieces = re.split(r"\n@@@ ([^\n]*)\n", done.stdout)
    outputs, codes = pieces[0:-1:2], pieces[1::2]
    assert len(codes) == len(commands), done.stdout[-2000:]
    return [(int(c) if c.lstrip("-").isdigit() else c, out) for c, out in zip(codes, outputs, strict=True)]


def write_raw(path: Path, tensors: dict[str, np.ndarray], weight: dict, shape: list[int],
              info: dict | None = None) -> Path:
    """One record over ``tensors`` with correct storage_bytes, written without any validation."""
    rec: dict[str, Any] = {"shape": shape, "dtype": "F32", "storage_bytes": sum(a.nbytes for a in tensors.values()),
                           "weight": weight}
    if info is not None:
        rec["info"] = info
    path.write_bytes(parts_of(tensors, qformat_meta({NAME: rec})).to_bytes())
    return path


def tensor_node(tensors: dict[str, np.ndarray], role: str, array: np.ndarray) -> dict:
    tensors[f"{NAME}.{role}"] = array
    return {"codec": "tensor", "version": 1, "tensor": f"{NAME}.{role}"}


def lowrank(a: dict, b: dict) -> dict:
    return {"codec": "lowrank", "version": 1, "a": a, "b": b}


def make_folder(folder: Path, shard: Path, with_config: bool = True, files: bool = True) -> Path:
    """A model folder holding ``shard`` as model.safetensors, with config.json recording its checksum."""
    folder.mkdir()
    target = folder / "model.safetensors"
    target.write_bytes(shard.read_bytes())
    if with_config:
        qconfig: dict[str, Any] = {"quant_method": "qformat", "format_version": 1, "method": "test"}
        if files:
            qconfig["files"] = {target.name: {"sha256": hashlib.sha256(target.read_bytes()).hexdigest(),
                                              "size": target.stat().st_size}}
        (folder / "config.json").write_text(json.dumps({"model_type": "test", "quantization_config": qconfig}))
    return folder


def error_of(fn: Any, *args: Any, **kwargs: Any) -> FormatError:
    with pytest.raises(FormatError) as info:
        fn(*args, **kwargs)
    return info.value


# ---------------------------------------------------------------------------------------------------------------
# finding 1: a row_ptr whose differences wrap around must be rejected, not crash (SIGSEGV before the fix)

def wrapping_csr(path: Path) -> Path:
    tensors: dict[str, np.ndarray] = {f"{NAME}.row_ptr": np.array([0, (1 << 63) - 1, -2, 1], np.int64),
                                      f"{NAME}.col_idx": np.array([2], np.int32)}
    weight = {"codec": "sparse_csr", "version": 1, "row_ptr": f"{NAME}.row_ptr", "col_idx": f"{NAME}.col_idx",
              "values": tensor_node(tensors, "values", np.array([1.5], np.float32)), "shape": [3, 4]}
    return write_raw(path, tensors, weight, [3, 4])


def test_wrapping_row_ptr_is_rejected_by_every_reader(tmp_path):
    path = wrapping_csr(tmp_path / "csr.safetensors")
    folder = make_folder(tmp_path / "model", path)
    done = run_python(f"""
        import json, sys
        from qformat.errors import FormatError
        from qformat.format import open_file, open_folder, verify_folder
        name, path, folder = {NAME!r}, sys.argv[1], sys.argv[2]
        readers = {{
            "open_file.decode": lambda: open_file(path).decode(name),
            "quantized.decode": lambda: open_file(path).quantized(name).decode(),
            "folder.decode": lambda: open_folder(folder).decode(name),
            "verify_folder": lambda: verify_folder(folder),
        }}
        try:
            from qformat_kernels.numba_plugin import NumbaKernel
            readers["numba"] = lambda: NumbaKernel().prepare(open_file(path).quantized(name), "cpu").dequantize()
            from qformat_kernels.triton_plan import plan
            readers["triton_plan"] = lambda: plan(open_file(path).quantized(name))
        except ImportError as exc:
            print("kernels not importable:", exc, file=sys.stderr)
        codes = {{}}
        for what, read in readers.items():
            try:
                read()
                codes[what] = "accepted"
            except FormatError as exc:
                codes[what] = [exc.code, exc.field]
        print(json.dumps(codes))
        """, str(path), str(folder))
    assert done.returncode == 0, f"reader crashed (rc {done.returncode}): {done.stderr[-2000:]}"
    codes = json.loads(done.stdout.strip().splitlines()[-1])
    assert {"open_file.decode", "quantized.decode", "folder.decode", "verify_folder", "numba"} <= set(codes)
    for what, got in codes.items():
        assert got[0] == "bad_index" and got[1].endswith("row_ptr"), (what, got)


def test_wrapping_row_ptr_through_the_cli(tmp_path):
    folder = make_folder(tmp_path / "model", wrapping_csr(tmp_path / "csr.safetensors"))
    (deep_code, deep), (shallow_code, shallow) = run_cli_many(["verify", str(folder)],
                                                              ["verify", "--shallow", str(folder)])
    assert deep_code == 1 and "[bad_index]" in deep, deep
    assert shallow_code == 0 and "data not decoded" in shallow, shallow  # row_ptr is data: checked on decode


CSR_CASES = [  # (row_ptr, nnz, cols, col_idx, expected code or None)
    ([0, (1 << 63) - 1, -2, 1], 1, 4, [2], "bad_index"),  # diffs wrap to 2^63-1, 2^63-1, 3
    ([0, -(1 << 63), 0, 1], 1, 4, [2], "bad_index"),
    ([0, 5, 1], 1, 4, [2], "bad_index"),  # above nnz in the middle
    ([0, 1, 0, 1], 1, 4, [2], "bad_index"),
    ([1, 1], 1, 4, [2], "bad_index"),
    ([0, 0], 1, 4, [2], "bad_index"),  # ends below nnz
    ([0, 2], 2, 4, [3, 1], "bad_index"),  # columns not increasing within the row
    ([0, 1, 2], 2, 4, [3, 1], None),  # the same columns in two rows are fine
    ([0, 1], 1, 4, [4], "index_out_of_range"),
    ([0, 0, 0, 0], 0, 4, [], None),
    ([0, 2, 2, 3], 3, 4, [0, 3, 1], None),
]


def test_shared_csr_validator():
    """Runs in a subprocess: a validator that did arithmetic before comparing would crash in rows_of."""
    done = run_python(f"""
        import json
        import numpy as np
        from qformat.format.sparse import validate_csr
        out = []
        for ptr, nnz, cols, idx, _ in {CSR_CASES!r}:
            def fail(code, message, fld):
                return ValueError(code, fld)
            try:
                rows = validate_csr(np.array(ptr, np.int64), np.array(idx, np.int32), cols, fail)
                out.append([None, rows.tolist()])
            except ValueError as exc:
                out.append(list(exc.args))
        print(json.dumps(out))
        """)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout)
    for (ptr, _, _, _, code), (got, detail) in zip(CSR_CASES, results, strict=True):
        assert got == code, (ptr, got, detail)
    assert results[-1] == [None, [0, 0, 2]]


def test_kernels_call_the_shared_validator():
    """Both kernel families read records through the one lowering, which validates CSR with the shared validator."""
    text = (ROOT / "qformat/lowering.py").read_text()
    assert "validate_csr(" in text and "np.diff(ptr)" not in text
    for source in ("kernels/numba_prepared.py", "kernels/triton_plan.py"):
        text = (ROOT / source).read_text()
        assert "lower(" in text and "np.diff(ptr)" not in text, source
    row_of = validate_csr(np.array([0, 1, 3], np.int32), np.array([5, 0, 2], np.uint16), 6,
                          lambda code, message, fld: FormatError(code, message, field=fld))
    assert row_of.tolist() == [0, 1, 1]


# ---------------------------------------------------------------------------------------------------------------
# finding 2: decode work is bounded at open (every node, every use); groups never expand with group_shape

def grouped_record(group: tuple[int, int], rows: int = 4, cols: int = 40, seed: int = 0) -> Any:
    rng = np.random.default_rng(seed)
    grid = (-(-rows // group[0]), -(-cols // group[1]))
    b = RecordBuilder(NAME, (rows, cols))
    node = b.affine(b.packed("codes", rng.integers(0, 16, (rows, cols)), 4),
                    scale=b.tensor("scale", (rng.random(grid) + 0.5).astype(np.float16)),
                    zero=b.tensor("zero", rng.integers(0, 16, grid).astype(np.float16)), bits=4, group_shape=group)
    return b.finish(node)


def test_groups_larger_than_the_output_cost_nothing(tmp_path):
    """[2^39, 16] over 4 rows is one tile of rows: the same weight as [4, 16], decoded in a 1 GiB address space
    (the old decoder repeated the parameters 2^39 times)."""
    paths = []
    for i, group in enumerate([(4, 16), (1 << 28, 16), (1 << 39, 16), (1 << 39, (1 << 40) - 1)]):
        qt = grouped_record(group, seed=1 if group[1] > 40 else 0)
        paths.append(str(write_file(tmp_path / f"g{i}.safetensors", quantized=[qt])))
    done = run_python(f"""
        import sys
        import numpy as np
        from qformat.format import open_file, verify_folder
        weights = []
        for path in sys.argv[1:]:
            verify_folder(path)
            weights.append(open_file(path).decode({NAME!r}))
        assert np.array_equal(weights[0], weights[1]) and np.array_equal(weights[0], weights[2])
        assert weights[3].shape == (4, 40)
        print("ok")
        """, *paths, limit_bytes=1 << 30)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.parametrize("entry", [1 << 40, 1 << 63, 1 << 64, 10 ** 30])
def test_dims_entries_must_be_below_2_40(tmp_path, entry):
    """Numbers numpy cannot hold (OverflowError) or allocate for (MemoryError) are a FormatError at open."""
    qt = grouped_record((4, 16))
    qt.record["weight"]["group_shape"] = [entry, 16]
    path = write_file(tmp_path / "g.safetensors", quantized=[qt])
    exc = error_of(open_file, path)
    assert (exc.code, exc.field, exc.tensor) == ("bad_field", "weight/group_shape", NAME)
    qt = grouped_record((4, 16))
    qt.record["weight"]["codes"]["shape"] = [4, entry]
    exc = error_of(open_file, write_file(tmp_path / "s.safetensors", quantized=[qt]))
    assert (exc.code, exc.field) == ("bad_field", "weight/codes/shape")


def test_a_half_mib_lowrank_asking_for_64_gib_is_refused_at_open(tmp_path):
    n = 1 << 17
    tensors: dict[str, np.ndarray] = {}
    weight = lowrank(tensor_node(tensors, "a", np.ones((n, 1), np.float16)),
                     tensor_node(tensors, "b", np.ones((1, n), np.float16)))
    path = write_raw(tmp_path / "lr.safetensors", tensors, weight, [n, n])
    assert path.stat().st_size < 600_000
    exc = error_of(open_file, path)
    assert (exc.code, exc.tensor, exc.field) == ("limit_exceeded", NAME, "weight")
    assert "per byte" in exc.message
    assert error_of(verify_folder, path, deep=False).code == "limit_exceeded"  # --shallow catches it too
    shallow = run_cli("verify", "--shallow", str(path))
    assert shallow.returncode == 1 and "[limit_exceeded]" in shallow.stdout


def test_an_inner_node_larger_than_the_record_counts(tmp_path):
    """A [2^17, 1] record whose factor `a` is a 2^17 x 2^16 product: 32 GiB of fp32 intermediate from ~6 MiB."""
    tensors: dict[str, np.ndarray] = {}
    inner = lowrank(tensor_node(tensors, "x", np.ones((1 << 17, 16), np.float16)),
                    tensor_node(tensors, "y", np.ones((16, 1 << 16), np.float16)))
    weight = lowrank(inner, tensor_node(tensors, "z", np.ones((1 << 16, 1), np.float16)))
    path = write_raw(tmp_path / "inner.safetensors", tensors, weight, [1 << 17, 1])
    assert path.stat().st_size < 8 << 20
    exc = error_of(open_file, path)
    assert (exc.code, exc.field) == ("limit_exceeded", "weight/a")


def test_every_use_of_a_tensor_counts(tmp_path):
    m = 2048
    tensors: dict[str, np.ndarray] = {}
    term = lowrank(tensor_node(tensors, "a", np.ones((m, 1), np.uint8)),
                   tensor_node(tensors, "b", np.ones((1, m), np.uint8)))
    once = write_raw(tmp_path / "once.safetensors", dict(tensors), term, [m, m])
    assert open_file(once).records  # 2^22 elements: under the 2^24 exemption
    weight = {"codec": "sum", "version": 1, "terms": [copy.deepcopy(term) for _ in range(64)]}
    path = write_raw(tmp_path / "many.safetensors", tensors, weight, [m, m])
    exc = error_of(open_file, path)
    assert (exc.code, exc.field) == ("limit_exceeded", "weight/terms[0]")


def test_the_absolute_work_cap():
    """Over 2^36 elements of work is refused whatever the storage (4 terms of 2^34 elements and their sum)."""
    def info(key: str) -> Any:
        from qformat.format import TensorInfo
        return TensorInfo("F16", (1 << 17, 1 << 17), 1 << 35)

    term = {"codec": "tensor", "version": 1, "tensor": f"{NAME}.w"}
    rec = {"shape": [1 << 17, 1 << 17], "dtype": "F32", "storage_bytes": 1 << 35,
           "weight": {"codec": "sum", "version": 1, "terms": [term] * 4}}
    exc = error_of(record.validate_record, NAME, rec, info)
    assert exc.code == "limit_exceeded" and "2^36" not in exc.message and str(1 << 36) in exc.message
    rec["weight"]["terms"] = [term] * 3
    assert record.validate_record(NAME, rec, info)  # 4 * 2^34 = 2^36: at the cap, allowed


def decode_work(qt: Any) -> tuple[int, int]:
    ctx = qt.context(CORE_CODECS)
    ctx.infer(qt.record["weight"], "weight")
    return ctx.work, qt.record["storage_bytes"]


@pytest.mark.parametrize("method,params", [
    ("rtn", {"bits": 2, "group_size": 32}), ("rtn", {"bits": 4, "group_size": 128}),
    ("rtn", {"bits": 8, "group_size": -1}), ("gptq", {"bits": 2, "group_size": 16}),
    ("gptq", {"bits": 4, "group_size": 128}), ("spqr", {"bits": 2}),
    ("spqr", {"bits": 3, "qq_groupsize": 1024, "outlier_threshold": 0.05}),  # groups of 1024 rows over 96 rows
])
def test_builtin_methods_stay_far_below_the_work_limit(method, params):
    torch = pytest.importorskip("torch")
    from qformat.methods import LayerInput
    from qformat.plugins import get_method

    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 320, generator=gen)
    x = torch.randn(512, 320, generator=gen)
    qt = get_method(method).quantize(LayerInput("blk.fc.weight", weight, "BF16", x.T @ x / 512), params)
    work, stored = decode_work(qt)
    assert work <= record.MAX_EXPANSION // 4 * stored, (work, stored)  # a 4x margin below the limit
    assert qt.decode().shape == (96, 320)


def test_apply_tiles_matches_an_explicit_expansion(rng):
    for rows, cols, gr, gc, first in [(7, 10, 3, 4, 0), (7, 10, 3, 4, 5), (5, 9, 1, 9, 0), (6, 8, 100, 3, 2),
                                      (4, 12, 2, 12, 1), (3, 5, 1, 1, 0), (9, 7, 4, 50, 7)]:
        total = first + rows
        grid = (-(-total // gr), -(-cols // gc))
        params = rng.standard_normal(grid).astype(np.float32)
        expanded = params[np.arange(total)[:, None] // gr, np.arange(cols)[None, :] // gc][first:]
        values = rng.standard_normal((rows, cols)).astype(np.float32)
        want = values * expanded
        got = values.copy()
        apply_tiles(got, params[first // gr:(total - 1) // gr + 1], (gr, gc), first, np.multiply)
        assert np.array_equal(got, want), (rows, cols, gr, gc, first)


# ---------------------------------------------------------------------------------------------------------------
# finding 3: lone surrogates are a clean bad_header, and the CLI prints whatever it is given

def surrogate_files(tmp_path: Path) -> dict[str, Path]:
    plain = parts_of({"a\ud800": np.arange(4, dtype=np.float32)}, {"format": "pt"})
    qt = grouped_record((1, 16))
    rec = {**copy.deepcopy(qt.record), "info": {"note": "\ud800"}}
    inner = json.dumps({"format_version": 1, "records": {NAME: rec}}, ensure_ascii=False)
    tensors = {k: np.array(v) for k, v in qt.tensors.items()}
    files = {"tensor_name": plain.to_bytes(),
             "metadata_string": parts_of(tensors, {"format": "pt", "qformat": inner}).to_bytes(),
             "record_info": parts_of(tensors, qformat_meta({NAME: rec})).to_bytes(),
             "metadata_key": raw_file(raw_header([("__metadata__", {"\ud800": "x"})]), b""),
             "encoded": raw_file(raw_header([("__metadata__", {"format": "pt"})]).replace(b"pt", b"\xed\xa0\x80"),
                                 b"")}
    out = {}
    for what, data in files.items():
        out[what] = tmp_path / f"{what}.safetensors"
        out[what].write_bytes(data)
    return out


def test_lone_surrogates_are_a_bad_header(tmp_path):
    for what, path in surrogate_files(tmp_path).items():
        exc = error_of(open_file, path)
        assert exc.code == "bad_header", what
        str(exc).encode("utf-8")  # the message itself prints anywhere


def test_inspect_and_verify_print_without_unicode_errors(tmp_path):
    odd = tmp_path / os.fsdecode(b"w\xff.safetensors")  # a path that is not UTF-8: decoded with a lone surrogate
    write_file(odd, quantized=[grouped_record((1, 16))])
    bad = [str(p) for p in surrogate_files(tmp_path).values()]
    commands = [[*cmd, path] for path in bad for cmd in (["inspect"], ["inspect", "--json"], ["verify"],
                                                         ["verify", "--json"])]
    commands += [["verify", str(odd)], ["inspect", str(odd)]]
    results = run_cli_many(*commands)
    for command, (code, out) in zip(commands, results, strict=True):
        expected = 0 if command[-1] == str(odd) else 1
        assert code == expected, (command, code, out[-500:])
        if expected:
            assert "bad_header" in out or command[0] == "inspect", (command, out)
    assert "\\udcff" in results[-2][1]


def test_writer_refuses_names_that_are_not_unicode(tmp_path):
    exc = error_of(write_file, tmp_path / "w.safetensors", {"a\ud800": np.zeros(2, np.float32)})
    assert exc.code == "bad_tensor_name" and exc.tensor == "a\\ud800"
    qt = grouped_record((1, 16))
    qt.name = "w\udc80"
    assert error_of(write_file, tmp_path / "w.safetensors", quantized=[qt]).code == "bad_tensor_name"
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------------------------
# finding 4: deep verification in memory bounded by one row range, decoding in about the result's size

def big_affine_file(path: Path, rows: int, cols: int, group: int = 128) -> Path:
    """A 4-bit g128 affine record written directly (random bytes are valid 4-bit codes without padding)."""
    rng = np.random.default_rng(0)
    b = RecordBuilder(NAME, (rows, cols), "BF16")
    codes = {"codec": "packed", "version": 1, "bits": 4, "shape": [rows, cols],
             "tensor": b.store("codes", rng.integers(0, 256, (rows, cols // 2), dtype=np.uint8))}
    grid = (rows, cols // group)
    node = b.affine(codes, scale=b.tensor("scale", (rng.random(grid) * 0.01 + 1e-3).astype(np.float16)),
                    zero=b.packed("zero", rng.integers(0, 16, grid), 4), bits=4, group_shape=(1, group))
    return write_file(path, quantized=[b.finish(node)])


def peak_rss_mib(what: str, path: Path) -> float:
    """Peak RSS added by ``what`` (verify or decode) in a fresh interpreter, over its state after the imports."""
    done = run_python(f"""
        import resource, sys
        import numpy as np
        from qformat.format import open_file, verify_folder
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if sys.argv[1] == "verify":
            verify_folder(sys.argv[2])
        else:
            weight = open_file(sys.argv[2]).decode({NAME!r})
            assert weight.dtype == np.float32
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
        """, what, str(path))
    assert done.returncode == 0, done.stderr[-2000:]
    return float(done.stdout.strip())


def test_deep_verify_and_decode_memory(tmp_path):
    rows, cols = 2048, 8192  # fp32 weight: 64 MiB; the old decoder peaked near 47 bytes per weight (~750 MiB)
    path = big_affine_file(tmp_path / "big.safetensors", rows, cols)
    fp32_mib = rows * cols * 4 / 2 ** 20
    stored_mib = path.stat().st_size / 2 ** 20  # mapped while its record is checked
    verify = peak_rss_mib("verify", path)
    decode = peak_rss_mib("decode", path)
    assert verify < stored_mib + 32, f"verify added {verify:.0f} MiB"
    assert decode < 1.25 * fp32_mib + stored_mib + 16, f"decode added {decode:.0f} MiB for a {fp32_mib:.0f} MiB weight"


TREES = [  # (shape, builder) covering every codec's row-range path, with ragged tiles and groups over the edge
    "affine_tiles", "affine_stats", "lut_tiles", "lut_global", "scale_ternary", "vq", "sparse_sum_permute",
    "lowrank", "sign_lowrank", "bitplanes", "concat_permute",
]


def build_tree(kind: str, rng: np.random.Generator) -> Any:
    rows, cols = 37, 52
    b = RecordBuilder(NAME, (rows, cols))
    f16 = lambda *shape: rng.standard_normal(shape).astype(np.float16)  # noqa: E731
    if kind == "affine_tiles":
        node = b.affine(b.packed("c", rng.integers(0, 32, (rows, cols)), 5), scale=b.tensor("s", f16(8, 4)),
                        zero=b.tensor("z", f16(8, 4)), bits=5, group_shape=(5, 14))
    elif kind == "affine_stats":
        stats = b.affine(b.packed("sc", rng.integers(0, 8, (rows, 4)), 3), scale=b.tensor("ss", f16(3, 1)),
                         zero=1.5, bits=3, group_shape=(16, 64))
        node = b.affine(b.packed("c", rng.integers(0, 8, (rows, cols)), 3), scale=stats, bits=3,
                        group_shape=(1, 13))
    elif kind == "lut_tiles":
        node = b.lut(b.packed("c", rng.integers(0, 8, (rows, cols)), 3), b.tensor("t", f16(4, 2, 8)),
                     group_shape=(10, 30))
    elif kind == "lut_global":
        node = b.scale(b.lut(b.packed("c", rng.integers(0, 16, (rows, cols)), 4), b.tensor("t", f16(16))),
                       b.tensor("f", f16(1, 1)), group_shape=(rows, cols))
    elif kind == "scale_ternary":
        node = b.scale(b.ternary("t", rng.integers(-1, 2, (rows, cols))), b.tensor("f", f16(rows, 1)),
                       group_shape=(1, 1000))
    elif kind == "vq":
        node = b.vq(b.packed("c", rng.integers(0, 16, (rows, cols // 4 * 2)), 4), b.tensor("cb", f16(2, 16, 4)))
    elif kind == "sparse_sum_permute":
        dense = np.where(rng.random((rows, cols)) < 0.1, f16(rows, cols), 0).astype(np.float16)
        dense[3] = 0
        base = b.affine(b.packed("c", rng.integers(0, 4, (rows, cols)), 2), scale=0.25, zero=1.5, bits=2,
                        group_shape=(1, 1))
        node = b.permute(b.sum([base, b.sparse_from_dense("o", dense), b.tensor("r", f16(rows, cols))]),
                         rng.permutation(cols))
    elif kind == "lowrank":
        node = b.sum([b.tensor("w", f16(rows, cols)), b.lowrank(b.tensor("a", f16(rows, 3)), b.tensor("b", f16(3, cols)))])
    elif kind == "sign_lowrank":
        node = b.sign_lowrank(b.packed("s", rng.integers(0, 2, (rows, cols)), 1), b.tensor("u", f16(rows, 2)),
                              b.tensor("v", f16(2, cols)))
    elif kind == "concat_permute":  # SliM-LLM: column blocks at 2 and 4 bits, ragged groups, permuted back
        parts = [b.affine(b.packed(f"c{k}", rng.integers(0, 1 << k, (rows, n)), k), scale=b.tensor(f"s{k}", f16(rows, 2)),
                          zero=1.5, bits=k, group_shape=(1, 16)) for k, n in ((2, 30), (4, 22))]
        node = b.permute(b.concat(parts), rng.permutation(cols))
    else:
        node = b.affine(b.bitplanes("p", rng.integers(0, 8, (rows, cols)), 3), scale=b.tensor("s", f16(rows, 1)),
                        bits=3, group_shape=(1, cols))
    return b.finish(node)


@pytest.mark.parametrize("kind", TREES)
def test_row_ranges_decode_bit_identically(monkeypatch, tmp_path, kind):
    qt = build_tree(kind, np.random.default_rng(TREES.index(kind)))
    path = write_file(tmp_path / "t.safetensors", quantized=[qt])
    qfile = open_file(path)
    whole = qfile.decode(NAME)
    planes = qfile.decode(NAME, use_planes=1)
    for chunk in (1, 7, 100, 52 * 5):
        monkeypatch.setattr(record, "CHUNK_ELEMENTS", chunk)
        got = qfile.decode(NAME)
        assert np.array_equal(got.view(np.uint32), whole.view(np.uint32)), (kind, chunk)
        assert np.array_equal(qfile.decode(NAME, use_planes=1).view(np.uint32), planes.view(np.uint32))
        qfile.check(NAME)
    assert np.array_equal(qt.decode().view(np.uint32), whole.view(np.uint32))


def test_row_ranges_still_find_data_errors_in_every_range(monkeypatch, tmp_path):
    monkeypatch.setattr(record, "CHUNK_ELEMENTS", 52)
    qt = build_tree("sparse_sum_permute", np.random.default_rng(0))
    idx = qt.tensors[f"{NAME}.o.col_idx"].copy()
    idx[-1] = 52  # in the last row that holds outliers
    qt.tensors[f"{NAME}.o.col_idx"] = idx
    path = write_file(tmp_path / "t.safetensors", quantized=[qt])
    for action in (lambda f: f.decode(NAME), lambda f: f.check(NAME)):
        exc = error_of(action, open_file(path))
        assert (exc.code, exc.field) == ("index_out_of_range", "weight/input/terms[1]/col_idx")


def test_decoded_stored_tensors_are_never_overwritten():
    """In-place arithmetic only touches arrays the decoder made: the caller's tensors stay as they were."""
    b = RecordBuilder(NAME, (6, 8))
    w = np.arange(48, dtype=np.float32).reshape(6, 8)
    qt = b.finish(b.scale(b.sum([b.tensor("w", w), b.tensor("r", np.ones((6, 8), np.float32))]),
                          b.tensor("f", np.full((6, 1), 2, np.float32)), group_shape=(1, 8)))
    kept = {k: v.copy() for k, v in qt.tensors.items()}
    np.testing.assert_array_equal(qt.decode(), (w + 1) * 2)
    for key, value in kept.items():
        np.testing.assert_array_equal(qt.tensors[key], value)


# ---------------------------------------------------------------------------------------------------------------
# verify without config.json says so; a single file says it has no checksums

def test_verify_of_a_folder_without_config_names_the_missing_file(tmp_path):
    folder = make_folder(tmp_path / "model", write_file(tmp_path / "x.safetensors", quantized=[grouped_record((1, 16))]),
                         with_config=False)
    exc = error_of(verify_folder, folder)
    assert exc.code == "bad_config" and exc.file == str(folder / "config.json") and "no config.json" in exc.message
    done = run_cli("verify", str(folder))
    assert done.returncode == 1 and "[bad_config]" in done.stdout and "checksum_mismatch" not in done.stdout


def test_verify_of_a_folder_whose_config_has_no_files(tmp_path):
    shard = write_file(tmp_path / "x.safetensors", quantized=[grouped_record((1, 16))])
    exc = error_of(verify_folder, make_folder(tmp_path / "model", shard, files=False))
    assert (exc.code, exc.field) == ("bad_config", "quantization_config.files")


def test_verify_of_a_single_file_says_no_checksums_were_available(tmp_path):
    path = write_file(tmp_path / "x.safetensors", quantized=[grouped_record((1, 16))])
    summary = verify_folder(path)
    assert summary["checksums_available"] is False and summary["checksums_verified"] == 0
    assert verify_folder(make_folder(tmp_path / "model", path))["checksums_available"] is True
    done = run_cli("verify", str(path))
    assert done.returncode == 0 and "no checksums to verify" in done.stdout and "checksums," not in done.stdout


@pytest.mark.parametrize("shard", ["A" * 300, "a\0b"])
def test_index_naming_a_shard_that_cannot_exist(tmp_path, shard):
    """A name too long for the file system, or with a NUL, is a FormatError, not an OSError or ValueError."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": shard}}))
    assert error_of(verify_folder, folder).code in ("missing_shard", "bad_index")


def test_an_empty_tensor_with_huge_dims_is_a_bad_header(tmp_path):
    """Zero bytes, but numpy cannot even make the empty array: a ValueError before the shape rule."""
    p = parts_of({"a": np.arange(4, dtype=np.float32)}, {"format": "pt"})
    p.entries.append(("empty", {"dtype": "F32", "shape": [(1 << 40) - 1, 0, (1 << 40) - 1],
                                "data_offsets": [len(p.data), len(p.data)]}))
    path = tmp_path / "e.safetensors"
    path.write_bytes(p.to_bytes())
    exc = error_of(open_file, path)
    assert (exc.code, exc.tensor, exc.field) == ("bad_header", "empty", "shape")
    p.entries[-1][1]["shape"] = [(1 << 40) - 1, 0, 1 << 20]  # 2^62 bytes: representable
    path.write_bytes(p.to_bytes())
    assert open_file(path).tensor("empty").shape == ((1 << 40) - 1, 0, 1 << 20)


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_an_index_that_is_not_a_regular_file_is_refused_at_once(tmp_path, kind):
    """A FIFO would block the reader forever and a link to /dev/zero would be read without end (st_size is 0):
    both are `unreadable`, in a child process with a timeout so a regression fails instead of hanging pytest."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "qformat",
                                                                            "format_version": 1}}))
    index = folder / "model.safetensors.index.json"
    if kind == "fifo":
        os.mkfifo(index)
    else:
        os.symlink("/dev/zero", index)
    code = textwrap.dedent(f"""
        from qformat.errors import FormatError
        from qformat.format import open_folder
        try:
            open_folder({str(folder)!r})
        except FormatError as exc:
            print(exc.code)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "unreadable", result.stderr[-2000:]


def test_a_valid_record_too_big_for_this_machine_is_a_clean_error(tmp_path):
    """A 4 MiB lowrank record legally asks for 4 GiB (within the decode-work limit): under a 1 GiB address-space cap,
    decoding it is a ResourceError naming the tensor, while checking it (verify) runs in bounded memory."""
    rng = np.random.default_rng(0)
    builder = RecordBuilder("model.layers.0.mlp.up_proj.weight", (4096, 262144))
    node = builder.lowrank(builder.tensor("a", rng.standard_normal((4096, 4)).astype(np.float32)),
                           builder.tensor("b", rng.standard_normal((4, 262144)).astype(np.float32)))
    path = tmp_path / "model.safetensors"
    write_file(path, quantized=[builder.finish(node)])
    code = textwrap.dedent(f"""
        import resource
        from qformat.errors import ResourceError
        from qformat.format import open_file
        qfile = open_file({str(path)!r})
        qfile.check("model.layers.0.mlp.up_proj.weight")  # bounded: row ranges, products split
        mapped = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize"))
        resource.setrlimit(resource.RLIMIT_AS, (mapped + (1 << 30),) * 2)  # 1 GiB more than mapped now
        try:
            qfile.decode("model.layers.0.mlp.up_proj.weight")
        except ResourceError as exc:
            print("resource:", exc)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.startswith("resource: not enough memory to decode 'model.layers.0.mlp.up_proj.weight'"), \
        result.stderr[-2000:]
