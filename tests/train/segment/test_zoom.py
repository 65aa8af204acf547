"""Scale-normalised segmentation: a large structure is zoomed, ``off`` is the plain path."""

from __future__ import annotations

import numpy as np
import torch

from maskbank.train.evaluation.sliding import iter_sliding_probabilities, task_groups
from maskbank.train.evaluation.structures import centred_crop, median_foreground
from maskbank.train.incontext_net import TaskEmbedding, build_model
from maskbank.train.segment.inference import Segmenter
from maskbank.train.segment.references import Reference, encode_references
from maskbank.train.segment.tasks import load_tasks, save_tasks

CROP = 32


def _setup():
    torch.manual_seed(0)
    model = build_model("tiny").eval()
    rng = np.random.default_rng(0)
    image = rng.normal(size=(64, 64, 64)).astype(np.float32)
    label = np.zeros(image.shape, np.uint8)
    label[10:50, 12:48, 16:46] = 1  # 40 voxels long, 30 thin: framed at scale 3
    label[54:60, 54:60, 54:60] = 2  # small: scale 1
    image[label == 1] += 2.0
    ref = Reference("ref", image, label)
    query = rng.normal(size=(50, 60, 40)).astype(np.float32)
    return model, ref, query


def _old_encode(model, ref, values):
    """The task embeddings as made before the reference zoom (plain centred crops)."""
    per_class, globals_ = [], []
    with torch.no_grad():
        for value in values:
            mask = ref.label == value
            centre = median_foreground(mask)
            image = centred_crop(ref.image, centre, CROP, float(ref.image.min()))
            masks = np.stack([centred_crop(mask, centre, CROP, False), np.ones((CROP,) * 3, bool)])
            shots = model.encode_tasks(
                torch.from_numpy(image)[None, None], torch.from_numpy(masks)[None].float()
            )
            per_class.append(shots.select([0]).mean())
            globals_.append(shots.select([1]))
    return TaskEmbedding.cat(per_class), TaskEmbedding.cat_batch(globals_).mean()


def test_a_large_reference_structure_is_zoomed_and_comes_back_on_the_query_grid(tmp_path):
    model, ref, query = _setup()
    tasks = encode_references(model, CROP, [ref], [1, 2], ["big", "small"])
    assert tasks.scales == [3.0, 1.0]
    assert sorted(tasks.zoomed) == [2.0, 3.0]  # the coarse scale and the step it is refined at
    assert tasks.zoom == {"reference_zoom": "fit", "max_zoom": 4.0}
    seen = {}
    for ids, probs in Segmenter(model, tasks, CROP, 13).probabilities(query):
        assert probs.shape == (len(ids), *query.shape) and probs.dtype == np.float32
        seen.update({i: p for i, p in zip(ids, probs, strict=True)})
    assert sorted(seen) == [0, 1]
    assert all(p.min() >= 0.0 and p.max() <= 1.0 for p in seen.values())
    capped = encode_references(model, CROP, [ref], [1, 2], ["big", "small"], max_zoom=2.0)
    assert capped.scales == [2.0, 1.0] and sorted(capped.zoomed) == [1.5, 2.0]

    back = load_tasks(save_tasks(tasks, tmp_path / "t.safetensors"))
    assert back.scales == tasks.scales and back.zoom == tasks.zoom
    assert sorted(back.zoomed) == [2.0, 3.0] and back.digest() == tasks.digest()
    torch.testing.assert_close(back.at(3.0)[0].fg0, tasks.at(3.0)[0].fg0)
    one = back.select([0])
    assert one.scales == [3.0] and one.at(2.0)[0].n_tasks == 1


def test_off_reproduces_the_unzoomed_embeddings_and_probabilities_exactly():
    model, ref, query = _setup()
    off = encode_references(model, CROP, [ref], [1, 2], ["big", "small"], reference_zoom="off")
    fit = encode_references(model, CROP, [ref], [1, 2], ["big", "small"])
    assert off.scales is None and off.zoomed == {} and off.metadata()["version"] == 1
    assert fit.unzoomed().digest() == off.digest() != fit.digest()
    classes, global_task = _old_encode(model, ref, [1, 2])
    for lv, tokens in classes.tokens.items():
        assert torch.equal(off.classes.tokens[lv], tokens)
    assert torch.equal(off.global_task.fg0, global_task.fg0)

    def predict(x, ids):
        group = TaskEmbedding.cat([classes.select(ids), global_task])
        return model.segment(x, group)[:, : len(ids)]

    groups = task_groups(2, query.size, 13, 1 << 30)
    before = list(iter_sliding_probabilities(predict, query, groups, CROP, window_batch=4))
    for refine in (True, False):
        segmenter = Segmenter(model, off, CROP, 13, window_batch=4, zoom_refine=refine)
        now = list(segmenter.probabilities(query))
        assert [ids for ids, _ in now] == [ids for ids, _ in before] == [[0, 1]]
        np.testing.assert_array_equal(now[0][1], before[0][1])
