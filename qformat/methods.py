"""The contract between qformat and a quantization method plugin.

A method quantizes one linear layer at a time. Its parameters are a typed, versioned :class:`MethodConfig` (a frozen
dataclass whose fields are declared with :func:`param`, so the command line, ``qformat plugins`` and the range checks
read them); it declares the calibration statistics it needs; the pipeline gathers those statistics block by block and
calls :meth:`Method.quantize` with the layer and the config, which returns a :class:`qformat.format.QuantizedTensor`
built from the format's component kinds (see :class:`qformat.format.RecordBuilder`)::

    @dataclass(frozen=True)
    class NF4Config(MethodConfig):
        method = "nf4"
        block_size: int = param(64, "weights per absmax block along a row", min=8, max=4096)
        double_quant: bool = param(True, "store absmax as 8-bit affine codes")

    class NF4(Method):
        config = NF4Config
        def quantize(self, layer: LayerInput, config: NF4Config) -> QuantizedTensor: ...

The older form, ``params = (Param("block_size", int, 64, ...), ...)`` with ``config["block_size"]`` in the body, still
works: such a method gets a config class made from its params.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass, make_dataclass
from typing import Any, ClassVar, TypeVar

from .errors import ParameterError
from .format import QuantizedTensor

# Integer parameters without a declared bound are still kept to 32-bit range: no bit width, group size or count a
# method can use lies beyond it, and a value like 99999999999999999999 is a typo, not a request.
INT_LIMIT = 2**31 - 1


@dataclass(frozen=True)
class Param:
    """A typed method parameter with its default and allowed range."""

    name: str
    type: type  # int, float, bool or str
    default: Any
    help: str
    min: float | None = None
    max: float | None = None
    choices: tuple[Any, ...] | None = None

    def parse(self, value: Any, method: str) -> Any:
        """Convert a value (possibly a command-line string) and check it against the declared range."""
        where = f"method {method!r} parameter {self.name!r}"
        if isinstance(value, str) and self.type is not str:
            text = value.strip().lower()
            try:
                if self.type is bool:
                    if text not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                        raise ValueError(value)
                    value = text in ("1", "true", "yes", "on")
                elif self.type is int:
                    value = _parse_int(text)
                else:
                    value = self.type(text)
            except ValueError:
                raise ParameterError(f"{where}: {value!r} is not a valid {self.type.__name__}") from None
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if self.type is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, self.type) or (self.type is not bool and isinstance(value, bool)):
            raise ParameterError(f"{where}: expected {self.type.__name__}, got {value!r}")
        if isinstance(value, float) and math.isnan(value):
            raise ParameterError(f"{where}: NaN is not allowed")
        if self.choices is not None and value not in self.choices:
            raise ParameterError(f"{where}: {value!r} is not one of {list(self.choices)}")
        low, high = self.min, self.max
        if self.type is int:
            low = -INT_LIMIT - 1 if low is None else low
            high = INT_LIMIT if high is None else high
        if low is not None and value < low:
            raise ParameterError(f"{where}: {value!r} is below the minimum {low}")
        if high is not None and value > high:
            raise ParameterError(f"{where}: {value!r} is above the maximum {high}")
        return value

    def describe(self) -> str:
        rng = f" in [{self.min}, {self.max}]" if self.min is not None or self.max is not None else ""
        choices = f" one of {list(self.choices)}" if self.choices else ""
        return f"{self.name} ({self.type.__name__}, default {self.default!r}{rng}{choices}): {self.help}"


def _parse_int(text: str) -> int:
    """An integer written as digits or in exponent form ("1e3"); a fraction, inf or nan is not one."""
    try:
        return int(text)
    except ValueError:
        number = float(text)  # ValueError for words
        if not math.isfinite(number) or not number.is_integer():
            raise ValueError(text) from None
        return int(number)


_FIELD_KEY = "qformat.param"  # where param() keeps a field's help and range in the dataclass field metadata
_FIELD_TYPES = {t.__name__: t for t in (int, float, bool, str)}
C = TypeVar("C", bound="MethodConfig")


@dataclass(frozen=True)
class _FieldSpec:
    help: str
    min: float | None
    max: float | None
    choices: tuple[Any, ...] | None


def param(default: Any, help: str, *, min: float | None = None, max: float | None = None,
          choices: tuple[Any, ...] | list[Any] | None = None) -> Any:
    """A :class:`MethodConfig` field: its default, help text and allowed range; its type is the field's annotation
    (int, float, bool or str)."""
    spec = _FieldSpec(help, min, max, tuple(choices) if choices is not None else None)
    return field(default=default, metadata={_FIELD_KEY: spec})


def _json_value(value: Any) -> Any:
    """A parameter value as strict JSON holds it: a non-finite float (outlier_threshold=inf) becomes the string that
    -p parses back ("inf"), since readers reject the non-standard Infinity token."""
    return str(value) if isinstance(value, float) and not math.isfinite(value) else value


@dataclass(frozen=True)
class MethodConfig:
    """A method's parameters, typed and versioned. Subclass as a ``@dataclass(frozen=True)`` whose fields are all
    declared with :func:`param`; set ``method`` (the method's name) and bump ``version`` when the meaning of stored
    parameters changes (then override :meth:`migrate`). Constructing one checks every value against its declared range,
    then :meth:`check` (constraints spanning parameters)."""

    method: ClassVar[str]
    version: ClassVar[int] = 1
    _params: ClassVar[tuple[Param, ...] | None] = None  # per class, from its fields (see params())

    def __post_init__(self) -> None:
        name = self._method_name()
        for p in self.params():  # also normalises: "4" -> 4 for an int, 1 -> 1.0 for a float
            object.__setattr__(self, p.name, p.parse(getattr(self, p.name), name))
        self.check()

    def check(self) -> None:
        """Override for constraints that span parameters (raise ParameterError naming the parameter)."""

    @classmethod
    def _method_name(cls) -> str:
        return getattr(cls, "method", None) or cls.__name__

    @classmethod
    def params(cls) -> tuple[Param, ...]:
        """The declared parameters, in field order (what the command line and ``qformat plugins`` show)."""
        declared = cls.__dict__.get("_params")
        if declared is None:
            declared = _declared_params(cls)
            cls._params = declared
        return declared

    @classmethod
    def from_params(cls: type[C], values: Mapping[str, Any]) -> C:
        """Defaults filled in, each value (a value or a command-line string) parsed and range-checked, unknown keys
        rejected naming the known ones."""
        declared = [p.name for p in cls.params()]
        unknown = sorted((k for k in values if k not in declared), key=str)
        if unknown:
            raise ParameterError(f"method {cls._method_name()!r} has no parameter {unknown[0]!r}; it takes: "
                                 f"{', '.join(declared) or 'none'}")
        return cls(**values)

    def to_params(self) -> dict[str, Any]:
        """The parameters in declaration order, as strict JSON holds them (inf as "inf", which from_params reads)."""
        return {p.name: _json_value(getattr(self, p.name)) for p in self.params()}

    def to_dict(self) -> dict[str, Any]:
        """``{"method", "version", "params"}``: what :meth:`from_dict` reads back, also after a version change."""
        return {"method": self._method_name(), "version": self.version, "params": self.to_params()}

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
        """Read :meth:`to_dict`'s form. Parameters of an older version go through :meth:`migrate`; a newer version
        (written by a newer plugin) is refused. Without a version the parameters are version 1 (as everything
        written before configs had versions)."""
        name = cls._method_name()
        params = data.get("params", {}) if isinstance(data, Mapping) else None
        if not isinstance(params, Mapping):
            raise ParameterError(f"method {name!r}: a config is a mapping with 'method', 'version' and 'params' "
                                 f"(a mapping), got {type(data).__name__}")
        if data.get("method", name) != name:
            raise ParameterError(f"these are parameters of method {data['method']!r}, not {name!r}")
        version = data.get("version", 1)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ParameterError(f"method {name!r}: config version {version!r} is not a positive integer")
        if version > cls.version:
            raise ParameterError(f"method {name!r}: these parameters are of config version {version}, newer than "
                                 f"this plugin's {cls.__name__} (version {cls.version}); upgrade the plugin")
        values = dict(params)
        if version < cls.version:
            values = cls.migrate(values, version)
        return cls.from_params(values)

    @classmethod
    def migrate(cls, params: dict[str, Any], from_version: int) -> dict[str, Any]:
        """Turn parameters of config version ``from_version`` into this version's (rename, convert, drop keys). The
        default keeps them: right when a version only added parameters with defaults."""
        return params


def _field_type(cls: type, f: Any) -> type:
    annotation = _FIELD_TYPES.get(f.type.strip()) if isinstance(f.type, str) else f.type
    if annotation not in _FIELD_TYPES.values():
        raise TypeError(f"{cls.__qualname__}.{f.name}: a parameter is an int, float, bool or str, not {f.type!r}")
    return annotation


def _declared_params(cls: type[MethodConfig]) -> tuple[Param, ...]:
    """The Params of a config class, from its dataclass fields; a class that cannot be one is a TypeError."""
    if not is_dataclass(cls) or not cls.__dataclass_params__.frozen:
        raise TypeError(f"{cls.__qualname__}: a MethodConfig is a @dataclass(frozen=True)")
    names = {f.name for f in fields(cls)}
    stray = [n for n, a in inspect.get_annotations(cls).items() if n not in names and "ClassVar" not in str(a)]
    if stray:  # a subclass adding fields without the decorator would silently ignore them
        raise TypeError(f"{cls.__qualname__}.{stray[0]} is not a dataclass field: decorate {cls.__qualname__} with "
                        "@dataclass(frozen=True)")
    declared = []
    for f in fields(cls):
        spec = f.metadata.get(_FIELD_KEY)
        if not isinstance(spec, _FieldSpec) or f.default is MISSING or not f.init:
            raise TypeError(f"{cls.__qualname__}.{f.name}: declare every field with qformat.methods.param(default, "
                            "help, ...)")
        declared.append(Param(f.name, _field_type(cls, f), f.default, spec.help, spec.min, spec.max, spec.choices))
    return tuple(declared)


@dataclass(frozen=True)
class _ParamsTupleConfig(MethodConfig):
    """Base of the config made for a method that declares ``params = (Param(...), ...)``: item access keeps bodies
    written against the parameter dict (``params["bits"]``) working."""

    def __getitem__(self, name: str) -> Any:
        if name not in {p.name for p in self.params()}:
            raise KeyError(name)
        return getattr(self, name)

    def get(self, name: str, default: Any = None) -> Any:
        return self[name] if name in {p.name for p in self.params()} else default


def _config_from_params(method: type, declared: tuple[Param, ...]) -> type[MethodConfig]:
    specs = [(p.name, p.type, param(p.default, p.help, min=p.min, max=p.max, choices=p.choices)) for p in declared]
    namespace = {"method": method.name} if getattr(method, "name", None) else {}
    config = make_dataclass(f"{method.__name__}Config", specs, bases=(_ParamsTupleConfig,), frozen=True,
                            namespace=namespace)
    config.__module__, config.__qualname__ = method.__module__, f"{method.__qualname__}Config"
    return config


class _ConfigParams:
    """``Method.params``: the parameters of the method's config, on the class and on its instances."""

    def __get__(self, instance: Any, owner: type) -> tuple[Param, ...]:
        return owner.config.params()


@dataclass
class LayerInput:
    """One linear layer handed to a method.

    ``weight`` is a float32 torch tensor [out, in] (CPU). ``hessian`` is the float32 torch tensor [in, in]
    ``2/N * sum(x x^T)`` over the N calibration tokens (or None if the method needs no calibration);
    ``act_norms`` is the per-input-channel L2 norm of the activations over the calibration tokens;
    ``act_absmax`` the per-input-channel max |x| over them (LLM.int8()'s outlier features), each only when asked for.
    ``dtype`` is the original weight dtype ("F32", "F16" or "BF16") to record.
    """

    name: str
    weight: Any
    dtype: str = "F32"
    hessian: Any | None = None
    act_norms: Any | None = None
    n_tokens: int = 0
    act_absmax: Any | None = None


def output_error(delta: Any, hessian: Any | None = None) -> float:
    """``tr(ΔW H ΔWᵀ)``: the squared output error on the calibration tokens of a weight error ``delta`` [out, in]
    (``hessian`` = the layer's ``2/N Σ x xᵀ``; None: ``‖ΔW‖²_F``), computed in the Hessian's dtype and summed in
    float64. What GPTQ-family methods minimise, and what the size budget compares."""
    import torch

    if hessian is None:
        return float(delta.square().sum(dtype=torch.float64))
    d = delta.to(hessian.dtype)
    return float(((d @ hessian) * d).sum(dtype=torch.float64))


def cloned_call_arguments(value: Any) -> Any:
    """A block call's arguments (tensors, tuples and lists of them, other values) with every tensor cloned: the
    calibration runs in inference mode, and inference tensors cannot be saved for a backward pass."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, tuple):
        return tuple(cloned_call_arguments(v) for v in value)
    if isinstance(value, list):
        return [cloned_call_arguments(v) for v in value]
    if isinstance(value, dict):
        return {k: cloned_call_arguments(v) for k, v in value.items()}
    return value


class BlockTuning:
    """One decoder block handed to :meth:`Method.tune_block` once all its selected linears are quantized.

    ``index``, ``prefix`` ("model.layers.3."), ``block`` (the decoder layer: every quantized linear's weight is its
    record decoded, the other tensors as the shard will hold them, after any block transform), ``records``
    (relative module name, e.g. "self_attn.q_proj" -> its :class:`QuantizedTensor`, in quantization order), ``seed``
    (this block's; torch's global RNG is seeded with it too). The calibration data: :attr:`batches` micro-batches;
    :meth:`forward` runs the block on one with autograd enabled (the inputs are what the quantized previous blocks
    produce, as in the file), :meth:`target` is the original block's fp32 output on the same input (before
    quantization), the goal of the tuning. A method builds whatever differentiable form of its records it needs
    (codes fixed, codebooks and scales trainable, say), may also tune the block's float parameters in place (norm
    weights, biases: set ``requires_grad`` itself; the pipeline rounds them to their stored dtype afterwards and
    writes them), and returns the tuned records.
    """

    index: int
    prefix: str
    block: Any
    records: dict[str, QuantizedTensor]
    seed: int

    def __init__(self, index: int, prefix: str, block: Any, records: Mapping[str, QuantizedTensor],
                 forward: Any, targets: list[Any], seed: int = 0) -> None:
        self.index, self.prefix, self.block, self.seed = index, prefix, block, seed
        self.records = dict(records)
        self._forward, self._targets = forward, targets

    @property
    def batches(self) -> int:
        return len(self._targets)

    def forward(self, batch: int) -> Any:
        """The block's output on calibration micro-batch ``batch`` with its current parameters, differentiable."""
        return self._forward(batch)

    def target(self, batch: int) -> Any:
        """The original (unquantized) block's output on micro-batch ``batch`` (fp32, no grad)."""
        return self._targets[batch]


