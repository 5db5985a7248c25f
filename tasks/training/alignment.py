"""How far apart retrieval sees the two resolutions, measured on the validation split while training.

Apart from tasks/evaluation/scoring.py, which the evaluate stage runs: what this imports (rain_model's diagnostics,
scikit-learn's probe) is the train stage's dependency, not evaluate's.
"""

from __future__ import annotations

from typing import Any

import numpy as np

PROBE_FOLDS = 2  # the probe is fitted on one half of the features and scored on the other, then the other way round


def resolution_alignment(pictures: dict[str, Any]) -> dict[str, float]:
    """How far apart retrieval sees the two resolutions, on one split's eval-mode features (`score_trial`'s
    pictures): its HR gallery images against its LR queries (the MLR protocol's rates).

    `probe_accuracy`: balanced accuracy of a linear probe (logistic regression on standardised features) fitted
    afresh to tell HR from LR, PROBE_FOLDS-fold: 0.5 when no line separates them, 1 when one does. A
    discriminator trained alongside F can sit at chance while a fresh probe still separates the features; this
    is what a D that plays the game should reach. Absent with fewer than PROBE_FOLDS images of either kind.
    `centroid_gap`: ||mean HR - mean LR|| over the HR features' spread (rain_model/diagnostics.py)."""
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from rain_model.diagnostics import centroid_gap

    lr_rows = [i for i, r in enumerate(pictures["queries"]) if r["query_set"] in ("mlr", "native")]
    hr = np.asarray(pictures["g_feat"], dtype=np.float64)  # (G, d)
    lr = np.asarray(pictures["q_feat"], dtype=np.float64)[lr_rows]  # (Q, d)
    out = {"centroid_gap": centroid_gap(torch.from_numpy(hr), torch.from_numpy(lr))}
    if min(len(hr), len(lr)) >= PROBE_FOLDS:
        features = np.concatenate([hr, lr])  # (G + Q, d)
        is_lr = np.r_[np.zeros(len(hr)), np.ones(len(lr))]  # (G + Q,)
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        folds = StratifiedKFold(PROBE_FOLDS, shuffle=True, random_state=0)
        out["probe_accuracy"] = float(cross_val_score(probe, features, is_lr, cv=folds,
                                                      scoring="balanced_accuracy").mean())
    return out
