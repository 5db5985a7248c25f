"""Report pictures and tables of the evaluate stage (the paper's Table 1, Figures 3 and 4, CMC curves).

Every picture function takes the output path (its suffix picks the format; ``.png`` is what the stage
writes) and a size, creates missing parent folders and returns the path. Matplotlib figures are drawn
with the Agg backend, chosen inside the functions (``Figure`` + ``FigureCanvasAgg``, no ``pyplot``, so
no global backend switch and nothing happens at import time); they are saved at ``dpi`` with
``figsize = size_px / dpi`` and without ``bbox_inches="tight"``, so the file is ``size_px`` pixels.
The ranked-gallery sheet is drawn with Pillow only and its size follows ``ranked_gallery_sheet_size``.

Metric values handed to this module are fractions in [0, 1] (as in ``metrics.json``); pictures and the
Markdown table show them in percent.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from rain_model.metrics import METRIC_KEYS

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from PIL import Image

__all__ = [
    "METRIC_LABELS",
    "SHEET_BORDER",
    "SHEET_GAP",
    "SHEET_LABEL_H",
    "SHEET_PAD",
    "TABLE1_COLUMNS",
    "TSNE_EXACT_MAX",
    "aligned_markdown",
    "cmc_plot_rows",
    "cmc_title",
    "distinct_people",
    "plot_cmc",
    "plot_label_fraction",
    "plot_rate_bars",
    "plot_tsne",
    "ranked_gallery_sheet",
    "ranked_gallery_sheet_size",
    "spread_apart",
    "table1_markdown",
]

# ---------------------------------------------------------------------------------------------------
# matplotlib helpers


def _figure(size_px: tuple[int, int], dpi: int) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    width, height = size_px
    if width < 16 or height < 16 or dpi < 1:
        raise ValueError(f"size_px must be at least 16 x 16 and dpi >= 1, got {size_px} at dpi {dpi}")
    # A hair over the exact size so that truncation to whole pixels cannot lose one.
    fig = Figure(figsize=((width + 1e-3) / dpi, (height + 1e-3) / dpi), dpi=dpi)
    FigureCanvasAgg(fig)  # attaches itself as fig.canvas
    return fig


def _tight(fig: Figure) -> None:
    """Arrange the axes inside the figure (the figure size is unchanged); tiny figures stay as they are."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Tight layout not applied" on very small figures
        fig.tight_layout()


def _save_figure(fig: Figure, path: str | Path, dpi: int) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)  # no bbox_inches="tight": the size stays the one asked for
    return out


def _natural_key(value: Any) -> tuple[Any, ...]:
    """Sort key putting numbers in numeric order: 'r=2' < 'r=10', 3 < 12."""
    if isinstance(value, int | float | np.integer | np.floating):
        return (0, float(value), "")
    parts = re.split(r"(\d+)", str(value))
    return (1, 0.0, tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts))


# ---------------------------------------------------------------------------------------------------
# CMC curves


def cmc_plot_rows(curves: Mapping[str, Sequence[float]]) -> list[dict[str, float | int]]:
    """CMC curves as DVC-plot rows, wide format: ``[{"rank": 1, "<label>": cmc, ...}, ...]``.

    One dict per rank (1-based), one key per curve label with the matching rate as a fraction in
    [0, 1]. Written as CSV (``reports/<dataset>/cmc.csv``) this plots in DVC with ``x: rank`` and the
    labels as ``y``. All curves must have the same length; no label may be ``"rank"``.
    """
    if not curves:
        raise ValueError("no CMC curves given")
    lengths = {label: len(values) for label, values in curves.items()}
    if "rank" in lengths:
        raise ValueError("a CMC curve may not be labelled 'rank' (that is the x column)")
    if len(set(lengths.values())) != 1:
        raise ValueError(f"CMC curves have different lengths: {lengths}")
    n = next(iter(lengths.values()))
    rows: list[dict[str, float | int]] = []
    for i in range(n):
        row: dict[str, float | int] = {"rank": i + 1}
        row.update({label: float(values[i]) for label, values in curves.items()})
        rows.append(row)
    return rows


