"""The page in headless Chromium against a real uvicorn server on loopback."""

from __future__ import annotations

import pytest

from histolens.testing import make_tissue_image
from histolens.web.app import create_app

pytestmark = pytest.mark.browser

# Sum of the canvas's pixel values: changes when the heatmap opacity changes.
CANVAS_SUM = """() => {
  const c = document.getElementById('canvas');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let s = 0; for (let i = 0; i < d.length; i += 4) s += d[i] + d[i + 1] + d[i + 2];
  return s;
}"""


@pytest.fixture
def live_server(checkpoint, serve):
    with serve(create_app(checkpoint)) as url:
        yield url


def test_upload_shows_prediction_and_heatmap_and_slider_only_redraws(
    live_server, browser, keep_screenshot, tmp_path
):
    image_path = tmp_path / "tile.png"
    make_tissue_image((700, 460), seed=7).save(image_path)

    page = browser.new_page(viewport={"width": 1360, "height": 900})
    api_calls: list[str] = []
    page.on("request", lambda r: api_calls.append(r.url) if "/v1/" in r.url else None)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(live_server + "/")

    assert "not for diagnosis" in page.locator(".notice").inner_text().lower()
    page.wait_for_function(
        "document.getElementById('model-chip-text').textContent.includes('test-')"
    )
    assert "test_resnet" in page.locator("#model-facts").inner_text()
    # An older checkpoint: its test figures, labelled, with the warning in words.
    assert "ROC AUC" in page.locator("#metrics").inner_text()
    assert page.locator("#metrics-title").inner_text() == "Measured performance"
    assert "number of test patients is not stored" in page.locator("#metrics-warnings").inner_text()

    page.set_input_files("#file-input", str(image_path))
    page.wait_for_selector("#result:not([hidden])")
    label = page.locator("#label").inner_text().lower()
    assert label in ("benign", "malignant")
    assert page.locator("#probability").inner_text().endswith("%")
    page.wait_for_function(
        "document.getElementById('canvas').dataset.method === 'gradcam'", timeout=30_000
    )
    assert page.locator("#heatmap-busy").is_hidden()
    size = page.evaluate("() => [canvas.width, canvas.height]")
    assert size == [700, 460]

    calls_before = len(api_calls)
    page.locator("#alpha").fill("0")
    plain = page.evaluate(CANVAS_SUM)
    page.locator("#alpha").fill("80")
    assert page.locator("#alpha-value").inner_text() == "80%"
    blended = page.evaluate(CANVAS_SUM)
    assert blended != plain  # the slider changes what is shown...
    page.locator("#alpha").fill("55")
    assert len(api_calls) == calls_before  # ...without asking the server again
    assert errors == []

    screenshot = tmp_path / "web_page.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000
    keep_screenshot(screenshot)


def test_model_panel_shows_the_estimate_with_cis_support_and_warnings(
    browser, serve, keep_screenshot, tmp_path, estimate
):
    from histolens.checkpoint.io import update_metadata
    from histolens.testing import make_checkpoint

    path = make_checkpoint(tmp_path / "m.safetensors", metrics={"split": "out-of-fold"})
    update_metadata(path, estimate=estimate)
    auc, (lo, hi) = estimate["metrics"]["roc_auc"], estimate["ci95"]["roc_auc"]
    with serve(create_app(path)) as url:
        page = browser.new_page(viewport={"width": 1360, "height": 1000})
        page.goto(url + "/")
        page.wait_for_selector("#metrics-block:not([hidden])")
        assert page.locator("#metrics-title").inner_text() == "Performance on unseen patients"
        headline = page.locator("#headline-figure").inner_text()
        assert f"{auc:.3f}" in headline and f"95% CI {lo:.2f}–{hi:.2f}" in headline
        assert (
            "5-fold patient-level cross-validation" in page.locator("#metrics-about").inner_text()
        )
        assert (
            "11 patients (3 benign, 8 malignant) · 66 images"
            in page.locator("#metrics-support").inner_text()
        )
        warnings = page.locator("#metrics-warnings li").all_inner_texts()
        assert len(warnings) == 3 and warnings[0].startswith("Only 3 benign patients")
        page.locator("#per-mag summary").click()
        assert "100X" in page.locator("#per-mag-table").inner_text()
        screenshot = tmp_path / "web_page_estimate.png"
        page.screenshot(path=str(screenshot), full_page=True)
    keep_screenshot(screenshot)


def test_bad_upload_shows_the_services_message(live_server, browser, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"this is not an image")
    page = browser.new_page()
    page.goto(live_server + "/")
    page.set_input_files("#file-input", str(bad))
    page.wait_for_selector("#error:not([hidden])")
    assert "is not an image this service can read" in page.locator("#error").inner_text()
    assert page.locator("#dropzone").is_visible()


def test_referred_and_unlike_images_show_the_flag_and_its_reason(
    browser, serve, keep_screenshot, tmp_path
):
    """A calibrated, guarded checkpoint: a tile is referred with its prediction set; a white
    tile is 'not like the training images', with the reason."""
    from PIL import Image

    from histolens.inference.ood import OODGuard
    from histolens.testing import flat_calibration, make_checkpoint

    ckpt = make_checkpoint(
        tmp_path / "r.safetensors", conformal=flat_calibration(0.99), guard=OODGuard()
    )
    tile, white = tmp_path / "tile.png", tmp_path / "white.png"
    make_tissue_image((700, 460), seed=7).save(tile)
    Image.new("RGB", (700, 460), "white").save(white)
    with serve(create_app(ckpt)) as url:
        page = browser.new_page(viewport={"width": 1360, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url + "/")
        page.set_input_files("#file-input", str(tile))
        page.wait_for_selector("#result:not([hidden])")
        assert page.locator("#review").inner_text() == "Refer"
        assert page.locator("#flag-reason").inner_text() == (
            "Benign and malignant are all plausible at alpha 0.1."
        )
        assert page.locator("#prediction-set").inner_text() == (
            "Prediction set {benign, malignant} at α=0.10"
        )
        page.wait_for_function("document.getElementById('canvas').dataset.method")

        page.set_input_files("#file-input", str(white))
        page.wait_for_function(
            "document.getElementById('review').textContent.includes('training images')"
        )
        badge = page.locator("#review")
        assert badge.is_visible() and badge.get_attribute("class") == "badge ood"
        assert badge.inner_text().lower() == "not like the training images"
        assert page.locator("#flag-reason").inner_text() == (
            "The image is nearly uniform (no visible structure)."
        )
        page.wait_for_selector("#heatmap-busy", state="hidden")
        assert errors == []
        screenshot = tmp_path / "web_page_unlike.png"
        page.screenshot(path=str(screenshot), full_page=True)
    keep_screenshot(screenshot)
