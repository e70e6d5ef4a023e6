"""The contract between qformat and a quantization method plugin.

A method quantizes one linear layer at a time. It declares its parameters (validated before any work starts) and the
calibration statistics it needs; the pipeline gathers those statistics block by block and calls
:meth:`Method.quantize`, which returns a :class:`qformat.format.QuantizedTensor` built from the format's component
kinds (see :class:`qformat.format.RecordBuilder`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

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


@dataclass
class LayerInput:
    """One linear layer handed to a method.

    ``weight`` is a float32 torch tensor [out, in] (CPU). ``hessian`` is the float32 torch tensor [in, in]
    ``2/N * sum(x x^T)`` over the N calibration tokens (or None if the method needs no calibration);
    ``act_norms`` is the per-input-channel L2 norm of the activations over the calibration tokens.
    ``dtype`` is the original weight dtype ("F32", "F16" or "BF16") to record.
    """

    name: str
    weight: Any
    dtype: str = "F32"
    hessian: Any | None = None
    act_norms: Any | None = None
    n_tokens: int = 0


class Method:
    """Base class for method plugins. Subclass, set the class attributes, implement :meth:`quantize`."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    params: ClassVar[tuple[Param, ...]] = ()
    # Which statistics the pipeline must collect: a subset of {"hessian", "act_norms"}.
    calibration: ClassVar[frozenset[str]] = frozenset()

    def validate_params(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults filled in, each value parsed and range-checked, unknown keys rejected."""
        declared = {p.name: p for p in self.params}
        unknown = sorted(set(values) - set(declared))
        if unknown:
            raise ParameterError(f"method {self.name!r} has no parameter {unknown[0]!r}; it takes: "
                                 f"{', '.join(declared) or 'none'}")
        resolved = {name: p.default for name, p in declared.items()}
        for key, value in values.items():
            resolved[key] = declared[key].parse(value, self.name)
        self.check_params(resolved)
        return resolved

    def check_params(self, params: dict[str, Any]) -> None:
        """Override for constraints that span parameters (raise ParameterError)."""

    def quantize(self, layer: LayerInput, params: dict[str, Any]) -> QuantizedTensor:
        raise NotImplementedError
