"""The evaluate stage's bookkeeping: which queries form each row, and how trials and draws combine."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.evaluation.scoring import row_label, row_names, summarise


def test_rows_split_mlr_queries_by_rate_and_keep_unseen_and_hr_sets() -> None:
    queries = [{"query_set": "mlr", "rate": 2}, {"query_set": "mlr", "rate": 4}, {"query_set": "hr", "rate": 1},
               {"query_set": "r8", "rate": 8}, {"query_set": "mlr", "rate": 2}]
    rows = row_names(queries, unseen=(8,))
    assert list(rows) == ["lr", "r2", "r4", "r8", "hr"]
    assert rows["lr"] == [0, 1, 4] and rows["r2"] == [0, 4] and rows["r8"] == [3] and rows["hr"] == [2]
    assert row_label("r8", (8,)) == "LR r=8 (unseen)" and row_label("r2", (8,)) == "LR r=2"


def cmc(rank1: float) -> np.ndarray:
    return np.array([rank1] + [1.0] * 19)


def test_several_trials_average_draws_first_then_spread_over_trials() -> None:
    # trial 0: draws with rank-1 0.2 and 0.4 (mean 0.3); trial 1: one draw with 0.7
    evals = [(0, cmc(0.2), 0.1), (0, cmc(0.4), 0.3), (1, cmc(0.7), 0.6)]
    row = summarise("lr", evals)
    assert row["rank1"] == pytest.approx(0.5)  # mean of 0.3 and 0.7, not of the three draws
    # the sample std (n - 1) of the two trial means: |0.7 - 0.3| / sqrt(2); the population one would be 0.2
    assert row["rank1_std"] == pytest.approx(0.4 / np.sqrt(2), abs=1e-6)
    assert row["mAP"] == pytest.approx(0.4) and row["mAP_std"] == pytest.approx(0.4 / np.sqrt(2), abs=1e-6)
    assert row["rank20"] == 1.0 and row["rank20_std"] == 0.0


def test_one_trial_spreads_over_gallery_draws() -> None:
    row = summarise("lr", [(0, cmc(0.2), 0.3), (0, cmc(0.4), 0.3)])
    assert row["rank1"] == pytest.approx(0.3) and row["rank1_std"] == pytest.approx(0.2 / np.sqrt(2), abs=1e-6)
    # mAP is over every HR image, the same for each draw: no spread over draws to report (not "± 0.0")
    assert row["mAP"] == pytest.approx(0.3) and "mAP_std" not in row


def test_map_counts_every_true_match_so_it_can_be_below_rank1() -> None:
    """One LR query of identity 0; HR images: 0 (the single-shot draw's), 1, and another of 0 (gallery_pool).
    Single-shot, identity 0 comes first (rank-1 = 1); over every HR image its matches are at ranks 1 and 3,
    AP = (1/1 + 2/3) / 2."""
    from tasks.evaluation.scoring import score_rows

    dist = np.array([[0.1, 0.2, 0.3]])
    g_pids, g_cams = np.array([0, 1, 0]), np.array([0, 0, 0])
    [(cmc, mean_ap)] = score_rows(dist, np.array([0]), np.array([1]), g_pids, g_cams, [np.array([0, 1])])
    assert cmc[0] == 1.0
    assert mean_ap == pytest.approx((1 + 2 / 3) / 2) and mean_ap < cmc[0]


def _alignment_input(hr: np.ndarray, lr: np.ndarray) -> dict:
    """score_trial's pictures as resolution_alignment reads them: LR (MLR) queries and HR gallery features."""
    queries = [{"query_set": "mlr"}] * len(lr) + [{"query_set": "hr"}]  # the HR query row is not an LR image
    return {"queries": queries, "q_feat": np.concatenate([lr, hr[:1]]), "g_feat": hr}


def test_a_fresh_probe_separates_resolutions_a_line_separates_and_not_others() -> None:
    from tasks.training.alignment import resolution_alignment

    rng = np.random.default_rng(0)
    hr = rng.normal(size=(40, 16))
    apart = resolution_alignment(_alignment_input(hr, rng.normal(size=(40, 16)) + 3.0))
    assert apart["probe_accuracy"] > 0.95 and apart["centroid_gap"] > 1.0
    alike = resolution_alignment(_alignment_input(hr, rng.normal(size=(40, 16))))
    assert 0.3 < alike["probe_accuracy"] < 0.7 and alike["centroid_gap"] < 0.3


def test_too_few_images_give_no_probe_but_the_centroid_gap() -> None:
    from tasks.training.alignment import resolution_alignment

    out = resolution_alignment(_alignment_input(np.ones((1, 4)), np.zeros((3, 4))))
    assert set(out) == {"centroid_gap"}
