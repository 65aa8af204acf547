"""Serve `prepare_bank` as a Prefect deployment from this process (no work pool needed).

    PREFECT_API_URL=http://127.0.0.1:4200/api python -m maskbank.flows.serve --name maskbank \\
        --allowed-root /data/scans --allowed-root /data/banks
    prefect deployment run prepare-bank/maskbank \\
        --params '{"inputs": ["/data/scans"], "bank": "/data/banks/ct", "workers": 8}'

Each triggered run executes in a fresh subprocess of this one, so the machine
running `serve` needs the data paths and the maskbank environment. For runs
picked up by workers of a work pool instead, see prefect.yaml and docs/deploy.md.

Whoever can trigger a run chooses its parameters, and the run reads and writes as the
user serving it. So the served flow is `guarded_prepare_bank`: before any work it
refuses a run whose bank, inputs (and the files their manifests name) or label-names
file resolve outside the allowed roots (`--allowed-root` / MASKBANK_ALLOWED_ROOTS,
`os.pathsep`-separated; none: any path), and a `dask_address` parameter unless the
deployment allows one (`--allow-dask-address` / MASKBANK_ALLOW_DASK_ADDRESS=1): a
scheduler address picks the machines that run the tasks' code.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from prefect import flow

from maskbank.flows.prepare import prepare_bank

DEFAULT_NAME = "maskbank"
ROOTS_ENV = "MASKBANK_ALLOWED_ROOTS"
DASK_ENV = "MASKBANK_ALLOW_DASK_ADDRESS"


class RunRefused(ValueError):
    """A triggered run asks for something this deployment does not allow."""


def _is_within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


@dataclass(frozen=True)
class RunPolicy:
    """What a run triggered through the deployment may touch.

    `roots`: resolved folders that every path of a run must lie in (None: anywhere);
    `allow_dask_address`: whether a run may name the Dask scheduler its tasks go to."""

    roots: tuple[str, ...] | None = None
    allow_dask_address: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> RunPolicy:
        """The policy `serve` (or a work-pool worker's environment) set for its runs."""
        roots = [r for r in env.get(ROOTS_ENV, "").split(os.pathsep) if r.strip()]
        allow = env.get(DASK_ENV, "").strip().lower() in ("1", "true", "yes")
        return cls.make(roots or None, allow)

    @classmethod
    def make(cls, roots: Iterable[str] | None, allow_dask_address: bool = False) -> RunPolicy:
        """Roots are resolved now (symlinks, ~), so a link cannot later widen them."""
        resolved = None
        if roots is not None:
            resolved = tuple(os.path.realpath(os.path.expanduser(r)) for r in roots)
        return cls(resolved, allow_dask_address)

    def to_env(self) -> dict[str, str]:
        """The environment that carries this policy to the flow-run subprocesses."""
        return {
            ROOTS_ENV: os.pathsep.join(self.roots or ()),
            DASK_ENV: "1" if self.allow_dask_address else "0",
        }

    def check_path(self, what: str, path: str) -> None:
        """Refuse ``path`` unless it resolves (symlinks followed) inside one of the roots."""
        if self.roots is None:
            return
        if "://" in path:
            raise RunRefused(f"{what} {path!r} is a URL; this deployment only takes local paths")
        real = os.path.realpath(os.path.expanduser(path))
        if not any(_is_within(real, root) for root in self.roots):
            raise RunRefused(
                f"{what} {path!r} resolves to {real}, outside the folders this deployment may "
                f"use ({', '.join(self.roots)}): put the data under one of them, or have the "
                f"deployment started with that folder allowed (--allowed-root / {ROOTS_ENV})"
            )

    def check_run(
        self,
        inputs: Sequence[str],
        bank: str,
        dask_address: str | None = None,
        dataset: str | None = None,
        label_names: str | None = None,
    ) -> None:
        """Raise `RunRefused` for the first thing a run may not do; nothing is written."""
        if dask_address and not self.allow_dask_address:
            raise RunRefused(
                f"this deployment does not take a Dask scheduler address from a run "
                f"(dask_address={dask_address!r}): leave it out, or start the deployment with "
                f"--allow-dask-address ({DASK_ENV}=1 for work-pool workers)"
            )
        if self.roots is None:
            return
        self.check_path("bank", bank)
        for item in inputs:
            self.check_path("input", item)
        if label_names:
            self.check_path("label_names", label_names)
        from maskbank.flows.inputs import collect_inputs

        # Manifests name their own files: each one must lie inside the roots as well.
        for scan in collect_inputs(list(inputs), dataset, label_names):
            for what, path in (
                ("image", scan.image),
                ("label", scan.label),
                ("label names", scan.label_names),
            ):
                if path:
                    self.check_path(f"scan {scan.scan_id}: {what}", path)


@flow(name="prepare-bank", validate_parameters=True)
def guarded_prepare_bank(
    inputs: list[str],
    bank: str,
    config: dict | None = None,
    workers: int = 2,
    dask_address: str | None = None,
    dataset: str | None = None,
    processes: bool = False,
    progress: bool = True,
    proposals: dict | None = None,
    label_names: str | None = None,
    batch: int | None = None,
    rehash: bool = False,
    dry_run: bool = False,
) -> dict:
    """`prepare_bank` for runs that others trigger: the deployment's policy is checked
    (`RunPolicy.from_env`) before any file is read or written."""
    parameters = dict(locals())  # the same signature: passed on unchanged
    RunPolicy.from_env().check_run(inputs, bank, dask_address, dataset, label_names)
    return prepare_bank.fn(**parameters)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m maskbank.flows.serve",
        description="Register the prepare-bank deployment and run its flow runs until stopped.",
    )
    p.add_argument("--name", default=DEFAULT_NAME, help=f"deployment name (default {DEFAULT_NAME})")
    p.add_argument("--limit", type=int, default=1, help="flow runs at once (default 1)")
    p.add_argument("--workers", type=int, default=4, help="default Dask workers per run")
    p.add_argument(
        "--allowed-root",
        action="append",
        metavar="DIR",
        help=f"a folder runs may read and write (repeatable; default: ${ROOTS_ENV}, else any)",
    )
    p.add_argument(
        "--allow-dask-address",
        action="store_true",
        help=f"let a run name its Dask scheduler (dask_address; default: ${DASK_ENV}, else no)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from maskbank.flows.commands._prefect_env import apply_cli_defaults

    apply_cli_defaults()
    env_policy = RunPolicy.from_env()
    policy = RunPolicy.make(
        args.allowed_root if args.allowed_root else env_policy.roots,
        args.allow_dask_address or env_policy.allow_dask_address,
    )
    os.environ.update(policy.to_env())  # the flow-run subprocesses read it from there
    if policy.roots is None:
        print(
            "flows.serve: warning: runs may read and write any path this user can; restrict "
            f"them with --allowed-root DIR (or {ROOTS_ENV})",
            file=sys.stderr,
        )
    guarded_prepare_bank.serve(
        name=args.name,
        limit=args.limit,
        tags=["maskbank"],
        description="Prepare raw CT/MR/PET scans into a maskbank bank (one Dask task per scan).",
        parameters={"workers": args.workers, "progress": False},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
