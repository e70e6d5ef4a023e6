"""Model card (README.md) for a converted qformat model: Hub metadata in YAML front matter plus a readable body.

The metadata is what the Hub indexes: ``base_model`` + ``base_model_relation: quantized`` puts the model in the
base model's "quantizations" tree, ``library_name: qformat`` and the tags make it findable, and the source's license
is carried over because a quantized derivative is bound by it. A source converted from a local folder or file has no
Hub page: the card then names it by its base name only (no ``base_model``, no link, no local path).
"""

from __future__ import annotations

import json
import math
import os
import re
from importlib import metadata as _md
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

# Source-card keys that legally or descriptively still apply to the quantized model.
_CARRIED_KEYS = ("license", "license_name", "license_link", "language", "pipeline_tag", "datasets")
_BEFORE = ("before", "baseline", "source", "reference", "original")
_AFTER = ("after", "quantized", "value")


def _load_config(folder_or_config: dict[str, Any] | str | os.PathLike[str]) -> dict[str, Any]:
    if isinstance(folder_or_config, dict):
        return folder_or_config
    path = Path(folder_or_config)
    return json.loads((path / "config.json" if path.is_dir() else path).read_text())


def _describe_source(source: Any) -> tuple[str | None, str | None, str | None]:
    """``(hub_id, local_name, revision)`` from ``quantization_config.source`` (a dict, or a bare id from older files).

    A source is on the Hub only when it is not marked ``local`` and its id is a valid repo id: an absolute or relative
    path must never become a ``base_model`` link. A local source is named by its last path component.
    """
    if isinstance(source, dict):
        ident, local, revision = source.get("id") or source.get("file"), bool(source.get("local")), source.get("revision")
    else:
        ident, local, revision = source, False, None
    if not isinstance(ident, str) or not ident.strip():
        return None, None, None
    if not local:
        try:
            validate_repo_id(ident)
            return ident, None, revision if isinstance(revision, str) else None
        except HFValidationError:
            pass
    return None, re.split(r"[\\/]", ident.rstrip("/\\"))[-1] or None, None


