"""`maskbank` subcommands through a real subprocess: help texts and exit codes."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from maskbank.bank import Bank
from maskbank.pipeline.config import PrepareConfig
from maskbank.pipeline.prepare import prepare_scan
from tests.flows.cli_run import maskbank
from tests.flows.scans import write_phantom


def test_help_is_fast_and_lists_commands() -> None:
    top = maskbank("--help", timeout=60)
    assert top.returncode == 0
    for name in ("prepare", "info", "verify", "demo"):
        assert name in top.stdout
    for name, phrase in (
        ("prepare", "exit status: 0 when every scan is ok or skipped; 1 when any scan failed"),
        ("info", "per modality"),
        ("verify", "1 problems found"),
        ("demo", "shared/data"),
    ):
        sub = maskbank(name, "--help", timeout=60)
        assert sub.returncode == 0, sub.stderr
        assert phrase in " ".join(sub.stdout.split()), sub.stdout
    # --help must not pay for prefect/dask/torch imports
    probe = (
        "import sys, contextlib, io\n"
        "from maskbank.flows.cli import main\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "    main(['prepare', '--help'])\n"
        "heavy = [m for m in ('prefect', 'dask', 'torch', 'zarr') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    import subprocess

    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_console_script_installed() -> None:
    script = Path(sys.executable).with_name("maskbank")
    if not script.exists():
        pytest.skip("maskbank console script not installed (pip install -e .)")
    import subprocess

    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "prepare" in out.stdout


@pytest.fixture(scope="module")
def small_bank(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bank written directly through pipeline + bank (no flow), for info/verify."""
    root = tmp_path_factory.mktemp("cli")
    bank = Bank.create(root / "bank")
    config = PrepareConfig(spacing=(3.0, 3.0, 3.0))
    for name, modality in (("a", "ct"), ("b", "mr")):
        img, lab = write_phantom(root / "in", name, modality)
        prepared = prepare_scan(img, lab, config=config, dataset="cli-test")
        bank.write_scan(name, prepared.arrays(), prepared.attrs)
    return root / "bank"


def test_info_table_and_json(small_bank: Path) -> None:
    out = maskbank("info", str(small_bank), timeout=120)
    assert out.returncode == 0, out.stderr
    assert "2 scans" in out.stdout and "cli-test" in out.stdout and "mr" in out.stdout
    js = maskbank("info", str(small_bank), "--json", timeout=120)
    summary = json.loads(js.stdout)
    assert summary["scans"] == 2 and set(summary["by_modality"]) == {"ct", "mr"}


def test_verify_exit_codes(small_bank: Path, tmp_path: Path) -> None:
    ok = maskbank("verify", str(small_bank), timeout=120)
    assert ok.returncode == 0 and "2 scans" in ok.stdout

    broken = tmp_path / "broken"
    shutil.copytree(small_bank, broken)
    chunk = next(p for p in (broken / "scans" / "a" / "image" / "c").rglob("*") if p.is_file())
    chunk.write_bytes(b"\x00garbage" * 8)
    bad = maskbank("verify", str(broken), timeout=120)
    assert bad.returncode == 1
    assert "problem" in bad.stdout and "a:" in bad.stdout

    not_bank = maskbank("verify", str(tmp_path), timeout=120)
    assert not_bank.returncode == 2 and "error" in not_bank.stderr


def test_prepare_dry_run_lists_scans_and_writes_nothing(tmp_path: Path) -> None:
    write_phantom(tmp_path / "in", "alpha")
    out = maskbank("prepare", str(tmp_path / "in"), "--bank", str(tmp_path / "b"), "--dry-run")
    assert out.returncode == 0, out.stderr
    assert "alpha_label.nii.gz" in out.stdout and "1 scans would be prepared" in out.stdout
    assert not (tmp_path / "b").exists()


