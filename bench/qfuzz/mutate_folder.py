"""Mutations of a model folder (a :class:`FolderSample`): shards, the index, config.json and the file system.

Shard mutations reuse :class:`FileMutator`; the checksums in ``config.json`` are then rewritten (most of the time) so
``verify_folder`` goes past them to the deep decode.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from typing import Any

from .jsontext import Pairs, Raw, nested
from .mutate_file import EXTREME_INTS, NEST_DEPTHS, ODD_VALUES, FileMutator
from .sample import MISSING, FileSample, FolderSample, Special, tensor_refs

BAD_SHARD_NAMES = ["../model-00001-of-00002.safetensors", "/etc/passwd", "a/b.safetensors", ".hidden.safetensors",
                   "", ".", "..", "config.json", "tokenizer.json", "README.md", "missing.safetensors",
                   "model.safetensors", "model-00001-of-00002.safetensors\x00", "\ud800.safetensors",
                   "\udcff.safetensors", "A" * 300, "sub\\shard.safetensors", "model.safetensors.index.json",
                   " model-00001-of-00002.safetensors", "MODEL-00001-OF-00002.SAFETENSORS", "~", "-"]


class FolderMutator:
    def __init__(self, rng: random.Random, sample: FolderSample, fs_special: bool = False) -> None:
        self.rng = rng
        self.s = sample
        self.fs_special = fs_special
        self.table: list[tuple[float, Callable[[], str | None]]] = [
            (16, self.m_shard), (3, self.m_index_names), (1, self.m_index_structure), (2, self.m_index_entries),
            (2.5, self.m_config), (2, self.m_config_files), (0.7, self.m_config_raw), (2, self.m_move_record),
            (1, self.m_swap_shards), (0.5, self.m_remove), (1, self.m_file_types),
        ]
        self.total = sum(w for w, _ in self.table)

    def choice(self, seq: Any) -> Any:
        return seq[self.rng.randrange(len(seq))]

    def run(self, count: int) -> list[str]:
        done = []
        for _ in range(count):
            for _attempt in range(12):
                x = self.rng.random() * self.total
                fn = self.table[-1][1]
                for weight, candidate in self.table:
                    x -= weight
                    if x < 0:
                        fn = candidate
                        break
                what = fn()
                if what:
                    done.append(f"{fn.__name__[2:]}: {what}")
                    break
        return done

    def weight_map(self) -> dict | None:
        index = self.s.index
        if isinstance(index, dict) and isinstance(index.get("weight_map"), dict):
            return index["weight_map"]
        return None

    def qconfig(self) -> dict | None:
        config = self.s.config
        if isinstance(config, dict) and isinstance(config.get("quantization_config"), dict):
            return config["quantization_config"]
        return None

    # -- shards ---------------------------------------------------------------------------------------------------
    def m_shard(self) -> str | None:
        shards = self.s.shards()
        if not shards:
            return None
        with_records = [s for s in shards if self.s.files[s].records()]  # type: ignore[union-attr]
        name = self.choice(with_records if with_records and self.rng.random() < 0.8 else shards)
        sample = self.s.files[name]
        assert isinstance(sample, FileSample)
        done = FileMutator(self.rng, sample).run(self.choice([1, 1, 2, 3]))
        if self.rng.random() < 0.12:
            self.s.fix_checksums = False
            done.append("checksums left stale")
        return f"{name}: " + "; ".join(done)

    def m_move_record(self) -> str | None:
        shards = self.s.shards()
        if len(shards) < 2:
            return None
        src_name, dst_name = self.rng.sample(shards, 2)
        src, dst = self.s.files[src_name], self.s.files[dst_name]
        assert isinstance(src, FileSample) and isinstance(dst, FileSample)
        records = list(src.records())
        if not records or dst.qmeta is MISSING or not isinstance(dst.records(), dict):
            return None
        record_name = self.choice(records)
        record = src.records().pop(record_name)
        how = self.choice(["with_tensors", "record_only", "copy_tensors"])
        if isinstance(dst.qmeta, dict) and isinstance(dst.qmeta.get("records"), dict):
            dst.qmeta["records"][record_name] = record
        refs = sorted(set(tensor_refs(record.get("weight") if isinstance(record, dict) else None)))
        for ref in refs:
            if ref not in src.blobs:
                continue
            entry = dict(src.entry(ref) or {})
            if how != "record_only":
                dst.entries.append((ref, entry))
                dst.blobs[ref] = src.blobs[ref]
            if how == "with_tensors":
                src.entries = [(k, v) for k, v in src.entries if k != ref]
                del src.blobs[ref]
        weight_map = self.weight_map()
        if weight_map is not None and how == "with_tensors":
            for ref in refs:
                weight_map[ref] = dst_name
        return f"{record_name} from {src_name} to {dst_name} ({how})"

    def m_swap_shards(self) -> str | None:
        shards = self.s.shards()
        if len(shards) < 2:
            return None
        a, b = self.rng.sample(shards, 2)
        if self.rng.random() < 0.5:
            self.s.files[a], self.s.files[b] = self.s.files[b], self.s.files[a]
            return f"{a} and {b} swapped"
        self.s.files[b] = self.s.files[a].clone()  # type: ignore[union-attr]
        return f"{b} is a copy of {a}"

    # -- index ----------------------------------------------------------------------------------------------------
    def m_index_names(self) -> str | None:
        weight_map = self.weight_map()
        if not weight_map:
            return None
        key = self.choice(sorted(weight_map))
        weight_map[key] = self.choice(BAD_SHARD_NAMES + [1, None, [], {}])
        return f"weight_map[{key[-30:]!r}] -> {str(weight_map[key])[:40]!r}"

    def m_index_structure(self) -> str | None:
        what = self.choice(["not_object", "weight_map_type", "dup", "nest", "metadata", "empty_map"])
        if what == "not_object":
            self.s.index = self.choice([[], None, "x", 1, Raw("1e400")])
        elif what == "weight_map_type" and isinstance(self.s.index, dict):
            self.s.index["weight_map"] = self.choice([[], None, "x", 1, [["a", "b"]]])
        elif what == "dup" and self.weight_map():
            weight_map = self.weight_map()
            pairs = list(weight_map.items())
            pairs.append(self.choice(pairs))
            self.s.index["weight_map"] = Pairs(pairs)
        elif what == "nest" and isinstance(self.s.index, dict):
            self.s.index["metadata"] = nested(self.choice(NEST_DEPTHS), self.choice(["list", "dict"]))
        elif what == "metadata" and isinstance(self.s.index, dict):
            self.s.index["metadata"] = copy.deepcopy(self.choice(ODD_VALUES))
        elif what == "empty_map" and isinstance(self.s.index, dict):
            self.s.index["weight_map"] = {}
        else:
            return None
        return f"index {what}"

    def m_index_entries(self) -> str | None:
        weight_map = self.weight_map()
        shards = self.s.shards()
        if not weight_map or not shards:
            return None
        what = self.choice(["drop", "add_missing", "move", "odd_key"])
        key = self.choice(sorted(weight_map))
        if what == "drop":
            del weight_map[key]
        elif what == "add_missing":
            weight_map["model.nope.weight"] = self.choice(shards)
        elif what == "move":
            weight_map[key] = self.choice(shards)
        else:
            weight_map[self.choice(["\ud800", "", "x" * 10000])] = self.choice(shards)
        return f"weight_map {what} {key[-30:]!r}"

    # -- config ---------------------------------------------------------------------------------------------------
    def m_config(self) -> str | None:
        qconfig = self.qconfig()
        what = self.choice(["quant_method", "format_version", "qconfig_type", "not_object", "codec_providers",
                            "nest", "dup"])
        if what == "quant_method" and qconfig is not None:
            qconfig["quant_method"] = self.choice(["gptq", "", None, "QFORMAT", 1, ["qformat"]])
        elif what == "format_version" and qconfig is not None:
            qconfig["format_version"] = self.choice(EXTREME_INTS + [1.0, "1", None, True, Raw("1.0")])
        elif what == "qconfig_type" and isinstance(self.s.config, dict):
            self.s.config["quantization_config"] = self.choice([[], None, "qformat", 1])
        elif what == "not_object":
            self.s.config = self.choice([[], None, "x", 1, Raw("NaN")])
        elif what == "codec_providers" and qconfig is not None:
            qconfig["codec_providers"] = self.choice([{"x.y": "pkg"}, [], None, {"\ud800": 1}])
        elif what == "nest" and isinstance(self.s.config, dict):
            self.s.config["extra"] = nested(self.choice(NEST_DEPTHS), self.choice(["list", "dict"]))
        elif what == "dup" and isinstance(self.s.config, dict):
            pairs = list(self.s.config.items())
            pairs.append(self.choice(pairs))
            self.s.config = Pairs(pairs)
        else:
            return None
        return f"config {what}"

    def m_config_files(self) -> str | None:
        qconfig = self.qconfig()
        if qconfig is None:
            return None
        files = qconfig.get("files")
        what = self.choice(["files_type", "drop", "extra", "entry_type", "size", "sha"])
        if what == "files_type":
            qconfig["files"] = self.choice([[], None, "x", {}])
        elif isinstance(files, dict) and files:
            shard = self.choice(sorted(files))
            if what == "drop":
                del files[shard]
            elif what == "extra":
                files[self.choice(["../../etc/passwd", "/etc/passwd", "config.json", "x.safetensors"])] = \
                    {"sha256": "0" * 64, "size": 1}
            elif what == "entry_type":
                files[shard] = self.choice([[], None, "x", 1])
            elif what == "size":
                self.s.fix_checksums = False
                files[shard]["size"] = self.choice(EXTREME_INTS + ["27456", 1.0, None, True])
            else:
                self.s.fix_checksums = False
                files[shard]["sha256"] = self.choice(["", None, 1, "z" * 64, "A" * 64])
        else:
            return None
        return f"quantization_config.files {what}"

    def m_config_raw(self) -> str | None:
        target = self.choice(["config", "index"])
        raw = self.choice([b"", b"{", b"\xff\xfe{}", b"\xef\xbb\xbf{}", b"{\"a\":1,\"a\":2}", b"[" * 100000,
                           b"{\"quantization_config\": NaN}", b"\x00"])
        if target == "config":
            self.s.config_raw = raw
        else:
            self.s.index_raw = raw
        return f"{target} bytes {raw[:16]!r}"

    # -- file system ----------------------------------------------------------------------------------------------
    def m_remove(self) -> str | None:
        what = self.choice(["shard", "config", "index"])
        if what == "shard" and self.s.shards():
            name = self.choice(self.s.shards())
            del self.s.files[name]
            return f"{name} removed"
        if what == "config":
            self.s.config = MISSING
            return "config.json removed"
        if what == "index":
            self.s.index = MISSING
            return "index removed"
        return None

    def m_file_types(self) -> str | None:
        kinds = ["dir", "symlink_missing", "symlink_outside", "empty"]
        if self.fs_special:
            kinds += ["fifo", "symlink_zero"]
        kind = self.choice(kinds)
        target = self.choice(self.s.shards() + ["config.json", "model.safetensors.index.json"])
        special: bytes | Special = {
            "dir": Special("dir"), "fifo": Special("fifo"), "symlink_missing": Special("symlink", "nowhere"),
            "symlink_outside": Special("symlink", "/etc/hostname"), "symlink_zero": Special("symlink", "/dev/zero"),
            "empty": b"",
        }[kind]
        if target == "config.json":
            self.s.config_raw = special
        elif target == "model.safetensors.index.json":
            self.s.index_raw = special
        else:
            self.s.files[target] = special
        return f"{target} -> {kind}"
