"""Work in progress: the svdquant method plugin (issue 19); registers nothing yet."""

from qformat.plugin import hookimpl


@hookimpl
def qformat_register_methods(register):
    pass
