"""Safetensors files: a reader that survives hostile input, a writer that is deterministic and atomic, mmap reads."""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import make_affine_record
from qformat_conformance.generate import Parts, parts_of, raw_file, raw_header

from qformat.errors import FormatError
from qformat.format import open_file, sha256_file, write_file
from qformat.format import safetensors_io as stio

PLAIN = {"a": np.arange(4, dtype=np.float32), "b": np.arange(3, dtype=np.int16)}


def write_bytes(tmp_path: Path, data: bytes, name: str = "f.safetensors") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def error_of(path: Path) -> FormatError:
    with pytest.raises(FormatError) as info:
        open_file(path)
    assert info.value.file == str(path)
    return info.value


def edited_plain(**changes) -> bytes:
    """PLAIN with the entry of tensor b changed."""
    p = parts_of(PLAIN, {"format": "pt"})
    entries = [(k, {**v, **changes} if k == "b" else v) for k, v in p.entries]
    return Parts(entries, p.data).to_bytes()


# -- reader robustness ------------------------------------------------------------------------------------------

def test_reads_what_the_safetensors_package_writes(tmp_path):
    from safetensors.numpy import save_file

    save_file(dict(PLAIN), str(tmp_path / "p.safetensors"), metadata={"k": "v"})
    qfile = open_file(tmp_path / "p.safetensors")
    assert qfile.records == {} and sorted(qfile.plain_names) == ["a", "b"]
    np.testing.assert_array_equal(qfile.tensor("a"), PLAIN["a"])
    assert qfile.st.metadata == {"k": "v"}


def test_the_safetensors_package_reads_what_we_write(tmp_path, affine_record):
    from safetensors.numpy import load_file

    path = write_file(tmp_path / "q.safetensors", PLAIN, [affine_record])
    loaded = load_file(str(path))
    np.testing.assert_array_equal(loaded["a"], PLAIN["a"])
    for name, array in affine_record.tensors.items():
        np.testing.assert_array_equal(loaded[name], array)


@pytest.mark.parametrize("cut", [0, 3, 7, 8, 20, -1, -4])
def test_truncated_files(tmp_path, affine_record, cut):
    full = write_file(tmp_path / "full.safetensors", PLAIN, [affine_record]).read_bytes()
    exc = error_of(write_bytes(tmp_path, full[:cut]))
    # under 8 bytes or a short data section: truncated; a header running past the end: bad_header
    assert exc.code == ("truncated" if cut < 8 else "bad_header"), str(exc)


def test_huge_header_length_is_refused_without_reading(tmp_path):
    # A sparse 200 MB file whose header claims 150 MB: beyond the 100 MiB limit, so refused before allocation.
    path = tmp_path / "sparse.safetensors"
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", 150 * 1024 * 1024))
        handle.truncate(200 * 1024 * 1024)
    exc = error_of(path)
    assert exc.code == "bad_header" and "limit" in exc.message


@pytest.mark.parametrize("header", [b"{nope}", b"\xff\xfe{}", b"[1, 2]", b"\"text\"", b"{\"a\": 1}", b"null"])
def test_headers_that_are_not_a_tensor_object(tmp_path, header):
    exc = error_of(write_bytes(tmp_path, raw_file(header, b"")))
    assert exc.code == "bad_header"


def test_duplicate_tensor_names(tmp_path):
    p = parts_of(PLAIN, None)
    dup = Parts(p.entries + [("a", p.entry("a"))], p.data)
    exc = error_of(write_bytes(tmp_path, dup.to_bytes()))
    assert exc.code == "duplicate_name" and exc.tensor == "a"


def test_duplicate_keys_in_the_qformat_metadata(tmp_path):
    meta = '{"format_version":1,"format_version":1,"records":{}}'
    exc = error_of(write_bytes(tmp_path, parts_of(PLAIN, {"qformat": meta}).to_bytes()))
    assert exc.code == "duplicate_name"


