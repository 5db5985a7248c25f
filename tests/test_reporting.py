"""Report pictures and tables in tasks.evaluation.reporting: written, readable, of the size asked for, and
showing the data given (read back from each matplotlib figure as it was saved)."""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.axes import Axes
from matplotlib.container import BarContainer, ErrorbarContainer
from matplotlib.figure import Figure
from matplotlib.text import Text
from PIL import Image

from tasks.evaluation.reporting import (
    SHEET_BORDER,
    SHEET_GAP,
    SHEET_LABEL_H,
    SHEET_PAD,
    aligned_markdown,
    cmc_plot_rows,
    cmc_title,
    distinct_people,
    plot_cmc,
    plot_label_fraction,
    plot_rate_bars,
    plot_tsne,
    ranked_gallery_sheet,
    ranked_gallery_sheet_size,
    spread_apart,
    table1_markdown,
)

GREEN, RED, GREY, WHITE = (0, 170, 0), (220, 0, 0), (140, 140, 140), (255, 255, 255)


def open_picture(path: Path) -> Image.Image:
    assert path.is_file() and path.stat().st_size > 0
    img = Image.open(path, formats=["PNG"])
    img.load()  # decodes every pixel
    return img


def assert_size_within_1px(img: Image.Image, size: tuple[int, int]) -> None:
    assert abs(img.size[0] - size[0]) <= 1 and abs(img.size[1] - size[1]) <= 1, (img.size, size)


@pytest.fixture
def saved_axes(monkeypatch: pytest.MonkeyPatch) -> list[Axes]:
    """The single axes of every matplotlib figure saved during the test, in saving order."""
    saved: list[Axes] = []
    savefig = Figure.savefig

    def recording_savefig(fig: Figure, *args: Any, **kwargs: Any) -> None:
        (ax,) = fig.axes
        saved.append(ax)
        savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", recording_savefig)
    return saved


def scatter_groups(ax: Axes) -> dict[str, np.ndarray]:
    """Legend label -> (n, 2) points of every scatter in `ax`, in drawing order."""
    return {str(c.get_label()): np.asarray(c.get_offsets()) for c in ax.collections}


# --- CMC ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(800, 600), (333, 257)])
def test_plot_cmc_writes_picture_of_requested_size(tmp_path, size):
    curves = {"LR r=2": np.linspace(0.4, 1.0, 20).tolist(), "HR": np.linspace(0.6, 1.0, 20).tolist()}
    out = plot_cmc(curves, tmp_path / "sub" / "cmc.png", size_px=size, title="CMC")
    assert out == tmp_path / "sub" / "cmc.png"
    img = open_picture(out)
    assert_size_within_1px(img, size)
    assert len(set(img.convert("RGB").getdata())) > 10  # something was drawn


def test_plot_cmc_draws_each_curve_in_percent_against_rank(tmp_path, saved_axes):
    curves = {"LR r=2": [0.4, 0.55, 0.7, 0.9], "HR": [0.6, 0.8, 0.85, 1.0]}
    plot_cmc(curves, tmp_path / "cmc.png", size_px=(400, 300))
    (ax,) = saved_axes
    lines = {str(line.get_label()): line.get_xydata() for line in ax.get_lines()
             if not str(line.get_label()).startswith("_")}  # the rank-1 markers are unlabelled
    assert list(lines) == list(curves)
    for label, values in curves.items():
        np.testing.assert_array_equal(lines[label][:, 0], [1, 2, 3, 4])  # ranks, 1-based
        np.testing.assert_allclose(lines[label][:, 1], [100 * v for v in values])
    legend = ax.get_legend()
    assert legend is not None and [t.get_text() for t in legend.get_texts()] == list(curves)


