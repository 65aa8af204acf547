"""The deployment recipe for real: serve `prepare_bank`, trigger a run through the Prefect API."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from maskbank.bank import Bank
from maskbank.flows.serve import RunPolicy, RunRefused, guarded_prepare_bank
from maskbank.flows.server import stop_process_group
from tests.flows.cli_run import REPO
from tests.flows.scans import write_phantom


def test_prefect_yaml_points_at_the_flow() -> None:
    import importlib

    recipe = yaml.safe_load((REPO / "prefect.yaml").read_text())
    (dep,) = recipe["deployments"]
    path, _, name = dep["entrypoint"].partition(":")
    module = importlib.import_module("maskbank." + path.removesuffix(".py").replace("/", "."))
    flow = getattr(module, name)
    assert flow is guarded_prepare_bank  # runs triggered by others go through the checks
    assert flow.name == "prepare-bank"
    assert set(dep["parameters"]) <= set(flow.parameters.properties)


def test_guarded_flow_takes_every_parameter_of_prepare_bank() -> None:
    from maskbank.flows.prepare import prepare_bank

    assert guarded_prepare_bank.parameters == prepare_bank.parameters


def test_run_paths_must_resolve_inside_the_allowed_roots(tmp_path: Path) -> None:
    scans, banks, outside = tmp_path / "scans", tmp_path / "banks", tmp_path / "outside"
    for d in (scans, banks, outside):
        d.mkdir()
    write_phantom(scans, "a", seed=0)
    image, _ = write_phantom(outside, "b", seed=1)
    policy = RunPolicy.from_env({"MASKBANK_ALLOWED_ROOTS": f"{scans}{os.pathsep}{banks}"})
    policy.check_run([str(scans)], str(banks / "new-bank"))  # inside: accepted
    with pytest.raises(RunRefused, match="outside the folders"):
        policy.check_run([str(scans)], str(outside / "bank"))
    with pytest.raises(RunRefused, match="outside the folders"):
        policy.check_run([str(outside)], str(banks / "b"))
    with pytest.raises(RunRefused, match="outside"):  # a sibling whose name extends a root's
        policy.check_run([str(scans)], str(tmp_path / "banks-evil"))
    with pytest.raises(RunRefused, match="outside"):
        policy.check_run([str(scans / ".." / "outside")], str(banks / "b"))
    # A symlink inside a root that points out of it is judged by where it leads.
    (scans / "escape").symlink_to(outside)
    with pytest.raises(RunRefused, match="resolves to"):
        policy.check_run([str(scans / "escape")], str(banks / "b"))
    (banks / "link").symlink_to(outside)
    with pytest.raises(RunRefused, match="resolves to"):
        policy.check_run([str(scans)], str(banks / "link" / "bank"))
    # A manifest inside a root may not name files outside it.
    manifest = scans / "list.csv"
    manifest.write_text(f"image\n{image}\n")
    with pytest.raises(RunRefused, match="image"):
        policy.check_run([str(manifest)], str(banks / "b"))
    RunPolicy.from_env({}).check_run([str(manifest)], str(outside / "b"))  # no roots: anything


def test_dask_address_needs_the_deployment_to_allow_it() -> None:
    with pytest.raises(RunRefused, match="--allow-dask-address"):
        RunPolicy.from_env({}).check_run([], "/x", dask_address="tcp://evil:8786")
    RunPolicy.from_env({}).check_run([], "/x")  # none asked: fine
    allowed = RunPolicy.from_env({"MASKBANK_ALLOW_DASK_ADDRESS": "1"})
    allowed.check_run([], "/x", dask_address="tcp://scheduler:8786")
    assert RunPolicy.from_env(allowed.to_env()) == allowed


def _wait_for_deployment(name: str, proc: subprocess.Popen, timeout: float) -> None:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"serve exited early:\n{proc.stdout.read()}")
            try:
                client.read_deployment_by_name(name)
                return
            except ObjectNotFound:
                time.sleep(0.5)
    raise TimeoutError(f"deployment {name} not registered after {timeout} s")


@pytest.mark.slow
def test_served_deployment_builds_a_bank(prefect_api: str, tmp_path: Path) -> None:
    from prefect.deployments import run_deployment

    for i in range(2):
        write_phantom(tmp_path / "in", f"d{i}", seed=i)
    name = f"test-{uuid.uuid4().hex[:6]}"
    serve = subprocess.Popen(
        [sys.executable, "-m", "maskbank.flows.serve", "--name", name, "--workers", "2"]
        + ["--allowed-root", str(tmp_path)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        _wait_for_deployment(f"prepare-bank/{name}", serve, timeout=180)
        flow_run = run_deployment(
            f"prepare-bank/{name}",
            parameters={
                "inputs": [str(tmp_path / "in")],
                "bank": str(tmp_path / "bank"),
                "config": {"spacing": [3.0, 3.0, 3.0]},
            },
            timeout=300,
        )
        assert flow_run.state is not None and flow_run.state.is_completed(), flow_run.state
        # The deployment's roots reach its runs: a bank outside them is refused, not created.
        outside = tmp_path.parent / f"{name}-outside"
        refused = run_deployment(
            f"prepare-bank/{name}",
            parameters={"inputs": [str(tmp_path / "in")], "bank": str(outside)},
            timeout=300,
        )
        assert refused.state is not None and refused.state.is_failed(), refused.state
        assert not outside.exists()
    finally:
        stop_process_group(serve)
    bank = Bank.open(tmp_path / "bank")
    assert bank.scan_ids == ["d0", "d1"]
    assert bank.scan("d0").spacing == (3.0, 3.0, 3.0)
    assert bank.verify() == [] and len(bank.reports("prepare")) == 1
