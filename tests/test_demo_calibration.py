"""The demo's calibration line and reliability diagram; predict's conformal score and Mondrian options."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from milcell.cli import main
from milcell.data.synthetic import make_cohort

FAST = ["--folds", "2", "--epochs", "1", "--no-progress", "--threads", "1", "--batch-size", "2"]


@pytest.mark.slow
def test_demo_prints_cross_fitted_calibration_and_draws_the_reliability_diagram(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import milcell.viz
    from milcell.calibration import Calibrator
    from milcell.metrics import calibration_report
    from milcell.runs import load_run

    figures: dict[str, Any] = {}
    save = milcell.viz.save_figure

    def keep(fig: Any, path: Any, dpi: int = 150) -> Path:
        figures[Path(path).name] = fig
        return save(fig, path, dpi)

    monkeypatch.setattr(milcell.viz, "save_figure", keep)
    import milcell._cli.demo as demo

    seen: dict[str, Any] = {}
    draw = demo._reliability_figure

    def spy(runs: Any, path: Path) -> Path | None:
        seen.update(runs)
        return draw(runs, path)

    monkeypatch.setattr(demo, "_reliability_figure", spy)
    out = tmp_path / "demo"
    # 32 patients (about 26 for training) in 2 folds: each fold's calibrator sees the other fold (>= 10).
    argv = ["demo", "--smoke", "--output-dir", str(out), "--no-progress", "--patients", "32"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    line = next(line for line in printed.splitlines() if line.startswith("calibration of"))
    found = re.search(r"ECE (\d\.\d{3}) -> (\d\.\d{3}), Brier (\d\.\d{3}) -> (\d\.\d{3})", line)
    assert found, line
    assert printed.index("clinical only") < printed.index("calibration of")  # after the table
    assert (out / "reliability.png").stat().st_size > 0
    record = json.loads((out / "results.json").read_text())
    assert "reliability.png" in record["figures"]
    entry = record["calibration"]
    assert entry["model"].endswith("fusion") and entry["cross_fitted"] is not None
    assert f"{entry['cross_fitted']['ece']:.3f}" == found.group(1)

    # Nothing fitted on what it is measured on: recompute the cross-fitted ECE from the saved run.
    saved = load_run(out / "runs" / "fusion")
    assert saved.calibration is not None and saved.calibration.calibrator.temperature == entry["temperature"]
    run = seen[entry["model"]]
    assert run.cv is not None
    oof = run.cv.oof
    first = np.asarray(oof.repeat) == 0
    p = np.asarray(oof.probabilities, dtype=np.float64)[first]
    y, folds = np.asarray(oof.labels)[first], np.asarray(oof.fold)[first]
    crossed = np.empty_like(p)
    for k in np.unique(folds):
        inside = folds == k
        fitted = Calibrator("temperature").fit(np.log(p[~inside]), y[~inside])
        crossed[inside] = fitted.transform(np.log(p[inside]))
    assert f"{calibration_report(y, p).ece:.3f}" == found.group(1)
    assert f"{calibration_report(y, crossed).ece:.3f}" == found.group(2)
    # The diagram's two curves carry the printed numbers.
    legend = [t.get_text() for t in figures["reliability.png"].axes[0].get_legend().get_texts()]
    assert any(f"uncalibrated (ECE {found.group(1)})" in t for t in legend), legend
    assert any(f"cross-fitted) (ECE {found.group(2)})" in t for t in legend), legend
    # The table is the demo's: calibration changes no model (the image-only and clinical runs are plain).
    assert load_run(out / "runs" / "image_only").calibration is None


def test_demo_too_small_to_cross_fit_says_so() -> None:
    from milcell._cli.demo import _can_cross_fit, _too_few, calibration_line

    assert not _can_cross_fit(13, 2) and _can_cross_fit(24, 2) and _can_cross_fit(90, 5)
    line = calibration_line({"calibration": {"skipped": _too_few(13)}})
    assert line is not None and "13 patients are too few" in line
    assert calibration_line({"models": {}}) is None


@pytest.fixture(scope="module")
def calibrated_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("conformal")
    cohort = make_cohort(root / "dlmi", n_patients=26, seed=3, image_size=32, bag_size=(2, 3))
    out = root / "run"
    args = ["train", "--data-dir", str(cohort), "--format", "dlmi", "--image-size", "32"]
    assert main([*args, *FAST, "--output-dir", str(out), "--calibrate", "temperature"]) == 0
    return out


def _sets(path: Path) -> list[str]:
    with open(path, newline="") as fh:
        return [row["prediction_set"] for row in csv.DictReader(fh)]


@pytest.mark.slow
def test_predict_conformal_score_and_mondrian(calibrated_run: Path, tmp_path: Path) -> None:
    from milcell.runs import load_run, load_samples

    run = load_run(calibrated_run)
    calibration = run.calibration
    assert calibration is not None
    base = ["predict", "--run", str(calibrated_run), "--alpha", "0.2", "--no-progress"]
    written = {}
    for name, extra in {
        "lac": [],
        "aps": ["--conformal-score", "aps"],
        "mondrian": ["--mondrian"],
        "aps_mondrian": ["--conformal-score", "aps", "--mondrian"],
    }.items():
        target = tmp_path / f"{name}.csv"
        assert main([*base, "--output", str(target), *extra]) == 0
        written[name] = _sets(tmp_path / f"{name}_calibrated.csv")
    # Each option reaches the library: the sets equal RunCalibration.rows with the same settings.
    samples = load_samples("dlmi", str(calibrated_run.parent / "dlmi"), "test", run.class_names)
    preds = run.predict(samples, held_out=True, progress=False)
    mean = np.mean(np.stack(preds.fold_probabilities).astype(np.float64), axis=0)
    names, ids = list(run.class_names), list(preds.ids)
    for name, score, mondrian in [
        ("lac", "lac", False),
        ("aps", "aps", False),
        ("mondrian", "lac", True),
        ("aps_mondrian", "aps", True),
    ]:
        expected = calibration.rows(ids, mean, names, alpha=0.2, score=score, mondrian=mondrian)
        assert written[name] == [r["prediction_set"] for r in expected], name
    # On this cohort the options give different sets (so none of them is silently ignored).
    assert written["aps"] != written["lac"] and written["mondrian"] != written["lac"]


@pytest.mark.slow
def test_conformal_options_need_alpha(
    calibrated_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["predict", "--run", str(calibrated_run), "--output", str(tmp_path / "p.csv"), "--mondrian"]
    assert main(argv) == 2
    assert "need --alpha" in capsys.readouterr().err
    argv = ["predict", "--run", str(calibrated_run), "--output", str(tmp_path / "p.csv")]
    assert main([*argv, "--conformal-score", "aps"]) == 2
    assert not (tmp_path / "p.csv").exists()
    capsys.readouterr()
    assert main([*argv, "--alpha", "0.1", "--conformal-score", "raps"]) == 2
    assert "invalid choice: 'raps'" in capsys.readouterr().err
