"""Fine-tuning a converted model (qformat.load(..., trainable=True)): gradients through the packed kernels match the
dequantized reference, sidecars and float parts train while the codes stay frozen, peft LoRA attaches / trains /
saves / reloads, tuned sidecars save and reload, and the error paths name what is wrong."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import input_ids, tiny_model, write_folder

from qformat.errors import LoadError

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _sidecar_folder(out: Path, rank: int, lowrank_only: str | None = None) -> Path:
    from qformat.format import RecordBuilder
    from qformat.sidecar import lowrank_node, with_sidecar

    model = tiny_model()
    state = {k: v.detach() for k, v in model.state_dict().items()}

    def mutate(qt):
        if qt.name == lowrank_only:  # a record that is a bare low-rank product: no base to split it from
            builder = RecordBuilder(qt.name, qt.record["shape"], "F32")
            u, s, vh = torch.linalg.svd(state[qt.name])
            node, _ = lowrank_node(builder, u[:, :rank] * s[:rank], vh[:rank], 16)
            return builder.finish(node)
        return with_sidecar(qt, state[qt.name], rank) if rank else qt

    return write_folder(model, out, mutate=mutate)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return _sidecar_folder(tmp_path_factory.mktemp("trainable") / "side4", 4)


@pytest.fixture(scope="module")
def peft():
    return pytest.importorskip("peft")


def _loss(model, ids):
    out = model(ids, labels=ids)
    return out.loss


def _packed_digest(model) -> str:
    """A hash of every QLinear's prepared (packed) arrays and of its decoded weight."""
    from qformat.runtime.nn import qlinear_modules

    digest = hashlib.sha256()
    for name, layer in sorted(qlinear_modules(model).items()):
        digest.update(name.replace(".base_layer", "").encode())  # peft wraps a layer as <layer>.base_layer
        for value in vars(layer.prepared).values():
            if isinstance(value, torch.Tensor):
                digest.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
            elif isinstance(value, np.ndarray):
                digest.update(np.ascontiguousarray(value).tobytes())
        digest.update(layer.prepared.dequantize().numpy().tobytes())
    return digest.hexdigest()



def _train(model, optimizer, lr: float, steps: int = 6) -> list[float]:
    """``steps`` optimizer steps on the trainable parameters over one fixed batch; the loss of each step."""
    opt = optimizer([p for p in model.parameters() if p.requires_grad], lr=lr)
    ids = input_ids(24)
    model.train()
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = _loss(model, ids)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses

def test_gradients_match_dequantized_reference(folder):
    import qformat
    from qformat.runtime.nn import QLinear

    model = qformat.load(folder, trainable=True)
    ref = qformat.load_dequantized(folder)
    for p in ref.parameters():
        p.requires_grad_(True)
    ids = input_ids(12)
    probe = torch.randn(2, 12, model.config.vocab_size, generator=torch.Generator().manual_seed(3))
    grads = []
    for m in (model, ref):
        embeds = m.get_input_embeddings()(ids).detach().requires_grad_(True)
        logits = m(inputs_embeds=embeds).logits
        (logits * probe).sum().backward()
        grads.append((logits.detach(), embeds.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-4, rtol=1e-3)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QLinear)}
    assert len(layers) == 14 and all(m.sidecar_a is not None for m in layers.values())
    for name, layer in layers.items():
        dense = ref.get_submodule(name).weight.grad  # dL/dW; W = base + a @ b
        a, b = layer.sidecar_a.detach(), layer.sidecar_b.detach()
        torch.testing.assert_close(layer.sidecar_a.grad, dense @ b.T, atol=1e-4, rtol=1e-3)
        torch.testing.assert_close(layer.sidecar_b.grad, a.T @ dense, atol=1e-4, rtol=1e-3)
        if layer.bias is not None:  # attention projections (attention_bias=True)
            torch.testing.assert_close(layer.bias.grad, ref.get_submodule(name).bias.grad, atol=1e-4, rtol=1e-3)
    norm = "model.layers.1.post_attention_layernorm.weight"
    torch.testing.assert_close(model.get_parameter(norm).grad, ref.get_parameter(norm).grad, atol=1e-4, rtol=1e-3)


def test_lora_gradients_match_dequantized_reference(folder, peft):
    import qformat

    grads = []
    for m in (qformat.load(folder, trainable=True), qformat.load_dequantized(folder)):
        torch.manual_seed(0)
        config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, init_lora_weights=False)
        pm = peft.get_peft_model(m, config)
        _loss(pm, input_ids(12)).backward()
        grads.append({n: p.grad for n, p in pm.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 28
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], atol=1e-4, rtol=1e-3, msg=name)


