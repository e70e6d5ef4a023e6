"""The block-transform chain of a conversion: which transforms, with which configs, in which order.

A chain is given as names (``"awq"``), command-line specs (``"awq:bits=3,group_size=64"``), dicts (``{"transform":
"awq", "params": {...}}``, as ``quantization_config`` records them) or :class:`~qformat.transforms.TransformConfig`
instances (used as they are). A parameter not given explicitly takes the method config's parameter of the same name
and type when it has one (``--transform awq --method gptq --bits 3`` searches AWQ scales for 3-bit codes). The
method's own ``transforms`` (AWQ's method declares ``("awq",)``) run first unless the user gave them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..errors import ParameterError
from ..methods import Method, MethodConfig
from ..transforms import Transform, TransformConfig

TransformSpec = str | Mapping[str, Any] | TransformConfig
Chain = list[tuple[Transform, TransformConfig]]


def parse_key_values(items: Iterable[str], *, malformed: str, prefix: str = "") -> dict[str, str]:
    """``key=value`` items → {key: value}, keys with ``-`` read as ``_``, values stripped (still strings: a config
    parses them). The one parser of ``-p KEY=VALUE`` and of ``--transform NAME:key=value,...``; its errors are
    ``{prefix}{malformed}, got 'item'`` and ``{prefix}parameter 'key' is given twice``."""
    values: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ParameterError(f"{prefix}{malformed}, got {item!r}")
        if key in values:
            raise ParameterError(f"{prefix}parameter {key!r} is given twice")
        values[key] = value.strip()
    return values


def parse_spec(text: str, option: str = "--transform") -> tuple[str, dict[str, str]]:
    """``NAME[:key=value,...]`` → (name, {key: value}) (values stay strings: the config parses them); errors name
    ``option``, the command-line option the spec came from."""
    name, _, rest = text.partition(":")
    name = name.strip()
    if not name:
        raise ParameterError(f"{option} expects NAME[:key=value,...], got {text!r}")
    items = filter(None, (part.strip() for part in rest.split(",")))
    return name, parse_key_values(items, malformed="expected key=value", prefix=f"{option} {text!r}: ")


def _explicit(spec: TransformSpec) -> tuple[str, dict[str, Any] | TransformConfig, int | None]:
    """(name, explicit parameters or a config, config version of a dict)."""
    if isinstance(spec, TransformConfig):
        return spec._method_name(), spec, None
    if isinstance(spec, MethodConfig):
        raise ParameterError(f"{type(spec).__name__} configures method {spec._method_name()!r}, not a transform")
    if isinstance(spec, str):
        name, params = parse_spec(spec)
        return name, params, None
    if isinstance(spec, Mapping):
        name = spec.get("transform")
        params = spec.get("params", {})
        if not isinstance(name, str) or not isinstance(params, Mapping):
            raise ParameterError(f"a transform given as a dict has 'transform' (a name) and 'params' (a dict), got "
                                 f"{dict(spec)!r}")
        unknown = sorted(set(spec) - {"transform", "version", "params"})
        if unknown:
            raise ParameterError(f"transform {name!r}: unknown key {unknown[0]!r} (a dict has 'transform', "
                                 "'version' and 'params')")
        return name, dict(params), spec.get("version")
    raise ParameterError(f"a transform is a name, 'NAME:key=value,...', a dict or a TransformConfig, not "
                         f"{type(spec).__name__}")


def explicit_name(spec: TransformSpec) -> str:
    """The transform a user's chain entry names."""
    return _explicit(spec)[0]


def resolve_chain(specs: Iterable[TransformSpec], method: Method, method_config: MethodConfig) -> Chain:
    """The chain as (transform, config) pairs, every parameter checked; raises ParameterError / PluginError naming
    the transform before any work."""
    from ..plugins import get_transform

    given = [_explicit(spec) for spec in specs]
    names = [name for name, _, _ in given]
    duplicate = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if duplicate is not None:
        raise ParameterError(f"transform {duplicate!r} is given twice")
    declared = tuple(getattr(method, "transforms", ()) or ())
    given = [(n, {}, None) for n in declared if n not in names] + given
    chain: Chain = []
    inherited = {p.name: (p.type, getattr(method_config, p.name)) for p in method_config.params()}
    for name, explicit, version in given:
        transform = get_transform(name)
        if isinstance(explicit, TransformConfig):
            chain.append((transform, transform.validate_params(explicit)))
            continue
        values = dict(explicit)
        taken = []
        for p in transform.params:
            if p.name not in values and p.name in inherited and inherited[p.name][0] is p.type:
                values[p.name] = inherited[p.name][1]
                taken.append(p.name)
        try:
            if version is not None:
                config = transform.config.from_dict({"transform": name, "version": version, "params": values})
            else:
                config = transform.validate_params(values)
        except ParameterError as exc:
            if taken:
                raise ParameterError(f"{exc} (taken from method {method.name!r}'s {', '.join(taken)}; give it "
                                     f"explicitly: --transform {name}:key=value)") from None
            raise
        chain.append((transform, config))
    return chain


def chain_dicts(chain: Sequence[tuple[Transform, TransformConfig]]) -> list[dict[str, Any]]:
    """``[{"transform", "version", "params"}, ...]``: how quantization_config and the run state record a chain."""
    return [config.to_dict() for _, config in chain]


def chain_command(chain: Sequence[tuple[Transform, TransformConfig]]) -> list[str]:
    """The chain as ``--transform`` options (parameters that differ from the defaults)."""
    parts = []
    for transform, config in chain:
        changed = [f"{p.name}={value}" for p in config.params()
                   if (value := config.to_params()[p.name]) != p.default]
        parts.append(f"--transform {transform.name}" + (f":{','.join(changed)}" if changed else ""))
    return parts
