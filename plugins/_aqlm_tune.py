"""AQLM's block fine-tuning (the reference's ``finetune`` stage after a block's linears are quantized): codes fixed,
the codebooks and per-row scales of every linear of the block and the block's norm weights tuned with Adam so the
quantized block reproduces the original block's outputs on the calibration inputs (mean squared error), then the
codebooks and scales rounded to fp16 and the records rebuilt with the same codes.

Deterministic: the gradient of a codebook lookup is a scatter-add, which autograd's index backward does not do in a
fixed order across threads; :class:`_Lookup` adds with ``index_add_`` (serial on CPU) instead.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from qformat.format import QuantizedTensor
from qformat.lowering import lower
from qformat.plugin import BlockTuning, PluginError


class _Lookup(torch.autograd.Function):
    """Σ_m books[m][codes[..., m]] as [R, C] (the vq codec's order), with a deterministic backward."""

    @staticmethod
    def forward(ctx: Any, books: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(codes)
        ctx.books_shape = books.shape
        rows, groups, n_books = codes.shape
        acc = books[0][codes[..., 0]]
        for m in range(1, n_books):
            acc = acc + books[m][codes[..., m]]
        return acc.reshape(rows, groups * books.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (codes,) = ctx.saved_tensors
        n_books, entries, width = ctx.books_shape
        per_slice = grad.reshape(-1, width)
        book_grad = torch.zeros(ctx.books_shape, dtype=grad.dtype)
        for m in range(n_books):
            book_grad[m].index_add_(0, codes[..., m].reshape(-1), per_slice)
        return book_grad, None


class _Tuned:
    """One linear's trainable form: codes fixed, fp32 master codebooks and scales; the outliers' sparse term, if any,
    a constant added to the weight."""

    def __init__(self, qt: QuantizedTensor) -> None:
        lowered = lower(qt)
        terms = list(lowered.terms)
        sparse = [t for t in terms if t.kind == "sparse"]
        term = next((t for t in terms if t.kind == "vq"), None)
        if term is None or len(terms) != 1 + len(sparse) or len(sparse) > 1 or term.chain \
                or len(term.factors) != 1 or term.books is None or term.codes is None or term.vector_rows != 1 \
                or (sparse and (sparse[0].chain or sparse[0].factors)):
            raise PluginError(f"aqlm tune_block: {qt.name} is not an aqlm record (scale(vq(codes, codebooks)), "
                              "optionally + sparse_csr outliers)")
        rows, cols = lowered.rows, lowered.cols
        self.outliers: torch.Tensor | None = None  # bool [R, C]: where the sparse term has entries
        self.extra: torch.Tensor | None = None  # the sparse term as a dense fp32 matrix
        if sparse:
            s = sparse[0]
            where = (torch.from_numpy(np.asarray(s.row_of)), torch.from_numpy(np.asarray(s.col_idx)))
            self.outliers = torch.zeros(rows, cols, dtype=torch.bool).index_put_(where, torch.tensor(True))
            self.extra = torch.zeros(rows, cols).index_put_(where, torch.from_numpy(np.asarray(s.values, np.float32)))
        books = np.asarray(term.books, dtype=np.float32)
        n_books, _, width = books.shape
        codes = np.asarray(term.codes.values(), dtype=np.int64).reshape(rows, cols // width, n_books)
        scale = term.factors[0].param
        if tuple(scale.group) != (1, cols):
            raise PluginError(f"aqlm tune_block: {qt.name} has scales on {scale.group} tiles, not one per row")
        self.codes = torch.from_numpy(codes)
        self.books = torch.nn.Parameter(torch.from_numpy(books.copy()))
        self.scales = torch.nn.Parameter(torch.from_numpy(np.asarray(scale.values, np.float32).reshape(rows, 1).copy()))
        self.rows, self.cols = rows, cols

    def weight(self) -> torch.Tensor:
        dense = _Lookup.apply(self.books, self.codes) * self.scales
        return dense if self.extra is None else dense + self.extra


def tune(block: BlockTuning, steps: int, lr: float, tune_norms: bool,
         rebuild: Any) -> dict[str, QuantizedTensor]:
    """Adam over the block's calibration batches (one batch a step, in order), then the records rebuilt by
    ``rebuild(qt, codes [R, G, M], books fp32 [M, K, g], scales fp32 [R, 1], outliers)`` (which rounds to fp16;
    ``outliers``: the sparse term as it was, (mask [R, C], its values in row-major order), or None)."""
    tuned = {name: _Tuned(qt) for name, qt in block.records.items()}
    modules = {name: block.block.get_submodule(name) for name in tuned}
    params: list[torch.nn.Parameter] = [p for t in tuned.values() for p in (t.books, t.scales)]
    if tune_norms:
        norms = [p for n, p in block.block.named_parameters() if "norm" in n and p.dim() == 1]
        for p in norms:
            p.requires_grad_(True)
        params += norms
    for name, module in modules.items():
        def forward(x: torch.Tensor, module: Any = module, form: _Tuned = tuned[name]) -> torch.Tensor:
            return torch.nn.functional.linear(x, form.weight(), module.bias)
        module.forward = forward
    try:
        optimizer = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.95))
        for step in range(steps):
            i = step % block.batches
            optimizer.zero_grad(set_to_none=True)
            loss = torch.nn.functional.mse_loss(block.forward(i), block.target(i))
            loss.backward()
            optimizer.step()
    finally:
        for module in modules.values():
            del module.forward  # the instance attribute set above: the class's forward again
    return {name: rebuild(block.records[name], t.codes, t.books.detach(), t.scales.detach(),
                          None if t.outliers is None else (t.outliers, t.extra[t.outliers]))
            for name, t in tuned.items()}