def test_sidecars_train_and_codes_stay_frozen(folder, tmp_path):
    import qformat
    from qformat.runtime.trainable import save_sidecars, trainable_summary

    model = qformat.load(folder, trainable=True)
    before = _packed_digest(model)
    sidecar = model.get_parameter("model.layers.0.mlp.up_proj.sidecar_a").detach().clone()
    summary = trainable_summary(model)
    assert summary["trainable_params"] == sum(p.numel() for p in model.parameters() if p.requires_grad) > 0
    losses = _train(model, torch.optim.Adam, 3e-3)
    ids = input_ids(24)
    assert losses[-1] < losses[0]
    assert _packed_digest(model) == before
    assert not torch.equal(model.get_parameter("model.layers.0.mlp.up_proj.sidecar_a"), sidecar)

    # tuned sidecars (and float parts) save and reload with the same logits
    names = save_sidecars(model, tmp_path / "tuned.safetensors")
    assert "model.layers.0.mlp.up_proj.sidecar_b" in names and "model.norm.weight" in names
    with torch.no_grad():
        tuned = model(ids).logits
        again = qformat.load(folder, trainable=True, sidecars=tmp_path / "tuned.safetensors")(ids).logits
        frozen = qformat.load(folder, sidecars=tmp_path / "tuned.safetensors")
        assert not any(p.requires_grad for p in frozen.parameters())
        torch.testing.assert_close(again, tuned, atol=0, rtol=0)
        torch.testing.assert_close(frozen(ids).logits, tuned, atol=0, rtol=0)
        assert not torch.allclose(qformat.load(folder)(ids).logits, tuned, atol=1e-4)


def test_peft_lora_trains_saves_and_reloads(folder, tmp_path, peft):
    import qformat
    from qformat.runtime.trainable import trainable_summary

    model = qformat.load(folder, trainable=True)
    before = _packed_digest(model)
    torch.manual_seed(0)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS))
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert trainable_summary(pm)["trainable_params"] == 4 * sum(
        m.in_features + m.out_features for m in model.modules() if type(m).__name__ == "QLinear")
    losses = _train(pm, torch.optim.AdamW, 1e-2)
    ids = input_ids(24)
    assert losses[-1] < losses[0]
    assert _packed_digest(model) == before
    pm.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        tuned = pm(ids).logits
        reloaded = peft.PeftModel.from_pretrained(qformat.load(folder, trainable=True), tmp_path / "adapter")
        torch.testing.assert_close(reloaded(ids).logits, tuned, atol=1e-6, rtol=1e-6)
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        reloaded.merge_and_unload()


def test_record_without_trainable_form_stays_frozen(tmp_path):
    import qformat
    from qformat.runtime.nn import QLinear

    plain = _sidecar_folder(tmp_path / "plain", 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to say: no record has a low-rank part
        model = qformat.load(plain, trainable=True)
    assert model.qformat_trainable["sidecars"] == [] and len(model.qformat_trainable["frozen"]) == 14
    assert model.get_parameter("model.norm.weight").requires_grad
    ids = input_ids(8)
    _loss(model, ids).backward()
    assert model.get_parameter("model.layers.0.input_layernorm.weight").grad is not None

    odd = "model.layers.1.mlp.up_proj.weight"
    bare = _sidecar_folder(tmp_path / "bare", 4, lowrank_only=odd)
    with pytest.warns(UserWarning, match=r"1 record\(s\) hold a low-rank part.*up_proj.*stay frozen"):
        model = qformat.load(bare, trainable=True)
    layer = model.get_submodule("model.layers.1.mlp.up_proj")
    assert isinstance(layer, QLinear) and layer.sidecar_a is None
    assert "model.layers.1.mlp.up_proj" in model.qformat_trainable["frozen"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, qformat.load_dequantized(bare)(ids).logits, atol=1e-4,
                                   rtol=1e-4)


def test_mismatched_sidecar_file_names_the_tensor(folder, tmp_path):
    from safetensors.torch import save_file

    import qformat
    from qformat.runtime.trainable import save_sidecars

    other = _sidecar_folder(tmp_path / "side2", 2)
    save_sidecars(qformat.load(other, trainable=True), tmp_path / "rank2.safetensors")
    with pytest.raises(LoadError, match=r"tensor 'model\.layers\.0\..*sidecar_[ab]' has shape \[\d+, \d+\], the "
                                        r"model's is"):
        qformat.load(folder, trainable=True, sidecars=tmp_path / "rank2.safetensors")
    save_file({"model.layers.0.mlp.nope.sidecar_a": torch.zeros(2, 2)}, tmp_path / "bad.safetensors")
    with pytest.raises(LoadError, match=r"tensor 'model\.layers\.0\.mlp\.nope\.sidecar_a' matches no parameter"):
        qformat.load(folder, sidecars=tmp_path / "bad.safetensors")
    with pytest.raises(LoadError, match="cannot read sidecar file"):
        qformat.load(folder, sidecars=tmp_path / "missing.safetensors")
    with pytest.raises(LoadError, match="not with max_memory"):
        qformat.load(folder, trainable=True, keep_terms=1)


def test_hf_quantizer_is_trainable():
    from qformat.runtime.hf_integration import QformatConfig, QformatHfQuantizer

    quantizer = QformatHfQuantizer(QformatConfig(), pre_quantized=True)
    assert quantizer.is_trainable is True
    assert quantizer.is_qat_trainable is False
