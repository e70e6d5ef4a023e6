"""The lean decode engine (qformat.runtime.decode_engine) against transformers on the same loaded models."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY, write_folder

import qformat
from qformat.cli import main
from qformat.runtime.decode_engine import ContextFull, DecodeEngine, UnsupportedModel, generate, why_unsupported

torch.set_num_threads(2)
# Weights ~ N(0, 0.2) (not transformers' 0.02) so greedy decoding does not settle on one token at once.
INIT = 0.2
# Logits agree to float rounding (attention reductions run in another shape): 1e-4 of the logits' scale.
RTOL_SCALE = 1e-4
ARCHS = {
    # GQA 4 heads over 2, attention biases on every projection (TINY), tied embedding.
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    # q/k/v biases (o has none), GQA 4 heads over 1, untied output layer.
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"num_key_value_heads": 1, "tie_word_embeddings": False,
                                                   "use_sliding_window": False}),
    # plain multi-head attention (groups of 1); sliding window far beyond any max_len used here.
    "mistral": ("MistralConfig", "MistralForCausalLM", {"num_key_value_heads": 4, "sliding_window": 4096}),
}


def make_model(arch: str, seed: int = 0, **overrides):
    import transformers

    config_name, model_name, extra = ARCHS[arch]
    base = {k: v for k, v in TINY.items() if arch == "llama" or k != "attention_bias"}
    config = getattr(transformers, config_name)(**{**base, "initializer_range": INIT, **extra, **overrides})
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(config).eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lean")
    return {arch: write_folder(make_model(arch), root / arch) for arch in ARCHS}


def load(folder: Path):
    logging.disable(logging.WARNING)  # a kernel that falls back says so; not what these tests check
    try:
        return qformat.load(folder)
    finally:
        logging.disable(logging.NOTSET)


def assert_logits_close(got: torch.Tensor, want: torch.Tensor) -> None:
    got, want = got.reshape(-1).float(), want.reshape(-1).float()
    scale = max(1.0, float(want.abs().max()))
    assert float((got - want).abs().max()) <= RTOL_SCALE * scale, float((got - want).abs().max())


def prompt(n: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(seed))


# -- correctness against transformers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", list(ARCHS))
def test_logits_match_transformers_step_by_step(folders, arch):
    """Teacher-forced: the prompt (several tokens), then one token at a time through transformers' KV cache and the
    engine's; every step's logits agree."""
    from transformers import DynamicCache

    model = load(folders[arch])
    ids = prompt(14)
    engine = DecodeEngine(model, max_len=16)
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        want = model(ids[:, :5], cache=cache, use_cache=True).logits[0, -1]
        assert_logits_close(engine.prefill(ids[:, :5]), want)
        for t in range(5, ids.shape[1]):
            want = model(ids[:, t:t + 1], cache=cache, use_cache=True).logits[0, -1]
            assert_logits_close(engine.step(int(ids[0, t])), want)
    assert engine.position == ids.shape[1]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_greedy_tokens_and_scores_match_generate(folders, arch):
    model = load(folders[arch])
    ids = prompt(6, seed=2)
    with torch.inference_mode():
        ref = model.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)
    scores: list[torch.Tensor] = []
    out = generate(model, ids, 20, logits=scores)
    assert out.tolist() == ref.sequences.tolist()
    assert len(set(out[0, 6:].tolist())) > 3  # the comparison is not about one repeated token
    assert len(scores) == len(ref.logits) == 20
    for got, want in zip(scores, ref.logits, strict=True):
        assert_logits_close(got, want)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_numba_ops_match_torch_ops_step_by_step(folders, arch):
    """The fp32 CPU step runs lean_ops between the linears by default; the torch ops (numba_ops=False) agree at every
    step to float rounding, and greedy continuations are the same."""
    model = load(folders[arch])
    ids = prompt(5, seed=6)
    fast, ref = DecodeEngine(model, max_len=40), DecodeEngine(model, max_len=40, numba_ops=False)
    assert fast.numba_ops and not ref.numba_ops
    want = ref.prefill(ids)
    assert_logits_close(fast.prefill(ids), want)  # the prefill is torch code in both
    for _ in range(30):
        token = int(want.argmax())
        got, want = fast.step(token), ref.step(token)
        assert_logits_close(got, want)
    torch.testing.assert_close(fast.k_cache[:, :, :35], ref.k_cache[:, :, :35], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.v_cache[:, :, :35], ref.v_cache[:, :, :35], rtol=1e-5, atol=1e-5)
    assert generate(model, ids, 12).tolist() == generate(model, ids, 12, numba_ops=False).tolist()


def test_lean_ops_against_torch():
    """Each compiled op against its torch formulation, on SmolLM2-like shapes (9 query heads over 3 KV heads)."""
    import numpy as np

    from qformat.runtime import lean_ops

    rng = np.random.default_rng(0)
    f32 = np.float32
    x = np.linspace(-87, 88, 100001, dtype=f32)
    y = np.empty_like(x)
    lean_ops.silu_mul(x, np.ones_like(x), y)  # exp through silu: x * sigmoid(x)
    torch.testing.assert_close(torch.from_numpy(y), F.silu(torch.from_numpy(x)), rtol=1e-6, atol=1e-30)
    h, delta, w = (rng.standard_normal(576).astype(f32) for _ in range(3))
    out = np.empty(576, f32)
    want_h = torch.from_numpy(h + delta)
    want = torch.from_numpy(w) * (want_h * torch.rsqrt(want_h.pow(2).mean(-1, keepdim=True) + 1e-5))
    lean_ops.add_rms_norm(h, delta, w, f32(1e-5), out)
    torch.testing.assert_close(torch.from_numpy(h), want_h, rtol=0, atol=0)  # the residual add is exact
    torch.testing.assert_close(torch.from_numpy(out), want, rtol=1e-6, atol=1e-6)
    heads, kv, d, max_len, p = 9, 3, 64, 80, 57
    q, k, v = (rng.standard_normal(n * d).astype(f32) for n in (heads, kv, kv))
    cos, sin = rng.standard_normal(d).astype(f32), rng.standard_normal(d).astype(f32)
    k_cache, v_cache = (rng.standard_normal((kv, max_len, d)).astype(f32) for _ in range(2))
    kt, vt = torch.from_numpy(k_cache.copy()), torch.from_numpy(v_cache.copy())
    a = np.empty(heads * d, f32)
    lean_ops.rope_attend(q, k, v, cos, sin, k_cache, v_cache, p, f32(0.125), a, np.empty(d, f32),
                         np.empty(max_len, f32))
    ct, st = torch.from_numpy(cos), torch.from_numpy(sin)
    qt = torch.from_numpy(q).view(heads, d)
    kt[:, p] = torch.from_numpy(k).view(kv, d) * ct + torch.from_numpy(k).view(kv, d).roll(d // 2, -1) * st
    vt[:, p] = torch.from_numpy(v).view(kv, d)
    qt = qt * ct + qt.roll(d // 2, -1) * st
    want = F.scaled_dot_product_attention(qt.view(1, kv, heads // kv, d), kt[None, :, :p + 1], vt[None, :, :p + 1],
                                          scale=0.125).reshape(-1)
    torch.testing.assert_close(torch.from_numpy(k_cache), kt, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.from_numpy(v_cache), vt, rtol=0, atol=0)
    torch.testing.assert_close(torch.from_numpy(a), want, rtol=1e-5, atol=1e-5)


def test_other_dtypes_keep_torch_ops():
    model = make_model("llama").to(torch.bfloat16)
    engine = DecodeEngine(model, 12)
    assert not engine.numba_ops
    with pytest.raises(ValueError, match="numba_ops runs fp32 on the CPU"):
        DecodeEngine(model, 12, numba_ops=True)
    assert generate(model, prompt(4, seed=3), 6).shape == (1, 10)


def test_fused_siblings_compute_once_per_layer(folders):
    """q then k, v (and gate then up) on the same tensor: one stacked kernel call per group per layer."""
    model = load(folders["llama"])
    groups = {id(m.shared): m.shared for m in model.modules() if getattr(m, "shared", None) is not None}
    assert len(groups) == 2 * TINY["num_hidden_layers"]  # q+k+v and gate+up in every layer (numba kernel)
    calls = []
    for group in groups.values():
        inner = group._run
        group._run = lambda x, bias, inner=inner: calls.append(1) or inner(x, bias)
    engine = DecodeEngine(model, max_len=8)
    assert engine.layer_threads == 1  # numba kernels: the small torch ops between them run on one thread
    engine.prefill(prompt(3))
    engine.step(5)
    assert len(calls) == 2 * len(groups)  # prefill and step, each group once
    assert all(g.enabled for g in groups.values())
    assert torch.get_num_threads() == 2  # restored after the layers


def test_plain_transformers_model_runs_too():
    """nn.Linear layers (an unquantized model, tied output layer) go through the same code."""
    model = make_model("llama")
    assert DecodeEngine(model, 8).layer_threads is None  # dense matmuls keep torch's threads
    ids = prompt(4, seed=3)
    with torch.inference_mode():
        want = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    assert generate(model, ids, 8).tolist() == want.tolist()


def test_eos_stops_and_one_token_prompt(folders):
    model = load(folders["llama"])
    ids = prompt(1, seed=4)
    with torch.inference_mode():
        want = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    assert generate(model, ids, 6).tolist() == want.tolist()
    eos = int(want[0, 3])  # the third new token
    got = generate(model, ids, 6, eos_token_id=[999, eos])
    first = want[0].tolist().index(eos, 1)
    assert got.tolist() == [want[0, :first + 1].tolist()]


def test_sampling(folders):
    model = load(folders["qwen2"])
    ids = prompt(5, seed=5)
    greedy = generate(model, ids, 10)
    assert generate(model, ids, 10, do_sample=True, top_k=1).tolist() == greedy.tolist()
    runs = [generate(model, ids, 10, do_sample=True, temperature=1.5, top_p=0.95,
                     generator=torch.Generator().manual_seed(s)) for s in (7, 7, 8)]
    assert runs[0].tolist() == runs[1].tolist()  # the generator decides
    assert runs[0].tolist() != greedy.tolist() or runs[2].tolist() != greedy.tolist()
    scores: list[torch.Tensor] = []
    out = generate(model, ids, 10, do_sample=True, top_k=3, generator=torch.Generator().manual_seed(9), logits=scores)
    for token, logits in zip(out[0, 5:].tolist(), scores, strict=True):
        assert token in torch.topk(logits, 3).indices.tolist()


# -- limits and refusals ----------------------------------------------------------------------------------------------


def test_reaching_max_len_is_a_clear_error(folders):
    model = load(folders["mistral"])
    engine = DecodeEngine(model, max_len=6)
    engine.prefill(prompt(5))
    engine.step(3)
    with pytest.raises(ContextFull, match=r"max_len=6 positions; 6 are used and 1 more"):
        engine.step(4)
    engine.reset()
    with pytest.raises(ContextFull, match="max_len=6"):
        engine.prefill(prompt(7))
    with pytest.raises(ContextFull, match="max_len=6"):
        engine.generate(prompt(4), 4)  # 4 + 3 fed back > 6
    assert engine.generate(prompt(4), 3).shape == (1, 7)  # the last new token needs no room


@pytest.mark.parametrize(("arch", "overrides", "max_len", "reason"), [
    ("mistral", {"sliding_window": 8}, 16, r"sliding-window attention \(window 8 < max_len 16\)"),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 0}, 16,
     "sliding-window attention"),
    ("llama", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}}, 16,
     r"rope type 'dynamic' \(implemented: default, linear, llama3, yarn\)"),
    ("llama", {"hidden_act": "gelu"}, 16, "activation 'gelu'"),
])
def test_unsupported_configurations_are_refused(arch, overrides, max_len, reason):
    model = make_model(arch, **overrides)
    with pytest.raises(UnsupportedModel, match=reason):
        DecodeEngine(model, max_len=max_len)


def test_sliding_window_beyond_max_len_is_fine_and_other_models_refused():
    assert why_unsupported(make_model("mistral", sliding_window=8), max_len=8) is None
    llama = make_model("llama", rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    assert why_unsupported(llama, 16) is None
    ids = prompt(4)
    with torch.inference_mode():
        want = llama.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    assert generate(llama, ids, 5).tolist() == want.tolist()  # the scaled tables come from the model's rotary module
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    assert "model class GPT2LMHeadModel" in why_unsupported(gpt2)
    llama.model.layers[0].mlp.register_forward_hook(lambda *a: None)
    assert "forward hooks on model.layers.0.mlp" in why_unsupported(llama)
    with pytest.raises(UnsupportedModel, match="not a batch of 2"):
        generate(make_model("llama"), torch.zeros(2, 3, dtype=torch.long), 2)


# -- the command line ---------------------------------------------------------------------------------------------------


def test_cli_engines_agree(folders, capsys):
    folder = str(folders["llama"])
    outputs = {}
    for engine in ("lean", "transformers", "auto"):
        assert main(["generate", folder, "hello", "--max-new-tokens", "6", "--engine", engine]) == 0
        captured = capsys.readouterr()
        lines = captured.out.strip().splitlines()
        assert lines[-1].startswith("[6 new tokens in ") and lines[-1].endswith("tokens/s]")
        outputs[engine] = lines[:-1]
        assert "lean engine" not in captured.err
    assert outputs["lean"] == outputs["transformers"] == outputs["auto"]


def test_cli_auto_falls_back_with_a_note(tmp_path, capsys):
    folder = write_folder(make_model("mistral", sliding_window=4), tmp_path / "windowed")
    assert main(["generate", str(folder), "hello", "--max-new-tokens", "4"]) == 0
    err = capsys.readouterr().err
    assert "lean engine does not apply" in err and "sliding-window attention (window 4" in err
    assert "using transformers" in err
    assert main(["generate", str(folder), "hello", "--max-new-tokens", "4", "--engine", "lean"]) == 1
    assert "sliding-window attention" in capsys.readouterr().err


# -- the real model ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_32_greedy_tokens_match_transformers():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from e2e import PROMPT, converted_folder
    from transformers import AutoTokenizer

    folder = converted_folder(False)  # SmolLM2-135M RTN 4-bit g128 (converted once, cached)
    model = qformat.load(folder)
    ids = AutoTokenizer.from_pretrained(folder)(PROMPT, return_tensors="pt").input_ids
    with torch.inference_mode():
        want = model.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False, output_logits=True,
                              return_dict_in_generate=True, pad_token_id=0)
    scores: list[torch.Tensor] = []
    got = generate(model, ids, 32, logits=scores)
    assert got.tolist() == want.sequences.tolist()
    for mine, theirs in zip(scores, want.logits, strict=True):
        assert_logits_close(mine, theirs)