def _valid_repo_id(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    try:
        validate_repo_id(value)
    except HFValidationError:
        return None
    return value


def _nominal_bits(qc: dict[str, Any]) -> int | None:
    """The headline bit width for tags: the method's own parameter, else the whole bits of the measured average."""
    params = qc.get("method_params") or {}
    for key in ("bits", "wbits", "nbits", "w_bits"):
        if isinstance(params.get(key), (int, float)) and not isinstance(params.get(key), bool):
            return int(params[key])
    bpw = qc.get("bits_per_weight")
    return int(math.floor(bpw)) if isinstance(bpw, (int, float)) and bpw > 0 else None


def _transforms(qc: dict[str, Any]) -> list[dict[str, Any]]:
    """The recorded block-transform chain (entries without a name are ignored)."""
    chain = qc.get("transforms")
    if not isinstance(chain, list):
        return []
    return [t for t in chain if isinstance(t, dict) and isinstance(t.get("transform"), str)]


def _pipeline_tag(config: dict[str, Any]) -> str | None:
    archs = config.get("architectures") or []
    if any(str(a).endswith("ForCausalLM") for a in archs):
        return "text-generation"
    return None


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return f"`{json.dumps(v, sort_keys=True)}`"
    return f"`{v}`" if isinstance(v, str) else str(v)


def _quality_rows(eval_results: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Rows ``| metric | before | after | change |`` from ``{metric: {before/after aliases}}`` or flat numbers;
    string values (dataset, split, ...) become notes under the table."""
    rows, notes = [], []
    for name, v in eval_results.items():
        if isinstance(v, dict):
            before = next((v[k] for k in _BEFORE if isinstance(v.get(k), (int, float))), None)
            after = next((v[k] for k in _AFTER if isinstance(v.get(k), (int, float))), None)
            change = f"{(after - before) / before * 100:+.2f}%" if before and after is not None else ""
            rows.append(f"| {name} | {_fmt(before) if before is not None else ''} | "
                        f"{_fmt(after) if after is not None else ''} | {change} |")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            rows.append(f"| {name} |  | {_fmt(v)} |  |")
        elif v is not None:
            notes.append(f"- {name}: {v}")
    return rows, notes


def render_model_card(
    folder_or_config: dict[str, Any] | str | os.PathLike[str],
    *,
    source_card_metadata: dict[str, Any] | None = None,
    eval_results: dict[str, Any] | None = None,
    repo_id: str | None = None,
    command: str | None = None,
) -> str:
    """README.md text for a converted model.

    ``folder_or_config`` is the converted folder or its parsed ``config.json``; ``source_card_metadata`` is the source
    model card's YAML metadata (license etc.); ``eval_results`` maps a metric to ``{"before": x, "after": y}`` (or a
    plain number) with optional string notes such as ``"dataset"``. Missing keys are tolerated throughout.
    """
    config = _load_config(folder_or_config)
    qc: dict[str, Any] = config.get("quantization_config") or {}
    src_meta = dict(source_card_metadata or {})
    source_id, local_name, source_rev = _describe_source(qc.get("source"))
    lineage = _valid_repo_id(qc.get("base_model"))
    if lineage and lineage != source_id:  # given with --base-model or found in the source: the link the Hub indexes
        source_id, source_rev = lineage, None
    method = qc.get("method")
    bits = _nominal_bits(qc)
    bpw = qc.get("bits_per_weight")
    repo = repo_id or "<this-repo>"
    version = qc.get("qformat_version") or _qformat_version()

    carried = {k: src_meta[k] for k in _CARRIED_KEYS if src_meta.get(k) is not None}
    if "license" not in carried and config.get("license"):
        carried["license"] = config["license"]
    carried.setdefault("pipeline_tag", _pipeline_tag(config))
    transforms = _transforms(qc)
    tags = ["qformat", *([method] if method else []), *[t["transform"] for t in transforms],
            *([f"{bits}bit"] if bits else []), "quantized"]
    if source_id:  # the relation is only meaningful next to a base model
        carried["base_model_relation"] = "quantized"
    data = ModelCardData(base_model=source_id, library_name="qformat", tags=tags, **carried)

    source_name = (source_id or local_name or "model").split("/")[-1]
    title = f"{repo.split('/')[-1]}" if repo_id else f"{source_name} ({method or 'qformat'})"
    lines = [f"# {title}", ""]
    if source_id:
        rev = f" (revision `{source_rev}`)" if source_rev else ""
        lines.append(f"A quantized version of [{source_id}](https://huggingface.co/{source_id}){rev}, stored in the "
                     f"qformat packed safetensors format (format version {qc.get('format_version', '?')}).")
    else:
        origin = f"A quantized version of the local model `{local_name}`" if local_name else "A model"
        lines.append(f"{origin} stored in the qformat packed safetensors format (format version "
                     f"{qc.get('format_version', '?')}).")
    imported = qc.get("source") if method == "import" and isinstance(qc.get("source"), dict) else None
    if imported and imported.get("format"):
        lines.append(f"\nImported bit-exactly from a `{imported['format']}` checkpoint: its stored integers, scales and "
                     "tables are kept as they were (no dequantize-and-requantize).")
    if "license" in carried:
        lines.append(f"\nLicense: `{carried['license']}`, carried over from the source model.")

    lines += ["", "## Quantization", "", "| Parameter | Value |", "|---|---|", f"| method | {_fmt(method or '?')} |"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in sorted((qc.get("method_params") or {}).items())]
    if transforms:
        chain = " → ".join(t["transform"] for t in transforms)
        lines += ["", f"Block transforms, applied to each decoder block before the method, in this order: {chain} "
                  "(function-preserving: scales and rotations folded into neighbouring weights, or stored as the "
                  "format's input-transform codecs).", "", "| Transform | Version | Parameters |", "|---|---|---|"]
        lines += [f"| {_fmt(t['transform'])} | {t.get('version', 1)} | {_fmt(t.get('params') or {})} |"
                  for t in transforms]

    lines += _allocation_lines(qc)
    output = qc.get("output_layer")
    if isinstance(output, dict) and output.get("method"):
        lines += ["", f"The output layer (`{output.get('module', 'lm_head')}`) has a method of its own: "
                  f"`{output['method']}` with {_fmt(output.get('params') or {})} (`--output-layer`; qformat's default "
                  "is 8 bits per output channel, which measured as good as the float layer and decodes faster)."]

    by_type: dict[str, Any] = qc.get("bits_by_layer_type") or {}
    if by_type or bpw is not None:
        lines += ["", "## Bits per weight", "", "| Layer type | Bits/weight |", "|---|---|"]
        lines += [f"| {k} | {_fmt(float(v))} |" for k, v in sorted(by_type.items())]
        if bpw is not None:
            lines.append(f"| **overall (quantized weights)** | **{_fmt(float(bpw))}** |")
        lines.append("\nBits per weight include scales, zero points and outliers stored alongside the codes.")

    if eval_results:
        rows, notes = _quality_rows(eval_results)
        lines += ["", "## Measured quality", ""]
        if rows:
            lines += ["| Metric | Source model | Quantized | Change |", "|---|---|---|---|", *rows]
        lines += ["", *notes] if notes else []

    lines += ["", "## How to use", "", "With qformat:", "", "```python", "import qformat", "",
              f'model = qformat.load("{repo}")', "```", "",
              "With transformers (importing qformat registers its quantizer):", "", "```python", "import qformat  # noqa: F401",
              "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f'model = AutoModelForCausalLM.from_pretrained("{repo}")',
              f'tokenizer = AutoTokenizer.from_pretrained("{repo}")', "```"]

    lines += ["", "## How it was produced", ""]
    cmd = command or qc.get("command")
    if cmd and local_name:  # the command names the local path it was given
        source = qc.get("source")
        cmd = str(cmd).replace(str((source.get("id") if isinstance(source, dict) else source) or local_name), local_name)
    lines += ["```bash", cmd, "```", ""] if cmd else []
    lines.append(f"Converted with qformat {version}" + (f" from `{source_id or local_name}`"
                                                        if source_id or local_name else "") + ".")

    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")
    return str(card)


def _qformat_version() -> str:
    try:
        return _md.version("qformat")
    except _md.PackageNotFoundError:
        return "(development version)"


def _allocation_lines(qc: dict[str, Any]) -> list[str]:
    """The size budget and the configuration each layer got, and the low-rank sidecar, where the conversion used
    them."""
    lines: list[str] = []
    sidecar = qc.get("sidecar")
    if isinstance(sidecar, dict) and sidecar.get("rank"):
        fit = "activation-weighted error" if sidecar.get("weighted") else "error"
        lines += ["", f"Every quantized decoder linear carries a rank-{sidecar['rank']} low-rank sidecar of its "
                  f"quantization {fit} in {sidecar.get('bits', 16)}-bit (`--sidecar-rank`), counted in the bits "
                  "per weight."]
    allocation = qc.get("allocation")
    if not isinstance(allocation, dict):
        return lines
    target = allocation.get("target") or {}
    goal = (f"{target['bits_per_weight']} bits per weight" if "bits_per_weight" in target
            else f"{target.get('bytes')} bytes in all")
    layers: dict[str, str] = allocation.get("layers") or {}
    counts: dict[str, int] = {}
    for choice in layers.values():
        counts[choice] = counts.get(choice, 0) + 1
    lines += ["", f"Mixed precision to a size budget of {goal} (`--target-bits`/`--target-size`): each decoder linear "
              f"got the candidate configuration that minimises the summed estimated loss "
              f"(estimate `{allocation.get('estimate')}`, measured on the calibration text) under the budget; allocated "
              f"{allocation.get('allocated_bits_per_weight')} bits per weight over them.", "",
              "| Configuration | Layers |", "|---|---|"]
    lines += [f"| `{choice}` | {n} |" for choice, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    lines += ["", "The configuration of each layer is in `config.json` (`quantization_config.allocation.layers`)."]
    return lines