def cmc_title(dataset: str, trials: int, gallery_draws: int) -> str:
    """The CMC picture's title: what each curve is the mean of (`1 trial x 10 gallery draws`)."""
    def count(n: int, what: str) -> str:
        return f"{n} {what}{'' if n == 1 else 's'}"
    return (f"CMC on {dataset}, single-shot gallery (mean of {count(trials, 'trial')} x "
            f"{count(gallery_draws, 'gallery draw')})")


def spread_apart(positions: Sequence[float], gap: float) -> list[float]:
    """Positions as near to `positions` as they can be (least squares) with at least `gap` between any two, in
    the same order: labels that would overlap are moved apart around where they belong, not all one way."""
    order = sorted(range(len(positions)), key=lambda i: positions[i])
    blocks: list[tuple[float, list[int]]] = []  # (first position, members in order): labels `gap` apart
    for i in order:
        blocks.append((positions[i], [i]))
        while len(blocks) > 1 and blocks[-2][0] + len(blocks[-2][1]) * gap > blocks[-1][0]:
            members = blocks[-2][1] + blocks[-1][1]  # they overlap: one block, centred on its members
            start = float(np.mean([positions[m] - j * gap for j, m in enumerate(members)]))
            blocks[-2:] = [(start, members)]
    placed = [0.0] * len(positions)
    for start, members in blocks:
        for j, m in enumerate(members):
            placed[m] = start + j * gap
    return placed


