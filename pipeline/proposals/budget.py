"""Hold a scan's proposal set to a stored-bytes budget per proposal.

Bytes are the label layers (their size grows with how many and how ragged the
cuts are, which differs a lot between layers and scans) plus a small table per
proposal.  The budget is held per scan, not on average: while the set is over
it, whole generated layers are dropped, fewest proposals lost first: the
smallest layer whose removal alone brings the set within budget, else the one
that saves the most bytes per proposal lost.  Dropping only some proposals of a
layer would not do: the layer's cuts stay for the proposals left.  Intensity
windows (few proposals that hold the lesions) and imported masks are never
dropped.

The measuring is the caller's (``maskbank.bank.writing.proposal_nbytes``, which
writes the whole part in memory as the bank will store it, metadata and
attributes included, so that the budget holds on the stored bytes): this module
only decides what to drop, so it stays free of the on-disk layout.  The report
is stored with the set too; a writer measures with `longest_report` in its place.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from maskbank.pipeline.proposals.proposal_set import ProposalSet

#: Layer kinds (``layer_info[name]["kind"]``) the budget never drops.
PROTECTED_KINDS = frozenset({"windows", "external"})


def fit_byte_budget(
    ps: ProposalSet,
    measure: Callable[[ProposalSet], dict[str, int]],
    max_bytes_per_proposal: float,
) -> tuple[ProposalSet, dict]:
    """(the set within ``max_bytes_per_proposal``, a report of what was dropped).

    ``measure(ps)`` returns stored bytes per layer name plus ``""`` for the rest
    (everything the stored set takes: members, table, metadata, attributes).
    ``max_bytes_per_proposal <= 0`` disables the budget.  A set that cannot fit
    (one layer left, or fixed metadata dominating a tiny set) is returned at its
    cheapest with ``fits`` False.
    """
    report: dict = {"bytes_per_proposal": None, "dropped": 0, "dropped_layers": [], "fits": True}
    if max_bytes_per_proposal <= 0 or ps.count == 0:
        return ps, report
    start = ps.count
    cheapest: tuple[float, ProposalSet, list[str]] | None = None
    while True:
        nbytes = measure(ps)
        total = sum(nbytes.values())
        per = total / max(ps.count, 1)
        if cheapest is None or per < cheapest[0]:
            cheapest = (per, ps, list(report["dropped_layers"]))
        layer = np.asarray(ps.table["layer"])
        carried = np.bincount(layer, minlength=len(ps.layer_names))
        size = np.array([nbytes.get(n, 0) for n in ps.layer_names], np.float64)
        droppable = (carried > 0) & (carried < ps.count)
        droppable &= [
            ps.layer_info.get(n, {}).get("kind") not in PROTECTED_KINDS for n in ps.layer_names
        ]
        # A layer's proposals take their members and table rows with them: at most the
        # rest's bytes per proposal each (the rest also holds fixed metadata).
        size += nbytes.get("", 0) / max(ps.count, 1) * carried
        saving = size - max_bytes_per_proposal * carried  # bytes over budget a layer removes
        excess = total - max_bytes_per_proposal * ps.count
        if per <= max_bytes_per_proposal:
            break
        if not (droppable & (saving > 0)).any():  # cannot fit: the cheapest set seen
            per, ps, report["dropped_layers"] = cheapest
            report["fits"] = False
            break
        enough = droppable & (saving >= excess)
        if enough.any():
            j = int(np.argmin(np.where(enough, carried, np.iinfo(np.int64).max)))
        else:
            j = int(np.argmax(np.where(droppable, size / np.maximum(carried, 1), -np.inf)))
        report["dropped_layers"].append(ps.layer_names[j])
        ps = ps.subset(np.flatnonzero(layer != j)).prune_layers()
    report.update(bytes_per_proposal=round(per, 1), dropped=start - ps.count)
    return ps, report


def longest_report(ps: ProposalSet, max_bytes_per_proposal: float) -> dict:
    """A stand-in for `fit_byte_budget`'s report, as long as JSON as any it returns for a
    set that fits.

    A writer stores the report among the set's attributes, so it counts towards the
    set's bytes, but it exists only once the budget is held: measure the set with this
    in its place. Dropped layers are a subset of the droppable ones, the count at most
    the set's, and a fitting set's ``bytes_per_proposal`` at most the budget.
    """
    droppable = [
        n for n in ps.layer_names if ps.layer_info.get(n, {}).get("kind") not in PROTECTED_KINDS
    ]
    return {
        "bytes_per_proposal": float(f"{int(max(max_bytes_per_proposal, 0))}.9"),
        "dropped": int(ps.count),
        "dropped_layers": droppable,
        "fits": False,
    }
