"""AWQ (Lin et al. 2023), following mit-han-lab/llm-awq `awq/quantize/` (`auto_scale.py`, `auto_clip.py`,
`quantizer.py`): a block transform that searches activation-aware per-channel scales and folds them into the preceding
norm or linear (``--transform awq``, also before gptq), and the ``awq`` method: that transform, then per linear AWQ's
clip search and round-to-nearest with AWQ's quantizer.

Storage is GPTQ/RTN's: ``affine(packed codes, fp16 scale [R, G], packed integer zero [R, G], group_shape [1, g])``.
A width the group does not divide gets a shorter last group (the reference asserts divisibility and so refuses e.g.
SmolLM2's 576-wide layers at group 128).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from qformat.plugin import (
    BlockInput,
    BlockResult,
    LayerInput,
    Method,
    MethodConfig,
    ParameterError,
    Transform,
    TransformConfig,
    hookimpl,
    param,
)

from ._awq_search import apply_clip, best_clip, clip_errors_hessian, quantize_stored
from ._awq_transform import scale_block
from ._common import MethodResult, QuantizesThroughRun, affine_record, effective_group, record_builder, weight_matrix

GROUP_HELP = ("input columns sharing one scale/zero; -1 or 0 = one group per row (need not divide the row: the last "
              "group may be shorter)")


@dataclass(frozen=True)
class AWQTransformConfig(TransformConfig):
    """The scale search's parameters; bits, group_size and n_grid default to the method's of the same name."""

    transform = "awq"
    bits: int = param(4, "bits of the quantizer the scales are searched for", min=2, max=8)
    group_size: int = param(128, GROUP_HELP, min=-1, max=1 << 20)
    n_grid: int = param(20, "ratios 0, 1/n_grid, ..., (n_grid-1)/n_grid of the search s = x_max^ratio", min=1,
                        max=1000)
    max_tokens: int = param(4096, "calibration tokens on which the inspected outputs are compared (whole "
                            "micro-batches, the first ones; x_max always uses every token)", min=1, max=1 << 30)


class AWQTransform(Transform):
    config = AWQTransformConfig
    description = ("AWQ scale search: per norm/linear -> linears pair of the block, s = x_max^ratio (x_max = mean |x| "
                   "per channel) normalised by sqrt(max s * min s), the ratio of a 20-point grid that minimises the "
                   "MSE of the inspected attention / MLP / linear output with weights Q(W s)/s (AWQ's asymmetric "
                   "group quantizer); s is folded into the norm or previous linear's rows and W's columns. v -> o is "
                   "skipped under GQA, as in the reference.")

    def apply(self, block: BlockInput, config: AWQTransformConfig) -> BlockResult:
        block.layout  # noqa: B018  # raises SkipBlock for a layout it does not know, before anything changes
        pairs = scale_block(block, config.bits, config.group_size, config.n_grid, config.max_tokens)
        return BlockResult(info={"pairs": pairs})


@dataclass(frozen=True)
class AWQConfig(MethodConfig):
    """awq's parameters: the quantizer's (bits, group_size), the clip search's; the scale search (the awq transform,
    always run first) takes bits, group_size and n_grid from here."""

    method = "awq"
    bits: int = param(4, "bits per weight code", min=2, max=8)
    group_size: int = param(128, GROUP_HELP, min=-1, max=1 << 20)
    clip: bool = param(True, "search a clipping range per (row, group) (not on q/k projections, as the reference)")
    n_grid: int = param(20, "grid of the clip search (max_val = amax * (1 - i/n_grid)) and of the scale search",
                        min=1, max=1000)
    max_shrink: float = param(0.5, "the clip search tries i < max_shrink * n_grid", min=0.0, max=1.0)

    def check(self) -> None:
        if self.clip and int(self.max_shrink * self.n_grid) < 1:
            raise ParameterError("method 'awq' parameter 'max_shrink': max_shrink * n_grid must be at least 1 for "
                                 "the clip search to try anything (or set clip=false)")


# The reference skips clipping where the output feeds the q.k product (auto_clip.py `auto_clip_block`: names with
# "q_", "k_", "query", "key", "Wqkv"); fused projections holding q and k (Phi-3 qkv_proj, query_key_value) likewise.
_QK_NAME = re.compile(r"(^q_|^k_|query|key|wqkv|qkv|c_attn)", re.IGNORECASE)


def feeds_attention_scores(weight_name: str) -> bool:
    """Whether a linear (``...self_attn.q_proj.weight``) produces queries or keys."""
    parts = weight_name.split(".")
    module = parts[-2] if len(parts) >= 2 and parts[-1] in ("weight", "qweight") else parts[-1]
    return bool(_QK_NAME.search(module))


class AWQ(QuantizesThroughRun, Method):
    config = AWQConfig
    description = ("AWQ: the awq transform (activation-aware scales folded into the block), then per linear the "
                   "clip search (per row and group, max_val = amax (1 - i/20), i < 10, least output MSE, computed as "
                   "dw^T H_gg dw from the pipeline's Hessian; not on q/k) and round-to-nearest with AWQ's asymmetric "
                   "quantizer (scale = (max - min)/maxq in fp16, integer zero); packed codes and zeros.")
    calibration = frozenset({"hessian"})
    transforms = ("awq",)


    def run(self, layer: LayerInput, config: AWQConfig | Mapping[str, Any]) -> MethodResult:
        """Quantize and keep what was computed; ``config`` may also be parameters to validate (tests, benchmarks)."""
        config = self.validate_params(config)
        w = weight_matrix(layer)
        group = effective_group(config.group_size, w.shape[1])
        clipped = False
        if config.clip and not feeds_attention_scores(layer.name):
            if layer.hessian is None:
                raise ParameterError(f"method 'awq' parameter 'clip': {layer.name} has no calibration Hessian "
                                     "(calibrate, or set clip=false)")
            hessian = torch.as_tensor(layer.hessian, dtype=torch.float32)
            max_val, error = clip_errors_hessian(w, hessian, config.bits, group, config.n_grid, config.max_shrink)
            w = apply_clip(w, best_clip(max_val, error), group)
            clipped = True
        codes, scale, zero, deq = quantize_stored(w, config.bits, group)
        b = record_builder(layer)
        info = {"method": self.name, "params": config.to_params(), "clipped": clipped}
        qt = b.finish(affine_record(b, codes, scale, zero, config.bits, group, sym=False), info)
        return MethodResult(qt, deq, info)


@hookimpl
def qformat_register_methods(register: Any) -> None:
    register(AWQ())


@hookimpl
def qformat_register_transforms(register: Any) -> None:
    register(AWQTransform())
