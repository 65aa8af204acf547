"""The proposals' byte budget holds on the bytes the bank stores.

`proposal_nbytes` writes the whole proposals part in memory as the bank stores it
(arrays, metadata and the writer's attributes), so what `maskbank propose` holds to
``max_bytes_per_proposal`` is what `Bank.stored_nbytes(id, "proposals")`, the
index's ``proposals_nbytes`` and `ProposalReader.nbytes_stored` report afterwards.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from maskbank.bank import Bank
from maskbank.bank.sampling import ProposalReader
from maskbank.flows.propose import propose_scan
from maskbank.pipeline.config import PrepareConfig
from maskbank.pipeline.phantom import make_phantom
from maskbank.pipeline.prepare import prepare_scan
from maskbank.pipeline.proposals.engine import ProposalConfig

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
CHEST = DATA / "ct_chest_lung1.nii.gz"


def _bank(tmp_path: Path, image: Path, label: Path | None) -> Bank:
    p = prepare_scan(image, label, config=PrepareConfig(spacing=1.5, modality="ct"))
    bank = Bank.create(tmp_path / "bank")
    bank.write_scan("s", p.arrays(), p.attrs)
    return bank


def _propose(bank: Bank, budget: float) -> dict:
    """Propose within ``budget`` B/proposal; what the budget said and what is stored."""
    out = propose_scan(bank, "s", ProposalConfig(max_bytes_per_proposal=budget), force=True)
    assert out.status == "ok", out
    scan = bank.scan("s")
    attrs = scan.proposals_attrs
    stored = bank.stored_nbytes("s", "proposals")
    assert stored == bank.row("s")["proposals_nbytes"] == ProposalReader(scan).nbytes_stored()
    n = attrs["n_proposals"]
    return {"report": attrs["byte_budget"], "n": n, "stored_per": stored / n}


def _holds(got: dict, budget: float) -> None:
    report = got["report"]
    assert report["fits"], report
    assert got["stored_per"] <= budget, (got, budget)
    # The budget's figure is the stored one, but for the few bytes by which its stand-in
    # for this report and the scan token are longer (and its rounding to 0.1 B).
    estimate = report["bytes_per_proposal"]
    assert got["stored_per"] - 0.05 <= estimate <= got["stored_per"] * 1.005 + 0.05, got


def test_the_budget_holds_on_the_stored_bytes_of_a_phantom(tmp_path):
    ph = make_phantom("ct", shape=(96, 96, 80), spacing=(1.5, 1.5, 1.5), seed=0)
    image, label = ph.save_nifti(tmp_path / "phantom", name="ct_phantom")
    bank = _bank(tmp_path, image, label)
    free = _propose(bank, 0)  # no budget: what the set costs
    assert free["report"]["dropped"] == 0
    budget = round(0.9 * free["stored_per"], 1)  # tight enough to drop layers
    got = _propose(bank, budget)
    assert got["report"]["dropped_layers"] and got["n"] < free["n"]
    _holds(got, budget)


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.parametrize("budget", [200.0, 160.0])
def test_the_budget_holds_on_the_stored_bytes_of_the_real_chest_ct(tmp_path, budget):
    """The chest CT at 1.5 mm: within the default budget as generated; at 160 B/proposal
    only after dropping nine layers (below ~156 its intensity windows, which are never
    dropped, keep it over)."""
    if not CHEST.exists():
        pytest.skip(f"the real chest CT is not available ({CHEST}; see SOURCES.md there)")
    bank = _bank(tmp_path, CHEST, DATA / "ct_chest_lung1_nodule_label.nii.gz")
    got = _propose(bank, budget)
    _holds(got, budget)
