"""Tests of milcell.viz: every figure renders headlessly to a PNG, inputs are validated."""

from __future__ import annotations

import csv
import importlib
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from matplotlib.figure import Figure
from PIL import Image
from sklearn.metrics import roc_auc_score

from milcell.exceptions import ConfigError, DataError, MilcellError, ShapeError
from milcell.viz import (
    MissingExtraError,
    attention_montage,
    attention_order,
    plot_confusion_matrix,
    plot_roc,
    plot_roc_comparison,
    plot_training_curves,
    save_figure,
)


def _fold(seed: int, n: int = 30) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.array([0, 1] * (n // 2))
    score = 1 / (1 + np.exp(-(1.5 * (2 * y - 1) + rng.normal(0, 1, n))))
    return y, score


def _legend(fig: Figure) -> list[str]:
    return [t.get_text() for t in fig.axes[0].get_legend().get_texts()]


def _write_log(path: Path, rows: list[list[object]], header: list[str]) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


LOG_HEADER = ["epoch", "lr", "train_loss", "val_loss", "val_balanced_accuracy", "val_auc", "epoch_time"]


def _log_rows(epochs: int = 6) -> list[list[object]]:
    return [
        [e, 1e-3 if e < 4 else 1e-5, 1 / e, 1.2 / e if e % 2 == 0 else "", 0.5 + e / 20, "", 3.2]
        for e in range(1, epochs + 1)
    ]


def _assert_png(path: Path, min_side: int = 200) -> None:
    with Image.open(path) as img:
        img.load()
        assert img.format == "PNG"
        assert min(img.size) >= min_side
        assert max(img.size) < 6000


# ----------------------------------------------------------------------------- rendering


def _roc_fig(tmp_path: Path) -> Figure:
    return plot_roc([_fold(s) for s in range(3)], title="3 folds")


def _comparison_fig(tmp_path: Path) -> Figure:
    return plot_roc_comparison({"CNN": _fold(0), "CNN + clinical": [_fold(1), _fold(2)]})


def _curves_fig(tmp_path: Path) -> Figure:
    return plot_training_curves(_write_log(tmp_path / "log.csv", _log_rows(), LOG_HEADER))


def _cm_fig(tmp_path: Path) -> Figure:
    return plot_confusion_matrix(
        [[5, 1, 0], [2, 7, 1], [0, 0, 9]], ["lympho", "mono", "neutro"], normalize=True
    )


def _montage_fig(tmp_path: Path) -> Figure:
    return attention_montage(torch.rand(12, 3, 32, 32), torch.rand(12), k=4, title="P001")


@pytest.mark.parametrize("make", [_roc_fig, _comparison_fig, _curves_fig, _cm_fig, _montage_fig])
def test_each_figure_renders_to_png(tmp_path: Path, make) -> None:
    fig = make(tmp_path)
    out = save_figure(fig, tmp_path / "sub" / "dir" / "figure.png", dpi=80)
    assert out == tmp_path / "sub" / "dir" / "figure.png"
    _assert_png(out)
    assert plt.get_fignums() == []  # no pyplot figure left open
    assert not [p for p in out.parent.iterdir() if p.name != "figure.png"]  # no temporary left behind


# ----------------------------------------------------------------------------- ROC


def test_plot_roc_legend_reports_fold_and_mean_auc() -> None:
    folds = [_fold(s) for s in range(4)]
    fig = plot_roc(folds)
    aucs = [roc_auc_score(y, s) for y, s in folds]
    legend = _legend(fig)
    assert legend[:4] == [f"fold {i + 1} (AUC = {a:.2f})" for i, a in enumerate(aucs)]
    # sample std (ddof=1), the same as the cross-validation table (regression: the legend used ddof=0)
    assert legend[4] == f"mean (AUC = {np.mean(aucs):.2f} ± {np.std(aucs, ddof=1):.2f})"
    assert "chance" in legend


def test_plot_roc_excludes_unlabelled_and_accepts_tensors() -> None:
    y, s = _fold(0)
    with_unlabelled = (torch.tensor([*y, -1, -1]), torch.tensor([*s, 0.99, 0.01]))
    expected = roc_auc_score(y, s)
    fig = plot_roc([with_unlabelled], labels=["val"])
    assert _legend(fig)[0] == f"val (AUC = {expected:.2f})"


def test_plot_roc_draws_into_given_axes() -> None:
    fig = Figure()
    left, right = fig.subplots(1, 2)
    returned = plot_roc([_fold(0)], ax=right, title="right")
    assert returned is fig
    assert right.get_title() == "right" and len(right.lines) == 2
    assert len(left.lines) == 0


def test_plot_roc_single_curve_has_no_mean() -> None:
    legend = _legend(plot_roc([_fold(3)]))
    assert len(legend) == 2 and legend[0].startswith("ROC (AUC = ")


@pytest.mark.parametrize(
    ("curves", "labels", "error", "match"),
    [
        ([], None, DataError, "non-empty sequence"),
        ({"a": _fold(0)}, None, DataError, "non-empty sequence"),
        (_fold(0), None, DataError, r"for a single curve pass \[\(y_true, y_score\)\]"),
        ([([0, 1, 1], [0.1, 0.2])], None, ShapeError, "y_true has 3 entries but y_score has 2"),
        ([([[0, 1]], [[0.1, 0.2]])], None, ShapeError, "must be 1-D"),
        ([([0, 2, 1], [0.1, 0.2, 0.3])], None, DataError, r"binary .* got \[0, 1, 2\]"),
        ([([1, 1, -1], [0.1, 0.2, 0.3])], None, DataError, r"curves\[0\] \(ROC\): .*both classes"),
        ([([0, 1], [0.1, float("nan")])], None, DataError, "NaN"),
        ([_fold(0), "oops"], None, DataError, r"curves\[1\] must be a \(y_true, y_score\) pair"),
        ([_fold(0)], ["a", "b"], ShapeError, "labels has 2 names but curves has 1 folds"),
    ],
)
def test_plot_roc_rejects_bad_input(curves, labels, error, match) -> None:
    with pytest.raises(error, match=match):
        plot_roc(curves, labels=labels)


def test_plot_roc_comparison_single_and_folds() -> None:
    folds = [_fold(1), _fold(2)]
    fig = plot_roc_comparison({"single": _fold(0), "cv": folds})
    aucs = [roc_auc_score(y, s) for y, s in folds]
    assert _legend(fig) == [
        f"single (AUC = {roc_auc_score(*_fold(0)):.2f})",
        f"cv (AUC = {np.mean(aucs):.2f} ± {np.std(aucs):.2f})",
        "chance",
    ]
    assert len(fig.axes[0].collections) == 1  # one std band, for the cross-validated model only


def test_plot_roc_comparison_two_folds_of_two_samples_is_not_a_pair() -> None:
    folds = [([0, 1], [0.2, 0.8]), ([1, 0], [0.3, 0.6])]
    assert _legend(plot_roc_comparison({"m": folds}))[0] == "m (AUC = 0.50 ± 0.71)"  # ddof=1


@pytest.mark.parametrize(
    ("models", "match"),
    [
        ({}, "non-empty mapping"),
        ([_fold(0)], "non-empty mapping"),
        ({"m": "scores"}, "model 'm': expected a"),
        ({"m": ([0, 0], [0.1, 0.2])}, "model 'm'.*both classes"),
        ({"m": [_fold(0), (1, 2, 3)]}, r"model 'm', fold 1 must be a \(y_true, y_score\) pair"),
    ],
)
def test_plot_roc_comparison_rejects_bad_input(models, match) -> None:
    with pytest.raises(DataError, match=match):
        plot_roc_comparison(models)


# ----------------------------------------------------------------------------- training curves


def test_training_curves_from_csv(tmp_path: Path) -> None:
    fig = plot_training_curves(_write_log(tmp_path / "log.csv", _log_rows(), LOG_HEADER), title="fold 0")
    loss, metrics, lr = fig.axes
    assert [a.get_title() for a in fig.axes] == ["Loss", "Metrics", "Learning rate"]
    assert fig.get_suptitle() == "fold 0"
    assert [line.get_label() for line in loss.lines] == ["train_loss", "val_loss"]
    # val_auc is entirely empty and epoch_time is bookkeeping: neither is drawn
    assert [line.get_label() for line in metrics.lines] == ["val_balanced_accuracy"]
    val_loss = loss.lines[1]
    assert list(val_loss.get_xdata()) == [2, 4, 6]  # empty cells skipped, not drawn as gaps
    assert val_loss.get_linestyle() == "--" and loss.lines[0].get_linestyle() == "-"
    assert lr.get_yscale() == "log"


def test_training_curves_draw_confusion_counts_on_their_own_axis() -> None:
    # Regression: tp/fp/tn/fn counts (tens) were drawn on the same axis as rates in [0, 1].
    rows = [
        {"epoch": e, "val_auc": 0.6 + e / 20, "val_tp": 10 + e, "val_fn": 5 - e, "val_n_samples": 40}
        for e in range(1, 4)
    ]
    fig = plot_training_curves(rows)
    assert [a.get_title() for a in fig.axes] == ["Metrics", "Counts"]
    metrics, counts = fig.axes
    assert [line.get_label() for line in metrics.lines] == ["val_auc"]
    assert [line.get_label() for line in counts.lines] == ["val_tp", "val_fn", "val_n_samples"]


def test_training_curves_share_colour_across_prefixes() -> None:
    rows = [{"epoch": e, "train_auc": 0.5 + e / 10, "val_auc": 0.5 + e / 20} for e in range(1, 4)]
    (metrics,) = plot_training_curves(rows).axes
    train, val = metrics.lines
    assert train.get_color() == val.get_color()
    assert (train.get_linestyle(), val.get_linestyle()) == ("-", "--")


def test_training_curves_columns_selects_and_skips_text(tmp_path: Path) -> None:
    header = ["epoch", "train_loss", "note", "val_auc"]
    path = _write_log(tmp_path / "log.csv", [[1, 0.5, "warmup", 0.6], [2, 0.4, "", 0.7]], header)
    assert [a.get_title() for a in plot_training_curves(path).axes] == ["Loss", "Metrics"]
    fig = plot_training_curves(path, columns=["val_auc"])
    assert [a.get_title() for a in fig.axes] == ["Metrics"]
    with pytest.raises(DataError, match=r"column 'note' holds non-numeric values"):
        plot_training_curves(path, columns=["note"])
    with pytest.raises(DataError, match=r"has no column\(s\) \['val_loss'\]"):
        plot_training_curves(path, columns=["val_loss"])


def test_training_curves_bad_logs(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="missing.csv' does not exist"):
        plot_training_curves(tmp_path / "missing.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match="empty.csv' is empty"):
        plot_training_curves(tmp_path / "empty.csv")
    (tmp_path / "header.csv").write_text("epoch,train_loss\n")
    with pytest.raises(DataError, match="header.csv' has no rows"):
        plot_training_curves(tmp_path / "header.csv")
    (tmp_path / "noepoch.csv").write_text("step,train_loss\n1,0.5\n")
    with pytest.raises(DataError, match=r"noepoch.csv' has no 'epoch' column \(columns: step, train_loss\)"):
        plot_training_curves(tmp_path / "noepoch.csv")
    (tmp_path / "badepoch.csv").write_text("epoch,train_loss\n1,0.5\nlast,0.4\n")
    with pytest.raises(DataError, match="badepoch.csv': row 2 has epoch 'last', not a number"):
        plot_training_curves(tmp_path / "badepoch.csv")
    (tmp_path / "nothing.csv").write_text("epoch,epoch_time\n1,3.0\n")
    with pytest.raises(DataError, match="nothing.csv' has no numeric column to plot"):
        plot_training_curves(tmp_path / "nothing.csv")
    with pytest.raises(DataError, match="has no 'epoch' column"):
        plot_training_curves([{"step": 1, "loss": 0.3}])
    with pytest.raises(DataError, match="has no rows"):
        plot_training_curves([])
    with pytest.raises(DataError, match="every row must be a mapping"):
        plot_training_curves([[1, 0.3]])
    with pytest.raises(DataError, match="log must be a CSV path or a list of row dicts"):
        plot_training_curves(3)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- confusion matrix


def test_confusion_matrix_texts_and_normalisation() -> None:
    cm = np.array([[3, 1], [0, 0]])
    counts = plot_confusion_matrix(cm)
    assert sorted(t.get_text() for t in counts.axes[0].texts) == ["0", "0", "1", "3"]
    fig = plot_confusion_matrix(torch.tensor(cm), class_names=["neg", "pos"], normalize=True, title="val")
    ax = fig.axes[0]
    # an empty true class gives 0 %, not a division warning
    assert sorted(t.get_text() for t in ax.texts) == ["0\n(0.0%)", "0\n(0.0%)", "1\n(25.0%)", "3\n(75.0%)"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["neg", "pos"]
    assert ax.get_title() == "val" and ax.get_ylabel() == "True label"


@pytest.mark.parametrize(
    ("cm", "names", "error", "match"),
    [
        ([[1, 2, 3], [4, 5, 6]], None, ShapeError, r"square \(C, C\) matrix, got shape \(2, 3\)"),
        ([1, 2], None, ShapeError, "square"),
        ([[1, -1], [0, 2]], None, DataError, "non-negative"),
        ([[1, 0], [0, 2]], ["a"], ShapeError, "class_names has 1 names but cm is 2 x 2"),
    ],
)
def test_confusion_matrix_rejects_bad_input(cm, names, error, match) -> None:
    with pytest.raises(error, match=match):
        plot_confusion_matrix(cm, class_names=names)


# ----------------------------------------------------------------------------- attention


@given(
    weights=st.lists(st.floats(0, 1, allow_nan=False), min_size=1, max_size=40),
    k=st.integers(1, 10),
)
def test_attention_order_selects_extremes(weights: list[float], k: int) -> None:
    w = np.array(weights)
    top, bottom = attention_order(w, k)
    if len(w) < 2 * k:
        assert sorted(top.tolist()) == list(range(len(w))) and bottom.size == 0
        assert np.all(np.diff(w[top]) <= 0)
        return
    assert len(top) == len(bottom) == k
    assert not set(top.tolist()) & set(bottom.tolist())
    rest = np.setdiff1d(np.arange(len(w)), top)
    assert w[top].min() >= w[rest].max()
    rest = np.setdiff1d(np.arange(len(w)), bottom)
    assert w[bottom].max() <= w[rest].min()
    assert np.all(np.diff(w[top]) <= 0) and np.all(np.diff(w[bottom]) >= 0)


@pytest.mark.parametrize(
    ("weights", "k", "error", "match"),
    [
        ([0.5, 0.5], 0, ConfigError, "k must be an integer >= 1, got 0"),
        ([0.5, 0.5], 1.5, ConfigError, "k must be an integer"),
        ([[0.5, 0.5]], 1, ShapeError, r"1-D \(N,\).*attention\[b\]\[mask\[b\]\]"),
        ([], 1, ShapeError, "non-empty"),
        ([0.5, float("nan")], 1, DataError, "NaN"),
    ],
)
def test_attention_order_rejects_bad_input(weights, k, error, match) -> None:
    with pytest.raises(error, match=match):
        attention_order(weights, k)


def _cell_axes(fig: Figure) -> list:
    return [ax for ax in fig.axes if ax.get_label().startswith("cell ")]


def test_montage_orders_cells_by_weight() -> None:
    weights = torch.tensor([0.05, 0.30, 0.10, 0.0002, 0.25, 0.08, 0.20])
    fig = attention_montage(torch.rand(7, 3, 16, 16), weights, k=2, title="P7")
    cells = _cell_axes(fig)
    assert [ax.get_label() for ax in cells] == ["cell 1", "cell 4", "cell 3", "cell 0"]
    assert [ax.get_xlabel() for ax in cells] == ["0.300", "0.250", "2.0e-04", "0.050"]
    assert fig.axes[0].get_ylabel() == "highest\nattention"
    assert fig.axes[2].get_ylabel() == "lowest\nattention"
    assert fig.get_suptitle() == "P7"


def test_montage_small_bag_shows_all_sorted() -> None:
    fig = attention_montage(np.random.default_rng(0).random((3, 1, 8, 8)), [0.2, 0.5, 0.3], k=2)
    assert [ax.get_label() for ax in _cell_axes(fig)] == ["cell 1", "cell 2", "cell 0"]
    assert len(fig.axes) == 4  # 2 rows of 2, the last slot empty


def test_montage_undoes_normalisation_and_reads_uint8() -> None:
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.2, 0.2]
    raw = torch.rand(4, 3, 8, 8)
    normed = (raw - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    with pytest.raises(DataError, match=r"images\[\d\] has values in .* pass mean= and std="):
        attention_montage(normed, torch.rand(4), k=2)
    fig = attention_montage(normed, torch.tensor([0.1, 0.4, 0.2, 0.3]), k=2, mean=mean, std=std)
    shown = fig.axes[0].images[0].get_array()
    np.testing.assert_allclose(shown, raw[1].permute(1, 2, 0).numpy(), atol=1e-5)
    fig = attention_montage((raw * 255).to(torch.uint8), torch.rand(4), k=2)
    assert float(np.max(fig.axes[0].images[0].get_array())) <= 1.0


def test_montage_from_paths_with_names(tmp_path: Path) -> None:
    paths = []
    for i in range(5):
        path = tmp_path / f"cell_{i}.png"
        Image.fromarray(np.full((20, 24, 3), 40 * i, dtype=np.uint8)).save(path)
        paths.append(path)
    names = [p.name for p in paths]
    names[3] = "UID_H10_123_4_a_very_long_name_hem.bmp"
    fig = attention_montage(paths, [0.1, 0.2, 0.3, 0.4, 0.0], k=2, names=names)
    cells = _cell_axes(fig)
    assert [ax.get_label() for ax in cells] == ["cell 3", "cell 2", "cell 4", "cell 0"]
    assert cells[1].get_xlabel() == "0.300\ncell_2.png"
    first_name = cells[0].get_xlabel().split("\n")[1]
    assert len(first_name) == 20 and "…" in first_name and first_name.endswith("hem.bmp")
    shown = cells[1].images[0].get_array()
    assert shown.shape == (20, 24, 3)
    np.testing.assert_allclose(shown, 80 / 255)


def test_montage_reads_only_the_shown_files(tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(good)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    paths = [good, good, tmp_path / "broken.png", good, good]
    attention_montage(paths, [0.3, 0.2, 0.25, 0.0, 0.4], k=1)  # the broken file is never shown
    with pytest.raises(DataError, match=r"cell 2: cannot read image .*broken.png'"):
        attention_montage(paths, [0.3, 0.2, 0.9, 0.0, 0.4], k=1)
    with pytest.raises(DataError, match=r"gone.png' \(cell 0\) does not exist"):
        attention_montage([tmp_path / "gone.png"], [1.0], k=1)


@pytest.mark.parametrize(
    ("images", "weights", "kwargs", "error", "match"),
    [
        (
            torch.rand(4, 3, 8, 8),
            torch.rand(5),
            {},
            ShapeError,
            "images has 4 cells but weights has 5 values",
        ),
        (
            torch.rand(4, 3, 8, 8),
            torch.rand(4),
            {"names": ["a"]},
            ShapeError,
            "names has 1 entries but weights has 4",
        ),
        (torch.rand(4, 8, 8), torch.rand(4), {}, ShapeError, r"\(N, C, H, W\), got shape \(4, 8, 8\)"),
        (
            torch.rand(2, 4, 8, 8),
            torch.rand(2),
            {},
            ShapeError,
            r"images\[\d\] must be \(C, H, W\) with C = 1 or 3",
        ),
        (torch.rand(2, 3, 8, 8), torch.rand(2), {"k": 0}, ConfigError, "k must be an integer >= 1"),
        ("cells/", torch.rand(2), {}, DataError, "not one path"),
        (
            torch.rand(2, 3, 8, 8),
            torch.rand(2),
            {"mean": [0.1, 0.2], "std": [1.0]},
            ShapeError,
            "mean and std need 1 or 3 values",
        ),
    ],
)
def test_montage_rejects_bad_input(images, weights, kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        attention_montage(images, weights, **kwargs)


# ----------------------------------------------------------------------------- saving


def test_save_figure_formats_and_replacement(tmp_path: Path) -> None:
    fig = plot_confusion_matrix([[1, 0], [0, 1]])
    target = tmp_path / "cm.png"
    target.write_bytes(b"old")
    save_figure(fig, target, dpi=50)
    _assert_png(target, min_side=100)
    assert save_figure(fig, tmp_path / "cm.svg").read_text().lstrip().startswith("<?xml")


@pytest.mark.parametrize(
    ("name", "dpi", "match"),
    [
        ("figure", 100, "suffix '' is not one of"),
        ("figure.docx", 100, r"suffix '.docx'"),
        ("f.png", 0, "dpi"),
    ],
)
def test_save_figure_rejects_bad_target(tmp_path: Path, name: str, dpi: int, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        save_figure(plot_confusion_matrix([[1]]), tmp_path / name, dpi=dpi)
    assert not (tmp_path / name).exists()


# ----------------------------------------------------------------------------- optional dependency


def test_missing_matplotlib_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.delitem(sys.modules, "milcell.viz")
    viz = importlib.import_module("milcell.viz")  # importing works without matplotlib
    calls = [
        lambda: viz.plot_roc([_fold(0)]),
        lambda: viz.plot_roc_comparison({"m": _fold(0)}),
        lambda: viz.plot_training_curves([{"epoch": 1, "loss": 0.5}]),
        lambda: viz.plot_confusion_matrix([[1, 0], [0, 1]]),
        lambda: viz.attention_montage(torch.rand(2, 3, 8, 8), [0.4, 0.6], k=1),
    ]
    for call in calls:
        with pytest.raises(
            ImportError,
            match=r"milcell.viz needs matplotlib \(a milcell dependency\): pip install 'milcell\[viz\]'",
        ) as info:
            call()
        assert isinstance(info.value, MilcellError)
        assert type(info.value).__name__ == "MissingExtraError"
    assert issubclass(MissingExtraError, ImportError)


# ----------------------------------------------------------------------------- calibration figures


def test_reliability_diagram_points_and_counts_match_the_bins(tmp_path: Path) -> None:
    from milcell.metrics import calibration_bins
    from milcell.viz import plot_reliability_diagram

    rng = np.random.default_rng(0)
    p = rng.uniform(size=200)
    y = (rng.uniform(size=200) < p**2).astype(int)  # over-confident model
    fig = plot_reliability_diagram(y, torch.tensor(p), n_bins=5, label="raw", title="before")
    top, bottom = fig.axes
    bins = calibration_bins(y, p, n_bins=5)
    x, freq = top.lines[1].get_data()
    np.testing.assert_allclose(x, bins.confidence)
    np.testing.assert_allclose(freq, bins.frequency)
    assert [round(b.get_height()) for b in bottom.patches] == bins.counts.tolist()
    assert f"raw (ECE {bins.ece:.3f})" in [t.get_text() for t in top.get_legend().get_texts()]
    # A second curve on the same axes (after calibration) adds a line and no count panel.
    plot_reliability_diagram(y, p**2, n_bins=5, label="calibrated", ax=top)
    assert len(fig.axes) == 2 and len(top.lines) == 3
    _assert_png(save_figure(fig, tmp_path / "reliability.png", dpi=60))


def test_reliability_diagram_top_label_and_bad_input() -> None:
    from milcell.viz import plot_reliability_diagram

    prob = np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8]])
    fig = plot_reliability_diagram([0, 2, 2], prob, n_bins=3, strategy="quantile")
    assert fig.axes[0].get_ylabel() == "Observed frequency (accuracy)"
    with pytest.raises(DataError, match="probabilities"):
        plot_reliability_diagram([0, 1], [2.0, -1.0])
    with pytest.raises(ConfigError, match="strategy"):
        plot_reliability_diagram([0, 1], [0.2, 0.8], strategy="log")


def test_risk_coverage_plot_draws_one_curve_per_score(tmp_path: Path) -> None:
    from milcell.metrics import aurc
    from milcell.viz import plot_risk_coverage

    correct = np.array([1, 0, 1, 1, 0, 1])
    conf = np.array([0.9, 0.55, 0.8, 0.7, 0.6, 0.95])
    fig = plot_risk_coverage({"max probability": (correct, conf), "random": (correct, np.arange(6.0))})
    texts = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert texts[0] == f"max probability (AURC {aurc(correct, conf):.3f})"
    assert len(fig.axes[0].lines) == 2
    _assert_png(save_figure(fig, tmp_path / "rc.png", dpi=60))
    with pytest.raises(ConfigError, match="non-empty"):
        plot_risk_coverage({})


def test_reliability_diagram_second_call_on_the_same_axes_adds_only_its_curve() -> None:
    # Regression: a second call on the top axes repeated the "perfect calibration" legend entry and
    # put an x-label on the top panel (the count panel below carries it).
    from milcell.viz import plot_reliability_diagram

    rng = np.random.default_rng(1)
    p = rng.uniform(size=60)
    y = (rng.uniform(size=60) < p).astype(int)
    fig = plot_reliability_diagram(y, p, n_bins=4, label="before")
    top, bottom = fig.axes
    plot_reliability_diagram(y, np.sqrt(p), n_bins=4, label="after", ax=top)
    texts = [t.get_text() for t in top.get_legend().get_texts()]
    assert texts.count("perfect calibration") == 1
    assert [t.split(" (")[0] for t in texts] == ["perfect calibration", "before", "after"]
    assert top.get_xlabel() == "" and bottom.get_xlabel() == "Predicted probability of class 1"
    assert len(fig.axes) == 2 and len(top.lines) == 3
    # On a user's own single axes the x-label is still set, and the diagonal still drawn once.
    ax = plt.figure().add_subplot()
    for probs in (p, np.sqrt(p)):
        plot_reliability_diagram(y, probs, n_bins=4, ax=ax)
    assert ax.get_xlabel() == "Predicted probability of class 1"
    assert [line.get_label() for line in ax.lines].count("perfect calibration") == 1
    plt.close("all")
