"""The conversion pipeline: sequential, block by block, resumable, deterministic.

For each decoder block: read its weights from the source, hook the selected linears to accumulate calibration
statistics, run the calibration forwards, quantize each linear through the method plugin, replace its weight by the
reference decode of the record (so the next block sees exactly what the file holds), re-run the block to produce the
next block's inputs, write the block's shard, and drop the block. Only one block's weights and its activations are in
memory at a time. Tensors outside the blocks (embeddings, final norm, lm_head) go into a last shard.

Shards go to ``<out>.partial/`` with a ``state.json`` of the exact options and ``source-digests.json``, the sha256
of every source tensor read so far (hashed as it streams); a run killed at any point and started again with the same
options checks the finished shards, re-reads (and so re-hashes) the source tensors they were made from, refusing to
continue if any differs, recomputes the block inputs through them, and continues; the output is byte-identical to an
uninterrupted run (on the same machine and thread count). The finished folder is moved into place in one rename.

One conversion at a time writes an output (:mod:`.lock`), and qformat deletes or moves only folders it can prove it
wrote (see ``qformat.format.container``: the work folder's marker, a qformat output's own files).
"""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import math
import os
import re
import shutil
import tempfile
import time
import warnings
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import torch
from torch import nn

from ..errors import ConversionError, FormatError, ParameterError, PluginError
from ..format import FORMAT_VERSION, FolderWriter, QFile, QuantizedTensor, bits_by_layer_type, iter_nodes
from ..format.container import (
    ALLOCATION_NAME,
    QUANT_METHOD,
    RUN_MARKER,
    output_replace_problem,
    read_run_marker,
    recover_interrupted_swap,
    remove_marked_folder,
    rounded_bits,
)
from ..format.dtypes import WEIGHT_DTYPES
from ..methods import BlockTuning, LayerInput, Method, MethodConfig, cloned_call_arguments, output_error
from ..sidecar import SIDECAR_BITS, with_sidecar
from ..text import tokenize
from ..transforms import BlockInput, TransformedBlock, apply_chain, wrap_record
from . import calibration as calib_data
from .activations import BlockCalls, LinearStats, capture_block_inputs, input_groups, run_block
from .budget import (
    ESTIMATES,
    Candidate,
    LayerCosts,
    allocation_summary,
    make_plan,
    parse_size,
    plan_choices,
    resolve_candidates,
)
from .lock import OutputLock
from .report import (
    Progress,
    Summary,
    current_rss_bytes,
    outlier_count,
    peak_rss_bytes,
    reset_peak_rss,
    return_freed_memory,
    summarize,
)
from .selection import Selection, matches, select_modules
from .source import HubResolver, ModelSource, Skeleton, build_skeleton, open_source, release, set_tensor, tied_source
from .transform_chain import (
    Chain,
    TransformSpec,
    chain_command,
    chain_dicts,
    explicit_name,
    parse_spec,
    resolve_chain,
)

STATE_NAME = "state.json"
DIGESTS_NAME = "source-digests.json"
# Calibration windows each layer's loss gain is measured on (estimate "loss"): one whole-model forward of these per
# layer is the estimate's cost (SmolLM2-135M, 210 layers x 8 windows of 512 tokens: over an hour on 2 loaded cores).
GAIN_WINDOWS = 4
BROKEN_GAIN_FACTOR = 100.0  # a layer whose probe made the loss non-finite gets this many times the largest gain
GAIN_FLOOR = 1e-12  # the gain of a layer whose probe did not raise the loss: it then ranks by output error alone
PLAN_NAME = ALLOCATION_NAME  # a size budget's plan: measured once, reused by a resumed run, kept in the output
STATE_VERSION = 2  # 2: per-tensor source digests, work-folder marker
CALIBRATED = frozenset({"hessian", "act_norms", "act_absmax"})
MAX_SEED = 2**32 - 1
MAX_CALIB = 1 << 20  # samples or tokens per window: beyond any text a CPU conversion calibrates on
# What a partial conversion of qformat < STATE_VERSION 2 (no marker) holds; only such a folder is deleted by --restart.
LEGACY_WORK_ENTRY = re.compile(r"(state\.json|\.state\.json\..+|shard-\d{5}\.safetensors|\.shard-\d{5}\.safetensors\..+|final)")


# The output layer by default: 8 bits per output channel. Measured on SmolLM2-135M RTN 4-bit g128 (bench/quality.py
# rows rtn4 / rtn4o8, bench/e2e.py --engine lean): wiki perplexity 19.246 with the fp32 head, 19.245 with this one;
# decode 40.3 -> 73.4 tok/s, resident 234 -> 176 MiB. llama.cpp keeps small models' output layer at 8 bits too.
# Symmetric (zero 128): every 32-column block of a row then is exactly a GGUF Q8_0 block and the row a
# compressed-tensors int8 channel, so the default folder exports to both without requantizing.
DEFAULT_OUTPUT_LAYER = "rtn:bits=8,group_size=-1,sym=true"
AUTO_OUTPUT_LAYER = "auto"


@dataclass
class ConvertOptions:
    source: str
    out: str | os.PathLike
    method: str
    # The method's config, or its parameters by name (values or command-line strings, as `-p key=value` gives them).
    params: Mapping[str, Any] | MethodConfig = field(default_factory=dict)
    revision: str | None = None
    calib: str | os.PathLike | None = None  # None: the shipped default text
    calib_samples: int = calib_data.DEFAULT_SAMPLES
    calib_seqlen: int = calib_data.DEFAULT_SEQLEN
    seed: int = 0
    include: Sequence[str] = ()
    exclude: Sequence[str] = ()
    true_sequential: bool = False
    overwrite: bool = False
    restart: bool = False
    quiet: bool = False
    # Block transforms applied before the method, in order: names, "NAME:key=value,..." specs, dicts or configs.
    transforms: Sequence[TransformSpec] = ()
    # The output layer (lm_head) quantized with its own method: "METHOD[:key=value,...]" (e.g. "rtn:bits=8") or a
    # MethodConfig; None or "keep": the output layer follows --include like any other module (kept as it is unless
    # named there, then quantized with the main method); "auto" (the default): DEFAULT_OUTPUT_LAYER where the model
    # has a linear output layer, no --include is given and --exclude does not name it, else "keep".
    output_layer: str | MethodConfig | None = AUTO_OUTPUT_LAYER
    # Downloads Hub ids (qformat.hub.resolve_model_source); the layer above passes it in. Not part of the state.
    resolve_hub: HubResolver | None = None
    # The Hub model this one derives from, for the card's base_model link (a Hub source is its own base; a local
    # folder inside the Hugging Face cache, models--org--name, names its own). Not part of the state: the weights
    # do not depend on it.
    base_model: str | None = None
    # A low-rank sidecar of each quantized decoder linear's error (qformat.sidecar): rank (0: none), stored bits (16
    # or 8), and whether it is fitted to the activation-weighted error (the layer's calibration Hessian).
    sidecar_rank: int = 0
    sidecar_bits: int = 16
    sidecar_weighted: bool = False
    # A size budget (qformat.conversion.budget): bits per weight of the decoder linears, or total tensor bytes of the
    # output (an int or "80MB"); the method (if given) narrows the candidates, which default to the built-in grid.
    target_bits: float | None = None
    target_size: int | str | None = None
    candidates: Sequence[str] = ()
    budget_estimate: str = "loss"
    # An earlier budget conversion's allocation.json (or its output folder): its measurements are reused when they
    # were taken on the same source, calibration, candidates and estimate; only the knapsack runs again.
    measurements: str | os.PathLike | None = None


@dataclass
class ConvertResult:
    out: Path
    summary: Summary
    quantization_config: dict[str, Any]
    source: ModelSource


BlockHook = Callable[[int], None]


def convert(options: ConvertOptions, *, on_block_done: BlockHook | None = None) -> ConvertResult:
    """Validate everything, then convert. ``on_block_done(i)`` runs after block i's shard is written (tests use it
    to simulate a kill). The summary's peak RSS covers this call only where the OS lets it be reset (Linux)."""
    reset_peak_rss()
    converter = Converter(options)
    converter.prepare()
    return converter.run(on_block_done=on_block_done)


