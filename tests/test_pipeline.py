"""FeatureCache on disk: only whole saves are ever loaded, and only for the same settings."""

import time

import pytest
import torch

from histolens.models.feature_cache import FeatureCache


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


# --- image sources: streamed from disk in bounded memory, or a bank in memory -----------------


@pytest.fixture
def image_files(tmp_path):
    from histolens.testing import make_tissue_image

    paths = []
    for i in range(10):
        paths.append(str(tmp_path / f"{i}.png"))
        make_tissue_image(seed=i).save(paths[-1])
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    paths.insert(3, str(tmp_path / "broken.png"))
    return paths


def _preprocess():
    from histolens.models.transforms import Preprocess

    return Preprocess((32, 48), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def test_stream_gives_the_banks_images_and_lists_the_unreadable(image_files):
    from histolens.models.pipeline import ImageBank, ImageStream

    stream, bank = ImageStream(_preprocess()), ImageBank(image_files, _preprocess(), False)
    broken = image_files[3]
    assert broken in stream  # not known to be unreadable until it is decoded
    got = list(stream.batches(image_files, 4))
    assert [len(paths) for paths, _ in got] == [3, 4, 3]  # the broken file left its batch
    assert [s.path for s in stream.skipped] == [s.path for s in bank.skipped] == [broken]
    assert broken not in stream and broken not in bank
    paths = [p for chunk, _ in got for p in chunk]
    assert paths == [p for p in image_files if p != broken]
    images = torch.cat([batch for _, batch in got])
    assert images.shape == (10, 3, 32, 48) and images.dtype == torch.uint8
    torch.testing.assert_close(images, bank.stack(paths), atol=0, rtol=0)
    assert [b.shape[0] for _, b in bank.batches(image_files, 4)] == [3, 4, 3]


def test_stream_holds_only_a_few_batches_at_once(image_files, monkeypatch):
    import histolens.models.pipeline as pipeline

    decoded = []
    real = pipeline._decode
    monkeypatch.setattr(pipeline, "_decode", lambda pre, p: decoded.append(p) or real(pre, p))
    readable = [p for p in image_files if "broken" not in p] * 4
    stream, consumed = pipeline.ImageStream(_preprocess(), workers=2), 0
    for paths, _ in stream.batches(readable, 2):
        time.sleep(0.02)  # a slow consumer: decoding must not run ahead of it
        consumed += len(paths)
        assert len(decoded) - consumed <= 3 * 2  # this batch and the two decoding ahead
    assert len(decoded) == 40


def test_features_streamed_equal_features_from_a_bank(image_files):
    from histolens.config import AugmentConfig
    from histolens.models.backbones import get_backbone_spec
    from histolens.models.classifier import build_model
    from histolens.models.pipeline import ImageBank, ImageStream, InputPipeline
    from histolens.models.transforms import Augmenter, resolve_preprocess

    model = build_model(get_backbone_spec("test_resnet"), 2, "none").eval()
    pre = resolve_preprocess(model.backbone)
    pipe = InputPipeline(pre, Augmenter(AugmentConfig()), None, seed=3)
    views = image_files[:6]
    from_bank = FeatureCache.build(
        model, ImageBank(image_files, pre, False), pipe, image_files, views, 2, "fp", 4, False
    )
    stream = ImageStream(pre)
    streamed = FeatureCache.build(model, stream, pipe, image_files, views, 2, "fp", 3, False)
    assert sorted(streamed.clean) == sorted(from_bank.clean) and len(streamed.clean) == 10
    assert sorted(streamed.views) == sorted(p for p in views if p != image_files[3])
    for p, f in from_bank.clean.items():
        torch.testing.assert_close(streamed.clean[p], f, atol=1e-4, rtol=1e-4)
    for p, f in from_bank.views.items():
        assert streamed.views[p].shape[0] == 2
        torch.testing.assert_close(streamed.views[p], f, atol=1e-4, rtol=1e-4)
    assert [s.path for s in stream.skipped] == [image_files[3]]