def plot_cmc(
    curves: Mapping[str, Sequence[float]],
    path: str | Path,
    size_px: tuple[int, int] = (800, 600),
    title: str = "CMC",
    dpi: int = 100,
    max_rank: int = 20,
) -> Path:
    """CMC curves: rank 1..``max_rank`` on x, matching rate (%) on y, one line per label (values are
    fractions). Each curve's rank-1 is marked and written left of it, in the curve's colour; labels of close
    values are moved apart (spread_apart) with a line to their mark, so none covers another. The y-axis starts 5
    points below the lowest value shown (rounded down to 10), so curves that all end near 100 % stay apart."""
    if not curves:
        raise ValueError("no CMC curves given")
    fig = _figure(size_px, dpi)
    ax = fig.add_subplot()
    max_n, lowest, rank1 = 1, 100.0, []
    for i, (label, values) in enumerate(curves.items()):
        y = 100.0 * np.asarray(values, dtype=np.float64)[:max_rank]  # (N,) percent
        ranks = np.arange(1, y.shape[0] + 1)
        max_n, lowest = max(max_n, y.shape[0]), min(lowest, float(y.min()))
        ax.plot(ranks, y, marker="o", markersize=3, linewidth=1.5, label=str(label), color=f"C{i}")
        ax.plot([1], y[:1], marker="o", markersize=8, fillstyle="none", color=f"C{i}")  # rank-1, marked
        rank1.append(float(y[0]))
    ax.set_xlim(0.5, max_n + 0.5)
    ax.set_xticks([1, *range(5, max_n + 1, 5)])
    ax.set_ylim(max(0.0, 10 * math.floor((lowest - 5) / 10)), 101)
    ax.set_xlabel("rank")
    ax.set_ylabel("matching rate (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    _tight(fig)
    # Once the axes have their final place (in pixels): room left of rank 1 for the widest label, and the labels
    # a line of small text apart.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.font_manager import FontProperties

    font, gap_pt = FontProperties(size="small"), 8.0
    texts = [f"{value:.1f}" for value in rank1]
    renderer = cast(FigureCanvasAgg, fig.canvas).get_renderer()  # _figure's canvas
    widest = max(renderer.get_text_width_height_descent(t, font, ismath=False)[0] for t in texts)
    room = widest + (gap_pt + 4) * dpi / 72  # px left of the rank-1 marks
    width, right = max(ax.get_window_extent().width, 2 * room), max_n + 0.5
    ax.set_xlim((width - room * right) / (width - room), right)  # x = 1 sits `room` px right of the axes' edge
    line_px = 1.25 * font.get_size_in_points() * dpi / 72
    marks_px = [float(ax.transData.transform((1, v))[1]) for v in rank1]
    for i, (value, text, mark_px, label_px) in enumerate(zip(rank1, texts, marks_px,
                                                              spread_apart(marks_px, line_px), strict=True)):
        moved = abs(label_px - mark_px) > 0.5
        ax.annotate(text, (1, value), xytext=(-gap_pt, (label_px - mark_px) * 72 / dpi), textcoords="offset points",
                    ha="right", va="center", fontproperties=font, color=f"C{i}", annotation_clip=False,
                    arrowprops={"arrowstyle": "-", "color": f"C{i}", "linewidth": 0.6, "shrinkB": 4} if moved
                    else None)
    return _save_figure(fig, path, dpi)


# ---------------------------------------------------------------------------------------------------
# The experiment grid: Figure 5 and per-rate bars


def plot_label_fraction(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[float]]],
    path: str | Path,
    references: Mapping[str, tuple[float, float]] | None = None,
    size_px: tuple[int, int] = (800, 550),
    dpi: int = 100,
    spread: str = "mean ± std",
) -> Path:
    """Rank-1 (%) against the labelled fraction: ``curves`` maps a label to (fractions, means, stds), all
    fractions in [0, 1]; ``references`` maps a label to (mean, std) drawn as a flat dashed line with its
    band. ``spread`` says what the error bars and bands are (e.g. "mean ± std over 3 seeds")."""
    if not curves:
        raise ValueError("no label-fraction curve given")
    fig = _figure(size_px, dpi)
    ax = fig.add_subplot()
    for label, (xs, means, stds) in curves.items():
        if not len(xs) == len(means) == len(stds):
            raise ValueError(f"curve {label!r}: {len(xs)} fractions, {len(means)} means, {len(stds)} stds")
        ax.errorbar(100 * np.asarray(xs), 100 * np.asarray(means), yerr=100 * np.asarray(stds), marker="o",
                    capsize=3, label=str(label))
    for i, (label, (mean, std)) in enumerate((references or {}).items()):
        color = f"C{i + len(curves)}"
        ax.axhline(100 * mean, linestyle="--", color=color, label=str(label))
        ax.axhspan(100 * (mean - std), 100 * (mean + std), color=color, alpha=0.12)
    ax.set_xlim(-3, 103)
    ax.set_ylim(0, 100)
    ax.set_xlabel("labelled training identities (%)")
    ax.set_ylabel(f"LR rank-1 (%), {spread}")
    ax.set_title("Semi-supervised cross-resolution re-ID (Figure 5)")
    ax.grid(True, alpha=0.3)
    # Below the axes: inside, it covered the measured curve wherever that ran low.
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), fontsize="small")
    _tight(fig)
    return _save_figure(fig, path, dpi)


def plot_rate_bars(
    bars: Mapping[str, Mapping[str, tuple[float, float]]],
    path: str | Path,
    size_px: tuple[int, int] = (900, 550),
    dpi: int = 100,
    spread: str = "mean ± std",
    xlabel: str = "test queries",
) -> Path:
    """Grouped bars of rank-1 (%): ``bars[method][test set] = (mean, std)``, fractions in [0, 1]. Test
    sets are the groups (in first-seen order), methods the bars within a group; the legend sits below the
    axes, clear of the bars. ``spread`` says what the error bars are."""
    if not bars:
        raise ValueError("no bars given")
    groups: list[str] = []
    for per_set in bars.values():
        groups += [g for g in per_set if g not in groups]
    x = np.arange(len(groups))
    width = 0.8 / len(bars)
    fig = _figure(size_px, dpi)
    ax = fig.add_subplot()
    for i, (method, per_set) in enumerate(bars.items()):
        means = [100 * per_set[g][0] if g in per_set else np.nan for g in groups]
        stds = [100 * per_set[g][1] if g in per_set else 0.0 for g in groups]
        ax.bar(x - 0.4 + (i + 0.5) * width, means, width, yerr=stds, capsize=2, label=str(method))
    ax.set_xticks(x, groups)
    ax.set_ylim(0, 100)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("rank-1 (%)")
    ax.set_title(f"Rank-1 by test rate ({spread})")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=min(3, len(bars)), fontsize="small")
    _tight(fig)
    return _save_figure(fig, path, dpi)


