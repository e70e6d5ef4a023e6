"""GGUF input: expand a ``.gguf`` file once with transformers into a cached Hugging Face folder, then stream from it.

The expansion loads the whole model (transformers dequantizes every tensor), so it runs in a child process: the
conversion's own peak memory stays that of one block. The cache key is the sha256 of the file's first 16 MiB and its
size; the folder is written under a temporary name and renamed into place, so an interrupted expansion is redone.

Run as ``python -m qformat.convert.gguf FILE DEST`` (that is what :func:`expand_gguf` does).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ..errors import ConversionError

PREFIX_BYTES = 16 << 20
MARKER = "qformat-gguf.json"


def cache_root() -> Path:
    base = os.environ.get("QFORMAT_CACHE")
    return Path(base).expanduser() if base else Path.home() / ".cache" / "qformat"


def gguf_key(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        digest.update(handle.read(PREFIX_BYTES))
    digest.update(str(path.stat().st_size).encode())
    return digest.hexdigest()


def expand_gguf(path: Path, *, quiet: bool = False) -> Path:
    """The cached Hugging Face folder (config, safetensors, tokenizer) of a GGUF file, expanding it if needed."""
    try:
        key = gguf_key(path)
    except OSError as exc:
        raise ConversionError(f"cannot read the GGUF file {path}: {exc.strerror or exc}") from None
    dest = cache_root() / "gguf" / key
    if (dest / MARKER).is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not quiet:
        print(f"qformat: expanding {path.name} with transformers into {dest} (once; cached)", file=sys.stderr)
    proc = subprocess.run([sys.executable, "-m", "qformat.convert.gguf", str(path), str(dest)],
                          capture_output=True, text=True)
    if proc.returncode != 0 or not (dest / MARKER).is_file():
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise ConversionError(f"cannot expand the GGUF file {path} with transformers "
                              f"(is it a complete GGUF of a supported architecture?):\n{tail}")
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
                                              "key": dest.name}, indent=2) + "\n")
        if dest.exists():  # an earlier, unfinished expansion
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    _expand(Path(sys.argv[1]).resolve(), Path(sys.argv[2]))