def test_plot_cmc_shows_ranks_to_20_marks_rank_1_and_starts_the_axis_near_the_data(tmp_path, saved_axes):
    curves = {"LR": np.linspace(0.62, 1.0, 50).tolist(), "HR": np.linspace(0.8, 1.0, 50).tolist()}
    plot_cmc(curves, tmp_path / "cmc.png", size_px=(400, 300))
    (ax,) = saved_axes
    assert ax.get_xlim()[1] == pytest.approx(20.5)  # ranks 1-20, as the tables
    assert ax.get_ylim()[0] == 50  # 5 points under the lowest value shown (62), rounded down to 10
    assert sorted(t.get_text() for t in ax.texts) == ["62.0", "80.0"]  # each curve's rank-1, written
    assert all(len(line.get_xdata()) <= 20 for line in ax.get_lines())


def test_rank1_labels_of_close_values_do_not_overlap(tmp_path, saved_axes):
    """make run's query sets reached rank-1 37.7 / 35.3 / 34.3 (issue 30): each label is written apart from the
    others, inside the picture, and says its own curve's value."""
    rank1 = {"LR": 0.377, "r=2": 0.353, "r=3": 0.343, "r=4": 0.350, "r=8": 0.2, "HR": 0.6}
    curves = {label: np.linspace(value, 0.95, 20).tolist() for label, value in rank1.items()}
    for size in ((800, 600), (400, 300)):
        saved_axes.clear()
        plot_cmc(curves, tmp_path / "cmc.png", size_px=size)
        (ax,) = saved_axes
        renderer = ax.figure.canvas.get_renderer()
        boxes = {t.get_text(): Text.get_window_extent(t, renderer) for t in ax.texts}  # the words, not the line
        assert sorted(boxes) == sorted(f"{100 * v:.1f}" for v in rank1.values())
        texts = list(boxes.items())
        for i, (a, box_a) in enumerate(texts):
            assert box_a.x0 >= 0 and box_a.y0 >= 0 and box_a.x1 <= size[0] and box_a.y1 <= size[1], (a, box_a)
            for b, box_b in texts[i + 1:]:
                assert not box_a.overlaps(box_b), (size, a, b)
        # Left of the rank-1 marks, within the axes: not over the curves.
        assert all(box.x1 < ax.transData.transform((1, 0))[0] for box in boxes.values())
        assert all(box.x0 >= ax.get_window_extent().x0 for box in boxes.values())


def test_spread_apart_keeps_order_and_gap_and_leaves_distant_labels_where_they_are():
    assert spread_apart([10.0, 50.0, 90.0], 5.0) == [10.0, 50.0, 90.0]
    placed = spread_apart([37.7, 35.3, 34.3, 35.0], 3.0)
    order = sorted(range(4), key=[37.7, 35.3, 34.3, 35.0].__getitem__)
    assert [placed[i] for i in order] == sorted(placed)  # the same order as the values
    assert all(b - a >= 3.0 - 1e-9 for a, b in itertools.pairwise(sorted(placed)))
    assert np.mean(placed) == pytest.approx(np.mean([37.7, 35.3, 34.3, 35.0]))  # around where they belong


@pytest.mark.parametrize(("trials", "draws", "said"), [(1, 10, "mean of 1 trial x 10 gallery draws"),
                                                       (3, 1, "mean of 3 trials x 1 gallery draw")])
def test_the_cmc_title_says_what_each_curve_is_the_mean_of(trials, draws, said):
    assert cmc_title("synthetic", trials, draws) == f"CMC on synthetic, single-shot gallery ({said})"


def test_cmc_plot_rows_wide_format():
    rows = cmc_plot_rows({"a": [0.1, 0.5, 1.0], "b": [0.2, 0.3, 0.9]})
    assert rows == [
        {"rank": 1, "a": 0.1, "b": 0.2},
        {"rank": 2, "a": 0.5, "b": 0.3},
        {"rank": 3, "a": 1.0, "b": 0.9},
    ]
    with pytest.raises(ValueError, match="different lengths"):
        cmc_plot_rows({"a": [0.1, 0.5], "b": [0.2]})
    with pytest.raises(ValueError, match="rank"):
        cmc_plot_rows({"rank": [0.1]})


