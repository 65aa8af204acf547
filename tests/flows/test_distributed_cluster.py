"""A real distributed run: `dask scheduler` and two `dask worker` processes, started the
way dask-jobqueue starts them in SLURM jobs, reached with `--dask-address`; one worker is
SIGKILLed mid-run (a lost node). Its tasks go to the survivor (or a second run finishes
them); the bank ends whole, every scan once."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from maskbank.bank import Bank
from maskbank.flows.per_scan import Cluster
from maskbank.pipeline.phantom import make_phantom
from tests.flows.cli_run import DECODE, ENV, MASKBANK, REPO

N_SCANS = 10
DASK = str(Path(sys.executable).with_name("dask"))


def _published(bank: Path) -> set[str]:
    scans = bank / "scans"
    if not scans.is_dir():
        return set()
    return {p.name for p in scans.iterdir() if (p / "zarr.json").exists()}


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a process started in its own session and everything it started."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)


class DaskCluster:
    """A scheduler and workers as separate process groups, found through a scheduler file."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root = root
        self.env = env
        self.scheduler_file = root / "scheduler.json"
        self.procs: list[subprocess.Popen] = []

    def _start(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "w")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen(
            [DASK, *args],
            cwd=REPO,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: nanny and worker die together
            **DECODE,
        )
        log.close()
        self.procs.append(proc)
        return proc

    def start(self, n_workers: int) -> None:
        """`dask scheduler` on a free loopback port, then ``n_workers`` `dask worker`s
        (one single-threaded process each, under a nanny, as dask-jobqueue runs them)."""
        common = ["--scheduler-file", str(self.scheduler_file), "--no-dashboard"]
        self._start("scheduler", "scheduler", "--host", "127.0.0.1", "--port", "0", *common)
        for i in range(n_workers):
            self._start(
                f"worker{i}",
                "worker",
                *common,
                "--host",
                "127.0.0.1",
                "--nthreads",
                "1",
                "--nworkers",
                "1",
                "--local-directory",
                str(self.root / f"worker{i}"),
                "--death-timeout",
                "60",  # gone for good if the test process dies without its finalizer
            )
        deadline = time.monotonic() + 60
        while not self.address:
            assert time.monotonic() < deadline, self.logs()
            time.sleep(0.1)

    @property
    def address(self) -> str | None:
        """The scheduler's address from its file, once the file is whole."""
        try:
            return json.loads(self.scheduler_file.read_text())["address"]
        except (OSError, ValueError, KeyError):
            return None

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
            for p in sorted(self.root.glob("*.log"))
        )

    def stop(self) -> None:
        for proc in reversed(self.procs):
            _kill_group(proc)


@pytest.fixture
def env(prefect_api: str) -> dict[str, str]:
    """The suite's Prefect server for the flow and every worker process: a task that runs
    in another process reports to the API the flow uses (docs/cluster.md)."""
    return {**ENV, "PREFECT_API_URL": prefect_api}


@pytest.fixture
def dask_cluster(env: dict[str, str], tmp_path: Path) -> Iterator[DaskCluster]:
    cluster = DaskCluster(tmp_path / "dask", env)
    cluster.root.mkdir()
    try:
        yield cluster
    finally:
        cluster.stop()


def _maskbank(env: dict[str, str], *args: str) -> subprocess.Popen:
    """`maskbank ARGS` in its own process group (its temporary children die with it)."""
    return subprocess.Popen(
        [*MASKBANK, *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        **DECODE,
    )


def _run(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    proc = _maskbank(env, *args)
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        _kill_group(proc)
    return proc.returncode, out, err


def _statuses(out: str) -> dict[str, str]:
    report = json.loads(out)
    return {r["scan_id"]: r["status"] for r in report["scans"]}


@pytest.mark.slow
def test_prepare_and_propose_survive_a_killed_dask_worker(
    dask_cluster: DaskCluster, env: dict[str, str], tmp_path: Path
) -> None:
    from distributed import Client

    inputs = tmp_path / "in"
    names = [f"scan{i:02d}" for i in range(N_SCANS)]
    for i, name in enumerate(names):  # kept at 3 mm: about a second of proposals each
        ph = make_phantom("ct", shape=(80, 80, 64), spacing=(1.5, 1.5, 1.5), seed=i)
        ph.save_nifti(inputs, name)
    dask_cluster.start(n_workers=2)
    address = str(dask_cluster.address)
    bank = tmp_path / "bank"
    with Client(address, timeout=60) as client:
        client.wait_for_workers(2, timeout=120)
        pids = client.run(os.getpid)  # worker address -> pid (the nanny's child)
        # the run sizes its batches by the cluster's threads, not by --workers alone
        assert Cluster(workers=1, dask_address=address).parallelism() == 2

        # 10 scans in batches of 2: five Dask tasks for two single-threaded workers
        prepare = [str(inputs), "--bank", str(bank), "--spacing", "3", "--batch", "2"]
        prepare += ["--dask-address", address, "--json", "--no-progress"]
        proc = _maskbank(env, "prepare", *prepare)
        victim = None
        try:
            deadline = time.monotonic() + 240
            while victim is None and proc.poll() is None and time.monotonic() < deadline:
                # once a scan is published, lose a node (nanny and worker) inside a batch
                if _published(bank):
                    busy = [a for a, keys in client.processing().items() if keys]
                    victim = busy[0] if busy else None
                time.sleep(0.02)
            at_kill = _published(bank)
            assert victim is not None, "the run ended before a worker could be killed"
            os.killpg(os.getpgid(pids[victim]), signal.SIGKILL)
            out, err = proc.communicate(timeout=300)
        finally:
            _kill_group(proc)
        assert 1 <= len(at_kill) < N_SCANS, (at_kill, out, err, dask_cluster.logs())
        assert list(client.scheduler_info()["workers"]) == [a for a in pids if a != victim]

        runs = 1
        if proc.returncode != 0:  # failures reported: a second run finishes the rest
            rc, out, err = _run(env, "prepare", *prepare)
            assert rc == 0, out + err + dask_cluster.logs()
            runs = 2
        statuses = _statuses(out)
        assert sorted(statuses) == names
        assert set(statuses.values()) <= {"ok", "skipped"}, out  # every report line: done
        print(f"worker killed after {len(at_kill)} scans were published; done in {runs} run(s)")

        # the survivor alone: small, fast proposal settings
        propose = [str(bank), "--generators", "supervoxels", "--scales", "200"]
        propose += ["--max-proposals", "50", "--batch", "3", "--dask-address", address]
        rc, out, err = _run(env, "propose", *propose, "--json", "--no-progress")
        assert rc == 0, out + err + dask_cluster.logs()
        assert _statuses(out) == dict.fromkeys(names, "ok")

    opened = Bank.open(bank)
    assert opened.scan_ids == names
    assert [r["scan_id"] for r in opened.index] == names  # one row each, no double
    assert sorted(p.name for p in (bank / "scans").iterdir() if p.is_dir()) == names
    staging = bank / ".staging"
    assert not staging.exists() or not any(staging.iterdir())  # nothing half-written
    rc, out, err = _run(env, "verify", str(bank))
    assert rc == 0, out + err
