"""The model card every export carries: what no other checkpoint in this field records.

A pretrained encoder is only as trustworthy as what is known about its data. The card
records where the masks came from (proposal set, generators, their parameters and engine
version as the bank stores them, imported sets), the bank's fingerprint, the scans per
modality and dataset, the full pretraining config, steps, hardware and time, evaluation
results when given (with their baselines), intended use and known limits. What the
checkpoint or bank does not say is written as "not recorded", never guessed.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from maskbank.train.export.source import ExportError, PretrainedEncoder

NOT_RECORDED = "not recorded"
TAGS = [
    "medical-imaging",
    "3d",
    "ct",
    "mri",
    "pet",
    "self-supervised-learning",
    "segmentation",
    "nnunet",
    "monai",
    "maskbank",
    "resenc",
]
# Attributes of a proposal set that describe the bank's storage, not the mask source.
_STORAGE_ATTRS = {"maskbank", "columns", "layer_sizes", "format", "shape", "count"}


def bank_provenance(enc: PretrainedEncoder, location: str | None) -> dict[str, Any]:
    """Mask source, scans per modality/dataset and spacing of the pretraining bank.

    ``location`` overrides the bank path the checkpoint recorded (a bank moved since).
    An unreachable bank leaves the fields "not recorded" (the card says which).
    """
    where = location or enc.bank
    out: dict[str, Any] = {
        "location": where,
        "fingerprint": enc.bank_fingerprint or NOT_RECORDED,
        "proposal_set": str(enc.config.get("data", {}).get("proposals", "default")),
        "reachable": False,
    }
    if not where:
        return out
    try:
        from maskbank.bank import Bank

        bank = Bank.open(where)
        scans = bank.scans
    except Exception as exc:  # any unreadable bank: the card still writes, saying so
        out["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return out
    out["reachable"] = True
    ids = scans["scan_id"]
    used = {r["scan_id"] for r in enc.pretraining_scans or []}
    rows = scans[ids.isin(used)] if used else scans
    out["scans"] = int(len(rows))
    out["scans_per_modality"] = dict(Counter(str(m) for m in rows["modality"]))
    out["scans_per_dataset"] = dict(Counter(str(d) for d in rows["dataset"]))
    out["spacings"] = [list(s) for s in rows["spacing"] if s is not None]
    summary = bank.summary()
    out["proposal_sets"] = summary.get("proposal_sets", {})
    name = out["proposal_set"]
    for sid in list(rows.get("scan_id", rows.index))[:1]:
        attrs = bank.scan(sid).proposal_set_attrs(name) or {}
        out["mask_source"] = {k: v for k, v in attrs.items() if k not in _STORAGE_ATTRS}
        out["mask_scan"] = str(sid)
    out["imported_sets"] = sorted(
        n
        for n in out["proposal_sets"]
        if n != "default" and _is_imported(bank, list(rows.get("scan_id", rows.index))[:1], n)
    )
    return out


def _is_imported(bank: Any, ids: list[str], name: str) -> bool:
    """True for a set made by ``maskbank propose --import`` (its attrs name the source)."""
    for sid in ids:
        attrs = bank.scan(sid).proposal_set_attrs(name) or {}
        return "imported_from" in attrs
    return False


def normalisation(prep: dict[str, Any]) -> dict[str, Any]:
    """maskbank's intensity normalisation as the bank applied it (per modality)."""
    return {
        "ct": "clipped to a HU window, then z-scored inside the body (maskbank prepare)",
        "mr": "clipped to body percentiles, then z-scored inside the body",
        "pet": "clipped to body percentiles, then z-scored inside the body",
        "nnunet_downstream": "ZScoreNormalization (nnU-Net's pretrained route forces it)",
        **prep,
    }