def resolve_output_layer(spec: str | MethodConfig | None) -> tuple[Method | None, MethodConfig | None]:
    """--output-layer's method and config: None or "keep" for none, "auto" for DEFAULT_OUTPUT_LAYER's (the
    converter drops it where the model has no linear output layer), else "METHOD[:key=value,...]" or a config."""
    from ..plugins import get_method

    if spec is None or (isinstance(spec, str) and spec.strip() == "keep"):
        return None, None
    if isinstance(spec, str) and spec.strip() == AUTO_OUTPUT_LAYER:
        spec = DEFAULT_OUTPUT_LAYER
    if isinstance(spec, MethodConfig):
        method = get_method(spec._method_name())
        return method, method.validate_params(spec)
    if not isinstance(spec, str):
        raise ParameterError(f"--output-layer is a method spec 'METHOD[:key=value,...]', 'keep' or a method config, "
                             f"not {type(spec).__name__}")
    name, params = parse_spec(spec, "--output-layer")
    method = get_method(name)
    try:
        return method, method.validate_params(params)
    except ParameterError as exc:
        raise ParameterError(f"--output-layer {spec!r}: {exc}") from None


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A tensor as numpy in its own dtype (bf16 through ml_dtypes), for writing."""
    tensor = tensor.detach().contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def _module_tensor(root: nn.Module, name: str) -> torch.Tensor:
    """A parameter or buffer of ``root`` by its dotted name."""
    module_path, _, leaf = name.rpartition(".")
    module = root.get_submodule(module_path) if module_path else root
    return getattr(module, leaf).detach()


def _check_int(option: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConversionError(f"{option} must be an integer from {low} to {high} (got {value!r})")


def _is_legacy_work_dir(work: Path) -> bool:
    """A partial conversion written by qformat before work folders had a marker: a state.json of state version 1
    and nothing but shards, their temp files and the finalize staging folder."""
    if work.is_symlink() or not work.is_dir():
        return False
    try:
        state = json.loads((work / STATE_NAME).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(state, dict) or state.get("state_version") != 1:
        return False
    return all(LEGACY_WORK_ENTRY.fullmatch(p.name) and not p.is_symlink() for p in work.iterdir())


@contextlib.contextmanager
def deterministic(seed: int) -> Iterator[None]:
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


class Converter:
    def __init__(self, options: ConvertOptions) -> None:
        self.options = options
        self.out = Path(os.path.normpath(os.fspath(options.out) or "."))
        self.lock: OutputLock | None = None
        self.resuming = False

    @property
    def work_dir(self) -> Path:
        return self.out.with_name(self.out.name + ".partial")

    # ================================================================================================ validation
    def prepare(self) -> None:
        """Every check that can fail before heavy work: method, parameters, output, source, architecture, modules,
        calibration text length, resumable state. Takes the output's lock, held until :meth:`run` ends (or
        :meth:`close`)."""
        try:
            self._prepare()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the output's lock (:meth:`run` does this when it ends)."""
        if self.lock is not None:
            self.lock.release()

    def _prepare(self) -> None:
        from ..plugins import get_method, get_plugins

        opts = self.options
        self._prepare_budget()
        if self.candidates:  # the method only narrows the candidates; the first stands for "the method" below
            self.method, self.config = self.candidates[0].method, self.candidates[0].config
        else:
            self.method: Method = get_method(opts.method)
            self.config: MethodConfig = self.method.validate_params(opts.params)
        self.chain: Chain = resolve_chain(opts.transforms, self.method, self.config)
        self.output_method, self.output_config = resolve_output_layer(opts.output_layer)
        owner = get_plugins().method_owner.get(self.method.name)
        info = get_plugins().info.get(owner) if owner else None
        self.plugin_label = f"{info.package} {info.version}" if info else "?"
        self.codecs = get_plugins().codecs  # shards are read back with the plugin codecs the method may use
        # A transform sees the block's calibration inputs, so a chain calibrates even for RTN.
        self.statistics = frozenset(self.method.calibration).union(
            *(c.method.calibration for c in self.candidates),
            {"hessian"} if self.candidates or (opts.sidecar_rank and opts.sidecar_weighted) else ())
        self.needs_calibration = bool(self.statistics & CALIBRATED) or bool(self.chain) or (
            self.output_method is not None and bool(self.output_method.calibration & CALIBRATED))
        _check_int("--seed", opts.seed, 0, MAX_SEED)
        if self.needs_calibration:
            _check_int("--calib-samples", opts.calib_samples, 1, MAX_CALIB)
            _check_int("--calib-seqlen", opts.calib_seqlen, 2, MAX_CALIB)
        self._check_out_path()
        self.lock = OutputLock(self.out)
        self.lock.acquire()  # before anything below moves or deletes a folder
        # A finalize killed midway may have left <out>.old (the previous output) and no <out>: restore it first, so
        # that a rerun without --overwrite refuses instead of replacing the only copy.
        try:
            recover_interrupted_swap(self.out, self.codecs)
        except FormatError as exc:
            raise ConversionError(str(exc)) from None
        if self.out.exists() or self.out.is_symlink():
            if not opts.overwrite:
                raise ConversionError(f"the output folder {self.out} exists; choose another --out or pass "
                                      "--overwrite (the old folder is replaced only once the new one is complete)")
            problem = output_replace_problem(self.out)
            if problem is not None:
                raise ConversionError(f"--overwrite replaces only a folder qformat wrote, and {problem}; choose "
                                      "another --out, or move or remove it yourself")
            backup = self.out.with_name(self.out.name + ".old")
            if backup.exists() or backup.is_symlink():
                raise ConversionError(f"{backup} exists and was not made by qformat; --overwrite moves the old "
                                      "output there until the new one is in place, so move it away first")
        self.calib_text = None
        if self.needs_calibration:
            self.calib_text = calib_data.read_text(opts.calib)
        self.source = open_source(opts.source, opts.revision, quiet=opts.quiet, resolve_hub=opts.resolve_hub)
        resolved_out, source_dir = self.out.resolve(), self.source.folder.resolve()
        if resolved_out == source_dir or source_dir in resolved_out.parents:
            raise ConversionError(f"--out {self.out} is inside the source model folder {self.source.folder}")
        if resolved_out in source_dir.parents:
            raise ConversionError(f"--out {self.out} contains the source model folder {self.source.folder}; give a "
                                  "new folder's name")
        self.skeleton: Skeleton = build_skeleton(self.source)
        self._check_chain_architecture()
        self.selection: Selection = select_modules(self.skeleton, opts.include, opts.exclude)
        self._check_chain_shapes()
        self._plan_tensors()
        self.windows = None
        if self.needs_calibration:
            tokenizer = self.source.tokenizer()
            ids = tokenize(tokenizer, self.calib_text.text)
            vocab = self.skeleton.model.get_input_embeddings().num_embeddings
            if ids.numel() and int(ids.max()) >= vocab:
                raise ConversionError(f"the tokenizer of {opts.source} produces id {int(ids.max())}, beyond the "
                                      f"model's {vocab} embeddings")
            self.windows = calib_data.sample_windows(ids, opts.calib_samples, opts.calib_seqlen, opts.seed,
                                                source=f"the calibration text {self.calib_text.path.name}")
        self.state = self._state()
        self._check_work_dir()

    def _prepare_budget(self) -> None:
        """Check the sidecar and budget options; resolve the candidate set (empty without a budget)."""
        opts = self.options
        _check_int("--sidecar-rank", opts.sidecar_rank, 0, 4096)
        if opts.sidecar_bits not in SIDECAR_BITS:
            raise ParameterError(f"--sidecar-bits is 8 or 16, got {opts.sidecar_bits!r}")
        self.candidates: list[Candidate] = []
        self.budget_target: dict[str, Any] | None = None
        if opts.target_bits is None and opts.target_size is None:
            if opts.candidates:
                raise ParameterError("--candidate lists configurations for a size budget: add --target-bits or "
                                     "--target-size")
            return
        if opts.target_bits is not None and opts.target_size is not None:
            raise ParameterError("give --target-bits or --target-size, not both")
        if opts.transforms:
            raise ParameterError("a size budget mixes methods layer by layer, so it does not combine with "
                                 "--transform (a block rewrite); convert with the transform and one --method instead")
        if opts.budget_estimate not in ESTIMATES:
            raise ParameterError(f"--budget-estimate is one of {list(ESTIMATES)}, got {opts.budget_estimate!r}")
        if opts.target_bits is not None:
            bits = opts.target_bits
            if isinstance(bits, bool) or not isinstance(bits, int | float) or not 0 < bits <= 32:
                raise ParameterError(f"--target-bits must be a number in (0, 32], got {bits!r}")
            self.budget_target = {"bits_per_weight": float(bits)}
        else:
            self.budget_target = {"bytes": parse_size(opts.target_size)}
        if opts.params:
            raise ParameterError("with a size budget the method's parameters come from the candidates: give them as "
                                 "--candidate METHOD:key=value,... instead of -p")
        self.candidates = resolve_candidates(opts.candidates, opts.method or None)

    def _check_chain_architecture(self) -> None:
        """A transform the user named that understands none of this model's blocks is refused before any work; one
        the method runs by itself (awq's) is left out with a warning, and the method quantizes without it."""
        self.architecture = str(getattr(self.skeleton.model.config, "model_type", "") or "")
        named = {explicit_name(spec) for spec in self.options.transforms}
        kept: Chain = []
        for transform, config in self.chain:
            if transform.supports(self.architecture):
                kept.append((transform, config))
                continue
            known = transform.architectures
            listed = f" (it knows: {', '.join(sorted(known))})" if isinstance(known, (set, frozenset)) else ""
            message = (f"transform {transform.name!r} does not understand architecture {self.architecture!r} of "
                       f"{self.options.source}{listed}")
            if transform.name in named:
                raise ConversionError(message)
            warnings.warn(f"{message}; method {self.method.name!r} runs without it", RuntimeWarning, stacklevel=2)
        self.chain = kept

    def _check_chain_shapes(self) -> None:
        """The method's and each transform's own shape constraints (a block dividing every width), before any work."""
        shapes = {}
        for index, names in self.selection.block_linears.items():
            block, prefix = self.skeleton.blocks[index], self.skeleton.block_prefix(index)
            for name in names:
                shapes[f"{prefix}{name}.weight"] = tuple(block.get_submodule(name).weight.shape)
        self.method.check_shapes(self.config, shapes)
        for transform, config in self.chain:
            transform.check_shapes(config, shapes)

    def _check_out_path(self) -> None:
        """--out must name a folder to create or replace: not '.', '..', the filesystem root, the current folder or
        one of its parents, and not a symbolic link."""
        given = os.fspath(self.options.out)
        if self.out.name in ("", ".", ".."):
            raise ConversionError(f"--out {given!r} is the current folder, a parent folder or the filesystem root; "
                                  "give the name of a new folder, e.g. --out model-q")
        resolved, cwd = self.out.resolve(), Path.cwd().resolve()
        if resolved == cwd or resolved in cwd.parents or resolved.parent == resolved:
            raise ConversionError(f"--out {given} is the current folder or one of its parents; give the name of a "
                                  "new folder")
        if self.out.is_symlink():
            raise ConversionError(f"--out {given} is a symbolic link; give the folder itself")
        source = Path(self.options.source).expanduser()
        if source.exists() and (resolved == source.resolve() or resolved in source.resolve().parents):
            raise ConversionError(f"--out {given} is or contains the source {self.options.source}; give the name of a "
                                  "new folder")

    def _plan_tensors(self) -> None:
        """Which tensors each shard holds, checked against the checkpoint before any work."""
        sk, src = self.skeleton, self.source
        self.block_names: list[list[str]] = []  # per block: names relative to the block, present in the checkpoint
        for index, block in enumerate(sk.blocks):
            prefix = sk.block_prefix(index)
            names = self._present(block, prefix)
            self.block_names.append(names)
        self.outside_names = [n for n in self._present(sk.model, "") if not n.startswith(sk.blocks_prefix + ".")]
        self.tied: dict[str, str] = {}
        for name in self._param_names(sk.model):
            if name.startswith(sk.blocks_prefix + ".") or name in src.weight_file:
                continue
            target = tied_source(sk.model, name)
            if target is None or target not in src.weight_file:
                raise ConversionError(f"the source model {self.options.source} lacks the tensor {name!r} that "
                                      f"{type(sk.model).__name__} needs")
            self.tied[name] = target
        self.output_name: str | None = None
        if self.output_method is not None:
            self._place_output_layer()
        self.outside_quantized = [f"{m}.weight" for m in self.selection.outside]
        calibrated_outside = [w for w in self.outside_quantized
                              if self._outside_method(w.rsplit(".", 1)[0])[0].calibration & CALIBRATED]
        self.need_final_hidden = self.needs_calibration and bool(calibrated_outside)
        for weight in calibrated_outside:
            module_name = weight.rsplit(".", 1)[0]
            module = sk.model.get_submodule(module_name)
            method = self._outside_method(module_name)[0]
            if self.needs_calibration and isinstance(module, nn.Embedding):
                raise ConversionError(f"{module_name} is an embedding: method {method.name!r} needs calibration "
                                      "statistics, which embeddings do not have; quantize embeddings with a method "
                                      "without calibration (e.g. rtn) or leave them out")
            if self.needs_calibration and not isinstance(getattr(sk.model.base_model, "norm", None), nn.Module):
                raise ConversionError(f"cannot collect calibration statistics for {module_name}: the model has no "
                                      "final norm at base_model.norm")
        # Parameters must hold finite, plausible floats; checked as each is read, before any is quantized.
        src.checked_values = frozenset(n for n in self._param_names(sk.model) if n in src.weight_file)
        for name in self.selected_weights():
            dtype = src.dtypes[self.tied.get(name, name)]
            if dtype not in WEIGHT_DTYPES:
                raise ConversionError(f"{name} is stored as {dtype}; qformat quantizes F32, F16 and BF16 weights")

    def _place_output_layer(self) -> None:
        """Find the output layer for --output-layer. The default ("auto") steps back, silently, where the model has
        no linear output layer, --include chooses the modules or --exclude names the output layer; a named method
        where there is no linear output layer is an error."""
        sk = self.skeleton
        auto = self.options.output_layer == AUTO_OUTPUT_LAYER
        head = sk.model.get_output_embeddings()
        found = [n for n, m in sk.model.named_modules() if m is head and head is not None]
        if not found or not isinstance(head, nn.Linear):
            if auto:
                self.output_method = self.output_config = None
                return
            raise ConversionError(f"--output-layer: {type(sk.model).__name__} has no linear output layer")
        # --include names exactly what is quantized, so the default adds nothing to it
        excluded = any(matches(found[0], pattern) for pattern in self.options.exclude)
        if auto and (self.options.include or excluded):
            self.output_method = self.output_config = None
            return
        self.output_name = found[0]
        if self.output_name not in self.selection.outside:
            self.selection.outside.append(self.output_name)

    def _param_names(self, module: nn.Module) -> list[str]:
        return [n for n, _ in module.named_parameters(remove_duplicate=False)]

    def _present(self, module: nn.Module, prefix: str) -> list[str]:
        """State names of a module: every parameter must be in the checkpoint; persistent buffers are optional."""
        params = set(self._param_names(module))
        names = []
        for name in module.state_dict(keep_vars=True):
            full = prefix + name
            if full in self.source.weight_file:
                names.append(name)
            elif name in params and prefix:
                raise ConversionError(f"the source model {self.options.source} lacks the tensor {full!r}")
        return names

    def selected_weights(self) -> list[str]:
        return [f"{n}.weight" for n in self.selection.names(self.skeleton.blocks_prefix)]

    # ================================================================================================ state
    def _state(self) -> dict[str, Any]:
        opts = self.options
        calibration = None
        if self.needs_calibration:
            assert self.calib_text is not None
            calibration = {"text": self.calib_text.label, "sha256": self.calib_text.sha256,
                           "samples": opts.calib_samples, "seqlen": opts.calib_seqlen, "seed": opts.seed,
                           "true_sequential": opts.true_sequential}
        return {"state_version": STATE_VERSION, "method": self.method.name, "method_params": self.config.to_params(),
                "method_config_version": self.config.version,
                "method_plugin": self.plugin_label, "transforms": self._chain_state(),
                "output_layer": self._output_layer_state(), "source": self.source.describe(),
                "source_fingerprint": self.source.fingerprint(), "calibration": calibration,
                "include": list(opts.include), "exclude": list(opts.exclude), "seed": opts.seed,
                "torch": torch.__version__, "threads": torch.get_num_threads(), "sidecar": self._sidecar_state(),
                "budget": self._budget_state()}

    def _sidecar_state(self) -> dict[str, Any] | None:
        opts = self.options
        return {"rank": opts.sidecar_rank, "bits": opts.sidecar_bits, "weighted": opts.sidecar_weighted} \
            if opts.sidecar_rank else None

    def _budget_state(self) -> dict[str, Any] | None:
        if self.budget_target is None:
            return None
        given = self.options.measurements
        return {"target": self.budget_target, "estimate": self.options.budget_estimate,
                "candidates": [c.to_dict() for c in self.candidates],
                "sidecar_weighted": self.options.sidecar_weighted,
                "measurements": None if given is None else str(Path(given).resolve())}

    def _output_layer_state(self) -> dict[str, Any] | None:
        if self.output_method is None:
            return None
        from ..plugins import get_plugins

        plugins = get_plugins()
        info = plugins.info.get(plugins.method_owner.get(self.output_method.name, ""))
        return {"method": self.output_method.name, "params": self.output_config.to_params(),
                "version": self.output_config.version, "plugin": f"{info.package} {info.version}" if info else "?"}

    def _outside_method(self, module_name: str) -> tuple[Method, MethodConfig]:
        """The method and config quantizing a module outside the blocks: --output-layer's for the output layer."""
        if self.output_method is not None and module_name == self.output_name:
            assert self.output_config is not None
            return self.output_method, self.output_config
        return self.method, self.config

    def _chain_state(self) -> list[dict[str, Any]]:
        """The chain with each transform's plugin: a different chain never resumes another's work."""
        from ..plugins import get_plugins

        plugins = get_plugins()
        states = []
        for (transform, _), recorded in zip(self.chain, chain_dicts(self.chain), strict=True):
            info = plugins.info.get(plugins.transform_owner.get(transform.name, ""))
            states.append({**recorded, "plugin": f"{info.package} {info.version}" if info else "?"})
        return states

    def _check_work_dir(self) -> None:
        """Resume only with identical options; ``--restart`` discards an earlier partial conversion. Only a work
        folder qformat can prove it made (its marker, or an earlier version's state.json and shards) is ever
        deleted."""
        work = self.work_dir
        self.resuming = False
        self.recorded_digests: dict[str, str] = {}
        if not work.exists() and not work.is_symlink():
            return
        marker = read_run_marker(work)
        ours = marker is not None and marker.get("qformat") == "work"
        legacy = not ours and _is_legacy_work_dir(work)
        empty = not ours and not legacy and work.is_dir() and not work.is_symlink() and not any(work.iterdir())
        if not (ours or legacy or empty):
            raise ConversionError(f"{work} exists and was not made by qformat (it has no {RUN_MARKER}); qformat "
                                  "does not delete it: move it away or remove it, then run again")
        state_path = work / STATE_NAME
        if self.options.restart or empty or not state_path.is_file():  # no state: killed before any work
            self._discard_work_dir(ours, legacy)
            return
        try:
            previous = json.loads(state_path.read_text())
        except (OSError, ValueError):
            previous = None
        current = json.loads(json.dumps(self.state))
        if isinstance(previous, dict) and previous.get("state_version") == STATE_VERSION:
            previous.setdefault("method_config_version", 1)  # written before configs had versions: all were 1
            previous.setdefault("transforms", [])  # written before block transforms existed: none
        if previous != current:
            if not isinstance(previous, dict) or previous.get("state_version") != STATE_VERSION:
                raise ConversionError(f"{work} holds a partial conversion made by another version of qformat; pass "
                                      "--restart to discard it and convert from scratch")
            changed = sorted(k for k in set(current) | set(previous) if previous.get(k) != current.get(k))
            raise ConversionError(f"{work} holds a partial conversion made with different options ("
                                  f"{', '.join(changed) or 'unreadable state'}); rerun with the same options to resume, "
                                  "or pass --restart to discard it")
        self.resuming = True
        self.recorded_digests = self._read_digests()
        self.source.expected_digests = dict(self.recorded_digests)

    def _discard_work_dir(self, ours: bool, legacy: bool) -> None:
        work = self.work_dir
        try:
            if ours:
                remove_marked_folder(work)
            elif legacy:
                shutil.rmtree(work)
            else:
                work.rmdir()  # empty
        except (OSError, FormatError) as exc:
            raise ConversionError(f"cannot remove the earlier partial conversion {work}: {exc}") from None

    def _read_digests(self) -> dict[str, str]:
        """The source digests recorded by the interrupted run ({} when missing or unreadable: nothing is resumed)."""
        try:
            recorded = json.loads((self.work_dir / DIGESTS_NAME).read_text()).get("sha256")
        except (OSError, ValueError, AttributeError):
            return {}
        if not isinstance(recorded, dict):
            return {}
        return {k: v for k, v in recorded.items() if isinstance(k, str) and isinstance(v, str)}

    def _save_digests(self) -> None:
        self._write_text(self.work_dir / DIGESTS_NAME,
                         json.dumps({"sha256": self.source.digests}, indent=0, sort_keys=True) + "\n")

    # ================================================================================================ running
    def run(self, on_block_done: BlockHook | None = None, *, keep_lock: bool = False) -> ConvertResult:
        """Convert and finalize. The output's lock is released at the end unless ``keep_lock`` (then the caller
        calls :meth:`close`, e.g. after evaluating or pushing the output) or when this raises."""
        ok = False
        try:
            result = self._run(on_block_done)
            ok = True
            return result
        finally:
            if not (ok and keep_lock):
                self.close()

    def _run(self, on_block_done: BlockHook | None) -> ConvertResult:
        start = time.perf_counter()
        try:
            writer = FolderWriter(self.out, self.work_dir, overwrite=True, registry=self.codecs)
            self._write_text(self.work_dir / STATE_NAME, json.dumps(self.state, indent=2, sort_keys=True) + "\n")
        except FormatError as exc:
            raise ConversionError(str(exc)) from None
        except OSError as exc:
            raise self._write_error(exc, self.work_dir / STATE_NAME) from None
        self.writer = writer
        self.rss_after_block: list[int] = []
        blocks = len(self.skeleton.blocks)
        done = self._finished_shards()
        progress = Progress(blocks, min(done, blocks), self.options.quiet)
        # Objects alive now (transformers, the skeleton, ...) survive the run: freezing them keeps the per-block
        # gc.collect of return_freed_memory from rescanning them each time (~0.2 s a block).
        gc.freeze()
        try:
            self._verify_finished_sources(done, progress)
            with deterministic(self.options.seed):
                if self.candidates:
                    self._allocate(progress)
                self._run_blocks(done, progress, on_block_done)
        finally:
            gc.unfreeze()
            progress.close()
        seconds = time.perf_counter() - start
        records, outliers = self._read_records()
        summary = summarize("mixed" if self.candidates else self.method.name, records, outliers, seconds, peak_rss_bytes(), min(done, blocks))
        summary.extra["rss_after_block"] = self.rss_after_block
        qconfig = self._quantization_config(records)
        config = dict(self.source.config)
        if any(w in self.tied for w in self.outside_quantized):
            config["tie_word_embeddings"] = False  # lm_head now has its own (quantized) weight
        from_card = self._model_card(config, qconfig, records)
        extra = {"README.md": from_card} if from_card else {}
        if self.candidates:  # the measurements, for another target without measuring again (--measurements)
            extra[PLAN_NAME] = json.dumps(self.plan, indent=1, sort_keys=True) + "\n"
        try:
            writer.finalize(config, qconfig, self.source.extra_files(), extra)
        except FormatError as exc:
            raise ConversionError(f"{exc}; the converted model is in {self.work_dir} and is finished by running the "
                                  "same command again") from None
        except OSError as exc:
            raise self._write_error(exc, self.out) from None
        return ConvertResult(self.out, summary, qconfig, self.source)

    def _replays(self, done: int) -> bool:
        blocks = len(self.skeleton.blocks)
        return self.needs_calibration and (done < blocks or (done == blocks and self.need_final_hidden))

    def _verify_finished_sources(self, done: int, progress: Progress) -> None:
        """Re-hash the source tensors the finished shards were made from that this run will not read anyway (a
        calibrated run re-reads the finished blocks to replay them): a source replaced since the interrupted run is
        refused instead of being mixed with the shards made from the old one."""
        if not self.recorded_digests:
            return
        replayed: set[str] = set()
        if self._replays(done):
            for index in range(min(done, len(self.skeleton.blocks))):
                prefix = self.skeleton.block_prefix(index)
                replayed.update(prefix + n for n in self.block_names[index])
        progress.note("checking the source against the partial conversion")
        self.source.verify(sorted(set(self.recorded_digests) - replayed))

    def _run_blocks(self, done: int, progress: Progress, on_block_done: BlockHook | None) -> None:
        blocks = len(self.skeleton.blocks)
        inputs: list[torch.Tensor] = []
        calls: BlockCalls | None = None
        if self._replays(done):
            calls = self._capture()
            inputs = calls.first_inputs
            calls.first_inputs = []
            for index in range(min(done, blocks)):  # resume: recompute inputs through the finished blocks
                progress.note(f"replaying block {index}")
                inputs = self._replay(index, calls, inputs)
        for index in range(done, blocks):
            inputs = self._convert_block(index, calls, inputs, progress)
            self.rss_after_block.append(current_rss_bytes())
            if on_block_done is not None:
                on_block_done(index)
        if done <= blocks:
            self._convert_outside(inputs)
            if on_block_done is not None:
                on_block_done(blocks)

    # ================================================================================================ size budget
    def _allocate(self, progress: Progress) -> None:
        """The budget's plan: the one an interrupted run saved in the work folder, else measured and saved first."""
        path = self.work_dir / PLAN_NAME
        if path.exists():
            try:
                self.plan = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise ConversionError(f"the saved allocation {path} cannot be read ({exc}); pass --restart") from None
        else:
            self.plan = self._measure_and_plan(progress)
            self._write_text(path, json.dumps(self.plan, indent=1, sort_keys=True) + "\n")
        self.assignment = plan_choices(self.plan, self.candidates)
        in_blocks = {f"{self.skeleton.block_prefix(i)}{n}.weight" for i, names in self.selection.block_linears.items()
                     for n in names}
        missing = sorted(in_blocks - set(self.assignment))
        if missing:
            raise ConversionError(f"the saved allocation {path} has no choice for {missing[0]}; pass --restart")

    def _measured_on(self) -> dict[str, Any]:
        """What a measurement depends on: a saved one is reused only where all of it is equal."""
        return {"source_fingerprint": self.source.fingerprint(), "calibration": self.state["calibration"],
                "candidates": [c.label for c in self.candidates],
                "sidecar_weighted": self.options.sidecar_weighted, "include": list(self.options.include),
                "exclude": list(self.options.exclude)}

    def _saved_measurements(self) -> list[LayerCosts] | None:
        given = self.options.measurements
        if given is None:
            return None
        path = Path(given)
        path = path / PLAN_NAME if path.is_dir() else path
        try:
            plan = json.loads(path.read_text())
            layers = [LayerCosts(name, int(e["weights"]), [int(b) for b in e["bytes"]], [float(x) for x in e["errors"]],
                                 float(e["reference"]), None if e.get("gain") is None else float(e["gain"]))
                      for name, e in plan["layers"].items()]
            measured_on = plan["measured_on"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConversionError(f"--measurements {path}: not a budget allocation qformat wrote ({exc})") from None
        ours = self._measured_on()
        differs = sorted(k for k in ours if measured_on.get(k) != ours[k])
        if self.options.budget_estimate == "loss" and any(layer.gain is None for layer in layers):
            differs.insert(0, "estimate (these have no loss gains: they were measured for 'output' or 'relative')")
        if differs:
            raise ConversionError(f"--measurements {path} were taken with a different {differs[0]}; convert without "
                                  "--measurements to measure again")
        return layers

    def _measure_and_plan(self, progress: Progress) -> dict[str, Any]:
        """Every candidate on every selected decoder linear, on the original model's calibration activations (or an
        earlier conversion's measurements of exactly that); then the knapsack over the bytes and estimates."""
        layers = self._saved_measurements()
        if layers is None:
            self.probes: dict[str, tuple[float, torch.Tensor]] = {}
            layers = self._measure(progress)
            if self.options.budget_estimate == "loss":
                self._measure_gains(layers, progress)
        weights = sum(layer.weights for layer in layers)
        assert self.budget_target is not None
        if "bits_per_weight" in self.budget_target:
            budget = int(self.budget_target["bits_per_weight"] * weights / 8)
        else:
            fixed = self._fixed_bytes()
            budget = self.budget_target["bytes"] - fixed
            if budget <= 0:
                raise ConversionError(f"--target-size {self.budget_target['bytes']} bytes leaves nothing for the "
                                      f"quantized linears: the other tensors take {fixed} bytes")
        plan = make_plan(self.candidates, layers, budget, self.budget_target, self.options.budget_estimate)
        return {**plan, "measured_on": self._measured_on()}

    def _measure(self, progress: Progress) -> list[LayerCosts]:
        calls = self._capture()
        inputs, calls.first_inputs = calls.first_inputs, []
        layers: list[LayerCosts] = []
        blocks = self.skeleton.blocks
        for index, block in enumerate(blocks):
            selected = self.selection.block_linears.get(index, [])
            prefix = self.skeleton.block_prefix(index)
            progress.note(f"measuring {len(self.candidates)} candidate configurations on block {index}")
            self._load_block(index)
            modules = dict(block.named_modules())
            if selected:
                stats = self._collect(index, calls, inputs, {prefix + name: modules[name] for name in selected})
                layers += [self._measure_layer(prefix + name, modules[name], stats) for name in selected]
            if index < len(blocks) - 1:
                inputs = run_block(block, index, calls, inputs)
            release(block)
            return_freed_memory()
        return layers

    def _measure_layer(self, module_name: str, module: nn.Module, stats: LinearStats) -> LayerCosts:
        weight_name = f"{module_name}.weight"
        absmax = stats.act_absmax(module_name)
        hessian, norms, tokens = stats.pop(module_name)
        weight = module.weight.detach().to(torch.float32)
        layer = LayerInput(weight_name, weight, self._dtype(weight_name), hessian, norms, tokens, act_absmax=absmax)
        sizes, errors, deltas = [], [], []
        for candidate in self.candidates:
            qt = self._quantize_layer(layer, candidate.method, candidate.config,
                                      (candidate.sidecar_rank, candidate.sidecar_bits), keep_hessian=True)
            decoded = torch.from_numpy(np.asarray(qt.decode(self.codecs), dtype=np.float32)).reshape(weight.shape)
            delta = weight - decoded
            sizes.append(int(qt.record["storage_bytes"]))
            errors.append(output_error(delta, hessian))
            deltas.append(delta)
        if self.options.budget_estimate == "loss":  # the probe's error, applied to the whole model afterwards
            probe = self._probe_index(sizes, weight.numel())
            self.probes[weight_name] = (errors[probe], deltas[probe].to(torch.float16))
        return LayerCosts(weight_name, weight.numel(), sizes, errors, output_error(weight, hessian))

    def _probe_index(self, sizes: list[int], weights: int) -> int:
        """The candidate whose error probes a layer's loss gain: the one nearest the target's bits (the size a
        layer is likely to get), else the median size."""
        target = (self.budget_target or {}).get("bits_per_weight")
        if target is None:
            return sorted(range(len(sizes)), key=sizes.__getitem__)[len(sizes) // 2]
        return min(range(len(sizes)), key=lambda i: (abs(8 * sizes[i] / weights - target), sizes[i]))

    def _measure_gains(self, layers: list[LayerCosts], progress: Progress) -> None:
        """Each layer's loss per unit of output error: the whole fp32 model on a few calibration windows, with that
        layer alone given its probe's error (estimate "loss"). The model is materialised once, then released."""
        model = self.skeleton.model
        for name, tensor in self.source.read(self.outside_names).items():
            set_tensor(model, name, tensor.to(torch.float32))
        for index in range(len(self.skeleton.blocks)):
            self._load_block(index)
        assert self.windows is not None
        windows = self.windows[:GAIN_WINDOWS]

        def loss() -> float:
            with torch.inference_mode():
                return float(sum(model(input_ids=w[None], labels=w[None]).loss for w in windows)) / len(windows)

        broken = []
        try:
            base = loss()
            if not math.isfinite(base):
                raise ConversionError(f"the source model's calibration loss is {base}: the 'loss' estimate cannot be "
                                      "measured; use --budget-estimate output")
            for layer in layers:
                progress.note(f"loss gain of {layer.name}")
                error, delta = self.probes.pop(layer.name)
                weight = _module_tensor(model, layer.name)
                original = weight.detach().clone()
                weight.sub_(delta.to(torch.float32))  # the layer as the probe quantizes it
                rise = loss() - base
                weight.copy_(original)
                if not math.isfinite(rise) or not math.isfinite(error):
                    broken.append(layer)  # the probe broke the model: the most sensitive kind of layer
                    continue
                # A probe that does not raise the loss (noise at this calibration size) still ranks by output error.
                layer.gain = (max(rise, 0.0) / error if error > 0 else 0.0) or GAIN_FLOOR
        finally:
            release(model)
            return_freed_memory()
        worst = max((layer.gain for layer in layers if layer.gain is not None), default=1.0)
        for layer in broken:
            layer.gain = BROKEN_GAIN_FACTOR * worst

    def _fixed_bytes(self) -> int:
        """Bytes of everything outside the budget's linears: the tensors written as they are, and the modules outside
        the blocks quantized by their own method (quantized here to count them; such a method must not need
        calibration)."""
        itemsize = {"F64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2, "I64": 8,
                    "U64": 8, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
        selected = set(self.selected_weights()) | set(self.outside_quantized)
        names = set(self.outside_names).union(*({self.skeleton.block_prefix(i) + n for n in names}
                                                for i, names in enumerate(self.block_names)))
        total = 0
        for name in sorted(names - selected):
            total += int(np.prod(self.source.shapes[name], dtype=np.int64)) * itemsize.get(self.source.dtypes[name], 4)
        for weight_name in self.outside_quantized:
            module_name = weight_name.rsplit(".", 1)[0]
            method, config = self._outside_method(module_name)
            if method.calibration & CALIBRATED:
                raise ConversionError(f"--target-size cannot count {module_name} in advance: its method "
                                      f"{method.name!r} calibrates; use --target-bits, or another --output-layer")
            source = self.tied.get(weight_name, weight_name)
            weight = self.source.read([source])[source].to(torch.float32)
            qt = self._quantize_tensor(weight_name, weight, self._dtype(weight_name), None, module_name, method, config)
            total += int(qt.record["storage_bytes"])
        return total

    def _capture(self) -> BlockCalls:
        """Block-0 inputs and the blocks' call arguments; only the modules before the blocks are materialised."""
        model = self.skeleton.model
        output_embeddings = model.get_output_embeddings()
        skip = {f"{n}.{p}" for n, m in model.named_modules() if m is output_embeddings
                for p, _ in m.named_parameters()}
        names = [n for n in self.outside_names if n not in skip]
        for name, tensor in self.source.read(names).items():
            set_tensor(model, name, tensor.to(torch.float32))
        try:
            assert self.windows is not None
            return capture_block_inputs(self.skeleton, self.windows)
        finally:
            release(model)  # the blocks are not materialised yet: this frees the embeddings
            return_freed_memory()

    def _load_block(self, index: int) -> dict[str, torch.Tensor]:
        block, prefix = self.skeleton.blocks[index], self.skeleton.block_prefix(index)
        stored = self.source.read(prefix + n for n in self.block_names[index])
        for name in self.block_names[index]:
            set_tensor(block, name, stored[prefix + name].to(torch.float32))
        return stored

    def _convert_block(self, index: int, calls: BlockCalls | None, inputs: list[torch.Tensor],
                       progress: Progress) -> list[torch.Tensor]:
        block, prefix = self.skeleton.blocks[index], self.skeleton.block_prefix(index)
        selected = self.selection.block_linears.get(index, [])
        progress.start_block(index, len(selected))
        stored = self._load_block(index)
        modules = dict(block.named_modules())
        tuning = calls is not None and bool(selected) and self.method.tunes_blocks
        # the original block's outputs: what a tuning method tunes the quantized block towards
        targets = run_block(block, index, calls, inputs) if tuning else []
        transformed = self._transform_block(index, selected, calls, inputs, stored)
        records: list[QuantizedTensor] = []
        if calls is None:
            for name in selected:
                records.append(self._quantize_module(prefix + name, modules[name], None))
                progress.layer_done(name)
        else:
            if not selected:  # nothing to calibrate here: the block only propagates
                groups = []
            elif self.options.true_sequential:
                groups = input_groups(block, index, calls, inputs[0], selected)
            else:
                groups = [selected]
            for group in groups:
                stats = self._collect(index, calls, inputs, {prefix + name: modules[name] for name in group})
                for name in group:
                    records.append(self._quantize_module(prefix + name, modules[name], stats))
                    progress.layer_done(name)
        tuned = False
        if tuning:
            assert calls is not None
            records, tuned = self._tune_block(index, records, calls, inputs, targets, stored)
            del targets
        if transformed is not None:
            records = self._finish_transformed(index, records, transformed)
        last = index == len(self.skeleton.blocks) - 1
        outputs = run_block(block, index, calls, inputs) if calls is not None and (
            not last or self.need_final_hidden) else []
        quantized = {qt.name for qt in records}
        # After a transform or a tuning the block's own tensors are written: folded norms and rows, tuned norms and
        # biases are part of the model now.
        plain = {prefix + n: to_numpy(stored[prefix + n] if transformed is None and not tuned
                                      else _module_tensor(block, n).to(stored[prefix + n].dtype))
                 for n in self.block_names[index] if prefix + n not in quantized}
        self._write_shard(index, plain, records)
        release(block)
        del stored, plain, records
        return_freed_memory()
        progress.block_done()
        return outputs

    def _collect(self, index: int, calls: BlockCalls, inputs: list[torch.Tensor],
                 linears: Mapping[str, nn.Module]) -> LinearStats:
        """The calibration statistics of ``linears`` (full module names) over block ``index``'s forwards."""
        stats = LinearStats.for_method(self.statistics)
        stats.attach(dict(linears))
        try:
            stats.collect(self.skeleton.blocks[index], index, calls, inputs)
        finally:
            stats.detach()
        return stats

    def _transform_block(self, index: int, selected: list[str], calls: BlockCalls | None,
                         inputs: list[torch.Tensor], stored: Mapping[str, torch.Tensor]) -> TransformedBlock | None:
        """Apply the transform chain to a loaded block (its selected linears then hold their transformed weights
        and hooks transform their inputs); the block's other tensors are rounded to their stored dtype, as the
        shard will hold them, so statistics, quantization and the next block's inputs see what the file holds."""
        if not self.chain:
            return None
        assert calls is not None  # a chain always calibrates
        block, prefix = self.skeleton.blocks[index], self.skeleton.block_prefix(index)

        def forward(keep: bool) -> list[torch.Tensor]:
            return run_block(block, index, calls, inputs, keep=keep)

        block_input = BlockInput(index, prefix, self.architecture, block, selected, forward,
                                 self.skeleton.model.config, self.options.seed)
        done = apply_chain(self.chain, block_input, self.options.seed)
        quantized = {f"{n}.weight" for n in selected}
        for name in self.block_names[index]:
            if name not in quantized:
                rounded = _module_tensor(block, name).to(stored[prefix + name].dtype).to(torch.float32)
                set_tensor(block, name, rounded)
        return done

    def _tune_block(self, index: int, records: list[QuantizedTensor], calls: BlockCalls, inputs: list[torch.Tensor],
                    targets: list[torch.Tensor], stored: Mapping[str, torch.Tensor]
                    ) -> tuple[list[QuantizedTensor], bool]:
        """The method's block tuning (:meth:`Method.tune_block`): the tuned records, each module's weight set to its
        tuned record decoded and the block's other tensors rounded to their stored dtype, so the block computes
        what the shard will hold; (records, whether anything was tuned)."""
        block, prefix = self.skeleton.blocks[index], self.skeleton.block_prefix(index)
        by_module = {qt.name[len(prefix):-len(".weight")]: qt for qt in records}
        # The captured call arguments and inputs are inference tensors, which autograd cannot save: plain copies.
        batches = [(hidden.clone(), *self._call_arguments(calls, index, hidden)) for hidden in inputs]
        targets = [t.clone() for t in targets]

        def forward(batch: int) -> torch.Tensor:
            hidden, args, kwargs = batches[batch]
            with torch.inference_mode(False), torch.enable_grad():
                out = block(hidden, *args, **kwargs)
            return out[0] if isinstance(out, (tuple, list)) else out

        seed = (zlib.crc32(f"tune:{prefix}".encode()) ^ self.options.seed) & 0x7FFFFFFF
        torch.manual_seed(seed)
        with torch.inference_mode(False):
            tuned = self.method.tune_block(BlockTuning(index, prefix, block, by_module, forward, targets, seed),
                                           self.config)
            for parameter in block.parameters():
                parameter.requires_grad_(False)
        if tuned is None:
            return records, False
        if set(tuned) != set(by_module):
            raise PluginError(f"method {self.method.name!r} ({self.plugin_label}) tuned block {index} into records "
                              f"for {sorted(tuned)}, not for its quantized linears {sorted(by_module)}")
        out = []
        for name, original in by_module.items():
            qt = tuned[name]
            if not isinstance(qt, QuantizedTensor) or qt.name != original.name or \
                    list(qt.record.get("shape", [])) != list(original.record.get("shape", [])):
                raise PluginError(f"method {self.method.name!r} tuned {original.name} into "
                                  f"{getattr(qt, 'name', type(qt).__name__)} with shape "
                                  f"{getattr(qt, 'record', {}).get('shape')}: not the same tensor")
            module = block.get_submodule(name)
            decoded = np.array(qt.decode(self.codecs), dtype=np.float32).reshape(tuple(module.weight.shape))
            module._parameters["weight"] = nn.Parameter(torch.from_numpy(decoded), requires_grad=False)
            out.append(qt)
        quantized = {f"{n}.weight" for n in by_module}
        for name in self.block_names[index]:
            if name not in quantized:
                value = _module_tensor(block, name).detach()
                set_tensor(block, name, value.to(stored[prefix + name].dtype).to(torch.float32))
        return out, True

    @staticmethod
    def _call_arguments(calls: BlockCalls, index: int, hidden: torch.Tensor) -> tuple[tuple, dict]:
        args, kwargs = calls.extra[(index, hidden.shape[0])]
        return cloned_call_arguments(tuple(args)), cloned_call_arguments(dict(kwargs))

    def _finish_transformed(self, index: int, records: list[QuantizedTensor],
                            done: TransformedBlock) -> list[QuantizedTensor]:
        """Wrap each record in its input transforms' codecs and give its module the decoded effective weight (no
        input hooks from here on): the block then computes exactly what a replay of its shard computes."""
        done.remove_hooks()
        block, prefix = self.skeleton.blocks[index], self.skeleton.block_prefix(index)
        wrapped = []
        for qt in records:
            name = qt.name[len(prefix):-len(".weight")]
            transforms = done.input_transforms.get(name)
            if transforms:
                try:
                    qt = wrap_record(qt, transforms, self.codecs)
                except FormatError as exc:
                    raise PluginError(f"the input transforms of {qt.name} do not wrap its record: {exc}") from None
                module = block.get_submodule(name)
                decoded = np.array(qt.decode(self.codecs), dtype=np.float32).reshape(tuple(module.weight.shape))
                module._parameters["weight"] = nn.Parameter(torch.from_numpy(decoded), requires_grad=False)
            wrapped.append(qt)
        return wrapped

    def _replay(self, index: int, calls: BlockCalls, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Run a finished block with the weights its shard holds (decoded), to get the next block's inputs."""
        block, prefix = self.skeleton.blocks[index], self.skeleton.block_prefix(index)
        self._load_block(index)  # also re-hashes the source tensors the shard was made from
        qfile = QFile(self.writer.shard_path(index), self.codecs)
        try:
            if self.chain or self.method.tunes_blocks:  # transforms and tunings change plain tensors too (folded or
                # tuned norms): the shard's are the model's
                for name in qfile.plain_names:
                    set_tensor(block, name[len(prefix):],
                               torch.from_numpy(np.array(qfile.tensor(name), dtype=np.float32)))
            for name in qfile.records:
                weight = torch.from_numpy(np.array(qfile.decode(name), dtype=np.float32))
                set_tensor(block, name[len(prefix):], weight)
        except FormatError as exc:
            qfile.close()
            self._discard_from(index)
            raise ConversionError(f"the finished shard of block {index} is damaged ({exc}); it was removed, run "
                                  "the same command again to redo it") from None
        qfile.close()
        outputs = run_block(block, index, calls, inputs)
        release(block)
        return_freed_memory()
        return outputs

    def _convert_outside(self, final_hidden: list[torch.Tensor]) -> None:
        """The last shard: embeddings, final norm, lm_head (plain unless selected)."""
        model = self.skeleton.model
        needed = sorted(set(self.outside_names) | {self.tied[w] for w in self.outside_quantized if w in self.tied})
        stored = self.source.read(needed)
        records = []
        for weight_name in self.outside_quantized:
            module_name = weight_name.rsplit(".", 1)[0]
            weight = stored[self.tied.get(weight_name, weight_name)]
            stats = None
            method, config = self._outside_method(module_name)
            if self.needs_calibration and method.calibration & CALIBRATED:
                stats = LinearStats.for_method(method.calibration)
                norm = model.base_model.norm
                norm_prefix = next(n for n, m in model.named_modules() if m is norm)
                for name in self.outside_names:
                    if name.startswith(norm_prefix + "."):
                        set_tensor(model, name, stored[name].to(torch.float32))
                with torch.inference_mode():
                    for hidden in final_hidden:
                        stats.add(module_name, norm(hidden))
                release(norm)
            records.append(self._quantize_tensor(weight_name, weight.to(torch.float32), self._dtype(weight_name),
                                                 stats, module_name, method, config))
        quantized = {qt.name for qt in records}
        plain = {n: to_numpy(stored[n]) for n in self.outside_names if n not in quantized}
        self._write_shard(len(self.skeleton.blocks), plain, records)

    # ================================================================================================ quantizing
    def _dtype(self, weight_name: str) -> str:
        return self.source.dtypes[self.tied.get(weight_name, weight_name)]

    def _quantize_module(self, module_name: str, module: nn.Module, stats: LinearStats | None) -> QuantizedTensor:
        weight_name = f"{module_name}.weight"
        choice = self.assignment.get(weight_name) if self.candidates else None
        if choice is not None:
            qt = self._quantize_tensor(weight_name, module.weight.detach(), self._dtype(weight_name), stats,
                                       module_name, choice.method, choice.config, (choice.sidecar_rank,
                                                                                   choice.sidecar_bits))
        else:
            qt = self._quantize_tensor(weight_name, module.weight.detach(), self._dtype(weight_name), stats,
                                       module_name, sidecar=(self.options.sidecar_rank, self.options.sidecar_bits))
        decoded = torch.from_numpy(np.array(qt.decode(self.codecs), dtype=np.float32)).reshape(module.weight.shape)
        module._parameters["weight"] = nn.Parameter(decoded, requires_grad=False)
        return qt

    def _quantize_tensor(self, weight_name: str, weight: torch.Tensor, dtype: str, stats: LinearStats | None,
                         stats_name: str, method: Method | None = None, config: MethodConfig | None = None,
                         sidecar: tuple[int, int] = (0, 16)) -> QuantizedTensor:
        method, config = method or self.method, config or self.config
        absmax = stats.act_absmax(stats_name) if stats is not None else None
        hessian, norms, tokens = stats.pop(stats_name) if stats is not None else (None, None, 0)
        layer = LayerInput(weight_name, weight.detach().to(torch.float32), dtype, hessian, norms, tokens,
                           act_absmax=absmax)
        return self._quantize_layer(layer, method, config, sidecar)

    def _quantize_layer(self, layer: LayerInput, method: Method, config: MethodConfig,
                        sidecar: tuple[int, int] = (0, 16), keep_hessian: bool = False) -> QuantizedTensor:
        """``method`` on a copy of ``layer``, then the sidecar if any. A method may change its inputs in place (GPTQ
        damps the Hessian), so the weight is copied, and the Hessian too where it is read again afterwards: by a
        weighted sidecar, or by the caller (``keep_hessian``)."""
        weight, weight_name, hessian = layer.weight, layer.name, layer.hessian
        keep = hessian is not None and (keep_hessian or (sidecar[0] and self.options.sidecar_weighted))
        layer = LayerInput(weight_name, weight.clone(), layer.dtype, hessian.clone() if keep else hessian,
                           layer.act_norms, layer.n_tokens, act_absmax=layer.act_absmax)
        # Seeded per layer, so a resumed run draws the same random numbers as an uninterrupted one.
        torch.manual_seed((zlib.crc32(weight_name.encode()) ^ self.options.seed) & 0x7FFFFFFF)
        qt = method.quantize(layer, config)
        if not isinstance(qt, QuantizedTensor) or qt.name != weight_name:
            raise PluginError(f"method {method.name!r} returned "
                              f"{type(qt).__name__} for {weight_name}, not a QuantizedTensor named so")
        if list(qt.record.get("shape", [])) != list(weight.shape):
            raise PluginError(f"method {method.name!r} returned shape {qt.record.get('shape')} for "
                              f"{weight_name}, whose shape is {list(weight.shape)}")
        rank, bits = sidecar
        if rank:
            qt = with_sidecar(qt, weight, rank, bits=bits, registry=self.codecs,
                              hessian=hessian if self.options.sidecar_weighted else None)
        return qt

    # ================================================================================================ files
    def _shard_expectation(self, index: int) -> tuple[set[str], set[str]]:
        """(record names, plain names) shard ``index`` must hold."""
        if index < len(self.skeleton.blocks):
            prefix = self.skeleton.block_prefix(index)
            records = {f"{prefix}{n}.weight" for n in self.selection.block_linears.get(index, [])}
            plain = {prefix + n for n in self.block_names[index]} - records
        else:
            records = set(self.outside_quantized)
            plain = set(self.outside_names) - records
        return records, plain

    def _source_names(self, index: int) -> set[str]:
        """The source tensors shard ``index`` is made from."""
        if index < len(self.skeleton.blocks):
            prefix = self.skeleton.block_prefix(index)
            return {prefix + n for n in self.block_names[index]}
        return set(self.outside_names) | {self.tied[w] for w in self.outside_quantized if w in self.tied}

    def _finished_shards(self) -> int:
        """Number of leading shards already written, intact, and with the digests of the source tensors they were
        made from on record; later or damaged shards are removed."""
        total = len(self.skeleton.blocks) + 1
        done = 0
        for index in range(total):
            path = self.writer.shard_path(index)
            if not path.is_file() or not self._source_names(index) <= self.recorded_digests.keys():
                break
            try:
                qfile = QFile(path, self.codecs)
                names = set(qfile.records), set(qfile.plain_names)
                qfile.close()
            except FormatError:
                break
            if names != self._shard_expectation(index):
                break
            done = index + 1
        self._discard_from(done)
        return done

    def _discard_from(self, index: int) -> None:
        for path in self.work_dir.glob("shard-*.safetensors"):
            if int(path.stem.split("-")[1]) >= index:
                path.unlink()
        for path in self.work_dir.glob(".shard-*"):  # temp files of an interrupted write
            path.unlink()

    def _write_shard(self, index: int, plain: Mapping[str, np.ndarray], records: list[QuantizedTensor]) -> None:
        path = self.writer.shard_path(index)
        try:
            self.writer.write_shard(index, plain, records)
            self._save_digests()  # a shard without its sources' digests on record counts as unfinished
        except OSError as exc:
            raise self._write_error(exc, path) from None

    def _write_error(self, exc: OSError, file: Path) -> ConversionError:
        kept = f"the partial work is in {self.work_dir} and can be resumed"
        untouched = f"{self.out} was not touched"
        if exc.errno == errno.ENOSPC:
            return ConversionError(f"disk full while writing {file}; {kept}; {untouched}")
        return ConversionError(f"cannot write {file}: {exc.strerror or exc}; {kept}; {untouched}")

    @staticmethod
    def _write_text(path: Path, text: str) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(text)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def _read_records(self) -> tuple[dict[str, dict], dict[str, int]]:
        records: dict[str, dict] = {}
        outliers: dict[str, int] = {}
        for index in range(len(self.skeleton.blocks) + 1):
            qfile = QFile(self.writer.shard_path(index), self.codecs)

            def length(tensor: str, _q: QFile = qfile) -> int:
                return int(np.prod(_q.st.entries[tensor].shape))

            for name, record in qfile.records.items():
                records[name] = record
                outliers[name] = outlier_count(record["weight"], length)
            qfile.close()
        return records, outliers

    def _quantization_config(self, records: Mapping[str, dict]) -> dict[str, Any]:
        from ..plugins import get_plugins
        from ..version import __version__

        source = {"id": self.source.hub_id or self._local_name(), "revision": self.source.revision,
                  **{k: v for k, v in self.source.describe().items() if k not in ("id", "revision")}}
        used = {node["codec"] for record in records.values() for node in iter_nodes(record["weight"])}
        providers = {}
        plugins = get_plugins()
        for codec in sorted(used):
            owner = plugins.codec_owner.get(codec)  # None for the core codecs
            if owner is not None:
                info = plugins.info[owner]
                providers[codec] = f"{info.package}>={info.version}"
        qconfig: dict[str, Any] = {
            "method": self.method.name, "method_params": self.config.to_params(),
            "method_config_version": self.config.version, "method_plugin": self.plugin_label,
            "bits_by_layer_type": bits_by_layer_type(records), "source": source,
            "calibration": self.state["calibration"], "quantized_modules": sorted(n.rsplit(".", 1)[0] for n in records),
            "qformat_version": __version__, "command": self._command(),
        }
        if providers:
            qconfig["codec_providers"] = providers
        if self.candidates:  # one method per layer, as allocated
            qconfig.update(method="mixed", method_params={}, allocation=allocation_summary(self.plan))
            del qconfig["method_config_version"], qconfig["method_plugin"]
        if self.options.sidecar_rank:
            qconfig["sidecar"] = self._sidecar_state()
        lineage = self.options.base_model or (None if self.source.hub_id else self._cached_hub_id())
        if lineage:
            qconfig["base_model"] = lineage
        if self.chain:
            qconfig["transforms"] = chain_dicts(self.chain)
        if self.output_method is not None:
            assert self.output_config is not None and self.output_name is not None
            qconfig["output_layer"] = {"module": self.output_name, "method": self.output_method.name,
                                       "params": self.output_config.to_params(),
                                       "version": self.output_config.version}
        return qconfig

    def _cached_hub_id(self) -> str | None:
        from .importing import hub_id_from_cache_path

        return hub_id_from_cache_path(Path(self.options.source))

    def _local_name(self) -> str:
        """A local source as its folder or file name: written files must not reveal the converting machine's paths."""
        return Path(self.options.source).resolve().name

    def _command(self) -> str:
        """The conversion as a canonical command line (for the model card)."""
        opts = self.options
        parts = ["qformat convert", self.source.hub_id or self._local_name(), f"--out {self.out.name}"]
        if self.candidates:
            parts += [f"--method {opts.method}"] if opts.method else []
            target = self.budget_target or {}
            parts.append(f"--target-bits {target['bits_per_weight']}" if "bits_per_weight" in target
                         else f"--target-size {target.get('bytes')}")
            if opts.candidates:
                parts += [f"--candidate {c.label}" for c in self.candidates]
            if opts.budget_estimate != "loss":
                parts.append(f"--budget-estimate {opts.budget_estimate}")
        else:
            parts.insert(1, f"--method {self.method.name}")
            defaults = {p.name: p.default for p in self.config.params()}
            parts += [f"-p {k}={v}" for k, v in sorted(asdict(self.config).items()) if defaults.get(k) != v]
        if opts.sidecar_rank:
            parts.append(f"--sidecar-rank {opts.sidecar_rank}" + (f" --sidecar-bits {opts.sidecar_bits}"
                                                                  if opts.sidecar_bits != 16 else ""))
        if opts.sidecar_weighted and (opts.sidecar_rank or any(c.sidecar_rank for c in self.candidates)):
            parts.append("--sidecar-weighted")
        parts += chain_command(self.chain)
        if self.output_method is not None:
            assert self.output_config is not None
            out_defaults = {p.name: p.default for p in self.output_config.params()}
            given = [f"{k}={v}" for k, v in sorted(asdict(self.output_config).items()) if out_defaults.get(k) != v]
            parts.append(f"--output-layer {self.output_method.name}" + (":" + ",".join(given) if given else ""))
        if self.needs_calibration:
            if opts.calib is not None:
                parts.append(f"--calib {Path(opts.calib).name}")
            parts.append(f"--calib-samples {opts.calib_samples} --calib-seqlen {opts.calib_seqlen} --seed {opts.seed}")
            if opts.true_sequential:
                parts.append("--true-sequential")
        parts += [f"--include '{p}'" for p in opts.include] + [f"--exclude '{p}'" for p in opts.exclude]
        if opts.base_model:
            parts.append(f"--base-model {opts.base_model}")
        return " ".join(parts)

    def _model_card(self, config: dict[str, Any], qconfig: dict[str, Any], records: Mapping[str, dict]) -> str | None:
        try:
            from ..model_card import render_model_card
        except ImportError:  # the card is documentation; a conversion does not depend on it
            return None
        full = {**config, "quantization_config": {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION,
                                                  **qconfig, "bits_per_weight": rounded_bits(records.values())}}
        return render_model_card(full, source_card_metadata=self.source.card_metadata())
