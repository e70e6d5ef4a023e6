"""QMoE's sub-1-bit stream on a Mixtral-shaped MoE block: experts to ternary with GPTQ feedback, stored as ternary_dict.

    python bench/qmoe_moe.py --hidden 1024 --intermediate 2816 --experts 8 --tokens 4096

A random-weight ``MixtralSparseMoeBlock`` (transformers, from a ``MixtralConfig``) is calibrated on random hidden
states: each token goes to its top-2 experts through the block's own router; every expert's ``gate_up_proj`` gets the
Hessian of the tokens routed to it, its ``down_proj`` that of their ``act(gate) · up`` activations (QMoE quantizes
each expert with its own tokens, as here). The pipeline converts ``nn.Linear`` layers and transformers now holds
experts as fused 3-D parameters, so this script quantizes each expert matrix with the ``qmoe`` method directly
(``-p stream=true``), writes all records into one qformat file (``qformat.format.write_file``), reloads it, and
reports: bits per weight from the file's bytes, the zero share, and the MoE block's relative output error on held-out
hidden states with the decoded experts against the original (and against the same experts at 2 bits, packed, to show
the stream changes bytes only, and without the error feedback). Random weights are not a trained model's: the error
says the pipeline works, not what QMoE costs a real MoE.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def routed_hessians(block, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], list[int]]:
    """Per expert: (H of its gate_up inputs, H of its down inputs, tokens routed), H = 2/N Σ x xᵀ (GPTQ's)."""
    experts = block.experts
    with torch.no_grad():
        _, _, top_k_index = block.gate(x)
    h_in, h_mid, counts = [], [], []
    for e in range(experts.num_experts):
        tokens = (top_k_index == e).any(dim=-1)
        xe = x[tokens]
        gate, up = torch.nn.functional.linear(xe, experts.gate_up_proj[e]).chunk(2, dim=-1)
        mid = experts.act_fn(gate) * up
        n = max(1, xe.shape[0])
        h_in.append((2.0 / n) * xe.T.double() @ xe.double())
        h_mid.append((2.0 / n) * mid.T.double() @ mid.double())
        counts.append(int(xe.shape[0]))
    return [h.float() for h in h_in], [h.float() for h in h_mid], counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=4096, help="calibration tokens (held-out: a quarter as many)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from qformat_plugins.qmoe import QMoE
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    from qformat.format import open_file, write_file
    from qformat.methods import LayerInput

    torch.manual_seed(args.seed)
    config = MixtralConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                           num_local_experts=args.experts, num_experts_per_tok=2)
    block = MixtralSparseMoeBlock(config).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.02)
    x = torch.randn(args.tokens, args.hidden)
    held_out = torch.randn(args.tokens // 4, args.hidden)
    h_in, h_mid, counts = routed_hessians(block, x)

    results = {}
    for variant in ("stream", "packed", "stream_no_feedback"):
        stream = variant != "packed"
        start = time.perf_counter()
        records = []
        for e in range(args.experts):
            for part, weight, h in (("gate_up_proj", block.experts.gate_up_proj[e], h_in[e]),
                                    ("down_proj", block.experts.down_proj[e], h_mid[e])):
                if variant == "stream_no_feedback":  # U diagonal: plain rounding to the per-row levels
                    h, params = torch.eye(h.shape[0]), {"stream": True, "damp": 10.0}
                else:
                    params = {"stream": stream}
                layer = LayerInput(f"experts.{e}.{part}.weight", weight.detach().clone(), "BF16", h.clone())
                records.append(QMoE().run(layer, params))
        seconds = time.perf_counter() - start
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "experts.safetensors"
            write_file(path, None, [r.qt for r in records])
            file_bytes = path.stat().st_size
            qfile = open_file(path)
            decoded = {name: torch.from_numpy(np.array(qfile.decode(name))) for name in qfile.records}
            qfile.close()
        weights = sum(r.qt.record["shape"][0] * r.qt.record["shape"][1] for r in records)
        stored = sum(r.qt.record["storage_bytes"] for r in records)
        quantized = MixtralSparseMoeBlock(config).eval()
        quantized.load_state_dict(block.state_dict())
        with torch.no_grad():
            for e in range(args.experts):
                quantized.experts.gate_up_proj[e].copy_(decoded[f"experts.{e}.gate_up_proj.weight"])
                quantized.experts.down_proj[e].copy_(decoded[f"experts.{e}.down_proj.weight"])
            ref = block(held_out[None])[0]
            got = quantized(held_out[None])[0]
        zeros = float(np.mean([r.info["zero_fraction"] for r in records]))
        results[variant] = {
            "bits_per_weight": 8 * stored / weights, "file_bytes": file_bytes, "zero_share": zeros,
            "relative_output_error": float((got - ref).norm() / ref.norm()), "quantize_seconds": round(seconds, 1)}
    summary = {"config": {k: getattr(args, k) for k in ("hidden", "intermediate", "experts", "tokens", "seed")},
               "tokens_per_expert": counts, **results}
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