# ---------------------------------------------------------------------------------------------------
# Figure 3: t-SNE


TSNE_EXACT_MAX = 1000  # t-SNE with the exact gradient up to this many points, Barnes-Hut above


def _palette(n: int) -> list[tuple[float, float, float, float]]:
    from matplotlib import colormaps

    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [colormaps["tab20"](i) for i in range(n)]
    base = [colormaps[name](i) for name in ("tab20", "tab20b", "tab20c") for i in range(20)]
    if n <= len(base):
        return base[:n]
    return [colormaps["hsv"](i / n) for i in range(n)]


def plot_tsne(
    features: np.ndarray,
    colour_by: Sequence[Any],
    path: str | Path,
    size_px: tuple[int, int] = (900, 900),
    title: str = "t-SNE",
    seed: int = 0,
    legend_title: str = "",
    dpi: int = 100,
    max_legend: int = 20,
) -> Path:
    """t-SNE of feature vectors ``(N, D)``, points coloured by ``colour_by`` (Figure 3).

    ``colour_by`` holds one category per point: the identity (Figure 3a) or the resolution / down-
    sampling rate, e.g. ``"r=1"``, ``"r=8"`` (Figure 3b). Categories are ordered naturally and get
    distinct colours; a legend (titled ``legend_title``) is drawn when there are at most ``max_legend``
    of them. scikit-learn's ``TSNE`` with ``random_state=seed``, PCA initialisation, perplexity
    ``min(30, (N - 1) / 3)`` so that small point sets work (t-SNE needs perplexity < N), and the exact
    gradient up to ``TSNE_EXACT_MAX`` points (faster there than Barnes-Hut, whose threads crowd a small
    machine), Barnes-Hut above. Needs N >= 2.
    """
    from sklearn.manifold import TSNE

    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {x.shape}")
    n = x.shape[0]
    if len(colour_by) != n:
        raise ValueError(f"colour_by has {len(colour_by)} entries for {n} feature vectors")
    if n < 2:
        raise ValueError(f"t-SNE needs at least 2 points, got {n}")
    tsne = TSNE(
        n_components=2,
        perplexity=min(30.0, (n - 1) / 3.0),
        init="pca" if x.shape[1] >= 2 else "random",
        method="exact" if n <= TSNE_EXACT_MAX else "barnes_hut",
        random_state=seed,
    )
    xy = tsne.fit_transform(x)  # (N, 2)

    categories = sorted(set(colour_by), key=_natural_key)
    colours = _palette(len(categories))
    fig = _figure(size_px, dpi)
    ax = fig.add_subplot()
    labels = np.asarray([categories.index(c) for c in colour_by])  # (N,)
    for k, category in enumerate(categories):
        pts = xy[labels == k]
        ax.scatter(pts[:, 0], pts[:, 1], s=14, color=colours[k], label=str(category), linewidths=0)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    if len(categories) <= max_legend:
        ax.legend(title=legend_title or None, loc="best", fontsize="small", markerscale=1.5)
    _tight(fig)
    return _save_figure(fig, path, dpi)


# ---------------------------------------------------------------------------------------------------
# Figure 4: ranked gallery sheet (Pillow only)

