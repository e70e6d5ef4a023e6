"""The import pipeline and its contract, with a test importer that reads a "foreign" checkpoint: a folder holding an
RTN-quantized tiny Llama as raw arrays (codes, scales, zeros per tensor) plus a manifest. It stands for GGUF, GPTQ and
the others (their own tests check bit-exactness against their libraries); here: the output folder, streaming into
shards, the quantized (tied) token embedding in the runtime, lineage in the card, the CLI and its errors."""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import byte_tokenizer, input_ids, rtn_record, tiny_model

import qformat
from qformat import plugins
from qformat.cli import main
from qformat.conversion import importing
from qformat.errors import ConversionError, SourceError
from qformat.format import open_folder
from qformat.hookspecs import hookimpl
from qformat.importers import ImportedModel, Importer
from qformat.runtime.nn import QEmbedding, QLinear

MANIFEST = "foreign.json"


def write_foreign(folder: Path, *, tie: bool = True, base_model: str | None = None) -> Path:
    """A foreign checkpoint: every decoder linear and the token embedding RTN-quantized, stored as .npy arrays."""
    model = tiny_model(tie_word_embeddings=tie)
    folder.mkdir(parents=True)
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    if tie:
        state.pop("lm_head.weight")
    entries = {}
    for name, array in state.items():
        quantize = name == "model.embed_tokens.weight" or (name.startswith("model.layers.") and name.endswith("_proj.weight"))
        if quantize:
            qt = rtn_record(name, array, bits=8 if "embed" in name else 4, group=32)
            entries[name] = {"record": qt.record, "parts": {}}
            for tensor, data in qt.tensors.items():
                file = f"{tensor}.npy"
                np.save(folder / file, data)
                entries[name]["parts"][tensor] = file
        else:
            np.save(folder / f"{name}.npy", array.astype(np.float16))
            entries[name] = {"plain": f"{name}.npy"}
    manifest = {"config": json.loads(model.config.to_json_string()), "tensors": entries, "base_model": base_model}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    byte_tokenizer().save_pretrained(folder / "tok")
    return folder


class ForeignImporter(Importer):
    name = "foreign"
    description = "test layout"

    def detect(self, source: Path) -> bool:
        return (source / MANIFEST).is_file()

    def open(self, source: Path) -> ImportedModel:
        manifest = json.loads((source / MANIFEST).read_text())

        def tensors():
            from qformat.format import QuantizedTensor

            for name, entry in manifest["tensors"].items():
                if "plain" in entry:
                    yield name, np.load(source / entry["plain"], mmap_mode="r")
                else:
                    parts = {t: np.load(source / f) for t, f in entry["parts"].items()}
                    if name == "broken.weight":
                        raise SourceError("a damaged block", file=str(source), tensor=name, field="scale")
                    yield name, QuantizedTensor(name, entry["record"], parts)

        files = {p.name: p.read_bytes() for p in sorted((source / "tok").iterdir())}
        return ImportedModel(manifest["config"], tensors, "foreign rtn", files, manifest.get("base_model"),
                             {"tensors": len(manifest["tensors"])}, 5.0)


@pytest.fixture
def foreign_plugins():
    module = types.ModuleType("foreign_importer")
    module.qformat_register_importers = hookimpl(lambda register: register(ForeignImporter()))
    with plugins.use_plugins(plugins.build_plugins(extra=[("foreign", module)])) as found:
        yield found


def test_import_writes_a_folder_that_loads_with_a_quantized_tied_embedding(foreign_plugins, tmp_path: Path) -> None:
    source = write_foreign(tmp_path / "src")
    result = importing.import_checkpoint(source, tmp_path / "out")
    assert (result.importer, result.source_format, result.records) == ("foreign", "foreign rtn", 15)
    folder = open_folder(tmp_path / "out")
    assert "model.embed_tokens.weight" in folder.records
    qc = folder.quantization_config
    assert qc["method"] == "import" and qc["source"]["format"] == "foreign rtn" and qc["source"]["local"] is True
    assert qc["source"]["bits_per_weight"] == 5.0 and qc["command"].startswith("qformat convert --method import src")
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    plain = folder.tensor("model.norm.weight")
    assert plain.dtype == np.float16  # plain tensors keep their stored dtype

    model = qformat.load(tmp_path / "out")
    reference = qformat.load_dequantized(tmp_path / "out")
    assert isinstance(model.model.embed_tokens, QEmbedding) and isinstance(model.lm_head, QLinear)
    ids = input_ids()
    with torch.no_grad():
        embedded = model.model.embed_tokens(ids)
        assert torch.equal(embedded, reference.model.embed_tokens(ids))  # rows exactly as the reference decode
        got, want = model(ids).logits, reference(ids).logits
    assert torch.allclose(got, want, atol=1e-3 * want.abs().max().item())


def test_untied_output_layer_stays_its_own(foreign_plugins, tmp_path: Path) -> None:
    source = write_foreign(tmp_path / "src", tie=False)
    importing.import_checkpoint(source, tmp_path / "out")
    model = qformat.load(tmp_path / "out")
    assert isinstance(model.model.embed_tokens, QEmbedding) and not isinstance(model.lm_head, QLinear)


