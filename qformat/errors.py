"""Exception hierarchy. Every error names what it is about (file, tensor, field) so a user can act on it."""

from __future__ import annotations


def shorten(text: object, limit: int = 120) -> str:
    """A path or name as a message shows it: at most about ``limit`` characters, the middle elided."""
    text = str(text)
    return text if len(text) <= limit else f"{text[:limit // 2]}...({len(text)} characters)...{text[-limit // 4:]}"


class QformatError(Exception):
    """Base class for every error qformat raises on purpose."""


class FormatError(QformatError):
    """A file, record or tensor violates the format spec.

    ``code`` is a stable identifier (see spec/errors.md) that conformance vectors and other implementations match on.
    """

    def __init__(self, code: str, message: str, *, file: str | None = None, tensor: str | None = None,
                 field: str | None = None) -> None:
        self.code = code
        self.message = message
        self.file = file
        self.tensor = tensor
        self.field = field
        where = ", ".join(f"{k} {v!r}" for k, v in (("file", file), ("tensor", tensor), ("field", field)) if v)
        super().__init__(f"[{code}] {message}" + (f" ({where})" if where else ""))

    def at(self, *, file: str | None = None, tensor: str | None = None) -> FormatError:
        """Return the same error with location details filled in where still unknown."""
        return type(self)(self.code, self.message, file=self.file or file, tensor=self.tensor or tensor,
                          field=self.field)


class ResourceError(QformatError):
    """A valid file needs more of a resource (memory) than this machine gives the process."""


class UnknownCodecError(FormatError):
    """A record needs a codec (or codec version) that no installed plugin provides."""


class PluginError(QformatError):
    """A plugin is missing, broken, or conflicts with another."""


class ParameterError(QformatError):
    """A method parameter is unknown, of the wrong type, or out of range."""


class LoadError(QformatError):
    """The folder cannot be turned into a model (unknown architecture, names or shapes that do not fit it)."""


class ConversionError(QformatError):
    """Conversion cannot proceed (bad model, unsupported architecture, calibration problems, disk full)."""


class SourceError(ConversionError):
    """An imported checkpoint is damaged or not what it claims (truncated file, unknown quantization type, shapes
    that disagree with its config). Names the file, the tensor and the field or type."""

    def __init__(self, message: str, *, file: str | None = None, tensor: str | None = None,
                 field: str | None = None) -> None:
        self.file, self.tensor, self.field = file, tensor, field
        where = ", ".join(f"{k} {shorten(v)!r}" for k, v in (("file", file), ("tensor", tensor), ("field", field)) if v)
        super().__init__(message + (f" ({where})" if where else ""))
