"""The MIL model: composition, shapes, validation, config round trip and the loss."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F

from milcell.data.bag import Bag, collate_bags
from milcell.exceptions import ConfigError, DataError, ShapeError
from milcell.nn.fusion import create_fusion, list_fusions
from milcell.nn.model import MILModel, MILOutput, create_mil_model, mil_loss
from milcell.nn.pooling import create_pooling, list_poolings
from tests._factories import make_batch

EMBEDDING_POOLINGS = ["mean", "max", "lse", "attention", "gated_attention", "conv"]
FUSIONS = ["linear", "concat", "moe", "gated"]


def test_the_expected_pooling_and_fusion_names_exist() -> None:
    assert set(EMBEDDING_POOLINGS) | {"instance_mean"} <= set(list_poolings())
    assert set(FUSIONS) <= set(list_fusions())


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("pooling", EMBEDDING_POOLINGS)
def test_pooling_fusion_cross_product_on_mini_resnet(pooling: str, fusion: str) -> None:
    clinical_dim = 0 if fusion == "linear" else 2
    model = create_mil_model(
        "milcell_mini_resnet_k8", pooling=pooling, fusion=fusion, clinical_dim=clinical_dim, chunk_size=4
    ).eval()
    batch = make_batch((3, 1, 4), image_size=32, clinical_dim=clinical_dim)
    out = model(batch)
    assert isinstance(out, MILOutput)
    assert out.logits.shape == (3, 2) and torch.isfinite(out.logits).all()
    assert out.embedding.shape == (3, model.pooling.out_dim)
    assert out.attention is not None and out.attention.shape == (3, 4)
    assert torch.equal(out.attention[1, 1:], torch.zeros(3))  # padded positions get no weight
    assert out.instance_logits is None
    if fusion in ("moe", "gated"):
        assert set(out.experts) == {"image", "clinical"}
    if fusion == "gated":
        assert out.gate is not None and out.gate.shape == (3, 1)
    loss = mil_loss(out, batch)
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_prediction_level_pooling_with_clinical() -> None:
    model = create_mil_model(
        "milcell_mini_resnet_k8", pooling="instance_mean", clinical_dim=2, pooling_kwargs={"hidden": [8]}
    ).eval()
    assert model.head is None and model.use_clinical
    batch = make_batch((3, 1, 4), image_size=32, clinical_dim=2)
    out = model(batch)
    assert out.logits.shape == (3, 2) and out.instance_logits.shape == (3, 4, 2)
    torch.testing.assert_close(out.logits.exp().sum(dim=1), torch.ones(3))
    # the bag score is the log of the mean instance probability
    probs = out.instance_logits.softmax(-1)[0, :3].mean(0)
    torch.testing.assert_close(out.logits[0].exp(), probs)
    with pytest.raises(ShapeError, match="clinical"):
        model(make_batch((3, 1, 4), image_size=32))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0"])
def test_backbone_presets_in_a_model(name: str) -> None:
    model = create_mil_model(name, pooling="attention", fusion="linear", trainable=2, chunk_size=3).eval()
    out = model(make_batch((2, 3), image_size=32))
    assert out.logits.shape == (2, 2)
    assert out.embedding.shape[1] == model.encoder.num_features


def test_feature_bag_model() -> None:
    model = create_mil_model(None, pooling="gated_attention", fusion="linear", in_dim=6)
    assert model.encoder is None
    batch = make_batch((3, 1, 4), dim=6, seed=1, prefix="F")
    out = model(batch)
    assert out.logits.shape == (3, 2)
    mil_loss(out, batch).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_five_classes_with_mean_pooling() -> None:
    model = create_mil_model(None, pooling="mean", in_dim=6, num_classes=5)
    batch = make_batch((2, 2, 1, 5, 3), dim=6, labels=(0, 1, 2, 3, 4), seed=1, prefix="F")
    out = model(batch)
    assert out.logits.shape == (5, 5)
    assert mil_loss(out, batch, class_weights=[1.0, 2.0, 1.0, 0.5, 1.0]).ndim == 0


def test_single_cell_classification_as_bags_of_one() -> None:
    model = create_mil_model(
        "milcell_mini_resnet_k8", pooling="mean", num_classes=5, freeze_bn_stats=True, chunk_size=2
    ).train()
    batch = collate_bags([Bag(torch.rand(1, 3, 32, 32), label=i) for i in range(5)])
    out = model(batch)
    assert out.logits.shape == (5, 5) and out.attention.shape == (5, 1)
    torch.testing.assert_close(out.attention, torch.ones(5, 1))
    mil_loss(out, batch).backward()
    assert model.encoder.backbone.model.conv1.weight.grad is not None


def test_chunked_model_equals_unchunked() -> None:
    kwargs = dict(pooling="gated_attention", backbone_kwargs={"norm_layer": "groupnorm"})
    torch.manual_seed(3)
    plain = create_mil_model("milcell_mini_resnet_k8", **kwargs).double()
    torch.manual_seed(3)
    chunked = create_mil_model("milcell_mini_resnet_k8", chunk_size=2, checkpointing=True, **kwargs).double()
    batch = make_batch((3, 1, 4), image_size=32).to("cpu", dtype=torch.float64)
    grads = []
    for model in (plain, chunked):
        out = model(batch)
        mil_loss(out, batch).backward()
        grads.append([p.grad for p in model.parameters()])
        assert out.logits.dtype == torch.float64
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_clinical_only_ablation_skips_the_images() -> None:
    model = create_mil_model(None, pooling="mean", fusion="moe", in_dim=6, clinical_dim=2, use_image=False)
    assert not model.use_image
    batch = collate_bags([Bag(torch.full((2, 6), float("nan")), 1, clinical=torch.randn(2))])
    out = model(batch)  # NaN instances are never read
    assert out.logits.shape == (1, 2) and set(out.experts) == {"clinical"}


def test_image_only_switch_ignores_clinical() -> None:
    model = create_mil_model(
        None, pooling="mean", fusion="concat", in_dim=6, clinical_dim=2, use_clinical=False
    )
    assert not model.use_clinical
    assert model(make_batch((3, 1, 4), dim=6, seed=1, prefix="F")).logits.shape == (3, 2)


def test_config_is_json_and_rebuilds_the_model() -> None:
    model = create_mil_model(
        "milcell_mini_resnet_k8",
        pooling="conv",
        fusion="gated",
        clinical_dim=2,
        chunk_size=4,
        pooling_kwargs={"kernel_size": 3},
        fusion_kwargs={"gate_hidden": (4,)},
    )
    text = json.dumps(model.config)
    rebuilt = MILModel.from_config(json.loads(text))
    assert rebuilt.config == model.config
    rebuilt.load_state_dict(model.state_dict())
    batch = make_batch((3, 1, 4), image_size=32, clinical_dim=2)
    torch.testing.assert_close(rebuilt.eval()(batch).logits, model.eval()(batch).logits)


def test_composed_model_and_its_checks() -> None:
    pool = create_pooling("attention", 6)
    model = MILModel(pool, create_fusion("concat", 6, 3, 4))
    assert model.num_classes == 4 and model.clinical_dim == 3 and model.config is None
    with pytest.raises(ConfigError, match="num_classes=3"):
        MILModel(pool, create_fusion("linear", 6, 0, 4), num_classes=3)
    with pytest.raises(ConfigError, match="head=None"):
        MILModel(create_pooling("instance_mean", 6), create_fusion("linear", 2, 0, 2))
    with pytest.raises(ConfigError, match="fusion head is required"):
        MILModel(pool, None)
    with pytest.raises(ConfigError, match="encoder gives 64"):
        create = create_mil_model("milcell_mini_resnet_k8")
        MILModel(pool, create_fusion("linear", 6, 0, 2), encoder=create.encoder)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"backbone": None}, "in_dim is required"),
        ({"backbone": None, "in_dim": 0}, "in_dim"),
        ({"in_dim": 10}, "in_dim=10"),
        ({"num_classes": 1}, "num_classes"),
        ({"clinical_dim": -1}, "clinical_dim"),
        ({"pooling": "instance_mean", "fusion": "moe"}, "prediction-level"),
        ({"fusion": None}, "needs a fusion head"),
        ({"use_image": False}, "clinical_dim > 0"),
        ({"use_image": False, "use_clinical": False}, "both be False"),
        ({"pooling_kwargs": {"hidden": object()}}, "JSON"),
        ({"pooling": "median"}, "median"),
        ({"fusion": "linear", "use_image": False, "clinical_dim": 2}, "linear"),
    ],
)
def test_bad_builder_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        create_mil_model(**kwargs)


def test_input_validation() -> None:
    image_model = create_mil_model("milcell_mini_resnet_k8", fusion="concat", clinical_dim=2).eval()
    with pytest.raises(ShapeError, match=r"batch.instances must be images \(T, C, H, W\)"):
        image_model(make_batch((3, 1, 4), dim=6, seed=1, prefix="F"))
    gray = collate_bags([Bag(torch.rand(2, 1, 32, 32), 0, clinical=torch.zeros(2))])
    with pytest.raises(ShapeError, match="instances has 1 channels"):
        image_model(gray)
    with pytest.raises(ShapeError, match="batch.clinical is missing"):
        image_model(make_batch((3, 1, 4), image_size=32))
    with pytest.raises(ShapeError, match=r"batch.clinical must have shape \(B, 2\)"):
        image_model(make_batch((3, 1, 4), image_size=32, clinical_dim=3))
    nan_clinical = make_batch((3, 1, 4), image_size=32, clinical_dim=2)
    nan_clinical.clinical[1, 0] = float("nan")
    with pytest.raises(DataError, match=r"NaN or inf for bags \['P1'\]"):
        image_model(nan_clinical)
    nan_image = make_batch((3, 1, 4), image_size=32, clinical_dim=2)
    nan_image.instances[3, 0, 0, 0] = float("inf")
    with pytest.raises(DataError, match=r"batch.instances holds NaN or inf in bags \['P1'\]"):
        image_model(nan_image)
    with pytest.raises(ShapeError, match="BagBatch"):
        image_model(torch.rand(2, 3, 32, 32))

    feature_model = create_mil_model(None, pooling="mean", in_dim=6)
    with pytest.raises(ShapeError, match=r"feature size 5 but the model expects 6"):
        feature_model(make_batch((3, 1, 4), dim=5, seed=1, prefix="F"))
    with pytest.raises(ShapeError, match=r"features \(T, D\)"):
        feature_model(make_batch((3, 1, 4), image_size=32))
    bad = make_batch((3, 1, 4), dim=6, seed=1, prefix="F")
    bad.instances[0, 0] = float("nan")
    with pytest.raises(DataError, match="F0"):
        feature_model(bad)
    ints = collate_bags([Bag(torch.ones(2, 6, dtype=torch.long), 0)])
    with pytest.raises(ShapeError, match="floating point"):
        feature_model(ints)


# ----------------------------------------------------------------------------- loss
def _out(logits: list[list[float]], experts: dict | None = None) -> MILOutput:
    t = torch.tensor(logits)
    return MILOutput(logits=t, embedding=torch.zeros(len(logits), 1), experts=experts or {})


def test_loss_ignores_unlabelled_and_uses_class_weights() -> None:
    batch = make_batch((1, 1, 1), dim=6, labels=(0, -1, 1), seed=1, prefix="F")
    out = _out([[1.0, 0.0], [9.0, -9.0], [0.5, 0.2]])
    expected = F.cross_entropy(out.logits[[0, 2]], torch.tensor([0, 1]))
    torch.testing.assert_close(mil_loss(out, batch), expected)
    weights = torch.tensor([1.0, 3.0])
    weighted = mil_loss(out, batch, class_weights=weights)
    manual = (
        1.0 * F.cross_entropy(out.logits[[0]], torch.tensor([0]))
        + 3.0 * F.cross_entropy(out.logits[[2]], torch.tensor([1]))
    ) / 4.0
    torch.testing.assert_close(weighted, manual)
    assert (
        mil_loss(out, batch, class_weights=torch.tensor([1.0, 3.0], dtype=torch.float64)).dtype
        == torch.float32
    )


def test_loss_with_soft_labels() -> None:
    bags = [
        Bag(torch.zeros(1, 2), label=-1, soft_label=torch.tensor([0.25, 0.75])),
        Bag(torch.zeros(1, 2), label=0, soft_label=torch.tensor([1.0, 0.0])),
    ]
    batch = collate_bags(bags)
    out = _out([[0.0, 1.0], [2.0, -1.0]])
    logp = out.logits.log_softmax(-1)
    expected = -(batch.soft_labels * logp).sum(1).mean()
    torch.testing.assert_close(mil_loss(out, batch), expected)
    bad = collate_bags([Bag(torch.zeros(1, 2), soft_label=torch.tensor([0.5, 0.2]))])
    with pytest.raises(DataError, match="sum to 1"):
        mil_loss(_out([[0.0, 0.0]]), bad)


def test_loss_adds_expert_terms() -> None:
    batch = make_batch((1, 1), dim=6, labels=(1, 0), seed=1, prefix="F")
    experts = {
        "image": torch.tensor([[0.0, 2.0], [1.0, 1.0]]),
        "clinical": torch.tensor([[3.0, 0.0], [0.0, 0.0]]),
    }
    out = _out([[0.1, 0.2], [0.3, -0.1]], experts)
    y = torch.tensor([1, 0])
    expected = F.cross_entropy(out.logits, y) + 0.5 * (
        F.cross_entropy(experts["image"], y) + F.cross_entropy(experts["clinical"], y)
    )
    torch.testing.assert_close(mil_loss(out, batch, expert_weight=0.5), expected)
    torch.testing.assert_close(mil_loss(out, batch, expert_weight=0.0), F.cross_entropy(out.logits, y))


def test_detached_moe_experts_train_through_the_auxiliary_loss() -> None:
    model = create_mil_model(
        None,
        pooling="mean",
        fusion="moe",
        in_dim=6,
        clinical_dim=2,
        fusion_kwargs={"detach_experts": True},
    )
    g = torch.Generator().manual_seed(2)
    batch = collate_bags(
        [Bag(torch.randn(2, 6, generator=g), i % 2, clinical=torch.randn(2, generator=g)) for i in range(3)]
    )
    out = model(batch)
    model.loss(out, batch, expert_weight=0.0).backward()
    assert all(p.grad is None or not p.grad.any() for p in model.head.image_expert.parameters())
    model.zero_grad()
    model.loss(model(batch), batch).backward()
    assert any(p.grad is not None and p.grad.any() for p in model.head.image_expert.parameters())


def test_loss_errors() -> None:
    batch = make_batch((1, 1), dim=6, labels=(-1, -1), seed=1, prefix="F")
    with pytest.raises(DataError, match="no labelled bag"):
        mil_loss(_out([[0.0, 0.0], [0.0, 0.0]]), batch)
    labelled = make_batch((1, 1), dim=6, labels=(0, 1), seed=1, prefix="F")
    with pytest.raises(ConfigError, match=r"class_weights must have shape \(2,\)"):
        mil_loss(_out([[0.0, 0.0], [0.0, 0.0]]), labelled, class_weights=[1.0, 2.0, 3.0])
    with pytest.raises(ConfigError, match="class_weights must be finite"):
        mil_loss(_out([[0.0, 0.0], [0.0, 0.0]]), labelled, class_weights=[1.0, -1.0])
    with pytest.raises(DataError, match="out of range"):
        mil_loss(_out([[0.0, 0.0], [0.0, 0.0]]), make_batch((1, 1), dim=6, labels=(0, 2), seed=1, prefix="F"))
    with pytest.raises(ShapeError, match="logits"):
        mil_loss(_out([[0.0, 0.0]]), labelled)


def test_frozen_backbone_freezes_batchnorm_statistics_by_default() -> None:
    # Regression: trainable="head" froze the weights but BatchNorm running statistics still drifted.
    import torch

    from milcell.data import Bag, collate_bags
    from milcell.nn.model import create_mil_model

    model = create_mil_model("milcell_mini_resnet_k8", pooling="mean", trainable="head")
    assert model.config["freeze_bn_stats"] is True
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    model.train()
    model(collate_bags([Bag(torch.rand(4, 3, 32, 32), 1), Bag(torch.rand(3, 3, 32, 32), 0)]))
    after = model.state_dict()
    assert before and all(torch.equal(v, after[k]) for k, v in before.items())
    trainable = create_mil_model("milcell_mini_resnet_k8", pooling="mean")
    assert trainable.config["freeze_bn_stats"] is False


# ----------------------------------------------------------------------------- decomposition and parts
@pytest.mark.parametrize(
    ("backbone", "pooling", "fusion", "clinical_dim"),
    [
        (None, "gated_attention", "gated", 2),
        (None, "conv", "moe", 2),
        (None, "instance_mean", None, 2),
        ("milcell_mini_resnet_k8", "attention", "concat", 2),
        ("milcell_mini_resnet_k8", "instance_mean", None, 0),
    ],
)
def test_forward_is_head_of_pool_of_encode(
    backbone: str | None, pooling: str, fusion: str | None, clinical_dim: int
) -> None:
    model = create_mil_model(
        backbone,
        pooling=pooling,
        fusion=fusion,
        in_dim=6 if backbone is None else None,
        clinical_dim=clinical_dim,
    ).eval()
    if backbone is None:
        g = torch.Generator().manual_seed(4)
        batch = collate_bags(
            [Bag(torch.randn(n, 6, generator=g), 1, clinical=torch.randn(2, generator=g)) for n in (2, 5, 1)]
        )
    else:
        batch = make_batch((3, 1, 4), image_size=32, clinical_dim=clinical_dim)
    out = model(batch)
    features = model.encode(batch)
    assert features.shape == (batch.num_instances, model.in_dim)
    embedding, attention = model.pool(features, batch, return_attention=True)
    torch.testing.assert_close(model.pool(features, batch), embedding)
    fused = model.forward_head(embedding, batch.clinical)
    torch.testing.assert_close(fused.logits, out.logits)
    torch.testing.assert_close(embedding, out.embedding)
    torch.testing.assert_close(attention, out.attention)
    assert set(fused.experts) == set(out.experts)
    # encode also takes packed instances as they are
    torch.testing.assert_close(model.encode(batch.instances), features)


def test_clinical_only_forward_head_without_embedding() -> None:
    model = create_mil_model(None, pooling="mean", fusion="concat", in_dim=6, clinical_dim=2, use_image=False)
    batch = collate_bags([Bag(torch.randn(2, 6), 1, clinical=torch.randn(2))])
    torch.testing.assert_close(model.forward_head(None, batch.clinical).logits, model(batch).logits)


def test_decomposition_errors() -> None:
    model = create_mil_model(None, pooling="mean", in_dim=6)
    batch = make_batch((3, 1, 4), dim=6, seed=1, prefix="F")
    with pytest.raises(ShapeError, match=r"MILModel.pool: features must have shape \(T, D\) with T = 8"):
        model.pool(torch.randn(7, 6), batch)
    with pytest.raises(ShapeError, match="BagBatch or a Tensor"):
        model.encode([[1.0]])  # type: ignore[arg-type]
    with pytest.raises(ShapeError, match="BagBatch"):
        model.pool(torch.randn(8, 6), batch.instances)  # type: ignore[arg-type]
    prediction = create_mil_model(None, pooling="instance_mean", in_dim=6)
    with pytest.raises(ShapeError, match="needs the embedding"):
        prediction.forward_head(None)


def test_parts_must_follow_their_protocols() -> None:
    head = create_fusion("linear", 6, 0, 2)
    with pytest.raises(ConfigError, match="pooling must be a milcell.nn.pooling.MILPooling.*got Linear"):
        MILModel(torch.nn.Linear(6, 6), head)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="head must be a milcell.nn.fusion.FusionHead.*got Linear"):
        MILModel(create_pooling("mean", 6), torch.nn.Linear(6, 2))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="encoder must be an nn.Module"):
        MILModel(create_pooling("mean", 6), head, encoder="resnet18")  # type: ignore[arg-type]


def test_prediction_level_is_read_from_the_pooling_not_its_name() -> None:
    """Regression: only the literal name "instance_mean" got num_classes and clinical_dim."""
    from milcell.nn.pooling import _POOLINGS, InstanceMeanPooling, register_pooling

    class Renamed(InstanceMeanPooling):
        pass

    register_pooling("instance_mean_renamed_for_test")(Renamed)
    try:
        model = create_mil_model(
            None, pooling="instance_mean_renamed_for_test", in_dim=6, num_classes=4, clinical_dim=2
        )
        assert model.head is None and model.prediction_level and model.num_classes == 4
        assert model.pooling.clinical_dim == 2 and model.use_clinical
        out = model(collate_bags([Bag(torch.randn(3, 6), 3, clinical=torch.randn(2))]))
        assert out.logits.shape == (1, 4) and out.instance_logits.shape == (1, 3, 4)
    finally:
        _POOLINGS._factories.pop("instance_mean_renamed_for_test")


def test_loss_class_weights_on_the_host_and_expert_weight() -> None:
    batch = make_batch((1, 1, 1), dim=6, labels=(0, -1, 1), seed=1, prefix="F")
    out = _out([[1.0, 0.0], [9.0, -9.0], [0.5, 0.2]])
    reference = mil_loss(out, batch, class_weights=[1.0, 3.0])
    for weights in (torch.tensor([1.0, 3.0]), (1, 3), __import__("numpy").array([1.0, 3.0])):
        torch.testing.assert_close(mil_loss(out, batch, class_weights=weights), reference)
    with pytest.raises(ConfigError, match="class_weights must be finite"):
        mil_loss(out, batch, class_weights=torch.tensor([float("nan"), 1.0]))
    with pytest.raises(ConfigError, match="class_weights must be"):
        mil_loss(out, batch, class_weights=["a", "b"])
    with pytest.raises(ConfigError, match="expert_weight must be a finite number >= 0.0, got -1.0"):
        mil_loss(out, batch, expert_weight=-1.0)


def test_old_spellings_of_the_model_names() -> None:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        old = create_mil_model(None, pooling="mean", fusion="concat", feature_dim=6, clinical_dim=2)
        needs = old.needs_clinical
    # feature_dim= and needs_clinical each warn once, naming the new spelling
    messages = [str(w.message) for w in record if issubclass(w.category, DeprecationWarning)]
    assert len(messages) == 2
    assert "in_dim" in messages[0] and "use_clinical" in messages[1]
    new = create_mil_model(None, pooling="mean", fusion="concat", in_dim=6, clinical_dim=2)
    assert old.config == new.config and old.config["in_dim"] == 6 and "feature_dim" not in old.config
    assert needs is new.use_clinical is True
    with pytest.raises(ConfigError, match=r"create_mil_model: pass in_dim= only \(feature_dim="):
        create_mil_model(None, pooling="mean", in_dim=6, feature_dim=6)
    with pytest.warns(DeprecationWarning, match=r"MILModel\.feature_dim is deprecated, use \.in_dim"):
        assert new.feature_dim == 6
    with pytest.warns(DeprecationWarning, match=r"MILModel\.uses_image is deprecated, use \.use_image"):
        assert new.uses_image is True


def test_a_config_saved_before_the_rename_loads_without_warning() -> None:
    config = create_mil_model(None, pooling="mean", in_dim=6).config
    saved = {("feature_dim" if k == "in_dim" else k): v for k, v in config.items()}  # a run.json of 0.2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert MILModel.from_config(saved).config == config


# --------------------------------------------------------------------------- issue 15: any encoder, one logit


def test_mlp_encoder_model_attention_mil_on_feature_bags() -> None:
    torch.manual_seed(0)
    model = create_mil_model(
        encoder="mlp",
        encoder_kwargs={"hidden": (32, 16, 8), "dropout": 0.1},
        in_dim=20,
        pooling="attention",
        chunk_size=3,
        checkpointing=True,
    )
    assert model.config["backbone"] is None and model.config["encoder"] == "mlp"
    assert model.encoder.num_features == 8 and model.pooling.in_dim == 8 and model.encoder.chunk_size == 3
    batch = collate_bags([Bag(torch.randn(5, 20), 1), Bag(torch.randn(2, 20), 0)])
    out = model(batch)
    assert out.logits.shape == (2, 2) and out.attention.shape == (2, 5)
    model.loss(out, batch).backward()
    assert model.encoder.backbone.net[0].weight.grad is not None
    # Chunked and checkpointed equals one pass (eval: no dropout).
    model.eval()
    plain = MILModel.from_config({**model.config, "chunk_size": None, "checkpointing": False}).eval()
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(model(batch).logits, plain(batch).logits)
    # The config rebuilds it (JSON round trip included).
    rebuilt = MILModel.from_config(json.loads(json.dumps(model.config)))
    rebuilt.load_state_dict(model.state_dict())
    torch.testing.assert_close(rebuilt.eval()(batch).logits, model(batch).logits)
    with pytest.raises(ShapeError, match=r"features \(T, 20\)"):
        model(collate_bags([Bag(torch.randn(3, 7), 0)]))


def test_mlp_encoder_arguments() -> None:
    with pytest.raises(ConfigError, match="backbone='resnet18' would encode images"):
        create_mil_model("resnet18", encoder="mlp", in_dim=8)
    with pytest.raises(ConfigError, match="encoder must be one of"):
        create_mil_model(None, encoder="lstm", in_dim=8)
    with pytest.raises(ConfigError, match="in_dim is required"):
        create_mil_model(encoder="mlp")
    with pytest.raises(ConfigError, match="without an encoder"):
        create_mil_model(None, in_dim=8, encoder_kwargs={"hidden": 4})
    with pytest.raises(ConfigError, match="does not take"):
        create_mil_model(encoder="mlp", in_dim=8, encoder_kwargs={"depth": 4})
    # Defaults: the classic 256-128-64 instance network.
    assert create_mil_model(encoder="mlp", in_dim=8).encoder.backbone.hidden == (256, 128, 64)
    # A model without encoder/one_logit records neither (configs of earlier runs are unchanged).
    assert not {"encoder", "encoder_kwargs", "one_logit"} & set(create_mil_model(None, in_dim=4).config)


def test_any_module_is_an_encoder() -> None:
    class Tokens(torch.nn.Module):  # (T, L, 4) -> (T, 4)
        num_features = 4

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=1)

    model = MILModel(create_pooling("mean", 4), create_fusion("linear", 4, 0, 2), encoder=Tokens())
    batch = collate_bags([Bag(torch.randn(3, 5, 4), 0), Bag(torch.randn(1, 5, 4), 1)])
    assert model(batch).logits.shape == (2, 2)

    class Wide(Tokens):
        num_features = 6

    with pytest.raises(ConfigError, match="the encoder gives 6 features"):
        MILModel(create_pooling("mean", 4), create_fusion("linear", 4, 0, 2), encoder=Wide())


@pytest.mark.parametrize("fusion", FUSIONS)
def test_one_logit_model_loss_is_bce_on_z(fusion: str) -> None:
    torch.manual_seed(0)
    kwargs = {"clinical_dim": 3} if fusion != "linear" else {}
    model = create_mil_model(None, pooling="attention", fusion=fusion, in_dim=6, one_logit=True, **kwargs)
    assert model.one_logit and model.config["one_logit"] is True
    batch = make_batch([3, 2, 4, 1], dim=6, clinical_dim=kwargs.get("clinical_dim", 0), labels=[1, 0, -1, 1])
    out = model(batch)
    z = out.logits[:, 1]
    assert torch.equal(out.logits[:, 0], torch.zeros(4))
    keep = batch.labels >= 0
    bce = F.binary_cross_entropy_with_logits(z[keep], batch.labels[keep].float())
    ce = F.cross_entropy(out.logits[keep], batch.labels[keep])
    torch.testing.assert_close(ce, bce)  # CE on [0, z] is BCE on z
    experts = sum(
        F.binary_cross_entropy_with_logits(s[keep, 1], batch.labels[keep].float())
        for s in out.experts.values()
    )
    torch.testing.assert_close(model.loss(out, batch), bce + experts)
    # pos_weight scales the positive terms, as torch's BCE does.
    pw = torch.tensor(2.5)
    expected = F.binary_cross_entropy_with_logits(z[keep], batch.labels[keep].float(), pos_weight=pw) + sum(
        F.binary_cross_entropy_with_logits(s[keep, 1], batch.labels[keep].float(), pos_weight=pw)
        for s in out.experts.values()
    )
    torch.testing.assert_close(model.loss(out, batch, pos_weight=2.5), expected)
    model.loss(out, batch, pos_weight=2.5).backward()


def test_one_logit_soft_labels_and_class_weights() -> None:
    torch.manual_seed(0)
    model = create_mil_model(None, pooling="mean", in_dim=4, one_logit=True)
    batch = make_batch([2, 3], dim=4, labels=[1, 0])
    out = model(batch)
    w = torch.tensor([0.5, 2.0])
    torch.testing.assert_close(
        model.loss(out, batch, class_weights=w), F.cross_entropy(out.logits, batch.labels, weight=w)
    )
    batch.soft_labels = torch.tensor([[0.2, 0.8], [0.9, 0.1]])
    torch.testing.assert_close(
        model.loss(out, batch),
        F.binary_cross_entropy_with_logits(out.logits[:, 1], batch.soft_labels[:, 1]),
    )


def test_pos_weight_and_one_logit_arguments() -> None:
    out = MILOutput(logits=torch.zeros(2, 3), embedding=torch.zeros(2, 1))
    batch = make_batch([1, 1], dim=1, labels=[0, 2])
    with pytest.raises(ConfigError, match="needs 2 classes"):
        mil_loss(out, batch, pos_weight=2.0)
    two = MILOutput(logits=torch.zeros(2, 2), embedding=torch.zeros(2, 1))
    with pytest.raises(ConfigError, match="pos_weight"):
        mil_loss(two, make_batch([1, 1], dim=1), pos_weight=0.0)
    with pytest.raises(ConfigError, match="one_logit=True is for binary problems"):
        create_mil_model(None, in_dim=4, num_classes=3, one_logit=True)
    with pytest.raises(ConfigError, match="prediction-level"):
        create_mil_model(None, pooling="instance_mean", in_dim=4, one_logit=True)