def test_lineage_from_the_source_then_from_the_option(foreign_plugins, tmp_path: Path) -> None:
    source = write_foreign(tmp_path / "src", base_model="HuggingFaceTB/SmolLM2-135M-Instruct")
    importing.import_checkpoint(source, tmp_path / "a")
    card = (tmp_path / "a" / "README.md").read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card and "base_model_relation: quantized" in card
    assert "Imported bit-exactly from a `foreign rtn` checkpoint" in card
    importing.import_checkpoint(source, tmp_path / "b", base_model="org/other")
    assert "base_model: org/other" in (tmp_path / "b" / "README.md").read_text()


def test_a_folder_inside_the_hub_cache_names_its_model(tmp_path: Path) -> None:
    snapshot = tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-135M" / "snapshots" / "abc123"
    assert importing.hub_id_from_cache_path(snapshot) == "HuggingFaceTB/SmolLM2-135M"
    assert importing.hub_id_from_cache_path(tmp_path / "plain") is None


def test_a_source_error_leaves_no_output(foreign_plugins, tmp_path: Path) -> None:
    source = write_foreign(tmp_path / "src")
    manifest = json.loads((source / MANIFEST).read_text())
    manifest["tensors"]["broken.weight"] = manifest["tensors"]["model.layers.0.mlp.up_proj.weight"]
    (source / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(SourceError, match=r"a damaged block \(file .*tensor 'broken.weight', field 'scale'\)"):
        importing.import_checkpoint(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_record_that_does_not_decode_is_refused(foreign_plugins, tmp_path: Path) -> None:
    source = write_foreign(tmp_path / "src")
    name = "model.layers.1.self_attn.o_proj.weight"
    codes = source / f"{name}.codes.npy"
    np.save(codes, np.full_like(np.load(codes), 0xFF))  # 8-bit bytes of 4-bit codes: fine; now break the scale
    manifest = json.loads((source / MANIFEST).read_text())
    manifest["tensors"][name]["record"]["weight"]["bits"] = 3  # codes no longer fit the declared width
    (source / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ConversionError, match="importer 'foreign'"):
        importing.import_checkpoint(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def run(capsys: pytest.CaptureFixture, *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_detects_and_imports(foreign_plugins, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    source = write_foreign(tmp_path / "src")
    code, out, _ = run(capsys, "convert", source, "--out", tmp_path / "out", "--json")
    assert code == 0 and json.loads(out)["importer"] == "foreign"
    code, out, _ = run(capsys, "convert", "--method", "import", "-p", "format=foreign", source, "--out",
                       tmp_path / "out2", "--quiet", "--base-model", "org/base")
    assert code == 0 and out.strip() == str(tmp_path / "out2")
    assert json.loads((tmp_path / "out2" / "config.json").read_text())["quantization_config"]["base_model"] == "org/base"


@pytest.mark.parametrize(("argv", "message"), [
    (["--method", "import", "--bits", "4"], "--bits does not apply to --method import"),
    (["--method", "import", "--transform", "awq"], "--transform does not apply to --method import"),
    (["--method", "import", "-p", "bits=4"], "--method import takes only -p format=NAME"),
    (["--method", "import", "-p", "format=nope"], "unknown import format 'nope'; installed importers: "),
    (["--method", "import", "--base-model", "not a repo id"], "--base-model 'not a repo id' is not a Hub model id"),
])
def test_cli_errors_before_any_work(foreign_plugins, tmp_path: Path, capsys: pytest.CaptureFixture, argv,
                                    message) -> None:
    source = write_foreign(tmp_path / "src")
    code, _, err = run(capsys, "convert", source, "--out", tmp_path / "out", *argv)
    assert code != 0 and message in err
    assert not (tmp_path / "out").exists()


def test_cli_without_method_on_a_plain_model_asks_for_one(foreign_plugins, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    plain = tmp_path / "plain"
    tiny_model().save_pretrained(plain)
    code, _, err = run(capsys, "convert", plain, "--out", tmp_path / "out")
    assert code != 0 and "--method is required: no importer recognises the source" in err
    code, _, err = run(capsys, "convert", "--method", "import", plain, "--out", tmp_path / "out")
    assert code != 0 and "is not a checkpoint any installed importer reads (importers: " in err and "foreign" in err


def test_harness_checks_an_importer_against_a_reference(foreign_plugins, tmp_path: Path) -> None:
    from qformat.format import QuantizedTensor
    from qformat.testing import check_import

    source = write_foreign(tmp_path / "src")
    manifest = json.loads((source / MANIFEST).read_text())

    def reference(name: str) -> np.ndarray:
        entry = manifest["tensors"][name]
        if "plain" in entry:
            return np.load(source / entry["plain"]).astype(np.float32)
        parts = {t: np.load(source / f) for t, f in entry["parts"].items()}
        return QuantizedTensor(name, entry["record"], parts).decode()

    report = check_import(ForeignImporter(), source, reference)
    assert (report.records, report.exact, report.source_bits) == (15, 15, 5.0)

    def off_by_one_ulp(name: str) -> np.ndarray:
        want = reference(name)
        return (want.view(np.uint32) ^ 1).view(np.float32) if name.endswith("up_proj.weight") else want

    with pytest.raises(AssertionError, match=r"record 'model.layers.0.mlp.up_proj.weight' differs from the reference"):
        check_import(ForeignImporter(), source, off_by_one_ulp)
