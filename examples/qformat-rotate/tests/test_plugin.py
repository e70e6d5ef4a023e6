"""The example plugin's own tests, written only against qformat's public API and its testing harness."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from qformat_rotate.codec import CODECS, hadamard_matrix, rotate_columns, unrotate_columns
from qformat_rotate.transform import Hadamard, HadamardRotation, signs_for

from qformat.plugin import LayerInput, ParameterError, RecordBuilder
from qformat.plugins import get_method, get_plugins, get_transform
from qformat.testing import PluginCheckError, check_transform, sample_layers
from qformat.transforms import wrap_record


def test_registered_through_entry_point():
    plugins = get_plugins()
    assert isinstance(plugins.transforms["hadamard"], Hadamard) and get_transform("hadamard") is plugins.transforms[
        "hadamard"]
    info = plugins.info["rotate"]
    assert info.package == "qformat-rotate" and info.transforms == ["hadamard"] and info.methods == []
    assert info.codecs == ["rotate.hadamard"] and info.error is None and plugins.codec_owner["rotate.hadamard"] == "rotate"
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


@pytest.mark.parametrize("params", [{}, {"block": 16, "seed": 3}])
def test_harness_accepts_the_transform(params):
    """Function-preserving on every tiny architecture (a predicate accepts any, so the unknown one is rotated too),
    and every selected linear carries its own rotation."""
    report = check_transform(Hadamard(), params)
    assert set(report.max_error) == {"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2"}
    assert max(report.max_error.values()) < 1e-5 and max(report.file_error.values()) < 1e-5
    assert all(count >= 4 for count in report.input_transforms.values())
    assert not any(report.changed_modules.values())  # nothing folded: only input transforms
    assert report.skipped == []


def test_the_harness_catches_a_rotation_that_is_not_undone():
    class Forgetful(HadamardRotation):
        def inputs(self, x):
            return x  # the weight is rotated, the inputs are not

    class Broken(Hadamard):
        def apply(self, block, config):
            result = super().apply(block, config)
            result.input_transforms = {n: Forgetful(t.signs, t.block) for n, t in result.input_transforms.items()}
            return result

    with pytest.raises(PluginCheckError, match="not function-preserving"):
        check_transform(Broken(), architectures=["llama"])


def test_parameters_are_checked():
    hadamard = get_transform("hadamard")
    with pytest.raises(ParameterError, match="transform 'hadamard' parameter 'block': 12 is not a power of two"):
        hadamard.validate_params({"block": 12})
    with pytest.raises(ParameterError, match="transform 'hadamard' parameter 'block'.*above the maximum"):
        hadamard.validate_params({"block": 65536})
    with pytest.raises(ParameterError, match="does not divide the 48 input features of m.weight"):
        hadamard.check_shapes(hadamard.validate_params({"block": 32}), {"m.weight": (8, 48)})


def test_signs_are_seeded_per_linear():
    a, b = signs_for(0, "model.layers.0.mlp.up_proj", 64), signs_for(0, "model.layers.0.mlp.down_proj", 64)
    assert np.array_equal(a, signs_for(0, "model.layers.0.mlp.up_proj", 64)) and not np.array_equal(a, b)
    assert a.dtype == np.int8 and set(np.unique(a)) == {-1, 1}


def test_rotation_helps_outlier_channels():
    """RTN 3-bit on a layer with a few huge input channels: rotating first spreads them, so the error drops."""
    layer = sample_layers(1)[0]
    w = layer.weight.copy()
    w[:, :3] *= 30
    rtn = get_method("rtn")
    config = rtn.validate_params({"bits": 3, "group_size": 64})
    plain = rtn.quantize(LayerInput("m.weight", torch.from_numpy(w)), config)
    rotation = HadamardRotation(signs_for(0, "m", w.shape[1]), 64)
    inner = rtn.quantize(LayerInput("m.weight", rotation.weight(torch.from_numpy(w))), config)
    rotated = wrap_record(inner, [rotation], CODECS)
    assert rotated.record["weight"]["codec"] == "rotate.hadamard"
    errors = {name: np.linalg.norm(qt.decode(CODECS) - w) / np.linalg.norm(w)
              for name, qt in (("plain", plain), ("rotated", rotated))}
    assert errors["rotated"] < 0.8 * errors["plain"], errors  # measured: 0.119 vs 0.168


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
