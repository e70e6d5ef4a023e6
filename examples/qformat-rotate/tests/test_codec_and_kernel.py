"""The codec's conformance vectors, run by qformat's harness, and the Numba kernel against the reference decoder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from qformat_rotate import generate_vectors
from qformat_rotate.codec import CODECS, HadamardCodec, rotate_columns
from qformat_rotate.generate_vectors import VECTORS_DIR
from qformat_rotate.kernel import HadamardKernel
from qformat_rotate.transform import HadamardRotation, signs_for

from qformat.plugin import LayerInput
from qformat.plugins import get_plugins
from qformat.testing import PluginCheckError, check_codec_vectors, check_kernel, sample_layers
from qformat.transforms import wrap_record


def test_vectors_are_reproduced_byte_for_byte():
    assert generate_vectors.check() == []


def test_vectors_cover_valid_and_invalid_files():
    manifest = json.loads((VECTORS_DIR / "manifest.json").read_text())
    kinds = [v["kind"] for v in manifest["vectors"]]
    assert kinds.count("valid") >= 4 and kinds.count("invalid") >= 8
    assert {v["error"]["code"] for v in manifest["vectors"] if v["kind"] == "invalid"} >= {
        "bad_field", "shape_mismatch", "code_out_of_range", "bad_record", "unsupported_codec_version"}


def test_harness_runs_the_vectors_of_the_installed_plugin():
    """The installed plugin set already holds rotate.hadamard: checking the codec again must not clash with it."""
    assert "rotate.hadamard" in get_plugins().codecs
    installed = check_codec_vectors(VECTORS_DIR)
    under_test = check_codec_vectors(VECTORS_DIR, [HadamardCodec()])
    assert installed.failed == under_test.failed == []
    assert len(under_test.passed) == len(installed.passed) == 14


class ForgetsTheSigns(HadamardCodec):
    def decode(self, node, ctx):
        inner = np.asarray(ctx.decode(node["input"], "input"), dtype=np.float32)
        return rotate_columns(inner, np.ones(inner.shape[1], np.float32), node["block"])


class AcceptsAnyBlock(HadamardCodec):
    def infer(self, node, ctx):
        return ctx.infer(node["input"], "input")


@pytest.mark.parametrize(("codec", "failing"), [(ForgetsTheSigns(), "hadamard_b4_tensor"),
                                                (AcceptsAnyBlock(), "hadamard_block_not_power_of_two")])
def test_harness_catches_a_wrong_codec(codec, failing):
    with pytest.raises(PluginCheckError, match=failing):
        check_codec_vectors(VECTORS_DIR, [codec])


def _rotated_layers(params_list):
    """RTN 4-bit records of a real layer, wrapped in a rotation as ``--transform hadamard`` writes them (params:
    ``block``; ``{}``: no rotation)."""
    method, layer = get_plugins().methods["rtn"], sample_layers(1)[0]
    config = method.validate_params({"bits": 4, "group_size": 64})
    weight = torch.from_numpy(layer.weight)
    for params in params_list:
        if "block" not in params:
            yield method.quantize(LayerInput(layer.name, weight), config)
            continue
        rotation = HadamardRotation(signs_for(0, layer.name, weight.shape[1]), params["block"])
        inner = method.quantize(LayerInput(layer.name, rotation.weight(weight)), config)
        yield wrap_record(inner, [rotation], CODECS)


def test_kernel_agrees_with_the_reference_decoder():
    kernel = get_plugins().kernels["rotate-numba"]
    assert isinstance(kernel, HadamardKernel)
    records = list(_rotated_layers([{"block": 64}, {"block": 8}, {"block": 2}]))
    report = check_kernel(kernel, records, batches=(1, 3, 16))
    assert report.checked == 9 and report.max_error_ratio < 0.05  # far inside rtol * |x| |W|


def test_kernel_passes_the_plugin_vectors():
    from qformat_conformance.runner import FAIL, PASS, run

    results = {r.vector_id: r.status for r in run("rotate-numba", VECTORS_DIR)}
    assert results["hadamard_b64_nf4"] == PASS and FAIL not in results.values()


def test_kernel_claims_only_rotations_whose_child_another_kernel_runs():
    kernel = HadamardKernel()
    rotated, plain = _rotated_layers([{"block": 64}, {}])
    assert kernel.supports(rotated.record) and not kernel.supports(plain.record)
    assert get_plugins().kernels["numba"].supports(plain.record)
    odd = {**rotated.record, "weight": {**rotated.record["weight"], "block": 3}}
    assert not kernel.supports(odd)


def test_dispatcher_picks_the_kernel_and_matches_the_reference():
    from qformat.runtime.dispatch import linear, prepare_weight

    (qt,) = _rotated_layers([{"block": 64}])
    prepared = prepare_weight(qt)
    assert prepared.kernel.name == "rotate-numba" and prepared.nbytes() < qt.decode(CODECS).nbytes
    x = torch.randn(2, 5, prepared.in_features)
    want = x.double() @ torch.from_numpy(np.array(qt.decode(CODECS))).double().T
    for rows in (x[:1, :1], x):  # fused below max_batch, dequantize + dense above
        got = linear(prepared, rows).double()
        torch.testing.assert_close(got, want[: rows.shape[0], : rows.shape[1]], rtol=1e-4, atol=1e-4)


def test_kernel_refuses_bad_signs_like_the_decoder():
    (qt,) = _rotated_layers([{"block": 64}])
    key = qt.record["weight"]["signs"]
    bad = qt.tensors[key].copy()
    bad[0] = 0
    qt.tensors[key] = bad
    with pytest.raises(Exception, match="code_out_of_range"):
        HadamardKernel().prepare(qt)
    with pytest.raises(Exception, match="code_out_of_range"):
        qt.decode(CODECS)


def test_convert_verify_and_run_a_model_with_the_plugin_codec(tmp_path):
    """End to end with only public entry points: the converter, the verifier and the loader all read the plugin's
    codec through the installed plugin set, and the loaded model runs the rotate-numba kernel."""
    import transformers

    import qformat
    from qformat.cli import main

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=4)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "src")
    _save_tokenizer(tmp_path / "src", vocab_size=300)  # a transform calibrates: the conversion tokenizes text
    result = qformat.convert(tmp_path / "src", tmp_path / "out", "rtn", params={"bits": 4, "group_size": 32},
                             transforms=["hadamard:block=16"], calib_samples=4, calib_seqlen=32)
    qconfig = result.quantization_config
    assert qconfig["codec_providers"] == {"rotate.hadamard": "qformat-rotate>=0.1.0"}
    assert qconfig["transforms"] == [{"transform": "hadamard", "version": 1, "params": {"block": 16, "seed": 0}}]
    assert main(["verify", str(tmp_path / "out")]) == 0
    tokens = torch.tensor([[1, 2, 3, 4]])
    model = qformat.load(tmp_path / "out")
    kernels = {name: m.kernel_name for name, m in model.named_modules() if hasattr(m, "kernel_name")}
    # The block linears carry the rotation; the output layer (8-bit per channel by default, outside every block, so
    # never rotated) runs the built-in kernel.
    assert kernels.pop("lm_head") == "numba"
    assert set(kernels.values()) == {"rotate-numba"}
    reference = qformat.load_dequantized(tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, reference(tokens).logits, rtol=1e-3, atol=1e-3)


def _save_tokenizer(folder, vocab_size):
    """A byte-level BPE trained on a few sentences, saved as a transformers tokenizer (ids < vocab_size)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["The history of the city begins with a small settlement on the river."] * 4,
                                  trainer)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>").save_pretrained(folder)
