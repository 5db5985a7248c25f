"""Stage `evaluate`: CMC rank 1/5/10/20 and mAP under the cross-resolution protocol, plus the pictures.

For each trained trial, LR queries are matched against a single-shot HR gallery (one image per test
identity from the other camera) for CMC. The gallery is drawn `evaluate.gallery_repeats` times (the first
draw is the manifest's own gallery); every (trial, draw) is one evaluation, and each reported figure is the
mean over them with its standard deviation. mAP is over every HR image of the test identities (several true
matches per query, as the paper's mAP below its rank-1 implies); metrics.json says so under `protocol`.
Rows: `lr` (the MLR queries, each at its drawn rate: the paper's headline protocol), `r2`, `r3`, `r4`
(those queries by rate), `r8` (every query at the unseen rate), and `hr` (the same queries at full
resolution, which shows the resolution gap).

Outputs in reports/<dataset>/: metrics.json (DVC metrics; top-level figures are the `lr` row),
cmc.csv (a column per row name; the `cmc` plot in dvc.yaml), cmc.png, tsne_identity.png,
tsne_resolution.png, ranked_gallery.png, table.md.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from tasks.config import Params, load_params
from tasks.evaluation.scoring import METRIC_KEYS, PROTOCOL_NOTE, row_label, score_trial, summarise
from tasks.images.store import ImageStore
from tasks.infra.logs import setup_logging

log = logging.getLogger(__name__)

def run(params: Params, mlr_path: Path, store_dir: Path, model_dir: Path, report_dir: Path) -> dict[str, Any]:

    from tasks.registry.embed import load_model
    from tasks.training.artifacts import summary_path

    cfg = params.evaluate

    train_summary = json.loads(summary_path(model_dir).read_text())
    store = ImageStore(store_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[tuple[int, np.ndarray, float]]] = defaultdict(list)  # (trial, cmc, AP)
    pictures: dict[str, Any] = {}
    for trial in params.train.trials:
        info = train_summary["trials"][str(trial)]
        model = load_model(model_dir / info["weights"], params.model, info["num_classes"])
        scores, trial_pictures = score_trial(model, params, mlr_path, trial, store)
        for name, evals in scores.items():
            results[name] += evals
        if trial == params.train.trials[0]:
            pictures = trial_pictures

    unseen = params.protocol.unseen_rates
    rows = {name: summarise(name, evals) | {"label": row_label(name, unseen)} for name, evals in results.items()}
    spread = "trials" if len(params.train.trials) > 1 else "gallery draws"
    metrics = {k: rows["lr"][k] for k in METRIC_KEYS} | {
        "rows": rows, "trials": len(params.train.trials), "gallery_draws": cfg.gallery_repeats,
        "evaluations_per_row": len(results["lr"]), "std_over": spread, "protocol": PROTOCOL_NOTE}
    (report_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))  # rows in table order
    cmc = {name: np.stack([c for _, c, _ in evals]).mean(axis=0) for name, evals in results.items()}  # (20,) each
    _write_pictures(params, report_dir, rows, cmc, pictures)
    _log_to_mlflow(train_summary, metrics, report_dir, cmc)
    log.info("evaluate: LR rank-1 %.1f%%, HR rank-1 %.1f%%, mAP %.1f%%", 100 * rows["lr"]["rank1"],
             100 * rows.get("hr", rows["lr"])["rank1"], 100 * rows["lr"]["mAP"])
    return metrics


def _write_pictures(params: Params, report_dir: Path, rows: dict[str, dict], cmc: dict[str, np.ndarray],
                    pictures: dict[str, Any]) -> None:
    """`cmc`: each row's mean CMC curve over its evaluations (trials x gallery draws)."""
    from PIL import Image

    from tasks.evaluation.reporting import (
        aligned_markdown,
        cmc_plot_rows,
        cmc_title,
        distinct_people,
        plot_cmc,
        plot_tsne,
        ranked_gallery_sheet,
        table1_markdown,
    )

    unseen = params.protocol.unseen_rates
    cfg = params.evaluate
    plot_cmc({row_label(n, unseen): curve.tolist() for n, curve in cmc.items()}, report_dir / "cmc.png",
             title=cmc_title(params.dataset.name, len(params.train.trials), cfg.gallery_repeats))
    # Columns keyed by row name (lr, r2, ..., hr): stable names dvc.yaml's plot definition can name.
    plot_rows = cmc_plot_rows({n: curve.tolist() for n, curve in cmc.items()})
    with (report_dir / "cmc.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(plot_rows[0]))
        writer.writeheader()
        writer.writerows(plot_rows)
    table_rows = [{k: v for k, v in r.items() if k != "label"} | {"row": r["label"]} for r in rows.values()]
    (report_dir / "table.md").write_text(aligned_markdown(table1_markdown(table_rows)) + "\n")

    # Figure 3: test features of a few identities, HR gallery plus every query variant.
    queries, gallery = pictures["queries"], pictures["gallery"]
    pids = sorted({r["person_id"] for r in gallery})[: cfg.tsne_identities]
    keep_q = [i for i, r in enumerate(queries) if r["person_id"] in pids and r["query_set"] != "hr"]
    keep_g = [i for i, r in enumerate(gallery) if r["person_id"] in pids]
    hr_q = [i for i, r in enumerate(queries) if r["person_id"] in pids and r["query_set"] == "hr"]
    feats = np.concatenate([pictures["q_feat"][keep_q + hr_q], pictures["g_feat"][keep_g]])
    ident = [queries[i]["person_id"] for i in keep_q + hr_q] + [gallery[i]["person_id"] for i in keep_g]
    rates = [f"r={queries[i]['rate']}" for i in keep_q + hr_q] + ["r=1"] * len(keep_g)
    what = (f"{len(pids)} test identities: {len(keep_g)} HR gallery and {len(keep_q) + len(hr_q)} query images"
            f" (trial {params.train.trials[0]})")
    plot_tsne(feats, [str(p) for p in ident], report_dir / "tsne_identity.png",
              title=f"t-SNE of v by identity, {what}", seed=params.protocol.seed, legend_title="identity")
    plot_tsne(feats, rates, report_dir / "tsne_resolution.png",
              title=f"t-SNE of v by down-sampling rate, {what}", seed=params.protocol.seed, legend_title="rate")

    # Figure 4: LR queries at the largest unseen rate (else the MLR set) and their top-7 HR gallery images.
    query_set = f"r{max(unseen)}" if unseen else "mlr"
    in_set = [i for i, r in enumerate(queries) if r["query_set"] == query_set]
    chosen = [in_set[j] for j in distinct_people([queries[i]["person_id"] for i in in_set], cfg.sheet_queries)]
    top_k = min(7, len(gallery))
    ranked, correct, distances = [], [], []
    for i in chosen:
        order = np.argsort(pictures["dist"][i], kind="stable")[:top_k]
        ranked.append([Image.open(gallery[j]["path"]).convert("RGB") for j in order])
        correct.append([gallery[j]["person_id"] == queries[i]["person_id"] for j in order])
        distances.append([float(pictures["dist"][i][j]) for j in order])
    ranked_gallery_sheet([Image.open(queries[i]["path"]).convert("RGB") for i in chosen], ranked, correct,
                         report_dir / "ranked_gallery.png", top_k=top_k, distances=distances,
                         labels=[f"r={queries[i]['rate']} #{queries[i]['person_id']}" for i in chosen])


def run_description(metrics: dict[str, Any], report_dir: Path, experiment_id: str, run_id: str) -> str:
    """A training run's description (the run page shows it): the results table and links to the pictures among
    its artifacts, relative to the UI's own address (its routes follow `#`), so they work wherever it runs, and
    in its training views (ui_route). The table (table.md, columns padded) is a code block: MLflow 3.17 draws a
    Markdown table with no cell padding, which ran the cells of a row together."""
    from tasks.infra.tracking import ui_route

    pictures = sorted(f.name for f in report_dir.iterdir() if f.suffix == ".png")
    route = f"experiments/{experiment_id}/runs/{run_id}/artifacts/evaluation"
    return "\n".join([
        "## Results (percent)", "", "```", (report_dir / "table.md").read_text().strip(), "```", "",
        f"CMC: {metrics['protocol']['cmc']}", f"mAP: {metrics['protocol']['mAP']}", "",
        "Pictures (the run's artifacts, `evaluation/`): "
        + ", ".join(f"[{name}]({ui_route(f'{route}/{name}')})" for name in pictures)])


def _log_to_mlflow(train_summary: dict[str, Any], metrics: dict[str, Any], report_dir: Path,
                   cmc: dict[str, np.ndarray]) -> None:
    """Metrics (`eval/<row>_<metric>`, each std as `eval_std/<row>_<metric>`), each row's CMC as metric
    `cmc/<row>` stepped by rank (MLflow draws the curve), all in percent, every report file, and a run description
    holding the results table (run_description), go to each trial's training run."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from tasks.infra.tracking import CMC, NOTE_TAG, eval_metrics, log_metrics, shown, tracking_uri

    client = MlflowClient(tracking_uri())
    flat = eval_metrics(metrics["rows"])
    files = sorted(report_dir.iterdir())
    now = int(time.time() * 1000)
    batch = [Metric(key, value, now, 0) for key, value in flat.items()] + [
        Metric(CMC + row, shown(CMC + row, value), now, rank) for row, curve in cmc.items()
        for rank, value in enumerate(curve, start=1)]
    for info in train_summary["trials"].values():
        run_id = info["mlflow_run_id"]
        log_metrics(client, run_id, batch)
        for file in files:
            client.log_artifact(run_id, str(file), artifact_path="evaluation")
        description = run_description(metrics, report_dir, client.get_run(run_id).info.experiment_id, run_id)
        client.set_tag(run_id, NOTE_TAG, description)  # the run page's description


def main() -> None:
    setup_logging()
    params = load_params()
    run(params, params.mlr_manifest_path(), params.store_dir(), params.model_dir(), params.report_dir())


if __name__ == "__main__":
    main()