def test_prepare_usage_errors_exit_2(tmp_path: Path) -> None:
    missing = maskbank("prepare", str(tmp_path / "nope"), "--bank", str(tmp_path / "b"))
    assert missing.returncode == 2 and "no such file" in missing.stderr
    write_phantom(tmp_path, "x")
    spacing = maskbank("prepare", str(tmp_path), "--bank", str(tmp_path / "b"), "--spacing", "1,2")
    assert spacing.returncode == 2 and "spacing" in spacing.stderr
    assert not (tmp_path / "b").exists()  # nothing was started
    (tmp_path / "notabank").mkdir()
    (tmp_path / "notabank" / "precious.txt").write_text("keep me")
    clash = maskbank("prepare", str(tmp_path), "--bank", str(tmp_path / "notabank"))
    assert clash.returncode == 2 and "not empty" in clash.stderr
    assert (tmp_path / "notabank" / "precious.txt").read_text() == "keep me"


def test_prepare_exit_1_when_a_scan_fails(prefect_api: str, tmp_path: Path) -> None:
    write_phantom(tmp_path / "in", "fine", seed=4)
    (tmp_path / "in" / "broken.nii.gz").write_bytes(b"")
    out = maskbank(
        "prepare",
        str(tmp_path / "in"),
        "--bank",
        str(tmp_path / "bank"),
        "--spacing",
        "3",
        "--workers",
        "2",
    )
    assert out.returncode == 1, out.stdout + out.stderr
    assert "1 ok, 0 skipped, 1 failed" in out.stdout
    assert "prepare: 100%" in out.stderr and "2/2" in out.stderr  # the tqdm bar
    assert "broken" in out.stdout and "empty" in out.stdout
    assert Bank.open(tmp_path / "bank").scan_ids == ["fine"]


@pytest.mark.slow
def test_prepare_without_a_server(tmp_path: Path) -> None:
    """The first-time user's path: no PREFECT_API_URL, Prefect starts a temporary server."""
    import os
    import subprocess

    from tests.flows.cli_run import MASKBANK, REPO

    write_phantom(tmp_path / "in", "solo")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PYTHONPATH=str(REPO), PREFECT_HOME=str(tmp_path / "prefect-home"))
    out = subprocess.run(
        [*MASKBANK, "prepare", str(tmp_path / "in"), "--bank", str(tmp_path / "bank"),
         "--spacing", "3", "--no-progress"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 ok, 0 skipped, 0 failed" in out.stdout
    assert Bank.open(tmp_path / "bank").scan_ids == ["solo"]


def test_a_missing_command_module_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    from maskbank.flows import cli

    monkeypatch.setattr(cli, "COMMANDS", (*cli.COMMANDS, "not_written_yet"))
    parser = cli.build_parser()
    assert "prepare" in parser.format_help() and "not_written_yet" not in parser.format_help()


def test_pretrain_overrides_may_follow_the_options() -> None:
    """`maskbank pretrain BANK --out DIR max_steps=10` (README's form) used to stop with
    'unrecognized arguments': argparse had given BANK's neighbour KEY=VALUE list nothing."""
    from maskbank.flows import cli

    parser = cli.build_parser()
    args = cli.parse(
        parser,
        ["pretrain", "--config", "tiny", "bank", "a=1", "--out", "run", "max_steps=10", "b.c=x"],
    )
    assert (args.bank, args.out, args.config) == ("bank", "run", "tiny")
    assert args.overrides == ["a=1", "max_steps=10", "b.c=x"]
    assert cli.parse(parser, ["pretrain", "bank", "--out", "run"]).overrides == []
    for argv in (
        ["pretrain", "bank", "--out", "run", "--bogus"],
        ["pretrain", "bank", "--out", "run", "notakeyvalue"],
        ["info", "bank", "a=1"],  # only a command with overrides takes them
    ):
        with pytest.raises(SystemExit) as exc:
            cli.parse(parser, argv)
        assert exc.value.code == 2


def test_the_console_script_exits_with_mains_code_and_a_frozen_heap(monkeypatch) -> None:
    """``maskbank`` (`entry`) exits with `main`'s status, the heap frozen so the interpreter's
    last collection skips it; `main` itself (called in-process) leaves the heap alone."""
    import gc

    from maskbank.flows import cli

    monkeypatch.setattr(cli, "main", lambda: 3)
    try:
        with pytest.raises(SystemExit) as exit_:
            cli.entry()
        assert exit_.value.code == 3 and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
