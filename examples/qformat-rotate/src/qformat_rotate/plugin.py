"""Hook implementations: what this package registers with qformat (instances, for methods and codecs alike)."""

from qformat.plugin import hookimpl

from .codec import HadamardCodec
from .method import NF4


@hookimpl
def qformat_register_codecs(register):
    register(HadamardCodec())


@hookimpl
def qformat_register_methods(register):
    register(NF4())