# --- t-SNE ----------------------------------------------------------------------------------------


def test_plot_tsne_by_identity_and_by_rate(tmp_path, saved_axes):
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((12, 32)) * 4
    identity = np.repeat(np.arange(12), 5)  # (60,)
    feats = centres[identity] + rng.standard_normal((60, 32))
    rates = [f"r={r}" for r in np.tile([1, 2, 4, 8, 2], 12)]
    out_id = plot_tsne(feats, identity.tolist(), tmp_path / "id.png", size_px=(500, 420), seed=1)
    out_r = plot_tsne(feats, rates, tmp_path / "r.png", size_px=(901, 899), legend_title="rate")
    assert_size_within_1px(open_picture(out_id), (500, 420))
    assert_size_within_1px(open_picture(out_r), (901, 899))

    by_identity, by_rate = (scatter_groups(ax) for ax in saved_axes)
    assert list(by_identity) == [str(i) for i in range(12)]  # one colour per identity, in numeric order
    assert all(points.shape == (5, 2) for points in by_identity.values())
    colours = {tuple(c.get_facecolor()[0]) for c in saved_axes[0].collections}
    assert len(colours) == 12
    # Each identity is a tight cluster in the features, so a point coloured as identity i has a
    # nearest neighbour coloured i: colours follow the points they belong to.
    xy = np.concatenate(list(by_identity.values()))  # (60, 2)
    owner = np.repeat(np.arange(12), 5)
    d = np.linalg.norm(xy[:, None] - xy[None], axis=-1) + np.diag(np.full(60, np.inf))  # (60, 60)
    assert np.mean(owner[d.argmin(axis=1)] == owner) >= 0.9

    assert list(by_rate) == ["r=1", "r=2", "r=4", "r=8"]  # natural order of the rates
    assert {k: len(v) for k, v in by_rate.items()} == {"r=1": 12, "r=2": 24, "r=4": 12, "r=8": 12}
    legend = saved_axes[1].get_legend()
    assert legend is not None and legend.get_title().get_text() == "rate"


def test_plot_tsne_few_points_and_bad_input(tmp_path, saved_axes):
    feats = np.array([[0.0, 1.0, 2.0], [1.0, 0.0, 2.0], [2.0, 2.0, 0.0]])
    out = plot_tsne(feats, ["a", "b", "a"], tmp_path / "few.png", size_px=(300, 300))
    assert_size_within_1px(open_picture(out), (300, 300))
    (ax,) = saved_axes
    assert {k: len(v) for k, v in scatter_groups(ax).items()} == {"a": 2, "b": 1}  # all three points
    with pytest.raises(ValueError, match="at least 2"):
        plot_tsne(feats[:1], ["a"], tmp_path / "one.png")
    with pytest.raises(ValueError, match="colour_by"):
        plot_tsne(feats, ["a", "b"], tmp_path / "bad.png")


# --- ranked gallery sheet -------------------------------------------------------------------------


def person(rng, size=(48, 100)):
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_sheet_size_formula():
    # documented: width = 2*pad + w + gap + k*w + (k-1)*pad ;
    # height = 2*pad + 2*label (header, legend) + n*(h+label if labelled) + (n-1)*pad
    assert ranked_gallery_sheet_size(3) == (556, 432)
    assert ranked_gallery_sheet_size(3, labelled=True) == (556, 480)
    assert ranked_gallery_sheet_size(1, tile_px=(30, 50), top_k=2) == (4 + 30 + 12 + 60 + 4 + 4, 58 + 32)


