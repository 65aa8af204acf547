"""The compiled merge loop builds the same tree as a plain Python heap loop."""

import heapq

import numpy as np
import pytest

from maskbank.pipeline.proposals.hierarchy import agglomerate, build_rag
from maskbank.pipeline.proposals.supervoxels import gradient_magnitude, supervoxels


def _reference(data, si, sg, wb, se, ws, sx):
    """Greedy agglomeration written plainly (dicts, heapq): the oracle."""
    n = int(data.num_nodes)
    counts = data.counts.numpy().astype(np.float64).tolist()
    sums = data.sums.numpy().astype(np.float64).tolist()
    cents = data.x.numpy()[:, 3:6].astype(np.float64) * np.asarray(data.spacing)
    csum = (cents * np.asarray(counts)[:, None]).tolist()
    ei, attr = data.edge_index.numpy(), data.edge_attr.numpy().astype(np.float64)
    half = ei.shape[1] // 2
    nbrs = [dict() for _ in range(n)]
    for (a, b), (_, f, g) in zip(ei[:, :half].T.tolist(), attr[:half].tolist(), strict=True):
        nbrs[a][b] = nbrs[b][a] = (f, g)
    ref = float(np.median(counts))

    def cost(a, b, fg):
        na, nb = counts[a], counts[b]
        d = abs(sums[a] / na - sums[b] / nb) / si + wb * (fg[1] / fg[0]) / sg
        dx = [csum[a][i] / na - csum[b][i] / nb for i in range(3)]
        d += ws * sum(v * v for v in dx) ** 0.5 / sx
        return d * ((na * nb / (na + nb)) / ref) ** se

    heap = [(cost(a, b, fg), a, b) for a in range(n) for b, fg in nbrs[a].items() if a < b]
    heapq.heapify(heap)
    alive, out = [True] * n, []
    while heap:
        c, a, b = heapq.heappop(heap)
        if not (alive[a] and alive[b]) or b not in nbrs[a]:
            continue
        new = len(counts)
        out.append((a, b, c))
        alive[a] = alive[b] = False
        alive.append(True)
        counts.append(counts[a] + counts[b])
        sums.append(sums[a] + sums[b])
        csum.append([csum[a][i] + csum[b][i] for i in range(3)])
        merged = {}
        for old in (a, b):
            for k, fg in nbrs[old].items():
                if k not in (a, b):
                    acc = merged.get(k, (0.0, 0.0))
                    merged[k] = (acc[0] + fg[0], acc[1] + fg[1])
                    del nbrs[k][old]
            nbrs[old] = {}
        nbrs.append(merged)
        for k, fg in merged.items():
            nbrs[k][new] = fg
            heapq.heappush(heap, (cost(k, new, fg), k, new))
    return out


@pytest.mark.parametrize("spatial_weight", [0.0, 10.0])
def test_compiled_merge_tree_equals_the_python_loop(spatial_weight):
    rng = np.random.default_rng(3)
    image = rng.normal(size=(40, 36, 30)).astype(np.float32)
    image[10:30, 8:28, 5:25] += 3.0  # a region the merges should keep apart late
    body = np.ones(image.shape, bool)
    body[:, :, 12] = False  # two components: a forest, not one tree
    spacing = (1.5, 1.5, 2.0)
    grad = gradient_magnitude(image, spacing)
    labels, k = supervoxels(image, body, spacing, 300, 0.3, grad)
    data, _ = build_rag(labels, image, grad, spacing)
    args = (1.3, 0.7, 1.0, 1.0, spatial_weight, 2.5)
    tree = agglomerate(data, *args)
    want = _reference(data, *args)
    assert len(tree.children) == len(want) == k - 2  # k leaves, two roots
    np.testing.assert_array_equal(tree.children, np.array([(a, b) for a, b, _ in want]))
    np.testing.assert_allclose(tree.cost, [c for _, _, c in want], rtol=1e-12)
