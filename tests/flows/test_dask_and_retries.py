"""Running on an existing Dask cluster (process workers), and the retry policy."""

from __future__ import annotations

from pathlib import Path

import pytest

from maskbank.bank import Bank
from maskbank.pipeline.errors import ScanError
from tests.flows.scans import write_phantom


def test_retry_only_transient_io() -> None:
    from prefect.states import Completed, Failed

    from maskbank.flows.per_scan import TASK_RETRIES, retry_transient_io
    from maskbank.flows.prepare import prepare_one
    from maskbank.flows.propose import propose_one

    assert prepare_one.retries == propose_one.retries == TASK_RETRIES >= 1
    assert retry_transient_io(None, None, Failed(data=OSError(5, "Input/output error")))
    assert retry_transient_io(None, None, Failed(data=TimeoutError("nfs stalled")))
    assert not retry_transient_io(None, None, Failed(data=ScanError("x.nii", "bad header")))
    assert not retry_transient_io(None, None, Failed(data=ValueError("a bug")))
    assert not retry_transient_io(None, None, Completed(data={"status": "ok"}))


@pytest.mark.slow
def test_joins_an_existing_dask_cluster(prefect_api: str, tmp_path: Path) -> None:
    """Like a dask-jobqueue cluster: separate worker processes reached by address."""
    from distributed import Client, LocalCluster

    from maskbank.flows.prepare import prepare_bank

    for i in range(2):
        write_phantom(tmp_path / "in", f"remote{i}", seed=i)
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=2, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        report = prepare_bank(
            [str(tmp_path / "in")],
            str(tmp_path / "bank"),
            {"spacing": [3.0, 3.0, 3.0]},
            dask_address=cluster.scheduler_address,
            progress=False,
        )
        worker_pids = set(client.run(lambda: __import__("os").getpid()).values())
    assert report["counts"] == {"ok": 2, "skipped": 0, "failed": 0}
    assert report["dask_address"] == cluster.scheduler_address
    assert worker_pids and __import__("os").getpid() not in worker_pids
    assert {int(r["worker"].rsplit(":", 1)[1]) for r in report["scans"]} <= worker_pids
    bank = Bank.open(tmp_path / "bank")
    assert bank.scan_ids == ["remote0", "remote1"] and bank.verify() == []
