"""The issue's round trip: convert -> push -> load by Hub id -> the same logits, against a local Hub server."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard, hf_hub_download
from tiny_model import make_tiny_llama

DATA = Path(__file__).resolve().parent.parent / "qformat" / "data" / "calibration.txt"


@pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")
def test_convert_push_load_by_id_same_logits(tmp_path, hub_env):
    import qformat
    from qformat.conversion.pipeline import ConvertOptions, convert
    from qformat.hub import push_folder

    source = make_tiny_llama(tmp_path / "tiny", layers=2)
    calib = tmp_path / "calib.txt"
    calib.write_text(DATA.read_text(encoding="utf-8")[:30_000])
    out = tmp_path / "tiny-gptq"
    convert(ConvertOptions(str(source), out, "gptq", params={"bits": 4, "group_size": 32}, calib=calib,
                           calib_samples=4, calib_seqlen=64, quiet=True))

    first = push_folder(out, "user/tiny-gptq", token="secret", endpoint=hub_env.endpoint)
    assert "config.json" in first.uploaded and not first.skipped
    again = push_folder(out, "user/tiny-gptq", token="secret", endpoint=hub_env.endpoint)
    assert not again.uploaded  # unchanged files are skipped

    ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(0))
    remote = qformat.load("user/tiny-gptq")
    local = qformat.load(out)
    with torch.inference_mode():
        torch.testing.assert_close(remote(ids).logits, local(ids).logits, rtol=0, atol=0)

    # The pushed card carries the metadata a Hub user expects.
    card_file = hf_hub_download("user/tiny-gptq", "README.md", endpoint=hub_env.endpoint, token="secret",
                                cache_dir=tmp_path / "cards")
    card = ModelCard(Path(card_file).read_text())
    # converted from a local folder: no base_model link to claim (test_model_card.py covers Hub sources)
    assert "base_model_relation" not in card.data.to_dict() and card.data.library_name == "qformat"
    assert "gptq" in card.data.tags and "qformat" in card.data.tags