@pytest.mark.parametrize("changes,code,fld", [
    ({"dtype": "F8_E4M3"}, "bad_dtype", "dtype"),
    ({"dtype": "int16"}, "bad_dtype", "dtype"),
    ({"shape": [1.5]}, "bad_header", "shape"),
    ({"shape": [True, 3]}, "bad_header", "shape"),
    ({"shape": [1 << 40]}, "bad_header", "shape"),
    ({"shape": "3"}, "bad_header", "shape"),
    ({"data_offsets": [22, 16]}, "bad_header", "data_offsets"),
    ({"data_offsets": [16]}, "bad_header", "data_offsets"),
    ({"data_offsets": [-2, 4]}, "bad_header", "data_offsets"),
    ({"shape": [4]}, "shape_mismatch", "data_offsets"),
    ({"data_offsets": [16, 24]}, "shape_mismatch", "data_offsets"),
])
def test_bad_tensor_entries(tmp_path, changes, code, fld):
    exc = error_of(write_bytes(tmp_path, edited_plain(**changes)))
    assert (exc.code, exc.tensor, exc.field) == (code, "b", fld), str(exc)


def test_entry_missing_a_key(tmp_path):
    p = parts_of(PLAIN, None)
    entries = [(k, {kk: vv for kk, vv in v.items() if kk != "dtype"} if k == "b" else v) for k, v in p.entries]
    exc = error_of(write_bytes(tmp_path, Parts(entries, p.data).to_bytes()))
    assert (exc.code, exc.tensor) == ("bad_header", "b")


def test_offsets_overlap_hole_and_trailing_bytes(tmp_path):
    p = parts_of(PLAIN, None)
    overlap = [(k, {**v, "data_offsets": [10, 16]} if k == "b" else v) for k, v in p.entries]
    assert error_of(write_bytes(tmp_path, Parts(overlap, p.data[:16]).to_bytes())).code == "bad_offsets"
    hole = [(k, {**v, "data_offsets": [18, 24]} if k == "b" else v) for k, v in p.entries]
    assert error_of(write_bytes(tmp_path, Parts(hole, p.data[:16] + b"xx" + p.data[16:]).to_bytes())).code \
        == "bad_offsets"
    assert error_of(write_bytes(tmp_path, Parts(p.entries, p.data + b"x").to_bytes())).code == "bad_offsets"
    assert error_of(write_bytes(tmp_path, Parts(p.entries, p.data[:-1]).to_bytes())).code == "truncated"


def test_json_has_no_nan_or_infinity_literals(tmp_path):
    meta = '{"format_version":1,"records":{"w":{"shape":[1,1],"dtype":"F32","storage_bytes":0,"weight":NaN}}}'
    exc = error_of(write_bytes(tmp_path, parts_of(PLAIN, {"qformat": meta}).to_bytes()))
    assert exc.code == "bad_header"


def test_metadata_must_map_strings_to_strings(tmp_path):
    exc = error_of(write_bytes(tmp_path, parts_of(PLAIN, {"qformat": {"format_version": 1}}).to_bytes()))
    assert (exc.code, exc.field) == ("bad_header", "__metadata__")


@pytest.mark.parametrize("meta,code", [
    ({"format_version": 2, "records": {}}, "unsupported_format_version"),
    ({"records": {}}, "unsupported_format_version"),
    ({"format_version": 1}, "bad_header"),
    ({"format_version": 1, "records": []}, "bad_header"),
    ({"format_version": 1, "records": {}, "extra": 1}, "bad_header"),
    ([1], "bad_header"),
])
def test_qformat_metadata_object(tmp_path, meta, code):
    exc = error_of(write_bytes(tmp_path, parts_of(PLAIN, {"qformat": json.dumps(meta)}).to_bytes()))
    assert exc.code == code


