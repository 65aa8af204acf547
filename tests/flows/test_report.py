"""`maskbank report`: a real bank, a real page, opened in real headless Chromium."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from maskbank.bank import Bank
from maskbank.flows.cli import main
from maskbank.flows.demo_bank import build_phantom_bank

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def report_bank(tmp_path_factory):
    """Three phantom scans with proposals, plus one with an empty body and 9 mm voxels."""
    root = tmp_path_factory.mktemp("report") / "bank"
    build_phantom_bank(str(root), n_scans=3, shape=(64, 64, 48))
    bank = Bank.create(str(root))  # opens the existing bank for writing
    image = np.zeros((20, 20, 20), np.float32)
    attrs = {
        "dataset": "odd", "modality": "ct", "spacing": [9.0, 9.0, 9.0],
        "source_path": "odd.nii.gz", "source_sha256": "0" * 64, "fingerprint": "x",
    }  # fmt: skip
    bank.write_scan("odd-000", {"image": image, "body": image > 1}, attrs)
    return root


def _suspicious(page: str) -> str:
    start = page.index("Suspicious scans")
    return page[start : page.index("</ul>", start)]


def test_report_lists_suspicious_scans_with_reasons(report_bank, tmp_path, capsys):
    out = tmp_path / "report"
    rc = main(
        ["report", str(report_bank), "--out", str(out), "--no-progress", "--min-proposals", "20"]
    )
    assert rc == 0, capsys.readouterr().err
    page = (out / "index.html").read_text(encoding="utf-8")
    listed = _suspicious(page)
    assert "odd-000" in listed and "empty body mask" in listed and "extreme spacing" in listed
    assert "no proposals" in listed
    assert "phantom-pet-002" in listed and "too few proposals (15 &lt; 20)" in listed
    assert "phantom-mr-001" not in listed  # 106 proposals, a normal body
    assert page.count('src="data:image/png;base64,') == 3
    for name in ("intensity", "proposals", "montage"):
        assert (out / "figures" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Proposal quality against the labels" in page and "phantom-ct-000" in page


class CountingBank(Bank):
    """A real bank that counts how often each scan is opened."""

    def scan(self, scan_id: str):
        self.opened[scan_id] = self.opened.get(scan_id, 0) + 1
        return super().scan(scan_id)


def test_report_opens_each_scan_once(report_bank, tmp_path):
    from maskbank.flows.qa_report import ReportOptions, build_report

    bank = CountingBank.open(str(report_bank))
    bank.opened = {}
    page = build_report(bank, tmp_path / "report", ReportOptions(progress=False))
    text = page.read_text(encoding="utf-8")
    assert "Proposal quality against the labels" in text and "Montage" in text
    assert bank.opened == dict.fromkeys(bank.scan_ids, 1)


def test_report_refuses_unknown_scans(report_bank, tmp_path, capsys):
    rc = main(["report", str(report_bank), "--out", str(tmp_path), "--scans", "nope"])
    assert rc == 2 and "scans not in the bank" in capsys.readouterr().err


@pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="headless Chromium not installed: apt-get install chromium chromium-driver "
    "(.ci/run installs them when missing)",
)
def test_report_renders_in_headless_chromium(report_bank, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    out = tmp_path / "report"
    assert main(["report", str(report_bank), "--out", str(out), "--no-progress"]) == 0
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1200,2000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(CHROMEDRIVER))
    try:
        driver.get((out / "index.html").as_uri())
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.complete, i.naturalWidth]);"
        )
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert driver.title.startswith("maskbank report")
        driver.save_screenshot(str(tmp_path / "report.png"))
    finally:
        driver.quit()
    assert errors == []
    assert len(images) == 3 and all(done and width > 100 for done, width in images), images
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_a_run_report_prints_its_flows_table_and_gives_the_exit_status(capsys):
    from maskbank.flows.report import print_run_report

    row = {"scan_id": "a", "status": "ok", "seconds": 1.0, "n_proposals": 5}
    failed = {"scan_id": "b", "status": "failed", "seconds": None, "reason": "4-D image"}
    base = {"bank": "/b", "report_path": "/b/r.json", "counts": {"ok": 1}, "seconds": 2.0}
    assert print_run_report({**base, "flow": "prepare", "scans": [row]}) == 0
    assert "reason" in capsys.readouterr().out.splitlines()[0]  # the prepare table
    for flow in ("propose", "import"):  # made or imported proposals: the same table
        assert print_run_report({**base, "flow": flow, "scans": [row]}) == 0
        assert "B/prop" in capsys.readouterr().out.splitlines()[0]
    bad = {**base, "flow": "prepare", "scans": [row, failed], "counts": {"ok": 1, "failed": 1}}
    assert print_run_report(bad, as_json=True) == 1
    assert '"failed": 1' in capsys.readouterr().out
