"""Which scans a pair stream draws from, and with what probability.

``eligible_rows`` keeps the bank's index rows that can serve the configured pairs (in
``data.scans``, holding ``data.proposals``, with at least ``data.k`` proposals) and skips
or refuses the scans short of K (``data.short_scans``); ``scan_weights`` turns
``data.dataset_weights`` and ``data.modality_weights`` into draw probabilities;
``bank_fingerprint`` hashes the rows that define the data, so a resumed run can tell a
changed bank. They read the bank's rows in place (``index_rows``), and callers hold the
cyclic garbage collector while they do (``gc_paused``): at 100,000 scans an index is
about a million containers, and the collections that reading it triggers cost more than
the reading itself.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
from collections.abc import Iterator, Mapping

import numpy as np

from maskbank.train.run_config import DataConfig

log = logging.getLogger(__name__)


class SamplerError(RuntimeError):
    """The bank cannot provide what the sampler was asked for (clear, actionable message)."""


def set_count(row: Mapping, name: str) -> int | None:
    """Proposals of set ``name`` in an index row, None when the scan lacks the set (rows
    written before named sets existed describe the default set by ``n_proposals`` alone)."""
    sets = row.get("proposal_sets")
    if isinstance(sets, dict):
        got = sets.get(name)
        return None if got is None else int(got.get("n") or 0)
    return int(row.get("n_proposals") or 0) if name == "default" else None


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """The cyclic garbage collector off meanwhile (as it was after).

    An opened bank of 100,000 scans holds about a million containers; every collection
    they trigger walks them again, which made opening the bank and reading its rows 2-3x
    slower. Reading them with the collector off, then dropping them before it is back on
    (their memory is freed by reference counting), leaves it nothing to walk.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def index_rows(bank) -> list[Mapping]:
    """The bank's index rows in scan id order, as ``bank.index`` lists them but without its
    copy of every row (a second per 100,000 scans): the bank's own rows, to read only."""
    rows = getattr(bank, "index_rows", None)
    if rows is None:  # a bank-like object without the read-only view
        return list(bank.index)
    return [rows[k] for k in sorted(rows)]


def bank_fingerprint(bank, proposals: str = "default") -> str:
    """Hash of the index rows that define the data (ids, sources, shapes, proposal counts)."""
    rows = index_rows(bank)
    data = [
        [r["scan_id"], r.get("source_sha256"), r.get("shape"), r.get("n_proposals")] for r in rows
    ]
    if proposals != "default":  # a named set's counts too (default fingerprints stay as they were)
        data.append([proposals, [set_count(r, proposals) for r in rows]])
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def open_bank(location: str):
    """Open a bank read-only with a clear error when it is missing or not a bank."""
    from maskbank.bank import Bank, BankError

    try:
        return Bank.open(location)
    except BankError as exc:
        raise SamplerError(f"cannot open bank {location!r}: {exc}") from exc
    except FileNotFoundError as exc:
        raise SamplerError(f"cannot open bank {location!r}: {exc}") from exc


def scan_weights(rows: list[Mapping], cfg: DataConfig) -> np.ndarray:
    """Per-scan draw probability: dataset weight x modality weight (default 1 each)."""
    if not cfg.dataset_weights and not cfg.modality_weights:  # every scan weighs 1
        w = np.ones(len(rows))
    else:
        d, m = cfg.dataset_weights, cfg.modality_weights
        w = np.array(
            [
                float(d.get(r.get("dataset"), 1.0)) * float(m.get(r.get("modality"), 1.0))
                for r in rows
            ]
        )
    if w.sum() <= 0:
        raise SamplerError("all scans have sampling weight 0 (check dataset/modality weights)")
    return w / w.sum()


def eligible_rows(bank, cfg: DataConfig, report: bool = True) -> list[Mapping]:
    """Index rows the sampler may draw from. Scans short of K proposals are left out
    (``data.short_scans=skip``; a warning counts them when ``report``) or refused; errors
    name the scans that cannot serve K. The rows are the bank's own (``index_rows``): read
    them, never modify them."""
    rows = index_rows(bank)
    if cfg.scans is not None:
        wanted = set(cfg.scans)  # once: the set of 100,000 ids, not one per row
        missing = sorted(wanted - {r["scan_id"] for r in rows})
        if missing:
            raise SamplerError(f"scans not in bank {bank.location!r}: {missing}")
        rows = [r for r in rows if r["scan_id"] in wanted]
    if not rows:
        raise SamplerError(f"bank {bank.location!r} has no scans to sample from")
    if cfg.proposals != "default":  # a named set: the scans that have it
        having = [r for r in rows if set_count(r, cfg.proposals) is not None]
        if not having:
            names = sorted({n for r in rows for n in (r.get("proposal_sets") or {})})
            raise SamplerError(
                f"no scan in {bank.location!r} has proposal set {cfg.proposals!r} "
                f"(sets there: {', '.join(names) or 'none'}); make it with `maskbank propose "
                f"BANK --name {cfg.proposals}` or `--import DIR --name {cfg.proposals}`"
            )
        rows = having
    counts = [set_count(r, cfg.proposals) or 0 for r in rows]
    short = [(r["scan_id"], n) for r, n in zip(rows, counts, strict=True) if n < cfg.k]
    if not short:
        return rows
    listed = _listed(short)
    if cfg.short_scans == "refuse":
        raise SamplerError(
            f"{len(short)} scan(s) in {bank.location!r} have fewer than k={cfg.k} proposals: "
            f"{listed}. Generate proposals (`maskbank propose`), lower data.k, exclude them "
            "with data.scans, or leave them out with data.short_scans=skip"
        )
    if len(short) == len(rows):
        raise SamplerError(
            f"every scan ({len(rows)}) in {bank.location!r} has fewer than k={cfg.k} "
            f"proposals: {listed}. Generate proposals (`maskbank propose`) or lower data.k"
        )
    if report:
        log.warning(
            "skipping %d of %d scan(s) in %r with fewer than k=%d proposals "
            "(data.short_scans=skip): %s",
            len(short),
            len(rows),
            bank.location,
            cfg.k,
            listed,
        )
    return [r for r, n in zip(rows, counts, strict=True) if n >= cfg.k]


def _listed(short: list[tuple[str, int]], most: int = 10) -> str:
    """The first ``most`` short scans as ``id (count)``, an ellipsis for the rest."""
    listed = ", ".join(f"{s} ({n})" for s, n in short[:most])
    return listed + (" ..." if len(short) > most else "")