def test_qformat_metadata_size_limit(tmp_path, monkeypatch):
    from qformat.format import qfile

    monkeypatch.setattr(qfile, "MAX_METADATA_BYTES", 1000)
    meta = json.dumps({"format_version": 1, "records": {}, "pad": "x" * 1000})
    exc = error_of(write_bytes(tmp_path, parts_of(PLAIN, {"qformat": meta}).to_bytes()))
    assert exc.code == "limit_exceeded"


def test_record_name_that_is_also_a_tensor(tmp_path, affine_record):
    path = write_bytes(tmp_path, parts_of({**PLAIN, **affine_record.tensors, affine_record.name: PLAIN["a"]},
                                          {"qformat": json.dumps({"format_version": 1, "records": {
                                              affine_record.name: affine_record.record}})}).to_bytes())
    exc = error_of(path)
    assert (exc.code, exc.tensor) == ("duplicate_name", affine_record.name)


def test_missing_file_is_unreadable(tmp_path):
    exc = error_of(tmp_path / "absent.safetensors")
    assert exc.code == "unreadable"


def test_zero_sized_tensors(tmp_path):
    path = write_file(tmp_path / "z.safetensors", {"empty": np.zeros((0, 3), np.float32), "x": np.ones(2, np.int8)})
    qfile = open_file(path)
    assert qfile.tensor("empty").shape == (0, 3)
    np.testing.assert_array_equal(qfile.tensor("x"), [1, 1])


# -- reading is memory-mapped -------------------------------------------------------------------------------------

def test_tensors_are_read_only_views_of_the_mapped_file(tmp_path, affine_record):
    path = write_file(tmp_path / "m.safetensors", PLAIN, [affine_record])
    qfile = open_file(path)
    codes = qfile.tensor(f"{affine_record.name}.codes")
    base = codes
    while base is not None and not isinstance(base, (np.memmap, mmap.mmap)):
        base = base.base
    assert base is not None, "the tensor is a copy, not a view of the mapped file"
    assert not codes.flags.writeable
    np.testing.assert_array_equal(codes, affine_record.tensors[f"{affine_record.name}.codes"])


def test_layout_aligns_every_tensor(tmp_path):
    tensors = {"u8": np.ones(3, np.uint8), "f64": np.ones(2, np.float64), "f16": np.ones(5, np.float16),
               "i32": np.ones(1, np.int32)}
    path = write_file(tmp_path / "a.safetensors", tensors)
    st = open_file(path).st
    assert st.data_start % 8 == 0
    for entry in st.entries.values():
        assert entry.begin % np.dtype(stio.NUMPY_BY_NAME[entry.dtype]).itemsize == 0


# -- deterministic bytes --------------------------------------------------------------------------------------------

