"""GGUF input: expand a ``.gguf`` file once with transformers into a cached Hugging Face folder, then stream from it.

The expansion loads the whole model (transformers dequantizes every tensor), so it runs in a child process: the
conversion's own peak memory stays that of one block. The cache key is the sha256 of the whole file (two GGUFs that
share a prefix and a size are different models); the folder is written under a temporary name and renamed into place,
so an interrupted expansion is redone.

Run as ``python -m qformat.conversion.gguf FILE DEST`` (that is what :func:`expand_gguf` does).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..errors import ConversionError

MARKER = "qformat-gguf.json"
CHUNK = 1 << 22
# A file's digest is remembered only once the file has been left alone this long (its ctime is older), so that a
# write landing in the same coarse timestamp tick as the one hashed cannot leave the remembered stat unchanged.
SETTLED_NS = 2_000_000_000
_HEX64 = re.compile(r"[0-9a-f]{64}")


def cache_root() -> Path:
    base = os.environ.get("QFORMAT_CACHE")
    return Path(base).expanduser() if base else Path.home() / ".cache" / "qformat"


def _identity(path: Path, st: os.stat_result) -> str:
    return f"{os.path.realpath(path)}\0{st.st_dev}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}"


def gguf_key(path: Path) -> str:
    """The sha256 of the whole file, streamed.

    Hashing a multi-GB GGUF on every run would cost seconds to minutes, so the digest is remembered under the file's
    (real path, device, inode, size, mtime, ctime). The trade-off: a remembered digest is trusted while none of these
    change. Any write through the file system updates ctime, which (unlike mtime) no user tool can set back, so only
    an edit of the raw device or a clock moved backwards between two runs could reuse a stale digest.
    """
    before = path.stat()
    memo = cache_root() / "gguf" / "digests" / hashlib.sha256(_identity(path, before).encode()).hexdigest()
    try:
        remembered = memo.read_text().strip()
        if _HEX64.fullmatch(remembered):
            return remembered
    except OSError:
        pass
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    key = digest.hexdigest()
    after = path.stat()
    if _identity(path, after) == _identity(path, before) and time.time_ns() - after.st_ctime_ns > SETTLED_NS:
        try:
            memo.parent.mkdir(parents=True, exist_ok=True)
            tmp = memo.with_name(f".{memo.name}.{os.getpid()}")
            tmp.write_text(key + "\n")
            os.replace(tmp, memo)
        except OSError:  # a read-only cache still converts; it just hashes again next time
            pass
    return key


def expand_gguf(path: Path, *, quiet: bool = False) -> Path:
    """The cached Hugging Face folder (config, safetensors, tokenizer) of a GGUF file, expanding it if needed."""
    try:
        before = path.stat()
        key = gguf_key(path)
    except OSError as exc:
        raise ConversionError(f"cannot read the GGUF file {path}: {exc.strerror or exc}") from None
    dest = cache_root() / "gguf" / key
    if (dest / MARKER).is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not quiet:
        print(f"qformat: expanding {path.name} with transformers into {dest} (once; cached)", file=sys.stderr)
    proc = subprocess.run([sys.executable, "-m", "qformat.conversion.gguf", str(path), str(dest)],
                          capture_output=True, text=True)
    if proc.returncode != 0 or not (dest / MARKER).is_file():
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise ConversionError(f"cannot expand the GGUF file {path} with transformers "
                              f"(is it a complete GGUF of a supported architecture?):\n{tail}")
    if _identity(path, path.stat()) != _identity(path, before):  # the folder must hold what `key` names
        shutil.rmtree(dest, ignore_errors=True)
        raise ConversionError(f"the GGUF file {path} changed while it was being expanded; run again")
    return dest


def _expand(path: Path, dest: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        # The expanded weights are plain floats now; the gguf quantization_config no longer describes them.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps({"gguf_file": path.name, "size": path.stat().st_size,
                                              "sha256": dest.name}, indent=2) + "\n")
        if dest.exists():  # an earlier, unfinished expansion
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    _expand(Path(sys.argv[1]).resolve(), Path(sys.argv[2]))
