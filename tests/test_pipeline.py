"""FeatureCache on disk: only whole saves are ever loaded, and only for the same settings."""

import pytest
import torch

from histolens.pipeline import FeatureCache


def _cache(n: int, fingerprint: str = "fp") -> FeatureCache:
    clean = {f"img{i}.png": torch.full((4,), float(i)) for i in range(n)}
    views = {f"img{i}.png": torch.full((2, 4), float(-i)) for i in range(n)}
    return FeatureCache(clean, views, fingerprint)


def test_a_killed_save_leaves_the_previous_cache(tmp_path, monkeypatch):
    import safetensors.torch

    path = tmp_path / "features.safetensors"
    _cache(3).save(path)

    def killed(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"\x00" * 64)  # half a file, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        _cache(5).save(path)
    loaded = FeatureCache.load(path, "fp")
    assert sorted(loaded.clean) == ["img0.png", "img1.png", "img2.png"]
    torch.testing.assert_close(loaded.views["img2.png"], torch.full((2, 4), -2.0))
    assert [p.name for p in tmp_path.iterdir()] == ["features.safetensors"]  # no temp file left


def test_damaged_or_foreign_caches_are_not_loaded(tmp_path):
    path = tmp_path / "features.safetensors"
    _cache(3).save(path)
    assert FeatureCache.load(path, "other settings") is None
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) - 20])  # truncated, as a non-atomic copy would leave it
    assert FeatureCache.load(path, "fp") is None

    from safetensors.torch import save_file

    # Names that do not match the rows (never written by save) are not trusted either.
    save_file(
        {"clean": torch.zeros(2, 4)},
        str(path),
        metadata={"fingerprint": "fp", "clean": '["a", "b", "c"]', "views": "[]"},
    )
    assert FeatureCache.load(path, "fp") is None
