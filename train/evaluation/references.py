"""The in-context split: which scans are references, which are queries, and what is scored.

Per dataset, every structure class gets one reference set: the first k holders in sorted
id order (``fixed``), the scans a JSON file names (``FILE``), or a seeded order of the
dataset's scans per repeat (``random``). With several shot counts the references of k
shots are the first k of the largest k's, so every k is scored on the same queries. The
queries are the dataset's labelled scans that are no class's reference (nor of a
reference's subject): a reference is never scored.

``plan_jobs`` turns the splits into one ``QueryJob`` per (query, k, repeat) with the
task list of its dataset, and says what cannot be scored and why.
"""

from __future__ import annotations

import json
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import EvaluationError
from .structures import LabelledScan, StructureClass

if TYPE_CHECKING:
    from .incontext import InContextOptions

FIXED, RANDOM_REFS = "fixed", "random"


@dataclass
class DatasetSplit:
    """References per class and the queries of one dataset in one repeat."""

    dataset: str
    repeat: int
    references: dict[int, list[str]]  # class value -> reference pool (the largest k's)
    queries: list[str]
    excluded: dict[str, str]  # scan -> why it is not a query

    def to_dict(self, names: dict[int, str]) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "repeat": self.repeat,
            "classes": {
                names.get(v, str(v)): {"value": v, "references": list(ids)}
                for v, ids in sorted(self.references.items())
            },
            "queries": list(self.queries),
            "excluded": dict(sorted(self.excluded.items())),
        }