SHEET_PAD = 4  # outer margin and space between tiles and between rows, px
SHEET_GAP = 12  # space between the query tile and the first gallery tile, px
SHEET_BORDER = 3  # width of the frame drawn inside every tile, px
SHEET_LABEL_H = 16  # height of a text strip: the header, the legend, and each row's caption when given, px
_GREEN, _RED, _GREY, _WHITE, _BLACK = (0, 170, 0), (220, 0, 0), (140, 140, 140), (255, 255, 255), (0, 0, 0)


def ranked_gallery_sheet_size(
    n_rows: int, tile_px: tuple[int, int] = (64, 128), top_k: int = 7, labelled: bool = False
) -> tuple[int, int]:
    """Pixel size ``(width, height)`` of a ranked-gallery sheet.

    ``width = 2*SHEET_PAD + tile_w + SHEET_GAP + top_k*tile_w + (top_k - 1)*SHEET_PAD`` and
    ``height = 2*SHEET_PAD + 2*SHEET_LABEL_H + n_rows*(tile_h + label_h) + (n_rows - 1)*SHEET_PAD``: a
    header strip (the column captions) and a legend strip always, and ``label_h = SHEET_LABEL_H`` per row
    if labelled else 0. (64 x 128 tiles, k = 7, 3 rows: 556 x 432.)
    """
    tile_w, tile_h = tile_px
    label_h = SHEET_LABEL_H if labelled else 0
    width = 2 * SHEET_PAD + tile_w + SHEET_GAP + top_k * tile_w + (top_k - 1) * SHEET_PAD
    height = 2 * SHEET_PAD + 2 * SHEET_LABEL_H + n_rows * (tile_h + label_h) + (n_rows - 1) * SHEET_PAD
    return width, height


def _tile(img: Image.Image, tile_px: tuple[int, int], frame: tuple[int, int, int]) -> Image.Image:
    from PIL import Image, ImageDraw, ImageOps

    tile = Image.new("RGB", tile_px, frame)
    inner = (tile_px[0] - 2 * SHEET_BORDER, tile_px[1] - 2 * SHEET_BORDER)
    fitted = ImageOps.pad(img.convert("RGB"), inner, method=Image.Resampling.BILINEAR, color=_WHITE)
    tile.paste(fitted, (SHEET_BORDER, SHEET_BORDER))
    ImageDraw.Draw(tile).rectangle((0, 0, tile_px[0] - 1, tile_px[1] - 1), outline=frame, width=SHEET_BORDER)
    return tile


def distinct_people(person_ids: Sequence[int], n: int) -> list[int]:
    """Indices of the first `n` entries whose person differs from every earlier pick: a sheet row each."""
    seen: set[int] = set()
    picked: list[int] = []
    for i, pid in enumerate(person_ids):
        if len(picked) == n:
            break
        if pid not in seen:
            seen.add(pid)
            picked.append(i)
    return picked


