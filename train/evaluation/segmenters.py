"""What the in-context loop runs: a ``Segmenter`` (a loaded network, or a baseline).

``InContextEvaluator`` makes a loaded network one: each reference's crop (the network's
training crop, centred on the class) and mask give a task embedding, several references
are averaged, and the whole query is segmented by sliding windows in fixed task groups
(the K the network was trained with), with an all-ones global task averaged over every
reference of the task list. The registration baseline (``registration.py``) is another.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch

from maskbank.train.incontext_net import TaskEmbedding

from .checkpoint import LoadedNetwork
from .errors import EvaluationError
from .sliding import iter_sliding_probabilities, task_groups, window_count
from .structures import LabelledScan, StructureClass, median_foreground
from .zoom import reference_crop, reference_scale, zoomed_probabilities

if TYPE_CHECKING:
    from .incontext import InContextOptions


@runtime_checkable
class Segmenter(Protocol):
    """What the evaluation loop runs: a network (``InContextEvaluator``) or a baseline."""

    label: str
    crop: int | None

    def segment(
        self, query: LabelledScan, tasks: list[tuple[StructureClass, list[LabelledScan]]]
    ) -> Iterator[tuple[list[int], np.ndarray]]:
        """Yield (task indices, float32 probabilities (len(ids), *query.image.shape))."""
        ...


class InContextEvaluator:
    """A loaded network as a ``Segmenter``: task embeddings from references, then windows.

    With ``options.reference_zoom`` (``zoom.py``) each class is seen at the scale its
    references choose: classes of one scale share the passes over the query averaged down
    to that scale, and their probabilities come back on the query's grid.
    """

    def __init__(self, net: LoadedNetwork, options: InContextOptions) -> None:
        self.net = net
        self.label = net.label
        self.crop: int | None = net.crop
        self.options = options
        self.device = torch.device(options.device)
        self.model = net.model.to(self.device).eval()
        self.max_group = net.task_group
        self._tasks: dict[tuple[str, int, float], TaskEmbedding] = {}
        self._scales: dict[tuple[str, int], float] = {}
        self.scales: dict[str, float] = {}  # class key -> the scale it was evaluated at
        self.windows = 0  # windows run over the last query (every pass, every scale)

    def reference_scale(self, scan: LabelledScan, value: int) -> float:
        """The scale one reference of a class asks for (1 without a reference zoom)."""
        key = (scan.scan_id, value)
        if key not in self._scales:
            self._scales[key] = reference_scale(
                scan.mask(value), self.net.crop, self.options.reference_zoom, self.options.max_zoom
            )
        return self._scales[key]

    @torch.no_grad()
    def reference_tasks(self, scan: LabelledScan, value: int, scale: float = 1.0) -> TaskEmbedding:
        """(class, global) embedding of one reference: the crop centred on the class."""
        key = (scan.scan_id, value, scale)
        if key not in self._tasks:
            size = self.net.crop
            mask = scan.mask(value)
            centre = median_foreground(mask)
            image, crop_mask = reference_crop(scan.image, mask, centre, size, scale)
            masks = np.stack([crop_mask, np.ones((size,) * 3, np.float32)])
            img_t = torch.from_numpy(image)[None, None].to(self.device)
            mask_t = torch.from_numpy(masks)[None].float().to(self.device)
            self._tasks[key] = self.model.encode_tasks(img_t, mask_t)
        return self._tasks[key]

    def segment(
        self, query: LabelledScan, tasks: list[tuple[StructureClass, list[LabelledScan]]]
    ) -> Iterator[tuple[list[int], np.ndarray]]:
        """Probabilities of the given classes, one fixed task group at a time.

        A class's scale is the largest its references ask for. Per scale, in increasing
        order, its classes run in fixed groups over the query at that scale; the global
        task is the mean over every reference of every task given, encoded at that scale,
        so for one task list it is the same whatever the query.
        """
        scales = [max(self.reference_scale(r, c.value) for r in refs) for c, refs in tasks]
        for (cls, _), s in zip(tasks, scales, strict=True):
            self.scales[cls.key] = s
        self.windows = 0

        def run(image: np.ndarray, ids: list[int], scale: float):
            return self._pass(image, tasks, ids, scale)

        yield from zoomed_probabilities(
            query.image, scales, run, self.net.crop, self.options.zoom_refine
        )

    def _pass(
        self,
        image: np.ndarray,
        tasks: list[tuple[StructureClass, list[LabelledScan]]],
        ids: list[int],
        scale: float,
    ) -> Iterator[tuple[list[int], np.ndarray]]:
        """Tasks ``ids`` (indices into ``tasks``) over ``image``, the query seen at ``scale``."""
        per_class, globals_ = [], []
        with torch.no_grad():
            for i, (cls, refs) in enumerate(tasks):
                shots = TaskEmbedding.cat_batch(
                    [self.reference_tasks(r, cls.value, scale) for r in refs]
                )
                if i in ids:
                    per_class.append(shots.select([0]).mean())
                globals_.append(shots.select([1]))
            classes = TaskEmbedding.cat(per_class)
            global_task = TaskEmbedding.cat_batch(globals_).mean()
        groups = task_groups(len(ids), image.size, self.max_group, self.options.max_output_bytes)
        self.windows += window_count(image.shape, self.net.crop, self.options.overlap) * len(groups)

        def predict(x: torch.Tensor, local: list[int]) -> torch.Tensor:
            group = TaskEmbedding.cat([classes.select(local), global_task])
            return self.model.segment(x, group)[:, : len(local)]

        return iter_sliding_probabilities(
            predict,
            image,
            groups,
            self.net.crop,
            overlap=self.options.overlap,
            window_batch=self.options.window_batch,
            device=self.device,
        )


def refuse_untrained_incontext(net: LoadedNetwork) -> None:
    """A checkpoint of another pretext has a trained encoder only: in-context it is the floor."""
    if net.sha256 is not None and net.pretext != "incontext":
        raise EvaluationError(
            f"{net.source} was pretrained with pretext {net.pretext!r}: only its encoder is "
            "trained, the task encoder and decoder are the untrained ones of "
            "`--checkpoint random`, so its in-context numbers would be the floor's. Compare "
            "pretexts with `maskbank evaluate finetune` or `maskbank evaluate probe`"
        )


def pretraining_overlap(
    networks: Sequence[Any], scans: Sequence[LabelledScan]
) -> tuple[list[str], dict[str, Any]]:
    """Scans of ``scans`` a network was pretrained on (by scan id or source content hash).

    Returns the sorted overlapping scan ids (all networks) and per network the ids, or
    "not recorded" for a checkpoint that does not list its pretraining scans. The
    evaluation passes its queries: a reference seen in pretraining is no leak (its label
    is given to the network anyway), a query seen in pretraining is.
    """
    detail: dict[str, Any] = {}
    overlap: set[str] = set()
    for net in networks:
        if not isinstance(net, LoadedNetwork) or net.sha256 is None:
            continue  # the untrained floor and baselines saw no scan
        record = net.pretraining_scans
        if record is None:
            detail[net.label] = "not recorded"
            continue
        ids = {str(r.get("scan_id")) for r in record}
        hashes = {str(r.get("source_sha256")) for r in record if r.get("source_sha256")}
        hits = sorted(
            s.scan_id
            for s in scans
            if s.scan_id in ids or str(s.scan.attrs.get("source_sha256")) in hashes
        )
        detail[net.label] = hits
        overlap.update(hits)
    return sorted(overlap), detail
