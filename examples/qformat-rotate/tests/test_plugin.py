"""The example plugin's own tests, written only against qformat's public API and its testing harness."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from qformat_rotate.codec import CODECS, hadamard_matrix, rotate_columns, unrotate_columns
from qformat_rotate.method import NF4, NF4_TABLE

from qformat.format import RecordBuilder, open_file, write_file
from qformat.methods import LayerInput
from qformat.plugins import get_method, get_plugins
from qformat.testing import check_method, sample_layers


def test_registered_through_entry_point():
    plugins = get_plugins()
    assert isinstance(plugins.methods["nf4"], NF4) and get_method("nf4") is plugins.methods["nf4"]
    info = plugins.info["rotate"]
    assert info.package == "qformat-rotate" and info.methods == ["nf4"] and info.codecs == ["rotate.hadamard"]
    assert info.error is None and plugins.codec_owner["rotate.hadamard"] == "rotate"
    assert plugins.codecs.owner("rotate.hadamard") == "qformat-rotate 0.1.0 (entry point 'rotate')"
    kernels = plugins.info["rotate_kernels"]
    assert kernels.package == "qformat-rotate" and kernels.kernels == ["rotate-numba"] and kernels.error is None


def test_hadamard_is_orthogonal_and_rotation_inverts():
    h = hadamard_matrix(16)
    assert np.array_equal(h @ h, 16 * np.eye(16))
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 64)).astype(np.float32)
    signs = rng.choice([-1.0, 1.0], size=64).astype(np.float32)
    np.testing.assert_allclose(rotate_columns(unrotate_columns(w, signs, 16), signs, 16), w, atol=1e-5)


@pytest.mark.parametrize("params", [{}, {"double_quant": False}, {"rotate": True}, {"block_size": 32}])
def test_harness_accepts_nf4(params):
    report = check_method(NF4(), params)
    # NF4 on real MiniLM layers: ~10% relative weight error is the expected 4-bit level.
    assert report.relative_error < 0.15
    # 4-bit codes + 8-bit (or fp32) absmax per block + small overheads (table, second-level stats, signs).
    per_block = 8 if report.params["double_quant"] else 32
    assert 4 + per_block / report.params["block_size"] < report.bits_per_weight < 4 + per_block / report.params[
        "block_size"] + 0.02


def test_nf4_codes_match_bitsandbytes_rule():
    # Nearest level by midpoints: exactly the table values map to themselves.
    weight = torch.from_numpy(np.tile(NF4_TABLE, (4, 4)))
    qt = NF4().quantize(LayerInput("m.weight", weight), NF4().validate_params({"double_quant": False}))
    np.testing.assert_array_equal(qt.decode(), weight.numpy())


def test_rotation_helps_outlier_channels(tmp_path):
    layer = sample_layers(1)[0]
    w = layer.weight.copy()
    w[:, :3] *= 30  # a few outlier input channels
    errors = {}
    for rotate in (False, True):
        params = NF4().validate_params({"rotate": rotate})
        qt = NF4().quantize(LayerInput("m.weight", torch.from_numpy(w)), params)
        write_file(tmp_path / f"{rotate}.safetensors", None, [qt])
        decoded = open_file(tmp_path / f"{rotate}.safetensors", get_plugins().codecs).decode("m.weight")
        errors[rotate] = np.linalg.norm(decoded - w) / np.linalg.norm(w)
    assert errors[True] < errors[False]


def test_bad_hadamard_record_is_rejected():
    b = RecordBuilder("m.weight", (4, 6), registry=CODECS)
    inner = b.tensor("inner", np.zeros((4, 6), np.float32))
    node = b.node("rotate.hadamard", 1, input=inner, signs=b.store("signs", np.ones(6, np.int8)), block=4)
    with pytest.raises(Exception, match="multiple of 4"):
        b.finish(node)


def test_the_core_registry_does_not_know_the_plugin_codec():
    """Readers know only the codecs they are given: the format layer's default is the core."""
    b = RecordBuilder("m.weight", (4, 8))
    node = b.node("rotate.hadamard", 1, input=b.tensor("inner", np.zeros((4, 8), np.float32)),
                  signs=b.store("signs", np.ones(8, np.int8)), block=4)
    with pytest.raises(Exception, match="unknown_codec"):
        b.finish(node)
