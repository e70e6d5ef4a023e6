"""After ``import qformat``, transformers loads qformat folders itself (quant_method "qformat")."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import input_ids, tiny_model, write_folder

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return write_folder(tiny_model(), tmp_path_factory.mktemp("hf") / "model")


def test_from_pretrained_matches_qformat_load(tiny_folder):
    from transformers import AutoModelForCausalLM

    import qformat
    from qformat.runtime.hf_integration import QformatConfig
    from qformat.runtime.nn import QLinear

    model, info = AutoModelForCausalLM.from_pretrained(tiny_folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QLinear)}
    assert len(layers) == 14 and all(m.prepared is not None for m in layers.values())
    assert isinstance(model.config.quantization_config, QformatConfig)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ours = qformat.load(tiny_folder)
    reference = qformat.load_dequantized(tiny_folder)
    ids = input_ids()
    with torch.inference_mode():
        got = model(ids).logits
        torch.testing.assert_close(got, ours(ids).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got, reference(ids).logits, rtol=1e-4, atol=1e-4)
        # biases came through transformers' loader
        torch.testing.assert_close(model.model.layers[1].self_attn.q_proj.bias,
                                   ours.model.layers[1].self_attn.q_proj.bias)
        # q/k/v and gate/up are fused as qformat.load fuses them; decoding one token matches exactly
        for m in (model, ours):
            attn, mlp = m.model.layers[1].self_attn, m.model.layers[1].mlp
            assert attn.q_proj.shared is not None and attn.q_proj.shared is attn.v_proj.shared
            assert mlp.gate_proj.shared is mlp.up_proj.shared is not None and mlp.down_proj.shared is None
        torch.testing.assert_close(model(ids[:, :1]).logits, ours(ids[:, :1]).logits, rtol=0, atol=0)


def test_generate_and_pipeline(tiny_folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    import qformat  # noqa: F401

    model = AutoModelForCausalLM.from_pretrained(tiny_folder)
    tokenizer = AutoTokenizer.from_pretrained(tiny_folder)
    ids = tokenizer("hello", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert out.shape[1] == ids.shape[1] + 6
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    text = generator("hello", max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert text.startswith("hello")


def test_save_pretrained_is_refused_and_dequantize_works(tiny_folder, tmp_path):
    from transformers import AutoModelForCausalLM

    import qformat
    from qformat.runtime.nn import QLinear

    model = AutoModelForCausalLM.from_pretrained(tiny_folder)
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path / "out")
    dense = model.dequantize()
    assert not any(isinstance(m, QLinear) for m in dense.modules()) and not dense.is_quantized
    reference = qformat.load_dequantized(tiny_folder)
    with torch.inference_mode():
        torch.testing.assert_close(dense(input_ids()).logits, reference(input_ids()).logits, rtol=1e-5, atol=1e-5)
    dense.save_pretrained(tmp_path / "dense")  # a plain model again


def test_missing_codec_plugin_fails_before_loading(tmp_path):
    import json

    from helpers import rewrite_records
    from transformers import AutoModelForCausalLM

    import qformat  # noqa: F401
    from qformat.errors import PluginError
    from qformat.format import QuantizedTensor

    def mutate(qt):
        record = json.loads(json.dumps(qt.record))
        record["weight"]["codes"]["codec"] = "acme.zigzag"
        return QuantizedTensor(qt.name, record, qt.tensors)

    folder = write_folder(tiny_model(), tmp_path / "m")
    rewrite_records(folder, mutate, requires={"acme.zigzag": "qformat-zigzag"})
    with pytest.raises(PluginError, match="names 'qformat-zigzag' as the package"):
        AutoModelForCausalLM.from_pretrained(folder)


def _run(code: str) -> str:
    prelude = f"import sys; sys.path.insert(0, {str(TESTS)!r})\n"
    result = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


CHECK = """
    from qformat.runtime.nn import QLinear
    model = AutoModelForCausalLM.from_pretrained({folder!r})
    print(sum(isinstance(m, QLinear) for m in model.modules()))
"""


def test_registration_when_qformat_is_imported_first(tiny_folder):
    out = _run("import qformat\nfrom transformers import AutoModelForCausalLM\n"
               + textwrap.dedent(CHECK).format(folder=str(tiny_folder)))
    assert out.split()[-1] == "14"


def test_registration_when_transformers_is_imported_first(tiny_folder):
    code = """
        from transformers import AutoModelForCausalLM
        import transformers.modeling_utils  # the quantizer registry is imported by now
        assert "transformers.quantizers.auto" in sys.modules
        import qformat
    """
    out = _run(textwrap.dedent(code) + textwrap.dedent(CHECK).format(folder=str(tiny_folder)))
    assert out.split()[-1] == "14"


def test_import_qformat_does_not_import_torch():
    _run("import qformat, qformat.format\n"
         "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, sorted(sys.modules)")