def ranked_gallery_sheet(
    queries: Sequence[Image.Image],
    ranked: Sequence[Sequence[Image.Image]],
    correct: Sequence[Sequence[bool]],
    path: str | Path,
    tile_px: tuple[int, int] = (64, 128),
    top_k: int = 7,
    labels: Sequence[str] | None = None,
    distances: Sequence[Sequence[float]] | None = None,
) -> Path:
    """Figure 4: one row per query, the LR query at left, then its top-k HR gallery images.

    A header strip names the columns ("query", "rank 1", 2, ...) and a legend strip at the bottom says
    what the frames mean. Gallery tiles get a green frame when ``correct`` says the match is right and red
    otherwise; the query has a grey frame. Images are fitted into the tile keeping their aspect ratio. A
    row with fewer than ``top_k`` ranked images leaves the remaining places blank; extra images are not
    shown. ``labels`` (one per row, e.g. the query's rate and person) and ``distances`` (per row, of each
    ranked image to the query) are written in a caption strip above each row. The picture's size is exactly
    ``ranked_gallery_sheet_size(len(queries), tile_px, top_k, labels or distances given)``.
    """
    from PIL import Image, ImageDraw

    n_rows = len(queries)
    if n_rows == 0:
        raise ValueError("no query images given")
    if len(ranked) != n_rows or len(correct) != n_rows:
        raise ValueError(f"{n_rows} queries but {len(ranked)} ranked lists and {len(correct)} correct lists")
    if labels is not None and len(labels) != n_rows:
        raise ValueError(f"{n_rows} queries but {len(labels)} labels")
    if distances is not None and len(distances) != n_rows:
        raise ValueError(f"{n_rows} queries but {len(distances)} distance lists")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if min(tile_px) < 2 * SHEET_BORDER + 2:
        raise ValueError(f"tile_px must be at least {2 * SHEET_BORDER + 2} px each way, got {tile_px}")
    for i, (images, flags) in enumerate(zip(ranked, correct, strict=True)):
        if len(flags) < min(len(images), top_k):
            raise ValueError(f"row {i}: {len(images)} ranked images but {len(flags)} correct flags")
        if distances is not None and len(distances[i]) < min(len(images), top_k):
            raise ValueError(f"row {i}: {len(images)} ranked images but {len(distances[i])} distances")

    tile_w, tile_h = tile_px
    captioned = labels is not None or distances is not None
    label_h = SHEET_LABEL_H if captioned else 0
    sheet = Image.new("RGB", ranked_gallery_sheet_size(n_rows, tile_px, top_k, captioned), _WHITE)
    draw = ImageDraw.Draw(sheet)
    x0 = SHEET_PAD + tile_w + SHEET_GAP

    def column(k: int) -> int:
        return x0 + k * (tile_w + SHEET_PAD)

    draw.text((SHEET_PAD, SHEET_PAD + 2), "query", fill=_BLACK)
    for k in range(top_k):
        draw.text((column(k) + 2, SHEET_PAD + 2), "rank 1" if k == 0 else str(k + 1), fill=_BLACK)
    for i in range(n_rows):
        y = SHEET_PAD + SHEET_LABEL_H + i * (tile_h + label_h + SHEET_PAD)
        if labels is not None:
            draw.text((SHEET_PAD, y + 2), str(labels[i]), fill=_BLACK)
        for k, d in enumerate(list(distances[i])[:top_k] if distances is not None else []):
            draw.text((column(k) + 2, y + 2), f"d {d:.2f}", fill=_BLACK)
        y += label_h
        sheet.paste(_tile(queries[i], tile_px, _GREY), (SHEET_PAD, y))
        for k, img in enumerate(list(ranked[i])[:top_k]):
            frame = _GREEN if correct[i][k] else _RED
            sheet.paste(_tile(img, tile_px, frame), (column(k), y))
    y = sheet.height - SHEET_PAD - SHEET_LABEL_H + 3
    x = SHEET_PAD
    legend = [(_GREEN, "same person as the query"), (_RED, "another person")]
    for colour, text in legend:
        draw.rectangle((x, y, x + 9, y + 9), fill=colour)
        draw.text((x + 13, y - 1), text, fill=_BLACK)
        x += 13 + int(draw.textlength(text)) + 12
    if distances is not None:
        draw.text((x, y - 1), "d: distance to the query", fill=_BLACK)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


# ---------------------------------------------------------------------------------------------------
# Table 1

METRIC_LABELS = {k: f"Rank {k.removeprefix('rank')}" if k.startswith("rank") else k for k in METRIC_KEYS}
"""Column header of each metric: rank1 -> "Rank 1", ..., mAP -> "mAP"."""
TABLE1_COLUMNS = tuple((k, METRIC_LABELS[k]) for k in METRIC_KEYS if k.startswith("rank"))


