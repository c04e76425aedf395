"""Quickstart: a patient-level MIL classifier in a few lines of milcell.

Writes a small synthetic lymphocytosis cohort (bags of cell images + age, lymphocyte count, sex),
builds a model from its parts (backbone -> gated-attention pooling -> clinical fusion head), trains it
with ``Trainer`` and prints clinical metrics on held-out patients. Honest by construction: the
epoch is chosen on patients held out of the training set, never on the patients it reports.

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
        make_cohort(root, n_patients=profile.pick(24, 60, 120), seed=args.seed, image_size=32)
cohort = load_dlmi(root, split="train").labelled()  # one record per patient, clinical attributes raw
print(f"{len(cohort)} labelled patients from {root}")

# 2. Split by patient: a test set that is only reported, and, inside the rest, a selection set that
#    picks the epoch (choosing it on the reported patients would make their metrics optimistic).
#    fold_datasets resizes to 32 px, normalises with the backbone's own statistics, augments the
#    training bags (flips, rotations) and scales the clinical attributes with training statistics only.
split = patient_holdout(cohort, test_size=0.25, seed=args.seed)
inner = patient_holdout(cohort.subset(split.train), test_size=0.2, seed=args.seed)
fit_rows, select_rows = split.train[inner.train], split.train[inner.val]
prep = Preprocessing.from_backbone("milcell_mini_resnet_k8", image_size=32)
options = {"image_size": 32, "mean": prep.mean, "std": prep.std, "seed": args.seed}
train_ds, select_ds, scaler = fold_datasets(cohort, fit_rows, select_rows, **options)
_, test_ds, _ = fold_datasets(cohort, fit_rows, split.val, **options)

# 3. Model from parts: cells (T, 3, 32, 32) -> features (T, D) -> bag embedding (B, D) -> logits (B, 2).
backbone = create_backbone("milcell_mini_resnet_k8")  # any timm name works, e.g. "resnet18"
model = MILModel(
    pooling=create_pooling("gated_attention", in_dim=backbone.num_features),
    head=create_fusion(
        "concat", in_dim=backbone.num_features, clinical_dim=len(cohort.clinical_names), num_classes=2
    ),
    encoder=InstanceEncoder(backbone),
)

# 4. Train, keeping the epoch with the best balanced accuracy on the selection patients.
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
select_loader = make_loader(select_ds, batch_size=4, shuffle=False)
trainer.fit(make_loader(train_ds, batch_size=4, shuffle=True, seed=args.seed), select_loader)

# 5. Evaluate: clinical metrics of the restored best model on the test patients (never used above).
metrics = trainer.evaluate(make_loader(test_ds, batch_size=4, shuffle=False))
print(f"{len(split.val)} test patients, epoch chosen on {len(select_rows)} others:")
for name in ("balanced_accuracy", "sensitivity", "specificity", "auc"):
    print(f"{name:>17}: {metrics[name]:.3f}")
print(f"checkpoints and metrics.csv in {args.output_dir / 'run'}")
