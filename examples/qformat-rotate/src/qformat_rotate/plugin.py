"""Hook implementations: what this package registers with qformat (instances, for transforms and codecs alike)."""

from qformat.plugin import hookimpl

from .codec import HadamardCodec
from .transform import Hadamard


@hookimpl
def qformat_register_codecs(register):
    register(HadamardCodec())


@hookimpl
def qformat_register_transforms(register):
    register(Hadamard())
