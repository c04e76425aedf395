"""Quickstart: a patient-level MIL classifier in a few lines of milcell.

Writes a small synthetic lymphocytosis cohort (bags of cell images + age, lymphocyte count, sex),
builds a model from its parts (backbone -> gated-attention pooling -> clinical fusion head), trains it
with ``Trainer`` on a patient-level split and prints the validation metrics.

Run::

    python examples/quickstart.py --smoke      # seconds
    python examples/quickstart.py              # a few minutes on a CPU
    python examples/quickstart.py --data-dir DIR   # real data: the lymphocytosis layout
"""

from __future__ import annotations

from _common import make_parser, setup

from milcell.data import patient_holdout
from milcell.data.formats.dlmi import load_dlmi
from milcell.data.synthetic import make_cohort
from milcell.nn.backbones import create_backbone
from milcell.nn.encoder import InstanceEncoder
from milcell.nn.fusion import create_fusion
from milcell.nn.model import MILModel
from milcell.nn.pooling import create_pooling
from milcell.runs import Preprocessing, fold_datasets
from milcell.train import Trainer, make_loader

args = make_parser(__doc__).parse_args()  # --smoke, --output-dir, --seed, --device, ...
profile = setup(args, __file__)  # seeds everything, creates the output folder

# 1. Data: --data-dir (the lymphocytosis layout), else a synthetic cohort in that layout, read by the
#    same loader. Unlabelled patients (LABEL -1) cannot be trained or validated on: leave them out.
if args.data_dir is not None:
    root = args.data_dir
else:
    root = args.output_dir / f"cohort_{profile.mode}_seed{args.seed}"
    if not root.exists():
        make_cohort(root, n_patients=profile.pick(16, 60, 120), seed=args.seed, image_size=32)
cohort = load_dlmi(root, split="train").labelled()  # one record per patient, clinical attributes raw
print(f"{len(cohort)} labelled patients from {root}")

# 2. Split by patient. fold_datasets resizes to 32 px, normalises with the backbone's own statistics,
#    augments the training bags (flips, rotations) and scales the clinical attributes with training
#    statistics only.
split = patient_holdout(cohort, test_size=0.25, seed=args.seed)
prep = Preprocessing.from_backbone("milcell_mini_resnet_k8", image_size=32)
train_ds, val_ds, scaler = fold_datasets(
    cohort, split.train, split.val, image_size=32, mean=prep.mean, std=prep.std, seed=args.seed
)

# 3. Model from parts: cells (T, 3, 32, 32) -> features (T, D) -> bag embedding (B, D) -> logits (B, 2).
backbone = create_backbone("milcell_mini_resnet_k8")  # any timm name works, e.g. "resnet18"
model = MILModel(
    pooling=create_pooling("gated_attention", in_dim=backbone.num_features),
    head=create_fusion(
        "concat", in_dim=backbone.num_features, clinical_dim=len(cohort.clinical_names), num_classes=2
    ),
    encoder=InstanceEncoder(backbone),
)

# 4. Train, keeping the epoch with the best validation balanced accuracy.
trainer = Trainer(
    model,
    lr=1e-3,
    max_epochs=profile.pick(1, 10, 20),
    monitor="val_balanced_accuracy",
    restore_best=True,
    output_dir=args.output_dir / "run",
    progress=False,
    device=args.device,
)
val_loader = make_loader(val_ds, batch_size=4, shuffle=False)
trainer.fit(make_loader(train_ds, batch_size=4, shuffle=True, seed=args.seed), val_loader)

# 5. Evaluate: clinical metrics of the restored best model on the held-out patients.
metrics = trainer.evaluate(val_loader)
for name in ("balanced_accuracy", "sensitivity", "specificity", "auc"):
    print(f"{name:>17}: {metrics[name]:.3f}")
print(f"checkpoints and metrics.csv in {args.output_dir / 'run'}")
