"""Label smoothing, MixUp and CutMix of the MLP head's training (histolens.training.mixing), their config
checks and their command-line flags."""

import csv
import json
import math

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from histolens.cli.commands import main
from histolens.config import RunConfig
from histolens.errors import ConfigError
from histolens.training.mixing import (
    batch_generator,
    mix_batch,
    mix_labelled_batch,
    soft_target_loss,
    soft_targets,
)

MLP = {"model.head": "mlp"}
# The tiny fast run of tests/test_ddp.py: random tiny backbone, one held-out split.
FAST = [
    "--backbone", "test_resnet", "--pretrained", "none", "--cv-folds", "0",
    "--input-size", "pretrained", "--batch-size", "8", "--stain-norm", "none", "--quiet",
]  # fmt: skip


def test_soft_targets_binary_and_multiclass():
    y = torch.tensor([0, 1, 1])
    torch.testing.assert_close(soft_targets(y, 1, 0.1), torch.tensor([0.05, 0.95, 0.95]))
    torch.testing.assert_close(soft_targets(y, 1), torch.tensor([0.0, 1.0, 1.0]))
    y3 = torch.tensor([0, 2, 1, 2])
    t = soft_targets(y3, 3, 0.3)
    assert t.shape == (4, 3)
    torch.testing.assert_close(t.sum(1), torch.ones(4))
    assert t[1].tolist() == pytest.approx([0.1, 0.1, 0.8])
    # The targets F.cross_entropy's own label smoothing uses.
    logits = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        F.cross_entropy(logits, t), F.cross_entropy(logits, y3, label_smoothing=0.3)
    )


def _batch(shape, n_classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g)
    y = torch.randint(n_classes, (shape[0],), generator=g)
    return x, soft_targets(y, n_classes, 0.1), torch.rand(shape[0], generator=g) + 0.5


def test_mixup_blends_inputs_targets_and_weights_by_the_drawn_share():
    x, t, w = _batch((6, 5))
    mixed = mix_batch(x, t, w, 0.4, 0.0, batch_generator(42, 0, 3))
    lam, perm = mixed.lam, mixed.perm
    assert 0 < lam < 1 and mixed.box is None
    assert sorted(perm.tolist()) == list(range(6)) and perm.tolist() != list(range(6))
    torch.testing.assert_close(mixed.inputs, lam * x + (1 - lam) * x[perm])
    torch.testing.assert_close(mixed.targets, lam * t + (1 - lam) * t[perm])
    torch.testing.assert_close(mixed.weights, lam * w + (1 - lam) * w[perm])
    torch.testing.assert_close(mixed.targets.sum(1), torch.ones(6))


def test_cutmix_pastes_exactly_one_box_and_lam_is_its_complement():
    x, t, w = _batch((4, 3, 20, 30))
    for batch_idx in range(8):
        mixed = mix_batch(x, t, w, 0.0, 1.0, batch_generator(42, 1, batch_idx))
        top, bottom, left, right = mixed.box
        inside = torch.zeros(20, 30, dtype=torch.bool)
        inside[top:bottom, left:right] = True
        perm = mixed.perm
        assert torch.equal(mixed.inputs[..., inside], x[perm][..., inside])
        assert torch.equal(mixed.inputs[..., ~inside], x[..., ~inside])
        assert mixed.lam == pytest.approx(1 - inside.sum().item() / (20 * 30))
        torch.testing.assert_close(mixed.targets, mixed.lam * t + (1 - mixed.lam) * t[perm])
    torch.testing.assert_close(x, _batch((4, 3, 20, 30))[0])  # the batch itself is untouched


def test_both_on_picks_one_per_batch_and_the_draws_follow_the_seed():
    x, t, w = _batch((4, 3, 16, 16))
    boxes = [mix_batch(x, t, w, 0.4, 1.0, batch_generator(7, 0, i)).box for i in range(20)]
    assert 0 < sum(b is None for b in boxes) < 20  # MixUp for some batches, CutMix for others
    a = mix_batch(x, t, w, 0.4, 1.0, batch_generator(7, 2, 5))
    b = mix_batch(x, t, w, 0.4, 1.0, batch_generator(7, 2, 5))
    assert (a.lam, a.box, a.perm.tolist()) == (b.lam, b.box, b.perm.tolist())
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    other = [mix_batch(x, t, w, 0.4, 0.0, batch_generator(s, 2, 5)).lam for s in (7, 8)]
    assert other[0] != other[1]


def test_the_share_follows_beta_alpha_alpha():
    from scipy.stats import beta, kstest

    x, t, _ = _batch((2, 1))
    lams = [mix_batch(x, t, None, 0.4, 0.0, batch_generator(0, 0, i)).lam for i in range(2000)]
    assert kstest(lams, beta(0.4, 0.4).cdf).pvalue > 0.01
    assert kstest(lams, beta(2.0, 2.0).cdf).pvalue < 1e-6


