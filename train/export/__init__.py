"""Export a pretrained ResEnc encoder to where the field fine-tunes: nnU-Net, MONAI, Hugging Face.

``export_checkpoint(checkpoint, fmt, out)`` writes one folder:

* ``nnunet``: ``checkpoint_final.pth`` (nnssl format, ``weights_only`` loadable),
  ``adaptation_plan.json``, ``plans_architecture.json`` (the ``-pretrained_weights``
  route), ``config.json`` and the model card ``README.md``;
* ``hf``: what a Hugging Face model repository needs (``checkpoint_final.pth``,
  ``adaptation_plan.json``, ``config.json``, ``README.md`` with the card's YAML header);
  nothing is uploaded;
* ``monai``: a MONAI bundle (``configs/``, ``models/model.pt``, ``docs/README.md``,
  ``LICENSE``).

Every format self-tests before it writes (``train.export.nnunet.self_test``), and the
folder appears whole or not at all (written beside ``out``, then renamed).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from maskbank.train.export import card as card_mod
from maskbank.train.export.monai_bundle import write_bundle
from maskbank.train.export.nnunet import (
    median_spacing,
    network_from_plan,
    nnunet_checkpoint,
    plans_architecture,
)
from maskbank.train.export.source import ExportError, PretrainedEncoder, load_encoder

FORMATS = ("nnunet", "monai", "hf")
CHECKPOINT_NAME = "checkpoint_final.pth"


@dataclass
class ExportResult:
    out: Path
    fmt: str
    files: list[Path]
    self_test: dict[str, Any]
    encoder: PretrainedEncoder


def _ct_clip(provenance: dict[str, Any], bank: str | None) -> list[float] | None:
    """The HU window the bank clipped CT to (median over its CT scans), if readable."""
    if not provenance.get("reachable"):
        return None
    try:
        from maskbank.bank import Bank

        scans = Bank.open(bank or provenance["location"]).scans
        ct = scans[scans["modality"] == "ct"]
        lows, highs = ct["clip_low"].dropna(), ct["clip_high"].dropna()
        if len(lows) and len(highs):
            return [float(lows.median()), float(highs.median())]
    except Exception:  # provenance only: a bank that reads partly still exports
        return None
    return None


def license_text(license_id: str) -> str:
    return (
        f"License: {license_id}\n\n"
        "These weights were pretrained on the scans of the bank named in docs/README.md "
        "(README.md). Whatever terms those scans were released under bind the weights too: "
        "check them before redistributing or using the weights commercially.\n"
    )


def _config_json(enc: PretrainedEncoder, plan: dict[str, Any], test: dict[str, Any]) -> dict:
    return {
        "framework": "nnunetv2",
        "model_type": "ResidualEncoderUNet",
        "architecture": plans_architecture(enc),
        "num_input_channels": enc.spec.in_channels,
        "patch_size": plan["recommended_downstream_patchsize"],
        "spacing": plan["pretrain_plan"]["original_median_spacing_after_transp"],
        "checkpoint": CHECKPOINT_NAME,
        "adaptation_plan": "adaptation_plan.json",
        "maskbank": {
            "preset": enc.preset,
            "encoder": enc.spec.encoder,
            "pretext": enc.pretext,
            "weights": enc.weights,
            "step": enc.step,
            "source_sha256": enc.sha256,
            "bank_fingerprint": enc.bank_fingerprint,
            "proposal_set": enc.config.get("data", {}).get("proposals", "default"),
        },
        "self_test": test,
    }


def _monai_self_test(folder: Path) -> None:
    """Build the bundle's network from its inference config and load model.pt strictly."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(folder / "configs" / "inference.json"))
    parser["bundle_root"] = str(folder)
    net = parser.get_parsed_content("network_def")
    state = torch.load(folder / "models" / "model.pt", map_location="cpu", weights_only=True)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ExportError(f"self-test: the bundle's network does not load model.pt: {exc}") from exc


def export_checkpoint(
    checkpoint: str | Path,
    fmt: str,
    out: str | Path,
    results: list[str] | None = None,
    bank: str | None = None,
    weights: str = "ema",
    license_id: str = "other",
    force: bool = False,
) -> ExportResult:
    """Export ``checkpoint`` as ``fmt`` into the folder ``out`` (see the module docstring)."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise ExportError(f"{out} exists and is not empty; choose a new --out or pass --force")
    enc = load_encoder(checkpoint, weights)
    evaluations = card_mod.results_summary(list(results or []))
    provenance = card_mod.bank_provenance(enc, bank)
    spacing = median_spacing(provenance.get("spacings", []))
    ct_clip = _ct_clip(provenance, bank)
    norm = card_mod.normalisation({"ct_clip_hu": ct_clip})
    payload, test = nnunet_checkpoint(enc, spacing, norm)
    training = {**card_mod.training_record(enc), "spacing": spacing}
    text = card_mod.model_card(enc, provenance, training, evaluations, fmt, license_id, test)
    plan = payload["nnssl_adaptation_plan"]

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if fmt == "monai":
            files = write_bundle(
                tmp, enc, payload["network_weights"], spacing, ct_clip or [-1024.0, 3071.0],
                text, license_text(license_id), license_id,
            )  # fmt: skip
            if ct_clip is None:  # no CT window known: do not clip
                for name in ("train.json", "inference.json"):
                    cfg = tmp / "configs" / name
                    data = json.loads(cfg.read_text())
                    data["is_ct"] = False
                    cfg.write_text(json.dumps(data, indent=2) + "\n")
            _monai_self_test(tmp)
        else:
            torch.save(payload, tmp / CHECKPOINT_NAME)
            reread = torch.load(tmp / CHECKPOINT_NAME, map_location="cpu", weights_only=True)
            network_from_plan(reread["nnssl_adaptation_plan"]).load_state_dict(
                reread["network_weights"], strict=True
            )
            (tmp / "adaptation_plan.json").write_text(json.dumps(plan, indent=2) + "\n")
            (tmp / "config.json").write_text(
                json.dumps(_config_json(enc, plan, test), indent=2) + "\n"
            )
            (tmp / "README.md").write_text(text, encoding="utf-8")
            files = [tmp / n for n in (CHECKPOINT_NAME, "adaptation_plan.json", "config.json")]
            files.append(tmp / "README.md")
            if fmt == "nnunet":
                arch = {"architecture": plans_architecture(enc)}
                (tmp / "plans_architecture.json").write_text(json.dumps(arch, indent=2) + "\n")
                files.append(tmp / "plans_architecture.json")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    final = [out / f.relative_to(tmp) for f in files]
    return ExportResult(out, fmt, final, test, enc)


__all__ = ["FORMATS", "ExportError", "ExportResult", "export_checkpoint", "load_encoder"]
