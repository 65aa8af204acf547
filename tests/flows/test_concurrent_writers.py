"""Two real processes writing one scan: a prepare or propose that checked the bank before
another writer published must re-check under the scan lock, not overwrite.

The interleaving is forced with the scan's own lock: this process holds it while the
other process runs its per-scan task up to the point where it waits for the lock (it
logs "waiting for lock"); then this process writes the scan and lets go.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

from maskbank.bank import Bank
from maskbank.bank.locks import file_lock
from maskbank.bank.publish import scan_lock_path
from maskbank.flows.inputs import ScanInput
from maskbank.pipeline.config import PrepareConfig
from tests.flows.scans import write_phantom

REPO = Path(__file__).resolve().parents[2]
CONFIG = PrepareConfig(spacing=(3.0, 3.0, 3.0)).to_dict()
PROPOSALS = {"max_proposals": 200}

_CHILD = r"""
import json, logging, sys
logging.getLogger("maskbank.bank.locks").setLevel(logging.DEBUG)
logging.getLogger("maskbank.bank.locks").addHandler(logging.StreamHandler(sys.stderr))
what, args = sys.argv[1], json.loads(sys.argv[2])
if what == "prepare":
    from maskbank.flows.prepare import prepare_record
    rec = prepare_record(args["scan_id"], args["item"], args["bank"], args["config"])
else:
    from maskbank.bank import Bank
    from maskbank.flows.propose import propose_scan
    from maskbank.pipeline.proposals.engine import ProposalConfig
    rec = propose_scan(Bank.open(args["bank"], mode="a"), args["scan_id"],
                       ProposalConfig.from_dict(args["config"]))
print("RESULT " + json.dumps(rec.to_json()), flush=True)
"""


def _start(what: str, args: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, what, json.dumps(args)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_until_blocked(child: subprocess.Popen) -> None:
    """Read the child's log until it waits for the scan lock (fails if it ends first)."""
    seen: list[str] = []
    found = threading.Event()

    def pump() -> None:
        for line in child.stderr:  # type: ignore[union-attr]
            seen.append(line)
            if "waiting for lock" in line:
                found.set()

    threading.Thread(target=pump, daemon=True).start()
    # A generous safety net, not a timing assertion: a child that never waits ends first.
    while not found.wait(1.0):
        assert child.poll() is None, "child finished without waiting for the lock:\n" + "".join(
            seen[-30:]
        )


def _result(child: subprocess.Popen) -> dict:
    out, _ = child.communicate(timeout=300)
    assert child.returncode == 0, out
    line = [x for x in out.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def _item(image: Path, label: Path) -> dict:
    return ScanInput(scan_id="case", image=str(image), label=str(label)).to_dict()


def test_concurrent_prepares_of_one_id_keep_the_first(tmp_path: Path) -> None:
    from maskbank.flows.prepare import prepare_record

    first = write_phantom(tmp_path / "a", "case", "ct", seed=1)
    second = write_phantom(tmp_path / "b", "case", "ct", seed=2)
    bank_dir = tmp_path / "bank"
    Bank.create(bank_dir)
    with file_lock(scan_lock_path(bank_dir, "case")):
        child = _start(
            "prepare",
            {"scan_id": "case", "item": _item(*second), "bank": str(bank_dir), "config": CONFIG},
        )
        _wait_until_blocked(child)  # it found no scan "case" and prepared its own file
        mine = prepare_record("case", _item(*first), str(bank_dir), CONFIG)
        assert mine["status"] == "ok"
    theirs = _result(child)
    assert theirs["status"] == "failed" and "already holds a different scan" in theirs["reason"]
    bank = Bank.open(bank_dir)
    assert bank.scan("case").attrs["source_path"] == str(first[0].resolve())
    assert bank.verify() == []


def test_propose_racing_a_prepare_stores_proposals_of_the_new_scan(tmp_path: Path) -> None:
    from maskbank.flows.prepare import prepare_record
    from maskbank.flows.propose import scan_version

    image, label = write_phantom(tmp_path / "in", "case", "ct", seed=1)
    bank_dir = tmp_path / "bank"
    Bank.create(bank_dir)
    assert prepare_record("case", _item(image, label), str(bank_dir), CONFIG)["status"] == "ok"
    old_token = Bank.open(bank_dir).scan("case").token
    write_phantom(tmp_path / "in", "case", "ct", seed=3)  # the source changes: a new version
    with file_lock(scan_lock_path(bank_dir, "case")):
        child = _start("propose", {"scan_id": "case", "bank": str(bank_dir), "config": PROPOSALS})
        _wait_until_blocked(child)  # proposals of the old version made, waiting to be stored
        redo = prepare_record("case", _item(image, label), str(bank_dir), CONFIG)
        assert redo["status"] == "ok" and redo["note"] == "source changed"
    rec = _result(child)
    assert rec["status"] == "ok", rec
    scan = Bank.open(bank_dir).scan("case")
    assert scan.token != old_token
    assert scan.proposals_attrs["scan_version"] == scan_version(scan)
    assert scan.proposals_attrs["maskbank"]["scan_token"] == scan.token
    assert Bank.open(bank_dir).verify() == []