def test_a_batch_of_one_or_nothing_switched_on_is_left_unmixed():
    x, t, w = _batch((1, 3, 8, 8))
    assert mix_batch(x, t, w, 0.4, 1.0, batch_generator(0, 0, 0)) is None
    x, t, w = _batch((4, 3, 8, 8))
    assert mix_batch(x, t, w, 0.0, 0.0, batch_generator(0, 0, 0)) is None
    assert mix_labelled_batch(x[:1], torch.tensor([1]), 1, 0.1, 0.4, 0.0, None) is None


def test_cutmix_of_features_is_refused():
    x, t, w = _batch((4, 16))
    with pytest.raises(ValueError, match="CutMix needs images"):
        mix_batch(x, t, w, 0.0, 1.0, batch_generator(0, 0, 0))


def test_binary_class_weights_weight_each_class_share_of_a_mixed_target():
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 0, 1, 1, 1])
    class_w = torch.tensor([2.0, 0.5])
    mixed = mix_labelled_batch(x, y, 1, 0.1, 0.4, 0.0, batch_generator(0, 0, 1))
    lam, perm = mixed.lam, mixed.perm
    assert mixed.weights is None
    soft = y.float() * 0.9 + 0.05
    torch.testing.assert_close(mixed.targets, lam * soft + (1 - lam) * soft[perm])
    logits = torch.randn(5, 1, generator=torch.Generator().manual_seed(2))
    t, z = mixed.targets, logits[:, 0]
    manual = -(0.5 * t * F.logsigmoid(z) + 2.0 * (1 - t) * F.logsigmoid(-z)).mean()
    loss = soft_target_loss(logits, t, None, class_w)
    assert float(loss) == pytest.approx(float(manual), rel=1e-5)
    # The binary form of softmax cross-entropy with class weights, as for several logits.
    two = torch.cat([torch.zeros_like(logits), logits], dim=1)
    as_softmax = F.cross_entropy(two, torch.stack([1 - t, t], 1), weight=class_w)
    assert float(loss) == pytest.approx(float(as_softmax), rel=1e-5)
    # A benign/malignant pair at lam 0.5 is pulled towards the rarer (heavier) class.
    half = torch.tensor([0.5])
    best = min(
        torch.linspace(-4, 4, 801),
        key=lambda v: float(soft_target_loss(v.view(1, 1), half, None, class_w)),
    )
    assert torch.sigmoid(best) == pytest.approx(0.2, abs=0.01)
    # Hard labels: each sample's loss times its class weight, as before mixing existed.
    hard = soft_target_loss(logits, y.float(), None, class_w)
    bce = F.binary_cross_entropy_with_logits(z, y.float(), weight=class_w[y])
    assert float(hard) == pytest.approx(float(bce), rel=1e-5)
    multi = mix_labelled_batch(x, y, 2, 0.0, 0.4, 0.0, batch_generator(0, 0, 1))
    assert multi.weights is None and multi.targets.shape == (5, 2)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
@pytest.mark.parametrize("n_classes", [2, 3])
def test_training_step_trains_on_the_mixed_batch(n_classes):
    """The module's training loss is the loss of the batch mixing draws for that batch."""
    from histolens.models.backbones import get_backbone_spec
    from histolens.models.classifier import build_model
    from histolens.testing import tiny_config
    from histolens.training.lightning_module import ClassifierModule

    model = build_model(get_backbone_spec("test_resnet"), n_classes, "none")
    cfg = tiny_config("unused", **{"train.mixup": 0.4, "train.label_smoothing": 0.1})
    weights = [1.5, 0.5, 1.0][:n_classes]
    module = ClassifierModule(model, cfg, weights, None, True).train(False)  # no dropout
    g = torch.Generator().manual_seed(0)
    feats = 20 * torch.randn(6, 2, model.feature_dim, generator=g)  # (B, views, D) cached
    y = torch.tensor([0, 1, 1, 0, 1, 0]) % n_classes
    with torch.no_grad():
        loss = module.training_step((feats, y), batch_idx=4)
        x = feats[:, 0]  # epoch 0 trains on view 0
        w = torch.tensor(weights)
        n_out = 1 if n_classes == 2 else n_classes
        mixed = mix_labelled_batch(x, y, n_out, 0.1, 0.4, 0.0, batch_generator(42, 0, 4))
        want = soft_target_loss(model.head(mixed.inputs), mixed.targets, mixed.weights, w)
        unmixed = module._loss(model.head(x), y, weighted=True, smoothing=0.1)
    assert float(loss) == pytest.approx(float(want), rel=1e-5)
    assert not math.isclose(float(loss), float(unmixed), rel_tol=1e-4)