WRITE_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from helpers import make_affine_record
import numpy as np
from qformat.format import write_file
plain = {{"b": np.arange(3, dtype=np.int16), "a": np.arange(4, dtype=np.float32)}}
qts = [make_affine_record("m.l1.weight", seed=2), make_affine_record("m.l0.weight", (3, 17), bits=3, group=8)]
write_file(sys.argv[1], plain, qts, metadata={{"z": "1", "a": "2"}})
"""


def write_reference(path: Path) -> Path:
    plain = {"a": np.arange(4, dtype=np.float32), "b": np.arange(3, dtype=np.int16)}
    qts = [make_affine_record("m.l0.weight", (3, 17), bits=3, group=8), make_affine_record("m.l1.weight", seed=2)]
    return write_file(path, plain, qts, metadata={"a": "2", "z": "1"})


def test_same_input_same_bytes_in_any_order_and_any_process(tmp_path):
    first = sha256_file(write_reference(tmp_path / "one.safetensors"))
    assert sha256_file(write_reference(tmp_path / "two.safetensors")) == first
    script = WRITE_SCRIPT.format(tests=str(Path(__file__).parent))
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # a different hash seed must not change the bytes
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "three.safetensors")], check=True, env=env)
    assert sha256_file(tmp_path / "three.safetensors") == first
    assert hashlib.sha256((tmp_path / "one.safetensors").read_bytes()).hexdigest() == first


def test_canonical_header(tmp_path, affine_record):
    path = write_file(tmp_path / "c.safetensors", PLAIN, [affine_record])
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = data[8:8 + n]
    assert n % 8 == 0 and header.rstrip(b" ") + b" " * (n - len(header.rstrip(b" "))) == header
    parsed = json.loads(header)
    assert list(parsed)[0] == "__metadata__"
    meta = json.loads(parsed["__metadata__"]["qformat"])
    assert parsed["__metadata__"]["qformat"] == json.dumps(meta, sort_keys=True, separators=(",", ":"))


# -- atomic writes ----------------------------------------------------------------------------------------------

def test_failed_write_leaves_no_file(tmp_path, monkeypatch, affine_record):
    def boom(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(stio.os, "fsync", boom)
    with pytest.raises(OSError):
        write_file(tmp_path / "out.safetensors", PLAIN, [affine_record])
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch, affine_record):
    path = write_file(tmp_path / "out.safetensors", PLAIN)
    before = sha256_file(path)
    monkeypatch.setattr(stio.os, "fsync", lambda fd: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        write_file(path, PLAIN, [affine_record])
    assert sha256_file(path) == before and list(tmp_path.iterdir()) == [path]


def test_unserializable_input_writes_nothing(tmp_path):
    with pytest.raises(TypeError):
        write_file(tmp_path / "x.safetensors", {"c": np.ones(2, np.complex64)})
    assert list(tmp_path.iterdir()) == []


def test_write_rejects_duplicate_names(tmp_path, affine_record):
    with pytest.raises(FormatError) as info:
        write_file(tmp_path / "d.safetensors", {affine_record.name: PLAIN["a"]}, [affine_record])
    assert info.value.code == "duplicate_name"
    with pytest.raises(FormatError):
        write_file(tmp_path / "d.safetensors", None, [affine_record, affine_record])
    assert list(tmp_path.iterdir()) == []


# -- bugs found in qformat/format (strict xfail) ---------------------------------------------------------------

def test_deeply_nested_header(tmp_path):
    assert error_of(write_bytes(tmp_path, raw_file(b"[" * 5000 + b"]" * 5000, b""))).code == "bad_header"


def test_dtype_of_wrong_type(tmp_path):
    assert error_of(write_bytes(tmp_path, edited_plain(dtype=["I16"]))).code == "bad_dtype"


def test_format_version_of_wrong_type(tmp_path):
    meta = json.dumps({"format_version": [1], "records": {}})
    assert error_of(write_bytes(tmp_path, parts_of(PLAIN, {"qformat": meta}).to_bytes())).code \
        == "unsupported_format_version"


@pytest.mark.parametrize("meta", [[], "", 0])
def test_metadata_of_wrong_type(tmp_path, meta):
    p = parts_of(PLAIN, None)
    assert error_of(write_bytes(tmp_path, Parts([("__metadata__", meta)] + p.entries, p.data).to_bytes())).code \
        == "bad_header"


def test_duplicate_key_inside_an_entry_names_the_tensor(tmp_path):
    p = parts_of(PLAIN, None)
    entry = p.entry("b")
    text = raw_header([e for e in p.entries if e[0] != "b"]).rstrip(b" ")[:-1] + b"," + (
        b'"b":{"dtype":"I16","dtype":"I16","shape":%s,"data_offsets":%s}}' % (
            json.dumps(entry["shape"]).encode(), json.dumps(entry["data_offsets"]).encode()))
    exc = error_of(write_bytes(tmp_path, raw_file(text + b" " * (-len(text) % 8), p.data)))
    assert exc.code == "duplicate_name" and exc.tensor == "b"


def test_written_files_get_normal_permissions(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    path = write_file(tmp_path / "perm.safetensors", PLAIN)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