class Method:
    """Base class for method plugins. Subclass, set ``config`` (a :class:`MethodConfig` class; ``name`` defaults to
    its ``method``), ``description`` and ``calibration``, and implement :meth:`quantize`."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    config: ClassVar[type[MethodConfig]] = MethodConfig
    params: ClassVar[tuple[Param, ...]] = _ConfigParams()  # type: ignore[assignment]  # derived from config
    # Which statistics the pipeline must collect: a subset of {"hessian", "act_norms", "act_absmax"}.
    calibration: ClassVar[frozenset[str]] = frozenset()
    transforms: ClassVar[tuple[str, ...]] = ()  # block transforms always run first, e.g. ("awq",) (qformat.transforms)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__
        if "config" in own:
            if "params" in own:
                raise TypeError(f"{cls.__qualname__}: declare the parameters as config fields, not also as params")
            config = cls.config
            if not (isinstance(config, type) and issubclass(config, MethodConfig)) or config is MethodConfig:
                raise TypeError(f"{cls.__qualname__}.config must be a subclass of MethodConfig, not {config!r}")
            config.params()  # a malformed config fails here, when its plugin is imported
            if isinstance(config.version, bool) or not isinstance(config.version, int) or config.version < 1:
                raise TypeError(f"{config.__qualname__}.version must be a positive integer, not {config.version!r}")
            # The name is said once: on the config (method = ...) or on the method class (name = ...).
            name, configured = own.get("name"), getattr(config, "method", None)
            if name is None:
                name = configured or getattr(cls, "name", None)
                if name:
                    cls.name = name
            if name and not configured:
                config.method = name
            elif name != configured:
                raise TypeError(f"{cls.__qualname__} is method {name!r} but its {config.__name__} configures "
                                f"{configured!r}")
        elif "params" in own or cls.config is MethodConfig or issubclass(cls.config, _ParamsTupleConfig):
            cls.config = _config_from_params(cls, tuple(cls.params))

    def validate_params(self, values: Mapping[str, Any] | MethodConfig) -> MethodConfig:
        """This method's config: ``values`` (parameter names to values or command-line strings) parsed and
        range-checked with defaults filled in, or a config instance checked to be of this method's class."""
        config_class = type(self).config
        if isinstance(values, MethodConfig):
            if not isinstance(values, config_class):
                raise ParameterError(f"method {self.name!r} takes a {config_class.__name__}, not a "
                                     f"{type(values).__name__} (which configures {values._method_name()!r})")
            config = values
        else:
            config = config_class.from_params(values)
        self.check_params(asdict(config))
        return config

    def check_params(self, params: dict[str, Any]) -> None:
        """The older place for constraints spanning parameters (raise ParameterError); a config's :meth:`check`
        is the place now."""

    def check_shapes(self, config: Any, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Refuse, before any work, weights this method cannot quantize (``shapes``: full weight name -> shape of every
        selected linear in the decoder blocks), raising ParameterError naming the weight. Default: all fine."""

    def quantize(self, layer: LayerInput, config: Any) -> QuantizedTensor:
        """Quantize one layer with this method's config (as :meth:`validate_params` returns it)."""
        raise NotImplementedError

    def tune_block(self, block: BlockTuning, config: Any) -> Mapping[str, QuantizedTensor] | None:
        """Optional second stage, run by the pipeline per decoder block after :meth:`quantize` (calibrating
        methods only): tune the block to its original outputs (AQLM's fine-tuning: codebooks, scales and the float
        parameters, codes fixed). Return the tuned records, keyed as ``block.records`` with the same names and
        shapes, or None to keep the block as quantized. Must be deterministic given ``block.seed``: a resumed
        conversion replays nothing of it, it just reads the shard."""
        return None

    @property
    def tunes_blocks(self) -> bool:
        """Whether this method implements :meth:`tune_block` (the pipeline then keeps the original block outputs)."""
        return type(self).tune_block is not Method.tune_block