def _fraction(row: str, key: str, value: Any, is_std: bool) -> float:
    v = float(value)
    if not math.isfinite(v) or v < 0.0 or (not is_std and v > 1.0):
        kind = "a standard deviation >= 0" if is_std else "a fraction in [0, 1]"
        raise ValueError(f"row {row!r}: {key} = {value!r} is not {kind} (values are fractions, not %)")
    return v


def table1_markdown(
    rows: Sequence[Mapping[str, Any]],
    name_header: str = "Method",
    decimals: int = 1,
    bold_best: bool = False,
) -> str:
    """A Markdown table in the layout of the paper's Table 1 (plus the mAP column of Table 3).

    Columns: ``name_header | Rank 1 | Rank 5 | Rank 10 | Rank 20 | mAP``. Each row is a mapping with
    ``"row"`` (its label, required) and any of ``rank1``, ``rank5``, ``rank10``, ``rank20``, ``mAP`` as
    fractions in [0, 1], each optionally with ``<key>_std``. Cells show percent with ``decimals``
    decimals, ``"78.9 ± 1.2"`` when the std is given, and ``"-"`` when the value is missing (as the
    paper does). Any other key is an error that names it. ``bold_best`` bolds the highest value of each
    column (every row that reaches it). Returns the table without a trailing newline.
    """
    allowed = {"row", *METRIC_KEYS, *(f"{k}_std" for k in METRIC_KEYS)}
    parsed: list[tuple[str, dict[str, tuple[float, float | None]]]] = []
    for i, row in enumerate(rows):
        unknown = sorted(set(row) - allowed)
        if unknown:
            raise ValueError(f"table row {i}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
        if "row" not in row:
            raise ValueError(f"table row {i}: missing the 'row' label")
        label = str(row["row"])
        cells: dict[str, tuple[float, float | None]] = {}
        for key in METRIC_KEYS:
            std_key = f"{key}_std"
            if key not in row or row[key] is None:
                if row.get(std_key) is not None:
                    raise ValueError(f"row {label!r}: {std_key} given without {key}")
                continue
            std = row.get(std_key)
            cells[key] = (
                _fraction(label, key, row[key], False),
                None if std is None else _fraction(label, std_key, std, True),
            )
        parsed.append((label, cells))

    best = {key: max((c[key][0] for _, c in parsed if key in c), default=None) for key in METRIC_KEYS}
    headers = [name_header, *(METRIC_LABELS[k] for k in METRIC_KEYS)]
    lines = ["| " + " | ".join(headers) + " |", "|:---|" + "---:|" * (len(headers) - 1)]
    for label, cells in parsed:
        texts = [label.replace("|", "\\|")]
        for key in METRIC_KEYS:
            if key not in cells:
                texts.append("-")
                continue
            value, std = cells[key]
            text = f"{100 * value:.{decimals}f}"
            if std is not None:
                text += f" ± {100 * std:.{decimals}f}"
            if bold_best and value == best[key]:
                text = f"**{text}**"
            texts.append(text)
        lines.append("| " + " | ".join(texts) + " |")
    return "\n".join(lines)


def aligned_markdown(table: str) -> str:
    """A Markdown table (``table1_markdown``'s) with every column padded to its widest cell, aligned as its
    separator row says (``---:`` right, else left): the same table to a Markdown renderer, and columns that line
    up where it is read as text (a terminal, a code block)."""
    rows = [[cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip()[1:-1])]  # `\|` is a cell's own
            for line in table.strip().splitlines()]
    if len(rows) < 2:
        raise ValueError("a Markdown table has a header and a separator row")
    header, separator, body = rows[0], rows[1], rows[2:]
    widths = [max(3, *(len(r[i]) for r in (header, *body))) for i in range(len(header))]
    right = [sep.endswith(":") and not sep.startswith(":") for sep in separator]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right,
                                                                                   strict=True)) + " |"
    rule = "|" + "|".join((":" + "-" * (w + 1)) if not r else ("-" * (w + 1) + ":") for w, r in zip(widths, right,
                                                                                                   strict=True)) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in body)])
