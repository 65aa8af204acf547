"""Queries spread over Dask: a local cluster of worker processes, or an existing one.

Workers get paths, not live objects: the checkpoint and a task file. Each worker
process loads the network and the tasks once and keeps them for every query it is
given (`_loaded`), so a cohort costs one load per worker, not per query. Outputs are
written by the workers into the run's folder, which they must see (a shared file
system on a cluster).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .result import SegmentResult

if TYPE_CHECKING:
    from maskbank.train.segment.inference import Segmenter

    from .run import SegmentRun

_CACHE: dict[tuple, tuple[Segmenter, str | None]] = {}


def _loaded(
    checkpoint: str, task_file: str, options: dict[str, Any]
) -> tuple[Segmenter, str | None]:
    from maskbank.train.segment.inference import Segmenter
    from maskbank.train.segment.tasks import load_tasks

    from . import network as networks

    key = (checkpoint, task_file, tuple(sorted((k, str(v)) for k, v in options.items())))
    if key not in _CACHE:
        net = networks.load(checkpoint)
        tasks = load_tasks(task_file, net.sha256)
        _CACHE.clear()  # one run per worker at a time: keep one network in memory
        _CACHE[key] = (
            Segmenter(
                net.model, tasks, net.crop, net.max_group, options["device"],
                options["window_batch"], options["overlap"],
                zoom_refine=options.get("zoom_refine", True),
            ),
            net.sha256,
        )  # fmt: skip
    return _CACHE[key]


def segment_remote(
    checkpoint: str,
    task_file: str,
    query: dict[str, Any],
    options: dict[str, Any],
    spacing: list[float],
    out: str,
    task_sha256: str,
    provenance: dict[str, Any],
    thresholds: list[float] | None = None,
) -> dict[str, Any]:
    """One query on a worker (plain arguments in and out)."""
    from maskbank.flows.inputs import ScanInput

    from .run import SegmentOptions, segment_query, set_threads

    set_threads(options.get("threads"))
    opts = SegmentOptions(**{**options, "spacing": tuple(options["spacing"] or spacing)})
    try:
        segmenter, sha = _loaded(checkpoint, task_file, options)
    except Exception as exc:  # noqa: BLE001 - the query fails with the reason, not the run
        return SegmentResult(query["scan_id"], query["image"], "failed", f"worker: {exc}").to_dict()
    result = segment_query(
        ScanInput.from_dict(query), segmenter, tuple(spacing), opts, out, sha, task_sha256,
        provenance, thresholds,
    )  # fmt: skip
    return result.to_dict()


def segment_on_dask(
    run: SegmentRun, task_file: str, workers: int, address: str | None
) -> Iterator[SegmentResult]:
    """Submit every query; yield results as they complete."""
    from dask.distributed import Client, LocalCluster, as_completed

    options = run.options.to_dict()
    if options.get("threads") is None and not address:
        options["threads"] = max(1, (os.cpu_count() or 1) // max(1, workers))
    cluster = None
    if address:
        client = Client(address)
    else:
        cluster = LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
        )
        client = Client(cluster)
    try:
        futures = [
            client.submit(
                segment_remote,
                os.path.abspath(run.checkpoint),
                os.path.abspath(task_file),
                q.to_dict(),
                options,
                list(run.spacing),
                os.path.abspath(run.out),
                run.task_sha256,
                run.provenance(),
                run.thresholds,
                key=f"segment-{q.scan_id}",
                pure=False,
            )
            for q in run.queries
        ]
        for future in as_completed(futures):
            try:
                yield SegmentResult.from_dict(future.result())
            except Exception as exc:  # noqa: BLE001 - a worker died: name the query
                scan_id = str(future.key).removeprefix("segment-")
                source = next((q.image for q in run.queries if q.scan_id == scan_id), scan_id)
                yield SegmentResult(scan_id, source, "failed", f"worker failed: {exc}")
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
