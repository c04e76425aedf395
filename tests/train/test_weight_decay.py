"""Weight decay from the Trainer to train_run, the command line and the tuning space."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from milcell.cli import main
from milcell.exceptions import ConfigError
from milcell.train.trainer import Trainer
from milcell.tune import SearchSpace, run_options
from tests._factories import MeanMIL


def test_trainer_passes_weight_decay_to_its_default_optimizer() -> None:
    assert Trainer(MeanMIL(), progress=False).optimizer.param_groups[0]["weight_decay"] == 0.0
    trainer = Trainer(MeanMIL(), weight_decay=5e-3, progress=False)
    assert trainer.optimizer.param_groups[0]["weight_decay"] == 5e-3


def test_weight_decay_is_validated_and_refused_with_an_optimizer() -> None:
    model = MeanMIL()
    with pytest.raises(ConfigError, match="weight_decay"):
        Trainer(model, weight_decay=-1.0, progress=False)
    with pytest.raises(ConfigError, match="default optimizer only"):
        Trainer(model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), weight_decay=0.1)


def test_weight_decay_is_an_option_of_a_run_and_of_a_search_space() -> None:
    assert "weight_decay" in run_options()
    space = SearchSpace.from_mapping(
        {"weight-decay": {"type": "loguniform", "low": 1e-5, "high": 1e-2}}, allowed=run_options()
    )
    assert space.names == ["weight_decay"]


@pytest.mark.slow
def test_cli_weight_decay_is_recorded_and_changes_the_settings(tmp_path: Path) -> None:
    from milcell.data.synthetic import make_cohort
    from milcell.runs import load_run

    data = make_cohort(tmp_path / "dlmi", n_patients=20, seed=0, image_size=32, bag_size=(2, 3))
    args = ["train", "--data-dir", str(data), "--format", "dlmi", "--image-size", "32", "--folds", "2"]
    args += ["--epochs", "1", "--batch-size", "2", "--no-progress", "--threads", "1", "--device", "cpu"]
    out = tmp_path / "run"
    assert main([*args, "--output-dir", str(out), "--weight-decay", "0.01"]) == 0
    assert load_run(out).record["config"]["weight_decay"] == 0.01
    # A rerun with another weight decay is another run: refused without --overwrite.
    assert main([*args, "--output-dir", str(out), "--weight-decay", "0.02"]) == 2
