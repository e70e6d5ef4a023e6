"""The dispatcher: kernel choice by codec signature, device and batch; forcing a kernel (QFORMAT_KERNEL, the kernel
argument of qformat.load and QformatConfig: one path, the same errors); the torch reference fallback; the kernel
contract's optional members and their defaults; ``linear`` switching to dequantize + dense matmul above a kernel's
max_batch; the ``qformat kernels`` command."""

from __future__ import annotations

import contextlib
import json
import logging
import types

import numpy as np
import pytest
import torch

from qformat.cli import main
from qformat.format import QuantizedTensor, RecordBuilder, write_file
from qformat.kernel_api import Kernel, PreparedWeight
from qformat.plugin import hookimpl
from qformat.plugins import build_plugins, use_plugins
from qformat.runtime import dispatch
from qformat.runtime.dispatch import (
    ENV_KERNEL,
    REFERENCE,
    KernelSelectionError,
    linear,
    prepare_weight,
    select_kernel,
)
from qformat.runtime.reference import TorchReferencePrepared

NAME = "model.layers.0.self_attn.q_proj.weight"


def affine_qt(rows: int = 24, cols: int = 64, seed: int = 0) -> QuantizedTensor:
    rng = np.random.default_rng(seed)
    b = RecordBuilder(NAME, (rows, cols), "BF16")
    node = b.affine(b.packed("codes", rng.integers(0, 16, (rows, cols)), 4),
                    scale=b.tensor("scale", (rng.random((rows, cols // 32)) * 0.05).astype(np.float16)), zero=8.0,
                    bits=4, group_shape=(1, 32))
    return b.finish(node)


def dense_qt(rows: int = 6, cols: int = 10) -> QuantizedTensor:
    b = RecordBuilder(NAME, (rows, cols))
    return b.finish(b.tensor("w", np.random.default_rng(1).standard_normal((rows, cols)).astype(np.float16)))


@pytest.fixture(autouse=True)
def no_forced_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_KERNEL, raising=False)


def reference(qt: QuantizedTensor, x: torch.Tensor) -> torch.Tensor:
    return x.double() @ torch.from_numpy(qt.decode().reshape(qt.record["shape"][0], -1)).double().T


# ---------------------------------------------------------------------------------------------------------------
# choice

def test_supported_record_gets_numba_on_cpu() -> None:
    kernel = select_kernel(affine_qt().record, "cpu", 1)
    assert kernel.name == "numba"
    prepared = prepare_weight(affine_qt(), "cpu")
    assert prepared.kernel.name == "numba"


def test_unsupported_record_falls_back_to_torch_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    qt = dense_qt()
    assert select_kernel(qt.record, "cpu", 1) is REFERENCE
    prepared = prepare_weight(qt, "cpu")
    assert isinstance(prepared, TorchReferencePrepared) and prepared.kernel is REFERENCE
    x = torch.randn(2, 10)
    with caplog.at_level(logging.WARNING, logger="qformat.kernels"):
        y1 = prepared.matmul(x)
        y2 = prepared.matmul(x)
    warnings = [r for r in caplog.records if "torch reference path" in r.getMessage()]
    assert len(warnings) == 1
    assert NAME in warnings[0].getMessage() and "tensor" in warnings[0].getMessage()
    torch.testing.assert_close(y1.double(), reference(qt, x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y1, y2)
    assert prepared.nbytes() == qt.record["storage_bytes"]  # the canonical tensors, no dense copy


def test_forced_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    qt = affine_qt()
    monkeypatch.setenv(ENV_KERNEL, "torch")
    assert select_kernel(qt.record, "cpu", 1) is REFERENCE
    prepared = prepare_weight(qt, "cpu")
    assert isinstance(prepared, TorchReferencePrepared)
    x = torch.randn(1, 64)
    torch.testing.assert_close(prepared.matmul(x).double(), reference(qt, x), rtol=1e-5, atol=1e-5)

    monkeypatch.setenv(ENV_KERNEL, "numba")
    assert select_kernel(qt.record, "cpu", 1).name == "numba"
    with pytest.raises(KernelSelectionError, match=r"does not support codec signature tensor \(weight: tensor as a "
                                                   r"term \(dense or unknown\)\)"):
        select_kernel(dense_qt().record, "cpu", 1)
    with pytest.raises(KernelSelectionError, match=r"kernel 'numba' \(forced by QFORMAT_KERNEL\) runs on cpu, not on "
                                                   "cuda"):
        select_kernel(qt.record, "cuda", 1)

    monkeypatch.setenv(ENV_KERNEL, "nonesuch")
    with pytest.raises(KernelSelectionError, match=r"unknown kernel 'nonesuch' \(forced by QFORMAT_KERNEL\); "
                                                   r"available kernels: .*numba.*torch"):
        select_kernel(qt.record, "cpu", 1)

    monkeypatch.setenv(ENV_KERNEL, "auto")
    assert select_kernel(qt.record, "cpu", 1).name == "numba"


def _error(call) -> str:
    with pytest.raises(KernelSelectionError) as caught:
        call()
    return str(caught.value)


FORCED = [("nonesuch", "cpu", affine_qt), ("numba", "cuda", affine_qt), ("numba", "cpu", dense_qt)]


@pytest.mark.parametrize(("name", "device", "make"), FORCED, ids=["unknown", "device", "unsupported"])
def test_argument_and_environment_force_alike(name: str, device: str, make, monkeypatch: pytest.MonkeyPatch) -> None:
    """One path: the same checks and messages whether the name comes from QFORMAT_KERNEL or the argument."""
    qt = make()
    monkeypatch.setenv(ENV_KERNEL, name)
    by_env = _error(lambda: prepare_weight(qt, device))
    monkeypatch.setenv(ENV_KERNEL, "torch")  # the argument wins over the environment
    by_argument = _error(lambda: prepare_weight(qt, device, forced=name))
    assert "forced by QFORMAT_KERNEL" in by_env
    assert by_env.replace("QFORMAT_KERNEL", "the kernel option") == by_argument
    if make is dense_qt:
        assert f"of {NAME!r}" in by_argument and "leave the kernel unset" in by_argument


def test_auto_and_forced_argument_override_the_environment(use_kernels, monkeypatch: pytest.MonkeyPatch) -> None:
    record = affine_qt().record
    monkeypatch.setenv(ENV_KERNEL, "nonesuch")
    assert select_kernel(record, "cpu", 1, forced="torch") is REFERENCE
    assert select_kernel(record, "cpu", 1, forced="auto").name == "numba"
    assert select_kernel(record, "cpu", 1, forced="").name == "numba"
    assert prepare_weight(affine_qt(), "cpu", forced="torch").kernel is REFERENCE


class FakePrepared(PreparedWeight):
    def __init__(self, qt: QuantizedTensor, kernel: Kernel) -> None:
        self.qt, self.kernel = qt, kernel
        self.out_features, self.in_features = qt.record["shape"]
        self.calls: list[str] = []

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append("matmul")
        return reference(self.qt, x.reshape(-1, self.in_features)).float().reshape(*x.shape[:-1], -1)

    def dequantize(self) -> torch.Tensor:
        self.calls.append("dequantize")
        return torch.from_numpy(self.qt.decode())

    def nbytes(self) -> int:
        return 0


def fake_kernel(name: str, priority: int, max_batch: int, device: str = "cpu", works: bool = True) -> Kernel:
    class Fake(Kernel):
        def supports(self, record: dict) -> bool:
            return True

        def prepare(self, qt: QuantizedTensor, device: str = "cpu") -> PreparedWeight:
            if not works:
                raise RuntimeError("repack failed")
            return FakePrepared(qt, self)

    Fake.name, Fake.priority, Fake.max_batch, Fake.device = name, priority, max_batch, device
    return Fake()


@pytest.fixture
def use_kernels():
    """``use_kernels(k1, k2, ...)``: the process-wide plugin set is exactly these kernels until the test ends
    (a plugin set built through the public API, as an installed package would register them)."""
    with contextlib.ExitStack() as stack:
        def install(*kernels: Kernel) -> None:
            module = types.ModuleType("fake_kernels")
            module.qformat_register_kernels = hookimpl(lambda register: [register(k) for k in kernels])
            stack.enter_context(use_plugins(build_plugins(extra=[("fake-kernels", module)], entry_points=[])))

        yield install


class Picky(Kernel):
    """Declares only why_unsupported: supports() follows from it."""

    name, device = "picky", "cpu"

    def why_unsupported(self, record: dict) -> str | None:
        return None if record["shape"][0] == 24 else "picky takes 24 rows only"

    def prepare(self, qt: QuantizedTensor, device: str = "cpu") -> PreparedWeight:
        return FakePrepared(qt, None)


class Lax(Kernel):
    """Declares only supports(): why_unsupported() defaults to None."""

    name, device = "lax", "cpu"

    def supports(self, record: dict) -> bool:
        return False

    def prepare(self, qt: QuantizedTensor, device: str = "cpu") -> PreparedWeight:
        raise AssertionError("never chosen")


def test_contract_defaults(use_kernels, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel declaring the required members only: the dispatcher fills in the rest with the declared defaults."""
    picky, lax = Picky(), Lax()
    assert picky.supports(affine_qt().record) and not picky.supports(affine_qt(rows=8).record)
    assert lax.why_unsupported(affine_qt().record) is None and not lax.supports(affine_qt().record)
    assert (Kernel.priority, Kernel.max_batch, Kernel.supported) == (0, 1 << 30, ())
    use_kernels(picky, lax)
    prepared = prepare_weight(affine_qt(), "cpu")
    assert prepared.kernel is picky  # set by the dispatcher: prepare() left it None
    assert prepared.max_batch is None and dispatch.max_batch(prepared) == Kernel.max_batch
    assert prepared.decode_fn() is None and prepared.fuse_rows([prepared, prepared]) is None
    assert dispatch.fuse_rows([prepared, prepared]) is None
    x = torch.randn(3, 64)
    torch.testing.assert_close(dispatch.bind(prepared)(x), linear(prepared, x), rtol=0, atol=0)
    assert prepared.calls == ["matmul", "matmul"]
    monkeypatch.setenv(ENV_KERNEL, "picky")
    with pytest.raises(KernelSelectionError, match=r"affine\[4\]\(packed\[4\],tensor\) \(picky takes 24 rows only\)"):
        select_kernel(affine_qt(rows=8).record, "cpu", 1)
    monkeypatch.setenv(ENV_KERNEL, "lax")
    with pytest.raises(KernelSelectionError, match=r"does not support codec signature affine\[4\]\(packed\[4\],"
                                                   r"tensor\); leave"):  # no reason given: none shown
        select_kernel(affine_qt().record, "cpu", 1)


def test_load_kernel_option_config_and_environment_force_alike(use_kernels, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """qformat.load(kernel=...), QformatConfig.kernel (from_pretrained) and QFORMAT_KERNEL: one path, one error."""
    from helpers import tiny_model, write_folder
    from transformers import AutoConfig, AutoModelForCausalLM

    import qformat

    folder = write_folder(tiny_model(), tmp_path / "model")
    use_kernels(Picky(), fake_kernel("gpu", priority=1, max_batch=8, device="cuda"))

    def from_pretrained(name: str) -> None:
        config = AutoConfig.from_pretrained(folder)
        config.quantization_config["kernel"] = name
        AutoModelForCausalLM.from_pretrained(folder, config=config)

    for name, expected in (("nonesuch", "unknown kernel 'nonesuch'"), ("gpu", "runs on cuda, not on cpu"),
                           ("picky", "(picky takes 24 rows only)")):
        by_option = _error(lambda: qformat.load(folder, kernel=name))  # noqa: B023
        assert expected in by_option and "forced by the kernel option" in by_option
        assert _error(lambda: from_pretrained(name)) == by_option  # noqa: B023
        monkeypatch.setenv(ENV_KERNEL, name)
        assert _error(lambda: qformat.load(folder)) == by_option.replace("the kernel option", ENV_KERNEL)
        monkeypatch.delenv(ENV_KERNEL)


def test_choice_by_device_batch_and_priority(use_kernels, monkeypatch: pytest.MonkeyPatch) -> None:
    small = fake_kernel("small", priority=20, max_batch=4)
    large = fake_kernel("large", priority=5, max_batch=1 << 20)
    gpu = fake_kernel("gpu", priority=99, max_batch=1 << 20, device="cuda")
    use_kernels(small, large, gpu)
    record = affine_qt().record
    assert select_kernel(record, "cpu", 1) is small
    assert select_kernel(record, "cpu", 64) is large  # a kernel whose max_batch covers the batch wins
    assert select_kernel(record, "cuda:0", 1) is gpu
    assert set(dispatch.available_kernels()) == {"small", "large", "gpu", "torch"}


def test_failed_prepare_falls_back_unless_forced(use_kernels, monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    use_kernels(fake_kernel("broken", priority=1, max_batch=8, works=False))
    with caplog.at_level(logging.WARNING, logger="qformat.kernels"):
        prepared = prepare_weight(affine_qt(), "cpu")
    assert prepared.kernel is REFERENCE
    assert any("broken" in r.getMessage() and "affine[4]" in r.getMessage() for r in caplog.records)
    monkeypatch.setenv(ENV_KERNEL, "broken")
    with pytest.raises(RuntimeError, match="repack failed"):
        prepare_weight(affine_qt(), "cpu")


# ---------------------------------------------------------------------------------------------------------------
# linear

def test_linear_switches_to_dequantize_above_max_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    qt = affine_qt()
    prepared = FakePrepared(qt, fake_kernel("fake", priority=1, max_batch=4))
    bias = torch.randn(24)
    for rows, path in ((1, "matmul"), (4, "matmul"), (5, "dequantize"), (40, "dequantize")):
        prepared.calls.clear()
        x = torch.randn(rows, 64)
        y = linear(prepared, x, bias)
        assert prepared.calls == [path]
        torch.testing.assert_close(y.double(), reference(qt, x) + bias.double(), rtol=1e-5, atol=1e-5)


def test_linear_with_numba_prepared_weight_all_batches() -> None:
    qt = affine_qt(40, 96, seed=3)
    prepared = prepare_weight(qt, "cpu")
    for shape in ((1, 96), (3, 96), (2, 4, 96), (9, 96), (33, 96)):
        x = torch.randn(*shape, dtype=torch.float32)
        y = linear(prepared, x)
        assert y.shape == (*shape[:-1], 40)
        torch.testing.assert_close(y.double().reshape(-1, 40), reference(qt, x.reshape(-1, 96)), rtol=1e-4,
                                   atol=1e-4)


def test_bind_takes_the_decode_path_for_one_row_and_linear_otherwise() -> None:
    qt = affine_qt(40, 96, seed=4)
    prepared = prepare_weight(qt, "cpu")
    run = dispatch.bind(prepared)
    bias = torch.randn(40)
    calls = []
    original = prepared.matmul
    prepared.matmul = lambda x: calls.append(x.shape) or original(x)  # the general path, counted
    for shape in ((1, 96), (1, 1, 96), (3, 96), (2, 4, 96), (40, 96)):
        x = torch.randn(*shape)
        for b in (None, bias):
            y = run(x, b)
            want = linear(prepared, x, b)
            assert y.shape == want.shape == (*shape[:-1], 40)
            torch.testing.assert_close(y, want, rtol=0, atol=0)
    # one-row inputs never reached prepared.matmul through bind (only through the direct linear calls above)
    assert calls.count((1, 96)) == 2 and calls.count((1, 1, 96)) == 2 and calls.count((3, 96)) == 4
    x64 = torch.randn(1, 96, dtype=torch.float64)
    assert run(x64).dtype == torch.float64  # not the decode path's dtype: linear handles it

    fake = FakePrepared(affine_qt(), fake_kernel("fake", priority=1, max_batch=4))  # no decode_fn: plain linear
    y = dispatch.bind(fake)(torch.randn(1, 64))
    assert fake.calls == ["matmul"] and y.shape == (1, 24)


def test_fuse_rows_only_where_the_kernel_offers_it(caplog: pytest.LogCaptureFixture) -> None:
    a, b = prepare_weight(affine_qt(24, 64, seed=1), "cpu"), prepare_weight(affine_qt(16, 64, seed=2), "cpu")
    whole, views = dispatch.fuse_rows([a, b])
    assert whole.out_features == 40 and [v.out_features for v in views] == [24, 16]
    x = torch.randn(1, 64)
    torch.testing.assert_close(dispatch.bind(whole)(x), torch.cat([linear(a, x), linear(b, x)], dim=1), rtol=0,
                               atol=0)
    assert dispatch.fuse_rows([a]) is None
    fake = FakePrepared(affine_qt(), fake_kernel("fake", priority=1, max_batch=4))
    assert dispatch.fuse_rows([fake, fake]) is None  # kernels without fuse_rows: left as they are
    assert dispatch.fuse_rows([a, fake]) is None  # different kernels

    def broken(parts):
        raise RuntimeError("cannot stack")

    fake.fuse_rows = broken
    with caplog.at_level(logging.WARNING, logger="qformat.kernels"):
        assert dispatch.fuse_rows([fake, fake]) is None
    assert "cannot stack" in caplog.text


# ---------------------------------------------------------------------------------------------------------------
# qformat kernels

def test_cli_lists_kernels_and_per_record_choice(tmp_path, capsys: pytest.CaptureFixture) -> None:
    assert main(["kernels", "--json"]) == 0
    listed = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert listed["numba"]["device"] == "cpu" and listed["numba"]["supports"]
    assert listed["torch"]["device"] == "any"

    path = write_file(tmp_path / "model.safetensors", quantized=[affine_qt()])
    assert main(["kernels", str(path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows == [{"signature": "affine[4](packed[4],tensor)", "records": 1, "example": NAME, "kernel": "numba",
                     "supported_by": ["numba", "torch"]}]
    assert main(["kernels", str(path)]) == 0
    assert "affine[4]" in capsys.readouterr().out