def test_config_refuses_what_cannot_apply():
    with pytest.raises(ConfigError, match="add --unfreeze N or --no-feature-cache"):
        RunConfig().override({**MLP, "train.cutmix": 1.0})
    RunConfig().override({**MLP, "train.cutmix": 1.0, "model.unfreeze": 1})
    RunConfig().override({**MLP, "train.cutmix": 1.0, "train.feature_cache": False})
    RunConfig().override({**MLP, "train.mixup": 0.4})  # MixUp of cached features is fine
    for name, flag in [("mixup", "--mixup"), ("label_smoothing", "--label-smoothing")]:
        with pytest.raises(ConfigError, match=f"{flag} trains the MLP head; add --head mlp"):
            RunConfig().override({f"train.{name}": 0.1})
    with pytest.raises(ConfigError, match="--cutmix trains the MLP head"):
        RunConfig().override({"train.cutmix": 1.0, "train.feature_cache": False})
    with pytest.raises(ConfigError, match="--mixup must be 0 \\(off\\) or a positive"):
        RunConfig().override({**MLP, "train.mixup": -0.2})
    with pytest.raises(ConfigError, match="--cutmix must be 0"):
        RunConfig().override({**MLP, "model.unfreeze": 1, "train.cutmix": -1.0})
    with pytest.raises(ConfigError, match="--label-smoothing must be 0 or more and below 1"):
        RunConfig().override({**MLP, "train.label_smoothing": 1.0})


def test_settings_round_trip_through_the_saved_config(tmp_path):
    cfg = (
        RunConfig()
        .override({**MLP, "model.unfreeze": 2, "train.mixup": 0.2, "train.cutmix": 1.0})
        .override({"train.label_smoothing": 0.05})
    )
    assert RunConfig.from_dict(json.loads(cfg.to_json())) == cfg
    assert RunConfig.from_dict({"train": {"epochs": 3}}).train.mixup == 0.0  # older configs


def test_a_config_file_setting_may_need_a_flag(tmp_path):
    from histolens.cli.train import _run_config

    (tmp_path / "c.yaml").write_text("train:\n  mixup: 0.3\n  lr: 0.5\n")
    flags = {"head": "mlp", "lr": 0.25, "cutmix": None}
    cfg = _run_config("default", tmp_path / "c.yaml", flags, {})
    assert (cfg.model.head, cfg.train.mixup, cfg.train.lr) == ("mlp", 0.3, 0.25)


def test_train_refuses_mixing_with_the_linear_probe(synth_small, tmp_path):
    out = tmp_path / "r"
    args = ["train", "--data", str(synth_small), "--out", str(out), *FAST, "--mixup", "0.4"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code != 0
    assert "--mixup trains the MLP head; add --head mlp" in res.output
    assert not out.exists()
    res = CliRunner().invoke(main, ["train", "--data", str(synth_small), "--label-smoothing", "1"])
    assert res.exit_code == 2 and "0<=x<1" in res.output


def _record_mixing(monkeypatch) -> list:
    """Make every training batch's mix_batch call append (input shape, result) to a list."""
    import histolens.training.mixing

    calls, real = [], histolens.training.mixing.mix_batch

    def recording(x, *args):
        mixed = real(x, *args)
        calls.append((tuple(x.shape), mixed))
        return mixed

    monkeypatch.setattr(histolens.training.mixing, "mix_batch", recording)
    return calls


def _train_losses(run):
    with open(run / "logs" / "version_0" / "metrics.csv") as fh:
        return [float(r["train_loss"]) for r in csv.DictReader(fh) if r.get("train_loss")]


def test_mlp_head_trains_with_mixup_and_label_smoothing(synth_small, tmp_path, monkeypatch):
    from histolens.checkpoint.io import read_metadata

    calls = _record_mixing(monkeypatch)
    run = tmp_path / "mix"
    flags = ["--head", "mlp", "--epochs", "2", "--cache-views", "2"]
    mixing = ["--mixup", "0.4", "--label-smoothing", "0.1"]
    res = CliRunner().invoke(
        main, ["train", "--data", str(synth_small), "--out", str(run), *FAST, *flags, *mixing]
    )
    assert res.exit_code == 0, res.output
    assert (run / "best.safetensors").exists() and (run / "lightning" / "last.ckpt").exists()
    t = read_metadata(run).run_config.train
    assert (t.mixup, t.label_smoothing, t.cutmix) == (0.4, 0.1, 0.0)
    losses = _train_losses(run)
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    # The frozen backbone's cached, pooled features are what is mixed (manifold MixUp).
    assert calls and all(len(shape) == 2 and m.box is None for shape, m in calls if m)
    assert any(m is not None and 0 < m.lam < 1 for _, m in calls)


def test_fine_tuning_trains_with_cutmix(synth_small, tmp_path, monkeypatch):
    from histolens.testing import tiny_config
    from histolens.training.runner import train

    calls = _record_mixing(monkeypatch)
    cfg = tiny_config(synth_small, **{"model.unfreeze": 1, "train.epochs": 1, "train.cutmix": 1.0})
    result = train(cfg, tmp_path / "cut", progress=False, evaluate=False)
    assert result.epochs_run == 1 and (tmp_path / "cut" / "best.safetensors").exists()
    assert math.isfinite(_train_losses(tmp_path / "cut")[0])
    boxes = [m.box for shape, m in calls if m is not None]
    assert boxes and all(box is not None for box in boxes)  # images, each with a pasted box
    assert all(len(shape) == 4 for shape, _ in calls)
