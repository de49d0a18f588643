"""DPC-kNN core: equals a dense transcription of the reference, exactly, also when computed in blocks."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokcompress.cluster as cluster
from tokcompress.cluster import cluster_sums, dpc_knn, nearest_center

_spec = importlib.util.spec_from_file_location("reference_impls", Path(__file__).parents[1] / "benchmarks" / "reference_impls.py")
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)


def _dense_score(x: torch.Tensor, k: int) -> torch.Tensor:
    """Textbook DPC-kNN score with exact (difference-based) distances, for (M, C) input."""
    d = (x[:, None, :] - x[None, :, :]).pow(2).sum(-1).sqrt() / x.shape[1] ** 0.5
    density = (-(d.sort(dim=1).values[:, :k] ** 2).mean(1)).exp()
    parent = torch.empty_like(density)
    for i in range(x.shape[0]):
        denser = density > density[i]
        parent[i] = d[i, denser].min() if denser.any() else d.max()
    return parent * density


@pytest.mark.parametrize("shape,k,num", [((1, 64, 16), 7, 16), ((3, 40, 24), 4, 5), ((2, 30, 8), 3, 30), ((1, 1, 4), 1, 1)])
def test_matches_reference_transcription(shape, k, num):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    want, _ = ref.reference_dpc_knn(x, k, num)
    got = dpc_knn(x, k, num)
    assert torch.equal(got.index, want)
    assert torch.equal(dpc_knn(x, k, num, max_block=37).index, want)  # blocks of one row
    assert torch.equal(got.centers, want.sort(dim=-1).values)


def test_score_matches_textbook_formula():
    x = torch.randn(50, 12, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(dpc_knn(x, 5, 3).score, _dense_score(x, 5), atol=1e-5, rtol=1e-5)


@settings(max_examples=30, deadline=None)
@given(
    m=st.integers(1, 40),
    c=st.integers(1, 12),
    k=st.integers(1, 8),
    frac=st.floats(0, 1),
    block=st.integers(40, 2000),
    seed=st.integers(0, 10_000),
)
def test_blocked_agrees_with_dense(m, c, k, frac, block, seed):
    x = torch.randn(2, m, c, generator=torch.Generator().manual_seed(seed))
    k = min(k, m)
    num = round(frac * m)
    dense = dpc_knn(x, k, num)
    blocked = dpc_knn(x, k, num, max_block=block)
    assert torch.equal(dense.index, blocked.index)
    torch.testing.assert_close(dense.score, blocked.score, atol=1e-6, rtol=1e-6)
    # centres: distinct, highest score first, ties by lower index
    idx = dense.index
    assert all(len(set(row.tolist())) == num for row in idx)
    s = dense.score.gather(1, idx)
    assert bool((s[:, 1:] <= s[:, :-1]).all())
    assert torch.isfinite(dense.score).all()


def test_k1_makes_every_token_a_peak():
    # k = 1 counts only the self-distance (exactly 0 here; torch.cdist round-off in the reference):
    # every density is 1, no token is denser than another, all scores tie -> index order.
    x = torch.randn(30, 8)
    assert torch.equal(dpc_knn(x, 1, 30).index, torch.arange(30))


def test_ties_go_to_the_lower_index():
    x = torch.tensor([[0.0, 0.0], [5.0, 5.0], [0.0, 0.0], [5.0, 5.0], [9.0, 0.0]])
    res = dpc_knn(x, 2, 2)
    # the two duplicate pairs are mutual nearest neighbours with equal densities and scores
    assert res.index.tolist() == [0, 1]
    assert dpc_knn(x.flip(0), 2, 2).index.tolist() == [1, 2]  # the isolated point is now index 0


def test_large_input_never_builds_the_full_matrix(monkeypatch):
    m = 3000
    x = torch.randn(m, 6, generator=torch.Generator().manual_seed(0))
    largest = []
    original = cluster.scaled_cdist

    def spy(a, b):
        out = original(a, b)
        largest.append(out.numel())
        return out

    monkeypatch.setattr(cluster, "scaled_cdist", spy)
    blocked = dpc_knn(x, 7, 30, max_block=1 << 18)
    assert max(largest) <= 1 << 18 and blocked.dist is None
    monkeypatch.undo()
    assert torch.equal(blocked.index, dpc_knn(x, 7, 30).index)


def test_nearest_center_equals_brute_force():
    x = torch.randn(2, 40, 5, generator=torch.Generator().manual_seed(3))
    centers = torch.tensor([[1, 7, 30], [0, 2, 39]])
    d = torch.cdist(x, x.gather(1, centers[:, :, None].expand(-1, -1, 5)))
    want = d.argmin(-1)
    assert torch.equal(nearest_center(x, centers), want)
    assert torch.equal(nearest_center(x, centers, max_block=7), want)
    res = dpc_knn(x, 4, 3)
    assert torch.equal(nearest_center(x, res.centers, res.dist), nearest_center(x, res.centers))


def test_cluster_sums_equal_a_loop():
    x = torch.randn(3, 20, 4)
    labels = torch.randint(0, 5, (3, 20))
    weight = torch.rand(3, 20) > 0.3
    sums, counts = cluster_sums(x, labels, 5, weight)
    for b in range(3):
        for j in range(5):
            sel = (labels[b] == j) & weight[b]
            torch.testing.assert_close(sums[b, j], x[b, sel].sum(0), atol=1e-6, rtol=0)
            assert counts[b, j] == sel.sum()


def test_bad_arguments_raise_clear_errors():
    x = torch.randn(10, 3)
    with pytest.raises(ValueError, match="k must be an int in \\[1, M=10\\]"):
        dpc_knn(x, 0, 2)
    with pytest.raises(ValueError, match="cluster_num must be an int in \\[0, M=10\\]"):
        dpc_knn(x, 3, 11)
    with pytest.raises(ValueError, match="shape \\(M, C\\) or \\(B, M, C\\)"):
        dpc_knn(torch.randn(10), 3, 2)
    assert dpc_knn(x, 3, 0).index.shape == (0,)


def test_squared_norms_blocked_is_bitwise_the_full_product():
    # Large enough for the blocked path (full, row-block view of a batch, and a 2-D strided slice).
    from tokcompress.cluster import NORM_BLOCK, squared_norms

    x = torch.randn(3, 4 * NORM_BLOCK // 1000 + 5, 1003, generator=torch.Generator().manual_seed(3)).double()
    for view in (x, x[:, 7:], x[0, :, 1:]):
        assert view.numel() > 4 * NORM_BLOCK or view.dim() == 2
        assert torch.equal(squared_norms(view), (view * view).sum(-1))


def test_take_rows_is_the_expanded_gather():
    from tokcompress.cluster import take_rows

    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 11, 5, generator=g)
    index = torch.randint(0, 11, (3, 4), generator=g)
    assert torch.equal(take_rows(x, index), x.gather(1, index[:, :, None].expand(-1, -1, 5)))