def results_summary(dirs: list[str]) -> list[dict[str, Any]]:
    """Headline rows of evaluation results (``results.json`` in each directory)."""
    out = []
    for d in dirs:
        path = Path(d)
        path = path / "results.json" if path.is_dir() else path
        try:
            res = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ExportError(f"--results {d}: cannot read {path}: {exc}") from exc
        rows: list = []
        for key in ("summary", "networks"):  # one row per network (and fraction / shots)
            if isinstance(res.get(key), list) and all(isinstance(r, dict) for r in res[key]):
                rows = res[key]
                break
        nets = []
        for row in rows:
            keep = {k: v for k, v in row.items() if isinstance(v, (int, float, str, list))}
            keep = {k: v for k, v in keep.items() if k != "headline" and k != "datasets"}
            nets.append({k: v for k, v in keep.items() if not isinstance(v, list) or len(v) <= 2})
        out.append(
            {
                "path": str(path),
                "evaluation": res.get("evaluation", NOT_RECORDED),
                "headline": res.get("headline", ""),
                "networks": nets,
                "baselines": list((res.get("baselines") or {}).keys()),
            }
        )
    return out


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def card_header(license_id: str, name: str) -> str:
    """The YAML front matter a Hugging Face model card needs."""
    meta = {
        "license": license_id,
        "library_name": "nnunetv2",
        "pipeline_tag": "image-segmentation",
        "tags": TAGS,
        "model_name": name,
    }
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def model_card(
    enc: PretrainedEncoder,
    provenance: dict[str, Any],
    training: dict[str, Any],
    results: list[dict[str, Any]],
    fmt: str,
    license_id: str,
    self_test: dict[str, Any],
) -> str:
    """README.md: YAML header + the card in Markdown."""
    name = f"maskbank-{enc.preset}"
    p = provenance
    lines = [
        card_header(license_id, name),
        f"# {name}: a mask-guided pretrained ResEnc encoder",
        "",
    ]
    lines += [
        "nnU-Net's residual encoder (`ResidualEncoder` of `dynamic_network_architectures`), "
        "pretrained with maskbank's in-context segmentation pretext (MASS): the network sees "
        "a reference crop with K class-agnostic mask proposals and must segment the same "
        "structures in another crop of the scan. No labels were used. Only the encoder is "
        "pretrained; the decoder in this checkpoint is freshly initialised.",
        "",
        "## Weights",
        "",
        f"- preset: `{enc.preset}` (features {list(enc.spec.channels)}, blocks per stage "
        f"{[max(1, b) for b in enc.spec.enc_blocks]}, 3x3x3 kernels, instance norm, LeakyReLU)",
        f"- weights: {enc.weights} ({'exponential moving average' if enc.weights == 'ema' else 'raw training weights'})",  # noqa: E501
        f"- source checkpoint: `{enc.path.name}`, SHA-256 `{enc.sha256}`",
        f"- pretext: {enc.pretext}; steps: {_fmt(enc.step) if enc.step is not None else NOT_RECORDED}",
        f"- export format: {fmt}; self-test: strict load, {self_test.get('pretrained_tensors_equal')} "
        "encoder/stem tensors equal to the pretrained ones, forward pass "
        f"{self_test.get('forward')}",
        "",
        "## Mask source",
        "",
        f"- proposal set: `{p.get('proposal_set')}`",
        f"- bank fingerprint: `{p.get('fingerprint')}`",
    ]
    if p.get("reachable"):
        src = p.get("mask_source") or {}
        engine = src.get("config") if isinstance(src.get("config"), dict) else {}
        generators = engine.get("generators") or src.get("sources") or NOT_RECORDED
        lines.append(f"- generators: {_fmt(generators)}")
        if "imported_from" in src:
            lines.append(f"- imported from: `{src['imported_from']}` (masks made elsewhere)")
        lines.append(f"- engine version: {engine.get('version', NOT_RECORDED)}")
        lines.append(f"- proposal config fingerprint: `{src.get('fingerprint', NOT_RECORDED)}`")
        kinds = sorted({str(v.get("kind")) for v in (src.get("layer_info") or {}).values()
                        if isinstance(v, dict)})  # fmt: skip
        if kinds:
            lines.append(f"- layer kinds: {', '.join(kinds)}")
        lines.append(f"- imported proposal sets in the bank: {p.get('imported_sets') or 'none'}")
        lines.append(f"- proposal sets in the bank: `{json.dumps(p.get('proposal_sets'))}`")
        if engine:
            params = {k: v for k, v in engine.items() if k != "version"}
            where = f" with scan `{p['mask_scan']}`" if p.get("mask_scan") else ""
            lines += ["", f"Generator parameters (as the bank stores them{where}):", "", "```"]
            lines += [f"{k}: {json.dumps(v, default=str)}" for k, v in params.items()]
            lines.append("```")
    else:
        why = p.get("error", "the checkpoint names no bank")
        lines.append(f"- generators and parameters: {NOT_RECORDED} (bank {p.get('location')} "
                     f"not readable at export: {why}; pass --bank)")  # fmt: skip
    lines += ["", "## Pretraining data", ""]
    if p.get("reachable"):
        lines.append(f"- scans: {p.get('scans')}")
        lines.append(f"- per modality: {_fmt(p.get('scans_per_modality'))}")
        lines.append(f"- per dataset: {_fmt(p.get('scans_per_dataset'))}")
        lines.append(f"- median spacing (mm): {_fmt(training.get('spacing') or NOT_RECORDED)}")
    else:
        n = len(enc.pretraining_scans) if enc.pretraining_scans is not None else NOT_RECORDED
        lines.append(f"- scans: {n}; per modality and dataset: {NOT_RECORDED}")
    lines += [
        "",
        "## Pretraining",
        "",
        f"- hardware: {training.get('hardware', NOT_RECORDED)}",
        f"- time: {training.get('time', NOT_RECORDED)}",
        f"- crop (patch size): {enc.crop}^3; input channels: {enc.spec.in_channels}",
        "",
        "```yaml",
        yaml.safe_dump(enc.config, sort_keys=False).rstrip(),
        "```",
        "",
        "## Evaluation",
        "",
    ]
    if not results:
        lines.append("No evaluation results were given at export (`--results DIR`).")
    for res in results:
        lines.append(f"### {res['evaluation']} (`{res['path']}`)")
        if res["headline"]:
            lines.append(f"Headline: {res['headline']}.")
        if res["baselines"]:
            lines.append(f"Baselines run beside it: {', '.join(res['baselines'])}.")
        lines.append("")
        for net in res["networks"]:
            lines.append("- " + "; ".join(f"{k} {_fmt(v)}" for k, v in net.items()))
        lines.append("")
    lines += [
        "",
        "## Intended use",
        "",
        "Initialisation of a 3D segmentation network (nnU-Net, MONAI) for CT, MR or PET, "
        "to be fine-tuned on labelled data of the target task. Not a diagnostic device; "
        "not validated for clinical use.",
        "",
        "## Known limits",
        "",
        "- Intensities: maskbank clips CT to a HU window before z-scoring (MR and PET to "
        "body percentiles); nnU-Net's pretrained-weights route forces plain z-score "
        "normalisation, so CT reaches the encoder with a different intensity mapping than "
        "in pretraining. Clipping CT the same way before nnU-Net preprocessing keeps them "
        "aligned.",
        "- Spacing: pretrained at the bank's spacing above; fine-tuning at a very different "
        "spacing sees structures at another scale than in pretraining.",
        "- The decoder and segmentation head are untrained; only `encoder.stem` and "
        "`encoder.stages` carry pretrained weights.",
        "- Mask proposals are class-agnostic and unsupervised: the encoder learnt to match "
        "structures the generators found, which may miss small or low-contrast anatomy.",
        "- Pretraining scans may overlap public evaluation sets; compare the bank's scan "
        "list before reporting results on them.",
        "",
    ]
    return "\n".join(lines)


