"""CMC/mAP, distances and single-shot sampling in rain_model.metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rain_model.metrics import (
    evaluate_rank,
    mean_std,
    pairwise_distance,
    single_shot_gallery,
)


def reference_eval(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=20):
    """Per-query loop in the style of the common re-ID toolkits' eval_market1501.

    Differences from those toolkits, both documented in rain_model.metrics: the argsort is stable (ties
    by gallery index) and a curve shorter than max_rank is padded with its last value.
    """
    num_q = distmat.shape[0]
    all_cmc, all_ap = [], []
    for q_idx in range(num_q):
        order = np.argsort(distmat[q_idx], kind="stable")
        remove = (g_pids[order] == q_pids[q_idx]) & (g_camids[order] == q_camids[q_idx])
        keep = np.invert(remove)
        raw_cmc = (g_pids[order] == q_pids[q_idx]).astype(np.int32)[keep]
        if not np.any(raw_cmc):
            continue
        cmc = raw_cmc.cumsum()
        cmc[cmc > 1] = 1
        cmc = cmc[:max_rank]
        if cmc.shape[0] < max_rank:
            cmc = np.concatenate([cmc, np.full(max_rank - cmc.shape[0], cmc[-1])])
        all_cmc.append(cmc)
        num_rel = raw_cmc.sum()
        tmp_cmc = raw_cmc.cumsum()
        tmp_cmc = [x / (i + 1.0) for i, x in enumerate(tmp_cmc)]
        tmp_cmc = np.asarray(tmp_cmc) * raw_cmc
        all_ap.append(tmp_cmc.sum() / num_rel)
    assert all_cmc, "reference: no valid query"
    return np.asarray(all_cmc, dtype=np.float64).mean(axis=0), float(np.mean(all_ap))


def ids(*values):
    return np.asarray(values)


# --- hand-built matrices -------------------------------------------------------------------------


def test_known_cmc_and_map():
    # one query (person 1, camera 0); matches at ranks 2 and 4
    dist = np.array([[0.1, 0.2, 0.3, 0.4]])
    cmc, m_ap = evaluate_rank(dist, ids(1), ids(2, 1, 3, 1), ids(0), ids(1, 1, 1, 1), max_rank=4)
    np.testing.assert_array_equal(cmc, [0.0, 1.0, 1.0, 1.0])
    assert m_ap == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert cmc.dtype == np.float64 and cmc.shape == (4,) and type(m_ap) is float  # a builtin float, not numpy's


def test_average_over_queries():
    # query 0: first match at rank 1 (AP 1); query 1: single match at rank 3 (AP 1/3)
    dist = np.array([[0.0, 1.0, 2.0], [0.0, 1.0, 2.0]])
    g_pids, g_cams = ids(1, 3, 2), ids(1, 1, 1)
    cmc, m_ap = evaluate_rank(dist, ids(1, 2), g_pids, ids(0, 0), g_cams, max_rank=3)
    np.testing.assert_allclose(cmc, [0.5, 0.5, 1.0])
    assert m_ap == pytest.approx((1 + 1 / 3) / 2)


def test_same_camera_same_id_entries_are_ignored():
    # the closest entry is the same person seen by the query's own camera: dropped, not a match,
    # and it does not push the real match down
    dist = np.array([[0.0, 0.5, 0.7]])
    cmc, m_ap = evaluate_rank(dist, ids(1), ids(1, 1, 2), ids(0), ids(0, 1, 1), max_rank=2)
    np.testing.assert_array_equal(cmc, [1.0, 1.0])
    assert m_ap == pytest.approx(1.0)
    # a same-person image from another camera is still a match, at its rank among kept entries
    dist = np.array([[0.0, 0.5, 0.7]])
    cmc, m_ap = evaluate_rank(dist, ids(1), ids(1, 2, 1), ids(0), ids(0, 1, 1), max_rank=2)
    np.testing.assert_array_equal(cmc, [0.0, 1.0])
    assert m_ap == pytest.approx(0.5)


def test_query_without_match_is_skipped():
    dist = np.array([[0.1, 0.2], [0.1, 0.2], [0.3, 0.1]])
    g_pids, g_cams = ids(5, 1), ids(1, 1)
    # query 1 has no same-id image; query 2's only same-id image is from its own camera
    cmc, m_ap = evaluate_rank(dist, ids(1, 7, 5), g_pids, ids(0, 0, 1), g_cams, max_rank=2)
    cmc_alone, map_alone = evaluate_rank(dist[:1], ids(1), g_pids, ids(0), g_cams, max_rank=2)
    np.testing.assert_array_equal(cmc, cmc_alone)
    np.testing.assert_array_equal(cmc, [0.0, 1.0])
    assert m_ap == map_alone == pytest.approx(0.5)


def test_no_query_with_match_raises():
    dist = np.array([[0.1, 0.2]])
    with pytest.raises(ValueError, match="no query has a correct match"):
        evaluate_rank(dist, ids(1), ids(1, 2), ids(0), ids(0, 1))  # only a same-camera image
    with pytest.raises(ValueError, match="no query has a correct match"):
        evaluate_rank(np.zeros((0, 3)), ids(), ids(1, 2, 3), ids(), ids(0, 0, 0))


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64, np.int16])
def test_ties_are_ordered_by_gallery_index(dtype):
    # all distances equal: the match's place is its gallery index among kept entries
    dist = np.zeros((1, 4), dtype=dtype)
    g_cams = ids(1, 1, 1, 1)
    cmc, m_ap = evaluate_rank(dist, ids(1), ids(2, 3, 1, 4), ids(0), g_cams, max_rank=4)
    np.testing.assert_array_equal(cmc, [0, 0, 1, 1])
    assert m_ap == pytest.approx(1 / 3)
    cmc, m_ap = evaluate_rank(dist, ids(1), ids(1, 3, 2, 4), ids(0), g_cams, max_rank=4)
    np.testing.assert_array_equal(cmc, [1, 1, 1, 1])
    assert m_ap == pytest.approx(1.0)
    # a junk entry inside the tie is removed before positions are counted
    cmc, m_ap = evaluate_rank(dist, ids(1), ids(2, 1, 1, 4), ids(0), ids(1, 0, 1, 1), max_rank=4)
    np.testing.assert_array_equal(cmc, [0, 1, 1, 1])
    assert m_ap == pytest.approx(1 / 2)


def test_tie_between_matches_and_signed_zero():
    # two matches tied with each other and with a non-match at a lower index; -0.0 == 0.0
    dist = np.array([[1.0, -0.0, 0.0, 0.0]])
    cmc, m_ap = evaluate_rank(dist, ids(1), ids(1, 2, 1, 1), ids(0), ids(1, 1, 1, 1), max_rank=4)
    # order: idx1 (non-match), idx2, idx3 (matches), idx0 (match) -> ranks 2, 3, 4
    np.testing.assert_array_equal(cmc, [0, 1, 1, 1])
    assert m_ap == pytest.approx((1 / 2 + 2 / 3 + 3 / 4) / 3)


def test_max_rank_larger_than_gallery_pads_with_one():
    dist = np.array([[0.3, 0.1, 0.2]])
    cmc, m_ap = evaluate_rank(dist, ids(1), ids(1, 2, 3), ids(0), ids(1, 1, 1), max_rank=10)
    assert cmc.shape == (10,)
    np.testing.assert_array_equal(cmc, [0, 0] + [1] * 8)
    assert m_ap == pytest.approx(1 / 3)


def test_bad_inputs_raise():
    dist = np.zeros((2, 3))
    with pytest.raises(ValueError, match="q_pids"):
        evaluate_rank(dist, ids(1), ids(1, 2, 3), ids(0, 0), ids(1, 1, 1))
    with pytest.raises(ValueError, match="g_camids"):
        evaluate_rank(dist, ids(1, 2), ids(1, 2, 3), ids(0, 0), ids(1, 1))
    with pytest.raises(ValueError, match="max_rank"):
        evaluate_rank(dist, ids(1, 2), ids(1, 2, 3), ids(0, 0), ids(1, 1, 1), max_rank=0)
    with pytest.raises(ValueError, match="NaN"):
        evaluate_rank(np.array([[0.1, np.nan, 0.3]]), ids(1), ids(1, 2, 3), ids(0), ids(1, 1, 1))


# --- against the per-query loop reference ---------------------------------------------------------


def random_problem(rng, num_q, num_g, n_ids, n_cams, kind):
    q_pids = rng.integers(0, n_ids, num_q)
    g_pids = rng.integers(0, n_ids, num_g)
    q_cams = rng.integers(0, n_cams, num_q)
    g_cams = rng.integers(0, n_cams, num_g)
    q_cams[0] = 0  # guarantee one valid query: same id as a gallery image from another camera
    g_pids[0], g_cams[0] = q_pids[0], 1
    if kind == "float32":
        dist = rng.random((num_q, num_g), dtype=np.float32)
    elif kind == "float64_inf":
        dist = rng.random((num_q, num_g))
        dist[rng.random((num_q, num_g)) < 0.2] = np.inf
    elif kind == "int_ties":
        dist = rng.integers(0, 3, (num_q, num_g))
    elif kind == "float_ties":
        dist = rng.integers(0, 4, (num_q, num_g)).astype(np.float32) / 2
    else:
        raise AssertionError(kind)
    return dist, q_pids, g_pids, q_cams, g_cams


@pytest.mark.parametrize(
    ("num_q", "num_g", "n_ids", "kind"),
    [
        (1, 40, 5, "float32"),
        (1, 7, 3, "int_ties"),
        (6, 5, 3, "float32"),  # gallery smaller than max_rank
        (25, 12, 4, "int_ties"),  # gallery smaller than max_rank, many ties
        (60, 300, 30, "float32"),
        (80, 150, 10, "int_ties"),
        (50, 120, 8, "float_ties"),
        (40, 90, 6, "float64_inf"),
        (300, 1000, 100, "float32"),
    ],
)
def test_matches_loop_reference(num_q, num_g, n_ids, kind):
    rng = np.random.default_rng(num_q * 1000 + num_g)
    dist, q_pids, g_pids, q_cams, g_cams = random_problem(rng, num_q, num_g, n_ids, 3, kind)
    for max_rank in (1, 5, 20):
        cmc_ref, map_ref = reference_eval(dist, q_pids, g_pids, q_cams, g_cams, max_rank)
        cmc, m_ap = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank, chunk_size=7)
        assert cmc.shape == (max_rank,)
        np.testing.assert_allclose(cmc, cmc_ref, rtol=0, atol=1e-12)
        assert abs(m_ap - map_ref) < 1e-9
        assert np.all(np.diff(cmc) >= 0) and cmc[0] >= 0 and cmc[-1] <= 1 and 0 < m_ap <= 1


def test_chunked_equals_unchunked():
    rng = np.random.default_rng(7)
    dist, q_pids, g_pids, q_cams, g_cams = random_problem(rng, 97, 210, 20, 4, "float_ties")
    cmc_all, map_all = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, chunk_size=10_000)
    for chunk in (1, 5, 32, None):
        cmc, m_ap = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, chunk_size=chunk)
        np.testing.assert_array_equal(cmc, cmc_all)
        assert abs(m_ap - map_all) < 1e-12
    # a Fortran-ordered matrix (e.g. a transposed one) gives the same figures
    cmc, m_ap = evaluate_rank(np.asfortranarray(dist), q_pids, g_pids, q_cams, g_cams, chunk_size=8)
    np.testing.assert_array_equal(cmc, cmc_all)
    assert abs(m_ap - map_all) < 1e-12


@pytest.mark.parametrize("num_g", [1, 2, 7, 64, 1000])
def test_row_wise_searchsorted_matches_numpy(num_g):
    from rain_model.metrics import _searchsorted_rows

    rng = np.random.default_rng(num_g)
    rows = np.sort(rng.integers(0, 6, (9, num_g)).astype(np.float32), axis=1)  # many ties
    values = rng.integers(-1, 8, (9, 5)).astype(np.float32)  # below, inside and above every row
    pairs = list(zip(rows, values, strict=True))
    left = np.stack([np.searchsorted(r, v, side="left") for r, v in pairs])
    right = np.stack([np.searchsorted(r, v, side="right") for r, v in pairs])
    np.testing.assert_array_equal(_searchsorted_rows(rows, values), left)
    np.testing.assert_array_equal(_searchsorted_rows(rows, values, right=True), right)


# --- distances --------------------------------------------------------------------------------


def test_pairwise_distance_matches_brute_force():
    rng = np.random.default_rng(3)
    q = rng.standard_normal((13, 24)).astype(np.float32)
    g = rng.standard_normal((41, 24)).astype(np.float32)
    q64, g64 = q.astype(np.float64), g.astype(np.float64)
    eucl = np.sqrt(((q64[:, None, :] - g64[None, :, :]) ** 2).sum(-1))
    qn = q64 / np.linalg.norm(q64, axis=1, keepdims=True)
    gn = g64 / np.linalg.norm(g64, axis=1, keepdims=True)
    cos = 1.0 - qn @ gn.T

    d = pairwise_distance(q, g)
    assert d.shape == (13, 41) and d.dtype == np.float32
    np.testing.assert_allclose(d, eucl, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(pairwise_distance(torch.from_numpy(q), torch.from_numpy(g)), d)
    np.testing.assert_allclose(pairwise_distance(q, g, chunk_size=4), d, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(pairwise_distance(q, g, metric="cosine"), cos, atol=1e-5)
    np.testing.assert_allclose(pairwise_distance(q, g, metric="cosine", chunk_size=5), cos, atol=1e-5)
    d64 = pairwise_distance(q64, g64)
    assert d64.dtype == np.float64
    np.testing.assert_allclose(d64, eucl, rtol=1e-10, atol=1e-8)
    with pytest.raises(ValueError, match="metric"):
        pairwise_distance(q, g, metric="manhattan")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="features"):
        pairwise_distance(q, g[:, :5])


# --- single-shot ------------------------------------------------------------------------------


def gallery(rng, n_ids=40, per_id=5):
    g_pids = np.repeat(np.arange(100, 100 + n_ids), per_id)
    rng.shuffle(g_pids)
    g_cams = rng.integers(1, 4, g_pids.shape[0])
    return g_pids, g_cams


def test_single_shot_draws_one_image_per_identity_reproducibly():
    g_pids, g_cams = gallery(np.random.default_rng(0))
    draws = single_shot_gallery(g_pids, g_cams, seed=11, repeats=4)
    assert len(draws) == 4
    for idx in draws:
        assert np.all(np.diff(idx) > 0)
        np.testing.assert_array_equal(np.sort(g_pids[idx]), np.unique(g_pids))
    again = single_shot_gallery(g_pids, g_cams, seed=11, repeats=4)
    assert all(np.array_equal(a, b) for a, b in zip(draws, again, strict=True))
    other = single_shot_gallery(g_pids, g_cams, seed=12, repeats=4)
    assert not all(np.array_equal(a, b) for a, b in zip(draws, other, strict=True))
    assert not np.array_equal(draws[0], draws[1])  # successive draws differ too
    assert single_shot_gallery(g_pids, g_cams, seed=11, repeats=0) == []
    # every image of an identity can be drawn
    many = np.concatenate(single_shot_gallery(g_pids, g_cams, seed=0, repeats=200))
    assert np.unique(many).shape[0] == g_pids.shape[0]


def test_single_shot_draws_give_one_match_per_query_and_a_spread():
    """On a single-shot draw each query has exactly one correct match, so its AP is 1 / (the match's rank):
    mAP is the mean reciprocal rank and cmc[k] the share of matches within rank k + 1. Draws differ, so
    the spread over them is not zero."""
    rng = np.random.default_rng(5)
    g_pids, g_cams = gallery(rng, n_ids=30, per_id=4)
    q_pids = rng.choice(np.unique(g_pids), 50)
    q_cams = np.zeros(50, dtype=np.int64)  # gallery cameras are 1..3: no junk
    dist = rng.random((50, g_pids.shape[0]))  # continuous: no ties
    maps = []
    for idx in single_shot_gallery(g_pids, g_cams, seed=3, repeats=5):
        cmc, m_ap = evaluate_rank(dist[:, idx], q_pids, g_pids[idx], q_cams, g_cams[idx], max_rank=10)
        d = dist[:, idx]  # (Q, 30)
        match = np.array([np.flatnonzero(g_pids[idx] == q)[0] for q in q_pids])  # (Q,) the one match
        rank = 1 + (d < d[np.arange(50), match][:, None]).sum(axis=1)  # (Q,) 1-based
        assert m_ap == pytest.approx(np.mean(1.0 / rank))
        np.testing.assert_allclose(cmc, [np.mean(rank <= k) for k in range(1, 11)])
        maps.append(m_ap)
    _, map_std = mean_std(maps)
    assert map_std > 0  # the draws really differ


def test_mean_std_is_the_sample_std_and_zero_for_one_value():
    mean, std = mean_std([0.2, 0.4, 0.6])
    assert float(mean) == pytest.approx(0.4)
    assert float(std) == pytest.approx(0.2)  # sqrt(((-0.2)^2 + 0 + 0.2^2) / (3 - 1)): n - 1, not n
    mean, std = mean_std([0.7])
    assert float(mean) == 0.7 and float(std) == 0.0  # no spread, not NaN
    rows = np.array([[0.0, 1.0], [2.0, 1.0]])  # (draws, ranks): spread per column
    mean, std = mean_std(rows)
    np.testing.assert_allclose(mean, [1.0, 1.0])
    np.testing.assert_allclose(std, [np.sqrt(2.0), 0.0])
    with pytest.raises(ValueError, match="no values"):
        mean_std([])
