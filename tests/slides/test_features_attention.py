"""``histolens slide features`` (resumable bags) and ``slide attention`` on small synthetic slides."""

from __future__ import annotations

import numpy as np
from click.testing import CliRunner

from histolens.cli.commands import main

FAST = ["--tile-mpp", "1.0", "--batch-size", "4", "--quiet", "--workers", "0"]


def test_features_then_attention(tmp_path, tiny_checkpoint, small_slides):
    from histolens.training.mil import MilConfig, build_mil_model
    from histolens.training.mil_data import read_bag
    from histolens.training.mil_run import MIL_SCHEMA, save_mil

    out = tmp_path / "bags"
    args = ["slide", "features", str(tiny_checkpoint), str(small_slides), "--out", str(out)]
    result = CliRunner().invoke(main, [*args, *FAST])
    assert result.exit_code == 0, result.output
    bags = [read_bag(out / "h5" / f"slide{i}.h5") for i in range(2)]
    assert all(len(b) > 5 and b.features.shape[1] > 0 for b in bags)
    again = CliRunner().invoke(main, [*args, *FAST])
    assert again.exit_code == 0 and again.output.count("already done") == 2, again.output
    dim = bags[0].features.shape[1]
    config = MilConfig(hidden=8, attention=4)
    meta = {"schema": MIL_SCHEMA, "version": 1, "feature_dim": dim,
            "positive_class": "malignant", "config": config.to_dict()}  # fmt: skip
    ckpt = save_mil(tmp_path / "mil.safetensors", build_mil_model(dim, config), meta)
    result = CliRunner().invoke(main, ["slide", "attention", str(ckpt), str(out)])
    assert result.exit_code == 0, result.output
    for i, bag in enumerate(bags):
        assert (out / "heatmaps" / f"slide{i}.attention.png").is_file()
        rows = (out / "attention" / f"slide{i}.csv").read_text().splitlines()[1:]
        weights = np.array([float(r.split(",")[2]) for r in rows])
        assert len(weights) == len(bag)
        # weights written with 8 significant digits; float32 softmax sums to 1 within n eps
        assert abs(weights.sum() - 1.0) < 1e-5
