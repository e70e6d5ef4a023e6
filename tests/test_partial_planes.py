"""Bit-plane storage for affine methods (``-p planes=true``) and loading at fewer planes (spec/partial.md).

A 4-bit RTN/GPTQ file whose codes are ``bitplanes`` decodes exactly like the packed one; loaded with ``planes=P`` it
runs P-bit codes (``QuantizedTensor.use_planes``: the affine rewritten by powers of two), equal bit for bit to the
reference decode with ``use_planes=P``, reading only the kept planes and holding less memory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import layer_input
from qformat_plugins.gptq import GPTQ
from qformat_plugins.rtn import RTN
from tiny_model import make_tiny_llama

import qformat
from qformat.conversion.pipeline import ConvertOptions, convert
from qformat.errors import LoadError
from qformat.format import open_folder
from qformat.testing import sample_layers

LAYERS = sample_layers(1)


@pytest.mark.parametrize("method, params", [(RTN(), {"bits": 4, "group_size": 64}),
                                            (RTN(), {"bits": 3, "sym": True}),
                                            (GPTQ(), {"bits": 4, "act_order": True, "group_size": 128})])
def test_planes_store_the_same_weight_and_read_fewer_planes_exactly(method, params: dict) -> None:
    sample = LAYERS[0]
    packed = method.run(layer_input(sample), params).qt
    planes = method.run(layer_input(sample), {**params, "planes": True}).qt
    assert np.array_equal(packed.decode(), planes.decode())
    assert planes.record["storage_bytes"] == packed.record["storage_bytes"]
    for p in range(1, params["bits"] + 1):
        cut = planes.use_planes(p)
        assert np.array_equal(cut.decode().view(np.uint32), planes.decode(use_planes=p).view(np.uint32))
    errors = [float(np.square(planes.decode(use_planes=p) - sample.weight).sum()) for p in range(1, params["bits"] + 1)]
    assert errors == sorted(errors, reverse=True)


@pytest.fixture(scope="module")
def planes_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = make_tiny_llama(tmp_path_factory.mktemp("src") / "tiny", layers=2)
    out = tmp_path_factory.mktemp("out") / "rtn4planes"
    convert(ConvertOptions(str(src), out, "rtn", {"bits": 4, "group_size": 32, "planes": True}, quiet=True))
    return out


def test_load_at_fewer_planes(planes_folder: Path) -> None:
    ids = torch.tensor([[3, 17, 42, 99, 7]])
    full = qformat.load(planes_folder)
    with torch.no_grad():
        reference = full(ids).logits
    sizes, errors = [], []
    for p in (1, 2, 3):
        model = qformat.load(planes_folder, planes=p)
        plan = model.qformat_partial
        assert plan.planes == p and len(plan.plane_records) == 14
        sizes.append(plan.loaded_bytes)
        with torch.no_grad():
            errors.append(float((model(ids).logits - reference).abs().max()))
    assert sizes == sorted(sizes) and sizes[-1] < plan.full_bytes  # bytes read from the file
    assert errors == sorted(errors, reverse=True) and errors[-1] > 0
    folder = open_folder(planes_folder)
    name = "model.layers.1.mlp.up_proj.weight"
    layer = qformat.load(planes_folder, planes=2).get_submodule(name.rsplit(".", 1)[0])
    x = torch.randn(2, layer.in_features)
    with torch.no_grad():
        got = layer(x)
    want = x @ torch.from_numpy(folder.decode(name, use_planes=2)).T
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)


def test_fewer_planes_hold_less_memory() -> None:
    """The Numba kernel holds P-bit codes (measured at 1024x1024 g128: 598 KB at 4 planes, 533 / 336 / 205 KB at
    3 / 2 / 1; the statistics become fp32, so on tiny layers they dominate and the total may not shrink)."""
    from qformat_kernels.numba_plugin import NumbaKernel

    from qformat.methods import LayerInput

    w = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0)) * 0.02
    qt = RTN().run(LayerInput("x.weight", w, "F32", None), {"bits": 4, "planes": True}).qt
    kernel = NumbaKernel()
    held = [kernel.prepare(qt.use_planes(p)).nbytes() for p in (1, 2, 3)] + [kernel.prepare(qt).nbytes()]
    assert held == sorted(held) and held[0] < 0.4 * held[-1]


def test_planes_needs_a_planes_file(tmp_path: Path) -> None:
    src = make_tiny_llama(tmp_path / "src", layers=1)
    out = tmp_path / "rtn4"
    convert(ConvertOptions(str(src), out, "rtn", {"bits": 4}, quiet=True))
    with pytest.raises(LoadError, match="planes=true"):
        qformat.load(out, planes=2)
    with pytest.raises(LoadError, match="not max_memory and planes"):
        qformat.load(out, max_memory="1GB", planes=2)
