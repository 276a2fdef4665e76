"""The slide viewer in headless Chromium against a real uvicorn server on loopback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("openslide", reason="openslide-python is not installed")
pytestmark = pytest.mark.browser

OVERLAY_OPACITY = "() => histolensViewer.world.getItemAt(1).getOpacity()"


@pytest.fixture(scope="module")
def viewer_slides(tmp_path_factory) -> Path:
    """One 4096 x 3072 synthetic slide with two lesions (0.5 um/px, three levels)."""
    from histolens.slides.synthetic import TextureBank, make_synthetic_slide, write_pyramid_tiff

    root = tmp_path_factory.mktemp("viewer-slides")
    slide = make_synthetic_slide(
        4096, 3072, 0.5, n_lesions=2, seed=3, bank=TextureBank.paint(seed=0, k=2)
    )
    write_pyramid_tiff(slide, root / "lesions.tiff", levels=3)
    return root


def test_viewer_opens_zooms_analyses_and_toggles_the_overlay(
    checkpoint, viewer_slides, browser, serve, keep_screenshot, tmp_path
):
    from histolens.web.app import create_app

    app = create_app(
        checkpoint, slides=viewer_slides, slide_cache=tmp_path / "cache", slide_tile_mpp=2.0
    )
    with serve(app) as url:
        page = browser.new_page(viewport={"width": 1360, "height": 900})
        tiles: list[tuple[str, int]] = []
        page.on(
            "response",
            lambda r: tiles.append((r.url, r.status)) if "_files/" in r.url else None,
        )
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url + "/slides")
        assert "not for diagnosis" in page.locator(".notice").inner_text().lower()
        page.locator("#slides button").first.click()
        page.wait_for_function("histolensViewer.world.getItemCount() === 1")
        page.wait_for_function("document.getElementById('analyse').disabled === false")
        before_zoom = len(tiles)

        page.evaluate("() => { histolensViewer.viewport.zoomBy(6); }")
        page.wait_for_function(
            "histolensViewer.world.getItemAt(0).getFullyLoaded()", timeout=30_000
        )
        levels = {int(u.split("_files/")[1].split("/")[0]) for u, _ in tiles}
        assert len(tiles) > before_zoom and max(levels) >= 11  # 4096 px wide: level 12 top

        page.locator("#analyse").click()
        page.wait_for_selector("#osd[data-overlay='shown']", timeout=240_000)
        assert "Analysis done" in page.locator("#analysis-text").inner_text()
        assert page.evaluate(OVERLAY_OPACITY) == pytest.approx(0.5)
        page.locator("#opacity").fill("80")
        assert page.locator("#opacity-value").inner_text() == "80%"
        assert page.evaluate(OVERLAY_OPACITY) == pytest.approx(0.8)
        page.wait_for_timeout(300)
        shown = tmp_path / "shown.png"
        page.locator("#osd").screenshot(path=str(shown))

        page.locator("#overlay-toggle").uncheck()
        assert page.locator("#osd").get_attribute("data-overlay") == "hidden"
        assert page.evaluate(OVERLAY_OPACITY) == 0
        page.wait_for_timeout(300)
        hidden = tmp_path / "hidden.png"
        page.locator("#osd").screenshot(path=str(hidden))
        page.locator("#overlay-toggle").check()
        assert page.evaluate(OVERLAY_OPACITY) == pytest.approx(0.8)

        # The heatmap changes what is drawn: the two element screenshots differ.
        a = np.asarray(Image.open(shown).convert("RGB"), np.int16)
        b = np.asarray(Image.open(hidden).convert("RGB"), np.int16)
        assert a.shape == b.shape and np.abs(a - b).mean() > 1.0

        assert page.request.get(url + "/v1/slides/..%2F..%2Fetc%2Fpasswd.dzi").status == 404
        assert page.request.get(url + "/v1/slides/lesions.dzi").status == 404
        page.wait_for_timeout(300)
        screenshot = tmp_path / "slide_viewer.png"
        page.screenshot(path=str(screenshot), full_page=True)
    assert tiles and all(status == 200 for _, status in tiles), [t for t in tiles if t[1] != 200]
    assert errors == []
    assert screenshot.stat().st_size > 10_000
    keep_screenshot(screenshot)
    keep_screenshot(shown)