class ReferencePlan:
    """Which scans are references (per dataset, class and repeat) and which are queries."""

    def __init__(self, options: InContextOptions) -> None:
        self.options = options
        self.named: dict[str, Any] | None = None
        if options.references not in (FIXED, RANDOM_REFS):
            try:
                self.named = json.loads(Path(options.references).read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise EvaluationError(f"{options.references}: not valid JSON ({exc})") from exc
            if not isinstance(self.named, dict):
                raise EvaluationError(
                    f"{options.references}: expected {{dataset: [scan ids]}} or "
                    "{dataset: {class: [scan ids]}}"
                )

    @property
    def repeats(self) -> int:
        return self.options.repeats if self.options.references == RANDOM_REFS else 1

    def _named(self, cls: StructureClass) -> list[str]:
        assert self.named is not None
        listed = self.named.get(cls.dataset, [])
        if isinstance(listed, dict):
            listed = listed.get(cls.name, listed.get(str(cls.value), []))
        return [str(s) for s in listed]

    def named_scans(self, dataset: str) -> set[str]:
        """Every scan the references file names for ``dataset`` (none of them is a query)."""
        if self.named is None:
            return set()
        listed = self.named.get(dataset, [])
        if isinstance(listed, dict):
            return {str(s) for ids in listed.values() for s in ids}
        return {str(s) for s in listed}

    def candidates(self, cls: StructureClass, repeat: int = 0) -> list[str]:
        """The class's holders in reference order (fixed: sorted id; random: seeded)."""
        if self.named is not None:
            return [s for s in self._named(cls) if s in cls.scans]
        if self.options.references != RANDOM_REFS:
            return list(cls.scans)

        # One seeded order of the dataset's scans per repeat, shared by its classes, so
        # organs labelled in every scan share references (and leave more queries).
        def rank(scan: str) -> int:
            return zlib.crc32(f"{self.options.seed}\0{repeat}\0{cls.dataset}\0{scan}".encode())

        return sorted(cls.scans, key=lambda s: (rank(s), s))

    def pool(self, cls: StructureClass, repeat: int = 0) -> list[str]:
        """The references of the largest requested k this class supports.

        From its holders a class can serve k shots when another holder is left as a query
        (k < holders); scans named in a references file are never queries, so there any
        k up to the named count. A k too large for a class takes no scan from its queries.
        """
        cand = self.candidates(cls, repeat)
        fits = [k for k in self.options.shots if (k <= len(cand) if self.named else k < len(cand))]
        return cand[: max(fits, default=0)]

    def choose(self, cls: StructureClass, k: int, repeat: int = 0) -> list[str] | str:
        """The k references (a prefix of the pool), or the reason there are not enough."""
        pool = self.pool(cls, repeat)
        if len(pool) < k:
            if self.named is not None:
                n = len(self.candidates(cls, repeat))
                return (
                    f"{n} scan(s) of dataset {cls.dataset!r} holding it are named in the "
                    f"references file; {k} shot(s) need {k} references"
                )
            return (
                f"{len(cls.scans)} scan(s) of dataset {cls.dataset!r} hold it; {k} shot(s) "
                f"need {k} references and one more holder to be the query"
            )
        return pool[:k]

    def split(
        self,
        dataset: str,
        classes: list[StructureClass],
        scans: list[LabelledScan],
        repeat: int = 0,
    ) -> DatasetSplit:
        """References per class; queries = the other scans, never of a reference's subject."""
        references = {c.value: self.pool(c, repeat) for c in classes}
        refs = set().union(*references.values(), self.named_scans(dataset))
        subject = {s.scan_id: s.subject for s in scans}
        ref_subjects = {subject[r]: r for r in sorted(refs) if r in subject}
        queries, excluded = [], {}
        for s in scans:
            if s.scan_id in refs:
                excluded[s.scan_id] = "reference"
            elif s.subject in ref_subjects:
                excluded[s.scan_id] = f"same subject as reference {ref_subjects[s.subject]}"
            else:
                queries.append(s.scan_id)
        return DatasetSplit(dataset, repeat, references, queries, excluded)


@dataclass
class QueryJob:
    """One query segmented for the task list of its dataset at (k, repeat)."""

    query: LabelledScan
    shots: int
    repeat: int
    tasks: list[tuple[StructureClass, list[str]]]


@dataclass
class JobPlan:
    """The splits, one job per (query, k, repeat), what is not scored and why."""

    splits: list[DatasetSplit] = field(default_factory=list)
    jobs: list[QueryJob] = field(default_factory=list)
    not_scored: list[dict[str, Any]] = field(default_factory=list)
    scorable: dict[int, set[tuple[str, int]]] = field(default_factory=dict)  # k -> class idents


NO_QUERY_HOLDS_IT = (
    "no query holds it: every scan labelled with it is a reference (its false positives on "
    "the queries are still scored)"
)


def plan_jobs(
    classes: list[StructureClass],
    skipped: list[dict[str, Any]],
    scans: list[LabelledScan],
    options: InContextOptions,
) -> JobPlan:
    """Split every dataset (per repeat) and list the jobs; ``skipped`` classes are not scored."""
    plan = ReferencePlan(options)
    out = JobPlan(
        not_scored=[{**s, "shots": None} for s in skipped],
        scorable={k: set() for k in options.shots},
    )
    by_id = {s.scan_id: s for s in scans}
    by_dataset: dict[str, list[StructureClass]] = defaultdict(list)
    for c in classes:
        by_dataset[c.dataset].append(c)
    for dataset, dclasses in sorted(by_dataset.items()):
        dscans = [s for s in scans if s.dataset == dataset]
        for rep in range(plan.repeats):
            split = plan.split(dataset, dclasses, dscans, rep)
            out.splits.append(split)
            if not split.queries:
                out.not_scored.append(
                    {
                        "dataset": dataset,
                        "class": None,
                        "repeat": rep,
                        "reason": f"all {len(dscans)} labelled scans of dataset {dataset!r} "
                        "are references (or of a reference's subject) for up to "
                        f"{options.max_shots} shot(s): no query is left",
                    }
                )
            for k in options.shots:
                tasks = _tasks(plan, split, dclasses, k, out)
                if tasks:
                    out.jobs += [QueryJob(by_id[q], k, rep, tasks) for q in split.queries]
    return out


def _tasks(
    plan: ReferencePlan, split: DatasetSplit, classes: list[StructureClass], k: int, out: JobPlan
) -> list[tuple[StructureClass, list[str]]]:
    """(class, k references) of one dataset's split; notes in ``out`` what cannot be scored."""
    tasks = []
    queries = set(split.queries)
    first = split.repeat == 0
    for c in classes:
        refs = plan.choose(c, k, split.repeat)
        if isinstance(refs, str):
            if first:
                out.not_scored.append(
                    {"dataset": split.dataset, "class": c.name, "shots": k, "reason": refs}
                )
            continue
        tasks.append((c, refs))
        if set(c.scans) & queries:
            out.scorable[k].add(c.ident)
        elif first and split.queries:
            out.not_scored.append(
                {"dataset": split.dataset, "class": c.name, "shots": k, "reason": NO_QUERY_HOLDS_IT}
            )
    return tasks


def common_classes(
    jobs: JobPlan, classes: list[StructureClass], shots: tuple[int, ...]
) -> tuple[set[tuple[str, int]], dict[int, list[str]]]:
    """The classes scorable at every k, and per k those left out of its means.

    Fails when some k can score no class, or no class is scorable at every k.
    """
    unsupported = [k for k in shots if not jobs.scorable[k]]
    if unsupported:
        why = "; ".join(
            dict.fromkeys(
                n["reason"] if n["class"] is None else f"{n['dataset']}/{n['class']}: {n['reason']}"
                for n in jobs.not_scored
                if n.get("shots") in unsupported or n["class"] is None
            )
        )
        raise EvaluationError(
            f"no structure class can be scored with {unsupported} shot(s) (k references and "
            f"a query holding the class): {why[:600] or 'no class'}; lower --shots or add "
            "labelled scans"
        )
    common = set.intersection(*jobs.scorable.values())
    if not common:
        raise EvaluationError(
            f"no structure class is scorable at every requested k {list(shots)}; "
            "evaluate the shot counts separately"
        )
    names = {c.ident: c.name for c in classes}
    dropped = {
        k: sorted(f"{d}/{names.get((d, v), str(v))}" for d, v in jobs.scorable[k] - common)
        for k in shots
    }
    return common, dropped