def training_record(enc: PretrainedEncoder) -> dict[str, Any]:
    """Hardware and wall time from the run directory beside the checkpoint, when there."""
    run = enc.path.parent.parent if enc.path.parent.name == "checkpoints" else enc.path.parent
    out: dict[str, Any] = {}
    log = run / "train.log"
    device = None
    if log.exists():
        match = re.search(r"device (\S+?);", log.read_text(encoding="utf-8", errors="replace"))
        device = match.group(1) if match else None
    world = enc.world_size
    out["hardware"] = (
        f"{world or 1} rank(s) on {device}"
        if device
        else f"{world or 1} rank(s); device {NOT_RECORDED}"
    )
    metrics = run / "metrics.jsonl"
    if metrics.exists():
        rows = []
        for line in metrics.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
        step_s = [float(r["step_s"]) for r in rows if isinstance(r.get("step_s"), (int, float))]
        gpu = [
            float(r["gpu_mem_gb"]) for r in rows if isinstance(r.get("gpu_mem_gb"), (int, float))
        ]
        if device is None and rows:  # the trainer logs GPU memory on CUDA devices only
            device = f"GPU (peak {max(gpu):.1f} GiB allocated)" if gpu else "CPU"
            out["hardware"] = f"{world or 1} rank(s) on {device}"
        if step_s and enc.step:
            mean = sum(step_s) / len(step_s)
            out["time"] = (
                f"~{mean * enc.step / 3600:.2f} h of training steps ({mean:.3g} s/step mean "
                f"over {len(step_s)} logged steps; data loading included)"
            )
    return out
