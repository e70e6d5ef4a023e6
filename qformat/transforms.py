"""The contract between qformat and a block-transform plugin (AWQ scaling, SmoothQuant, Hadamard rotations, ...).

A transform rewrites one decoder block, function-preserving, before its linears are quantized. It sees the block
(:class:`BlockInput`: the modules with fp32 weights loaded, its calibration inputs and outputs, the norm→linear pairs
of its architecture) and may

- modify the block's modules in place: fold per-channel scales into the preceding norm or linear
  (:func:`qformat.block_layout.fold_into_norm`, :func:`~qformat.block_layout.fold_into_rows`), merge an orthogonal
  rotation into adjacent weights;
- return, per selected linear, an :class:`InputTransform` for what cannot be folded: the method then quantizes
  ``weight(W)`` with calibration statistics of ``inputs(x)``, and :meth:`InputTransform.wrap` puts the format's
  input-transform codec around the method's record so that the file decodes to the weight the model uses on its
  untransformed inputs. :class:`ColumnScale` (a per-input-column ``scale`` node) is built in.

    @dataclass(frozen=True)
    class SmoothConfig(TransformConfig):
        transform = "smooth"
        alpha: float = param(0.5, "migration strength", min=0.0, max=1.0)

    class Smooth(Transform):
        config = SmoothConfig

        def apply(self, block: BlockInput, config: SmoothConfig) -> BlockResult:
            for pair in block.layout:                      # raises SkipBlock where the layout is not understood
                ...
            return BlockResult()

Register instances with the hook ``qformat_register_transforms(register)``. This module is importable without torch:
torch is imported where tensors are handled.
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from .block_layout import (
    LAYOUT_ARCHITECTURES,
    ScalePair,
    SkipBlock,
    block_layout,
    fold_into_norm,
    fold_into_rows,
    scale_columns,
)
from .errors import ParameterError, PluginError
from .format import CORE_CODECS, CodecRegistry, QuantizedTensor, RecordBuilder
from .format.builder import Node
from .methods import MethodConfig

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["BlockInput", "BlockResult", "ColumnScale", "InputTransform", "ScalePair", "SkipBlock", "Transform",
           "TransformConfig", "TransformedBlock", "apply_chain", "fold_into_norm", "fold_into_rows", "scale_columns",
           "wrap_record"]


def _as_transform_error(exc: ParameterError) -> ParameterError:
    """MethodConfig's messages say "method 'x'"; a transform's say "transform 'x'"."""
    return ParameterError(str(exc).replace("method ", "transform ", 1))


@dataclass(frozen=True)
class TransformConfig(MethodConfig):
    """A transform's parameters, typed and versioned exactly like a :class:`qformat.methods.MethodConfig`: a
    ``@dataclass(frozen=True)`` whose fields are declared with :func:`qformat.methods.param`; set ``transform`` (the
    transform's name) and bump ``version`` when the meaning of stored parameters changes (override ``migrate``)."""

    transform: ClassVar[str]

    def __post_init__(self) -> None:
        try:
            super().__post_init__()
        except ParameterError as exc:
            raise _as_transform_error(exc) from None

    @classmethod
    def _method_name(cls) -> str:
        return getattr(cls, "transform", None) or cls.__name__

    @classmethod
    def from_params(cls, values: Mapping[str, Any]) -> Any:
        try:
            return super().from_params(values)
        except ParameterError as exc:
            raise _as_transform_error(exc) from None

    def to_dict(self) -> dict[str, Any]:
        """``{"transform", "version", "params"}``: what :meth:`from_dict` reads back."""
        return {"transform": self._method_name(), "version": self.version, "params": self.to_params()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Any:
        if isinstance(data, Mapping):
            data = {("method" if k == "transform" else k): v for k, v in data.items()}
        try:
            return super().from_dict(data)
        except ParameterError as exc:
            raise _as_transform_error(exc) from None


Architectures = frozenset[str] | Callable[[str], bool]


class Transform:
    """Base class for transform plugins. Subclass, set ``config`` (a :class:`TransformConfig` class; ``name``
    defaults to its ``transform``), ``description`` and ``architectures`` (the ``config.model_type`` values it
    understands, or a predicate on them), and implement :meth:`apply`."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    config: ClassVar[type[TransformConfig]] = TransformConfig
    architectures: ClassVar[Architectures] = LAYOUT_ARCHITECTURES

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "config" not in cls.__dict__:
            return
        config = cls.config
        if not (isinstance(config, type) and issubclass(config, TransformConfig)) or config is TransformConfig:
            raise TypeError(f"{cls.__qualname__}.config must be a subclass of TransformConfig, not {config!r}")
        config.params()  # a malformed config fails when its plugin is imported
        if isinstance(config.version, bool) or not isinstance(config.version, int) or config.version < 1:
            raise TypeError(f"{config.__qualname__}.version must be a positive integer, not {config.version!r}")
        name, configured = cls.__dict__.get("name"), getattr(config, "transform", None)
        if name is None:
            name = configured or getattr(cls, "name", None)
            if name:
                cls.name = name
        if name and not configured:
            config.transform = name
        elif name != configured:
            raise TypeError(f"{cls.__qualname__} is transform {name!r} but its {config.__name__} configures "
                            f"{configured!r}")

    @property
    def params(self) -> tuple[Any, ...]:
        return type(self).config.params()

    def supports(self, architecture: str) -> bool:
        """Whether blocks of this ``model_type`` are understood (``architectures``: a set or a predicate)."""
        known = type(self).architectures  # from the class: a predicate defined in the class body stays unbound
        return bool(known(architecture)) if callable(known) else architecture in known

    def check_shapes(self, config: Any, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Refuse, before any work, weights this transform cannot handle (``shapes``: full weight name → shape of
        every selected linear in the decoder blocks); raise ParameterError naming the weight. Default: all fine."""

    def validate_params(self, values: Mapping[str, Any] | TransformConfig) -> TransformConfig:
        """This transform's config: parameters (values or command-line strings) parsed and range-checked, or a config
        instance checked to be of this transform's class."""
        config_class = type(self).config
        if isinstance(values, MethodConfig):
            if not isinstance(values, config_class):
                raise ParameterError(f"transform {self.name!r} takes a {config_class.__name__}, not a "
                                     f"{type(values).__name__}")
            return values
        return config_class.from_params(values)

    def apply(self, block: BlockInput, config: Any) -> BlockResult | None:
        """Rewrite ``block`` function-preservingly. Raise :class:`SkipBlock` (before changing anything) for a block
        this transform does not understand; reading ``block.layout`` does that for an unknown layout."""
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------------------------
# what a transform returns


class InputTransform:
    """What a transform leaves on one linear's input when it cannot fold it into a neighbour.

    The linear then computes ``inputs(x) @ weight(W).T`` (equal to ``x @ W.T`` up to fp32 rounding): the method
    quantizes ``weight(W)`` with statistics of ``inputs(x)``, and :meth:`wrap` stores the inverse in the record so that
    the file decodes to the weight for the untransformed inputs.
    """

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        """The weight [out, in] the method quantizes."""
        raise NotImplementedError

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """The linear's inputs [..., in] as the transformed weight expects them."""
        raise NotImplementedError

    def wrap(self, builder: RecordBuilder, inner: Node, role: str) -> Node:
        """A node decoding ``inner`` (the quantized ``weight(W)``) back to the effective weight for untransformed
        inputs; tensors are stored with ``builder.store(f"{role}.<part>", array)`` (``role`` is unique per record)."""
        raise NotImplementedError

    def describe(self) -> str:
        return type(self).__name__


class ColumnScale(InputTransform):
    """A per-input-column scale: the method quantizes ``W · diag(s)`` on inputs ``x / s``; the record is wrapped in a
    ``scale`` node with factor ``1/s`` ([1, in] fp32, group_shape [out, 1]). The stored fp32 factor is what the
    weight and inputs use too, so the file holds exactly the transformed linear."""

    def __init__(self, s: Any) -> None:
        import torch

        s = torch.as_tensor(s, dtype=torch.float32).detach().reshape(-1)
        if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
            raise PluginError("ColumnScale needs finite positive scales")
        self.factor = (1.0 / s).contiguous()  # the stored factor, fp32
        if not bool(torch.isfinite(self.factor).all()) or not bool((self.factor > 0).all()):
            raise PluginError("ColumnScale: a scale's reciprocal is not a finite positive fp32 number")

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        return w / self.factor.to(w.device)

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor.to(device=x.device, dtype=x.dtype)

    def wrap(self, builder: RecordBuilder, inner: Node, role: str) -> Node:
        rows = builder.matrix_shape[0]
        factor = self.factor.cpu().numpy().astype(np.float32).reshape(1, -1)
        return builder.scale(inner, builder.tensor(f"{role}.factor", factor), group_shape=(rows, 1))

    def describe(self) -> str:
        return f"ColumnScale[{self.factor.numel()}]"


@dataclass
class BlockResult:
    """``input_transforms``: per selected linear (relative name), the input transform(s) the transform leaves on it,
    in the order they apply to the input. ``info``: free-form notes (e.g. which pairs were scaled)."""

    input_transforms: dict[str, InputTransform | list[InputTransform]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# what a transform sees


class BlockInput:
    """One decoder block handed to a transform.

    ``index``, ``prefix`` ("model.layers.3."), ``architecture`` (config.model_type), ``block`` (the decoder layer,
    fp32 weights loaded), ``linears`` (relative names of the linears selected for quantization), ``model_config``
    (the transformers config, for head counts), ``seed`` (this block's and transform's seed; torch's global RNG is
    also seeded with it before :meth:`Transform.apply`). ``forward(keep)`` is what the pipeline (or harness) runs the
    block with over the calibration inputs.
    """

    index: int
    prefix: str
    architecture: str
    block: nn.Module
    linears: tuple[str, ...]
    model_config: Any
    seed: int

    def __init__(self, index: int, prefix: str, architecture: str, block: nn.Module, linears: Sequence[str],
                 forward: Callable[[bool], list[torch.Tensor]], model_config: Any = None, seed: int = 0) -> None:
        self.index, self.prefix, self.architecture = index, prefix, architecture
        self.block, self.linears = block, tuple(linears)
        self.model_config, self.seed = model_config, seed
        self._forward = forward
        self._layout: list[ScalePair] | None = None

    @property
    def layout(self) -> list[ScalePair]:
        """The block's (previous op, linears, module to inspect) pairs; raises :class:`SkipBlock` with the reason
        when this architecture or this block's modules are not understood."""
        if self._layout is None:
            self._layout = block_layout(self.architecture, self.block, self.prefix)
        return self._layout

    def run(self) -> list[torch.Tensor]:
        """The block's outputs (fp32 hidden states, one per calibration micro-batch) with the current weights."""
        return self._forward(True)

    def capture(self, names: Iterable[str], max_tokens: int | None = None) -> dict[str, torch.Tensor]:
        """``{name: X [N, in] fp32}``: the inputs of those submodules over the calibration tokens (after the input
        transforms of the transforms before this one), or a seeded subsample of ``max_tokens`` rows (the same rows
        for every name)."""
        import torch

        names = list(names)
        modules = dict(self.block.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise PluginError(f"block {self.prefix!r} has no submodule {missing[0]!r}")
        seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        last: list[Any] = [None, None]  # the last input and its flattened copy: q/k/v share one

        def hook(_module: Any, args: tuple, _name: str) -> None:
            x = args[0]
            if x is not last[0]:
                last[0], last[1] = x, x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
            seen[_name].append(last[1])

        handles = [modules[n].register_forward_pre_hook(lambda m, a, _n=n: hook(m, a, _n)) for n in names]
        try:
            self._forward(False)
        finally:
            for handle in handles:
                handle.remove()
        out = {n: torch.cat(v) if v else torch.zeros(0, 0) for n, v in seen.items()}
        rows = {x.shape[0] for x in out.values()}
        if max_tokens is not None and rows and max(rows) > max_tokens:
            generator = torch.Generator().manual_seed(self.seed & 0x7FFFFFFF)
            pick = {r: torch.randperm(r, generator=generator)[:max_tokens].sort().values for r in sorted(rows)}
            out = {n: x[pick[x.shape[0]]] for n, x in out.items()}
        return out


# ---------------------------------------------------------------------------------------------------------------
# running a chain on one block (the pipeline and the harness share this)


class _InputHooks:
    """Forward pre-hooks applying each linear's input transforms. Linears fed the same tensor with the same
    transforms (q/k/v under one ColumnScale) get one transformed tensor, so statistics shared between them stay
    shared."""

    def __init__(self) -> None:
        self.handles: list[Any] = []
        self._last: tuple[Any, tuple[int, ...], Any] | None = None

    def add(self, module: nn.Module, transforms: list[InputTransform]) -> None:
        def hook(_module: Any, args: tuple) -> tuple:
            x, key = args[0], tuple(id(t) for t in transforms)
            last = self._last
            if last is not None and last[0] is x and last[1] == key:
                out = last[2]
            else:
                out = x
                for t in transforms:
                    out = t.inputs(out)
                self._last = (x, key, out)
            return (out, *args[1:])

        self.handles.append(module.register_forward_pre_hook(hook))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self._last = None


@dataclass
class TransformedBlock:
    """A chain applied to one block: the modules changed in place, each selected linear's weight replaced by its
    transformed weight, and hooks applying the input transforms (until :meth:`remove_hooks`).
    ``input_transforms``: per linear, in the order they apply to the input. ``skipped``: (transform, reason)."""

    input_transforms: dict[str, list[InputTransform]] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    info: dict[str, dict[str, Any]] = field(default_factory=dict)
    hooks: _InputHooks = field(default_factory=_InputHooks)

    def remove_hooks(self) -> None:
        self.hooks.remove()


def transform_seed(seed: int, prefix: str, transform: str) -> int:
    """The seed of one transform on one block: like the per-layer seed, so a resumed run draws the same numbers."""
    return (zlib.crc32(f"{prefix}{transform}".encode()) ^ seed) & 0x7FFFFFFF


def apply_chain(chain: Sequence[tuple[Transform, TransformConfig]], block: BlockInput,
                seed: int = 0) -> TransformedBlock:
    """Apply each transform in turn; each sees the block as the ones before left it (their input transforms active).

    A transform that does not support the architecture, or raises :class:`SkipBlock`, leaves the block as it was
    and a warning names the block and the reason. Raises :class:`PluginError` for a result that breaks the contract.
    """
    import torch
    from torch import nn

    done = TransformedBlock()
    modules = dict(block.block.named_modules())
    for transform, config in chain:
        where = f"transform {transform.name!r} skips block {block.index} ({block.prefix.rstrip('.')})"
        if not transform.supports(block.architecture):
            reason = f"architecture {block.architecture!r} is not one it understands"
            warnings.warn(f"{where}: {reason}", RuntimeWarning, stacklevel=2)
            done.skipped.append((transform.name, reason))
            continue
        block.seed = transform_seed(seed, block.prefix, transform.name)
        saved = {k: v.detach().clone() for k, v in block.block.state_dict().items()}
        torch.manual_seed(block.seed)
        try:
            with torch.no_grad():
                result = transform.apply(block, config)
        except SkipBlock as exc:
            block.block.load_state_dict(saved)  # whatever it changed before giving up is undone
            warnings.warn(f"{where}: {exc}", RuntimeWarning, stacklevel=2)
            done.skipped.append((transform.name, str(exc)))
            continue
        del saved
        if result is None:
            result = BlockResult()
        if not isinstance(result, BlockResult):
            raise PluginError(f"transform {transform.name!r} returned {type(result).__name__} for block "
                              f"{block.prefix!r}, not a BlockResult")
        done.info[transform.name] = dict(result.info)
        for name, given in result.input_transforms.items():
            items = list(given) if isinstance(given, (list, tuple)) else [given]
            if name not in block.linears:
                raise PluginError(f"transform {transform.name!r} returned an input transform for {name!r}, which "
                                  f"is not a selected linear of block {block.prefix!r}")
            if not all(isinstance(t, InputTransform) for t in items):
                raise PluginError(f"transform {transform.name!r} returned something else than InputTransforms for "
                                  f"{block.prefix}{name}")
            module = modules[name]
            with torch.no_grad():
                weight = module.weight.detach()
                for t in items:
                    weight = t.weight(weight)
                if tuple(weight.shape) != tuple(module.weight.shape):
                    raise PluginError(f"transform {transform.name!r}: the input transform of {block.prefix}{name} "
                                      f"changed the weight's shape {tuple(module.weight.shape)} to "
                                      f"{tuple(weight.shape)}")
                module._parameters["weight"] = nn.Parameter(weight.to(torch.float32).contiguous(),
                                                            requires_grad=False)
            done.hooks.add(module, items)
            done.input_transforms.setdefault(name, []).extend(items)
    return done


def wrap_record(qt: QuantizedTensor, transforms: Sequence[InputTransform],
                registry: CodecRegistry = CORE_CODECS) -> QuantizedTensor:
    """The method's record wrapped in each input transform's codec, the last-applied innermost, so the file decodes
    to the weight for untransformed inputs. Validated like any record."""
    if not transforms:
        return qt
    record = qt.record
    builder = RecordBuilder(qt.name, record["shape"], record["dtype"], registry)
    builder.tensors.update(qt.tensors)
    node = record["weight"]
    for index in reversed(range(len(transforms))):
        node = transforms[index].wrap(builder, node, f"input_transform{index}")
    return builder.finish(node, info=record.get("info"))
