"""AdaBN: batch-norm statistics re-estimated on a new cohort, and nothing else changed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from histolens.errors import DataError
from histolens.models.adapt import MIN_ADAPT_IMAGES, adapt_batchnorm


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=0.1))
        self.head = nn.Sequential(nn.Flatten(), nn.LazyLinear(2), nn.BatchNorm1d(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x).mean(dim=(2, 3), keepdim=True))


def _net() -> _Net:
    torch.manual_seed(0)
    net = _Net()
    net(torch.randn(4, 3, 8, 8))  # materialise the lazy layer
    net.head[2].running_mean.fill_(0.25)
    return net.eval()


def test_statistics_become_the_cohorts_and_only_the_backbones_change():
    net = _net()
    weights = {
        k: v.clone()
        for k, v in net.state_dict().items()
        if "running" not in k and "batches" not in k
    }
    cohort = [torch.randn(8, 3, 8, 8) * 3 + 2 for _ in range(4)]
    n = adapt_batchnorm(net, cohort)
    assert n == 32
    with torch.no_grad():
        outs = [net.backbone[0](x) for x in cohort]
    bn = net.backbone[1]
    # The exact average over batches of each batch's statistics (not an exponential one).
    assert torch.allclose(bn.running_mean, torch.cat(outs).mean(dim=(0, 2, 3)), atol=1e-4)
    batch_vars = torch.stack([o.var(dim=(0, 2, 3)) for o in outs])
    assert torch.allclose(bn.running_var, batch_vars.mean(0), rtol=1e-4)
    assert bn.momentum == 0.1 and not net.training and not bn.training
    assert torch.all(net.head[2].running_mean == 0.25)  # the fitted head is left as trained
    for k, v in net.state_dict().items():
        if k in weights:
            assert torch.equal(v, weights[k]), k


def test_too_few_images_refuses_and_keeps_the_old_statistics():
    net = _net()
    before = net.backbone[1].running_mean.clone()
    with pytest.raises(DataError, match=f"at least {MIN_ADAPT_IMAGES}"):
        adapt_batchnorm(net, [torch.randn(4, 3, 8, 8)])
    assert torch.equal(net.backbone[1].running_mean, before)
    assert not net.training


def test_a_model_without_batch_norm_is_refused():
    with pytest.raises(DataError, match="no batch-norm layer"):
        adapt_batchnorm(nn.Sequential(nn.Conv2d(3, 2, 1)), [torch.randn(32, 3, 4, 4)])


def test_predictor_adapts_to_a_cohort_and_says_so(tiny_checkpoint, synth_small):
    from histolens.inference.predictor import Predictor

    paths = sorted(str(p) for p in synth_small.rglob("*.png"))[:24]
    predictor = Predictor.from_checkpoint(tiny_checkpoint)
    _, before, _ = predictor.logits_for_paths(paths)
    assert predictor.adapt_batchnorm(paths, batch_size=8) == 24
    _, after, _ = predictor.logits_for_paths(paths)
    assert predictor.metadata.adapted_batchnorm == {"images": 24}
    assert not torch.allclose(before, after)


def test_evaluate_adapts_to_the_cohort_on_request(tiny_checkpoint, synth_small, tmp_path):
    from click.testing import CliRunner

    from histolens.cli.commands import main

    args = ["evaluate", str(tiny_checkpoint), "--data", str(synth_small), "--split", "all"]
    args += ["--n-boot", "0"]
    plain = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "a"), "--quiet"])
    adapted = CliRunner().invoke(
        main, [*args, "--out", str(tmp_path / "b"), "--quiet", "--adapt-bn"]
    )
    assert plain.exit_code == 0 and adapted.exit_code == 0, adapted.output
    assert "adapted to these 32 images (AdaBN)" in adapted.output
    a = (tmp_path / "a" / "predictions.csv").read_text()
    b = (tmp_path / "b" / "predictions.csv").read_text()
    assert a.splitlines()[0] == b.splitlines()[0] and a != b