def test_ranked_gallery_sheet_exact_size_and_frame_colours(tmp_path):
    rng = np.random.default_rng(0)
    tile_w, tile_h = 64, 128
    queries = [person(rng) for _ in range(3)]
    ranked = [
        [person(rng) for _ in range(7)],
        [person(rng) for _ in range(4)],
        [person(rng) for _ in range(9)],
    ]
    correct = [[True, False, True, True, False, True, False], [False] * 4, [True] * 9]
    out = ranked_gallery_sheet(queries, ranked, correct, tmp_path / "sheet.png")
    img = open_picture(out).convert("RGB")
    assert img.size == (556, 432)

    x0 = SHEET_PAD + tile_w + SHEET_GAP
    for row in range(3):
        y = SHEET_PAD + SHEET_LABEL_H + row * (tile_h + SHEET_PAD)
        assert img.getpixel((SHEET_PAD + 1, y + 1)) == GREY  # query frame
        for k in range(7):
            x = x0 + k * (tile_w + SHEET_PAD)
            corner = img.getpixel((x + 1, y + tile_h // 2))  # inside the left frame edge
            if k < len(ranked[row]):
                assert corner == (GREEN if correct[row][k] else RED), (row, k)
                assert img.getpixel((x + tile_w - SHEET_BORDER, y + tile_h - 1)) == corner
            else:
                assert corner == WHITE  # fewer than top_k images: blank place


def test_ranked_gallery_sheet_labels_and_top_k(tmp_path):
    rng = np.random.default_rng(1)
    queries = [person(rng), person(rng)]
    ranked = [[person(rng) for _ in range(5)] for _ in range(2)]
    correct = [[True] * 5, [False] * 5]
    out = ranked_gallery_sheet(
        queries, ranked, correct, tmp_path / "s.png", tile_px=(40, 90), top_k=3, labels=["HR", "Ours"]
    )
    img = open_picture(out)
    assert img.size == ranked_gallery_sheet_size(2, (40, 90), 3, labelled=True) == (188, 256)
    with pytest.raises(ValueError, match="labels"):
        ranked_gallery_sheet(queries, ranked, correct, tmp_path / "x.png", labels=["one"])
    with pytest.raises(ValueError, match="ranked lists"):
        ranked_gallery_sheet(queries, ranked[:1], correct, tmp_path / "x.png")
    with pytest.raises(ValueError, match="correct flags"):
        ranked_gallery_sheet(queries, ranked, [[True], [True]], tmp_path / "x.png")
    with pytest.raises(ValueError, match="1 distance lists"):
        ranked_gallery_sheet(queries, ranked, correct, tmp_path / "x.png", distances=[[0.1] * 5])
    with pytest.raises(ValueError, match="row 1: 5 ranked images but 2 distances"):
        ranked_gallery_sheet(queries, ranked, correct, tmp_path / "x.png", distances=[[0.1] * 5, [0.1] * 2])


def test_ranked_gallery_sheet_says_what_its_columns_and_frames_are(tmp_path):
    rng = np.random.default_rng(2)
    queries = [person(rng) for _ in range(2)]
    ranked = [[person(rng) for _ in range(7)] for _ in range(2)]
    correct = [[True] + [False] * 6, [False] * 7]
    plain = open_picture(ranked_gallery_sheet(queries, ranked, correct, tmp_path / "a.png")).convert("RGB")
    with_d = open_picture(ranked_gallery_sheet(queries, ranked, correct, tmp_path / "b.png",
                                               distances=[[0.5] * 7, [0.9] * 7])).convert("RGB")

    def strip(img: Image.Image, top: int) -> set[tuple[int, int, int]]:
        return set(img.crop((0, top, img.width, top + SHEET_LABEL_H)).getdata())

    def has_text(pixels: set[tuple[int, int, int]]) -> bool:
        return any(max(p) < 80 for p in pixels)  # dark glyph pixels on the white strip

    assert has_text(strip(plain, SHEET_PAD))  # the header: "query", "rank 1", 2, ...
    legend = strip(plain, plain.height - SHEET_PAD - SHEET_LABEL_H)
    assert {GREEN, RED} <= legend and has_text(legend)  # a swatch of each frame colour, with its words
    assert has_text(strip(with_d, SHEET_PAD + SHEET_LABEL_H))  # each row's distances above its tiles
    assert with_d.height == plain.height + 2 * SHEET_LABEL_H


def test_sheet_rows_are_distinct_people():
    assert distinct_people([5, 5, 7, 5, 9, 7, 11], 3) == [0, 2, 4]
    assert distinct_people([1, 1, 1], 6) == [0]


# --- Table 1 --------------------------------------------------------------------------------------


def test_table1_markdown_layout():
    rows = [
        {
            "row": "LR r=2",
            "rank1": 0.789,
            "rank1_std": 0.0123,
            "rank5": 0.973,
            "rank10": 0.987,
            "rank20": 0.995,
            "mAP": 0.745,
            "mAP_std": 0.01,
        },
        {"row": "HR", "rank1": 0.8, "rank5": 0.9},
    ]
    assert table1_markdown(rows) == "\n".join(
        [
            "| Method | Rank 1 | Rank 5 | Rank 10 | Rank 20 | mAP |",
            "|:---|---:|---:|---:|---:|---:|",
            "| LR r=2 | 78.9 ± 1.2 | 97.3 | 98.7 | 99.5 | 74.5 ± 1.0 |",
            "| HR | 80.0 | 90.0 | - | - | - |",
        ]
    )
    bold = table1_markdown(rows, bold_best=True, decimals=2).splitlines()
    assert bold[2].split(" | ")[1:3] == ["78.90 ± 1.23", "**97.30**"]
    assert bold[3].split(" | ")[1] == "**80.00**"


def test_table1_markdown_rejects_bad_rows():
    with pytest.raises(ValueError, match="rank_1"):
        table1_markdown([{"row": "a", "rank_1": 0.5}])
    with pytest.raises(ValueError, match="fraction"):
        table1_markdown([{"row": "a", "rank1": 78.9}])  # percent by mistake
    with pytest.raises(ValueError, match="rank5_std given without rank5"):
        table1_markdown([{"row": "a", "rank5_std": 0.1}])
    with pytest.raises(ValueError, match="'row'"):
        table1_markdown([{"rank1": 0.5}])


def test_an_aligned_table_lines_up_its_columns_and_keeps_every_cell():
    """Read as text (a terminal, a run description's code block), the cells of a row stand apart in columns:
    every line is as long and has its `|` at the same places; numbers are right-aligned; nothing else changes."""
    rows = [{"row": "LR (MLR, r in {2,3,4})", "rank1": 0.377, "rank1_std": 0.012, "rank5": 0.8, "rank10": 0.922,
             "rank10_std": 0.007, "mAP": 0.466}, {"row": "a|b", "rank1": 0.9}]
    plain = table1_markdown(rows)
    aligned = aligned_markdown(plain).splitlines()
    assert len({len(line) for line in aligned}) == 1
    bars = {tuple(i for i, ch in enumerate(line) if ch == "|" and line[i - 1] != "\\") for line in aligned}
    assert len(bars) == 1
    assert aligned[2].startswith("| LR (MLR, r in {2,3,4}) | 37.7 ± 1.2 |   80.0 | 92.2 ± 0.7 |")
    assert aligned[1].startswith("|:----") and aligned[1].endswith("-:|")

    def cells(table: list[str]) -> list[list[str]]:
        return [[c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in table]
    assert cells(aligned)[2:] == cells(plain.splitlines())[2:] and cells(aligned)[0] == cells(plain.splitlines())[0]


def test_label_fraction_and_rate_bar_plots_have_the_requested_size(tmp_path):
    curve = {"RAIN": ([0.0, 0.5, 1.0], [0.1, 0.5, 0.7], [0.01, 0.05, 0.02])}
    out = plot_label_fraction(curve, tmp_path / "f5.png", {"baseline": (0.3, 0.02)}, size_px=(640, 480))
    bars = {"RAIN": {"r=2": (0.7, 0.1), "r=8": (0.4, 0.05)}, "baseline": {"r=2": (0.2, 0.0)}}
    out2 = plot_rate_bars(bars, tmp_path / "bars.png", size_px=(500, 400))
    with Image.open(out) as a, Image.open(out2) as b:
        assert a.size == (640, 480) and b.size == (500, 400)


def test_label_fraction_plot_draws_each_curve_and_reference_in_percent(tmp_path, saved_axes):
    curve = {"RAIN": ([0.0, 0.5, 1.0], [0.1, 0.5, 0.7], [0.01, 0.05, 0.02])}
    plot_label_fraction(curve, tmp_path / "f5.png", {"baseline": (0.3, 0.02)}, size_px=(640, 480))
    (ax,) = saved_axes
    (errorbar,) = (c for c in ax.containers if isinstance(c, ErrorbarContainer))
    assert errorbar.get_label() == "RAIN"
    data_line, _, (bars,) = errorbar.lines
    np.testing.assert_allclose(data_line.get_xydata(), [[0, 10], [50, 50], [100, 70]])
    np.testing.assert_allclose([seg[:, 1] for seg in bars.get_segments()], [[9, 11], [45, 55], [68, 72]])
    (reference,) = (line for line in ax.get_lines() if line.get_label() == "baseline")
    np.testing.assert_allclose(reference.get_ydata(), [30, 30])
    (band,) = ax.patches  # the reference's mean +- std
    ys = band.get_path().transformed(band.get_patch_transform()).vertices[:, 1]
    assert (ys.min(), ys.max()) == (pytest.approx(28), pytest.approx(32))


def test_rate_bar_plot_draws_a_bar_per_method_and_test_set_in_percent(tmp_path, saved_axes):
    bars = {"RAIN": {"r=2": (0.7, 0.1), "r=8": (0.4, 0.05)}, "baseline": {"r=2": (0.2, 0.0)}}
    plot_rate_bars(bars, tmp_path / "bars.png", size_px=(500, 400))
    (ax,) = saved_axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["r=2", "r=8"]  # test sets in first-seen order
    groups = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert [g.get_label() for g in groups] == ["RAIN", "baseline"]
    heights = [[p.get_height() for p in g.patches] for g in groups]
    np.testing.assert_allclose(heights, [[70, 40], [20, np.nan]])  # baseline has no r=8 bar
    centres = [[p.get_x() + p.get_width() / 2 for p in g.patches] for g in groups]
    assert centres[0][0] < centres[1][0] < 1 and 0 < centres[0][1] < centres[1][1]  # grouped by test set
    assert groups[0].errorbar is not None
    (rain_err,) = groups[0].errorbar.lines[2]
    np.testing.assert_allclose([seg[:, 1] for seg in rain_err.get_segments()], [[60, 80], [35, 45]])


def test_rate_bar_plot_says_what_it_shows_and_its_legend_covers_no_bar(tmp_path, saved_axes):
    bars = {name: {f"r={r}": (0.95, 0.03) for r in (2, 3, 4, 8)} | {"HR": (0.97, 0.02)}
            for name in ("Baseline (train on HR)", "Baseline (train on HR & LR)", "Ours (single-level)",
                         "Ours (multi-level)")}
    plot_rate_bars(bars, tmp_path / "bars.png", size_px=(600, 400), spread="mean ± std over 3 seeds",
                   xlabel="test queries")
    (ax,) = saved_axes
    assert ax.get_xlabel() == "test queries" and "mean ± std over 3 seeds" in ax.get_title()
    renderer = ax.figure.canvas.get_renderer()
    legend = ax.get_legend().get_window_extent(renderer)
    patches = [p.get_window_extent(renderer) for c in ax.containers if isinstance(c, BarContainer) for p in c]
    assert not any(legend.overlaps(p) for p in patches)


def test_grid_plots_refuse_bad_input(tmp_path):
    with pytest.raises(ValueError, match="'RAIN': 2 fractions, 1 means"):
        plot_label_fraction({"RAIN": ([0.0, 1.0], [0.5], [0.1, 0.1])}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="no label-fraction curve"):
        plot_label_fraction({}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="no bars"):
        plot_rate_bars({}, tmp_path / "x.png")
