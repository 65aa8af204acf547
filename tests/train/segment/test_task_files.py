"""Task files and saved fine-tuned networks: round trips, and refusals that name the problem."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from maskbank.train.incontext_net import TaskEmbedding, build_model
from maskbank.train.segment.inference import Segmenter
from maskbank.train.segment.references import Reference, encode_references
from maskbank.train.segment.saved_model import (
    SavedModelError,
    is_saved_model,
    load_finetuned,
    save_finetuned,
)
from maskbank.train.segment.tasks import TaskFileError, TaskSet, load_tasks, save_tasks


def _embedding(k: int, seed: int = 0) -> TaskEmbedding:
    g = torch.Generator().manual_seed(seed)
    return TaskEmbedding(
        {2: torch.randn(1, k, 5, 32, generator=g), 3: torch.randn(1, k, 5, 32, generator=g)},
        torch.randn(1, k, 8, generator=g),
    )


def _tasks(values=(3, 4), sha="a" * 64) -> TaskSet:
    return TaskSet(
        _embedding(len(values)),
        _embedding(1, seed=1),
        list(values),
        [f"organ {v}" for v in values],
        sha,
        (1.5, 1.5, 2.0),
        "ct",
        [{"id": "ref0", "source_sha256": "f" * 64}],
    )


def test_task_file_round_trip_keeps_embeddings_and_metadata(tmp_path):
    tasks = _tasks()
    path = save_tasks(tasks, tmp_path / "t.safetensors")
    back = load_tasks(path, "a" * 64)
    for lv in (2, 3):
        torch.testing.assert_close(back.classes.tokens[lv], tasks.classes.tokens[lv])
    torch.testing.assert_close(back.global_task.fg0, tasks.global_task.fg0)
    assert back.values == [3, 4] and back.names == ["organ 3", "organ 4"]
    assert back.spacing == (1.5, 1.5, 2.0) and back.modality == "ct"
    assert back.references == tasks.references and back.digest() == tasks.digest()
    assert _tasks(values=(3, 5)).digest() != tasks.digest()
    assert not list(tmp_path.glob(".*"))  # written through a temporary, renamed


def test_task_file_of_another_network_or_format_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = save_tasks(_tasks(), tmp_path / "t.safetensors")
    with pytest.raises(TaskFileError, match="made by another network"):
        load_tasks(path, "b" * 64)
    plain = tmp_path / "weights.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(TaskFileError, match="not a maskbank task file"):
        load_tasks(plain)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(TaskFileError, match="not a task file"):
        load_tasks(junk)


def test_references_fuse_shots_by_averaging_embeddings():
    torch.manual_seed(0)
    model = build_model("tiny").eval()
    rng = np.random.default_rng(0)
    refs = []
    for i in range(2):
        label = np.zeros((40, 40, 40), np.uint8)
        label[10 + i : 20 + i, 12:22, 8:30] = 1
        label[25:35, 20:30, 10 : 20 + i] = 2
        refs.append(Reference(f"r{i}", rng.normal(size=label.shape).astype(np.float32), label))
    both = encode_references(model, 32, refs, [1, 2], ["a", "b"], network_sha256="x")
    one = [encode_references(model, 32, [r], [1, 2], ["a", "b"]) for r in refs]
    mean = (one[0].classes.fg0 + one[1].classes.fg0) / 2
    torch.testing.assert_close(both.classes.fg0, mean)
    assert both.classes.n_tasks == 2 and both.network_sha256 == "x"
    with pytest.raises(ValueError, match="label value 7 is in none"):
        encode_references(model, 32, refs, [7], ["c"])


def test_saved_finetuned_network_gives_the_same_logits(tmp_path):
    torch.manual_seed(0)
    net = build_model("tiny").eval()
    tasks = TaskEmbedding.cat([_embedding(2), _embedding(1, seed=1)])  # 2 classes + global
    out = save_finetuned(
        tmp_path / "model", net, tasks, [1, 6], ["liver", "lesion"], preset="tiny", crop=32,
        spacing=(1.5, 1.5, 1.5), modality="ct",
    )  # fmt: skip
    assert is_saved_model(out) and not is_saved_model(tmp_path)
    saved = load_finetuned(out)
    assert saved.tasks.together and saved.tasks.values == [1, 6] and saved.crop == 32
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        want = net.segment(x, tasks)[:, :2]
        got = next(iter(Segmenter(saved.model, saved.tasks, 32, 13).probabilities(x[0, 0].numpy())))
    assert got[0] == [0, 1]  # both classes in one pass, as they were trained
    np.testing.assert_allclose(got[1], torch.sigmoid(want)[0].numpy(), atol=1e-5)
    config = json.loads((out / "model.json").read_text())
    config["format"] = "something-else"
    (out / "model.json").write_text(json.dumps(config))
    with pytest.raises(SavedModelError, match="not a 'maskbank-finetuned'"):
        load_finetuned(out)
