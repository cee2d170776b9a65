"""The HTML report in a real browser: Debian's Chromium, headless, driven by Playwright.

Skipped when Playwright or Chromium is missing, unless ``UNIREG_REQUIRE_BROWSER=1`` (CI sets
it, and installs Chromium), which turns the skip into a failure."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import demo_brains  # noqa: E402


def _unavailable(reason: str) -> None:
    if os.environ.get("UNIREG_REQUIRE_BROWSER") == "1":
        pytest.fail(f"UNIREG_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason)


def _pixels(png: bytes) -> np.ndarray:
    from PIL import Image as PILImage

    return np.asarray(PILImage.open(io.BytesIO(png)).convert("RGB")).astype(np.float64)


def _page(tmp: Path) -> tuple[Path, dict]:
    """The report of the demo pair under a smooth warp with one fold, with labels, metrics
    and keypoints."""
    from unireg.metrics import registration_metrics
    from unireg.result import RegistrationResult
    from unireg.spatial.transform import DisplacementFieldTransform
    from unireg.viewer.page import Keypoints, build_report, write_report

    fixed, moving, flab, mlab = demo_brains()
    geom = fixed.geometry
    g = torch.Generator().manual_seed(0)
    coarse = torch.randn(1, 3, 4, 4, 4, generator=g)
    u = torch.nn.functional.interpolate(coarse, size=geom.shape, mode="trilinear")[0] * 3.0
    u[0, 60, 60, 45] += 12.0  # a spike: a fold beside it
    transform = DisplacementFieldTransform(u, geom)
    result = RegistrationResult(transform, geom, moving.geometry)
    metrics = registration_metrics(result, fixed_labels=flab, moving_labels=mlab, hd95=False)
    centre = geom.center_world
    kp = Keypoints(centre + [[0, 0, 0], [20, 10, 0]], centre + [[2, 0, 0], [20, 14, 0]],
                   centre + [[3, 1, 0], [22, 12, 0]])  # fmt: skip
    page = build_report(fixed, moving, transform, metrics={"spec": "test", **metrics},
                        fixed_labels=flab, keypoints=kp, title="browser test")  # fmt: skip
    path = tmp / "report.html"
    write_report(path, page)
    from unireg.spatial.field import displacement_jacobian_determinant

    folded = (displacement_jacobian_determinant(u, geom) <= 0).nonzero()
    assert len(folded) >= 1  # the spike folds the map (beside it, along world R)
    fold = geom.voxel_to_world[:3, :3] @ folded[0].double().numpy() + geom.voxel_to_world[:3, 3]
    return path, {**metrics, "fold_mm": fold.tolist()}


@pytest.fixture(scope="module")
def browser_page(tmp_path_factory):
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _unavailable("playwright is not installed (pip install playwright)")
    from unireg.viewer.browser import chromium_path, headless_chromium, open_report

    if not chromium_path().exists():
        _unavailable(f"no Chromium at {chromium_path()} (apt-get install chromium)")
    path, metrics = _page(tmp_path_factory.mktemp("report"))
    with headless_chromium() as browser:
        page, log = open_report(browser, path)
        log.update(metrics=metrics, path=path)
        log["first_draw_ms"] = page.evaluate("window.unireg.firstDrawMs")
        yield page, log


def _crosshair_mm(page, view: str) -> np.ndarray:
    return np.array(page.evaluate(
        f"(() => {{ const nv = window.unireg.views['{view}']; "
        "return Array.from(nv.frac2mm(nv.scene.crosshairPos)).slice(0, 3); })()"
    ))  # fmt: skip


def _canvas(page, name: str) -> np.ndarray:
    return _pixels(page.locator(f"#view-{name}").screenshot())


def _set(page, selector: str, script: str) -> None:
    page.evaluate(f"(() => {{ const e = document.querySelector('{selector}'); {script}; }})()")
    page.wait_for_timeout(300)


def test_page_loads_without_errors_or_requests(browser_page):
    page, log = browser_page
    assert page.evaluate("window.unireg.errors") == []
    errors = [m for m in log["console"] if m[0] in ("error", "pageerror")]
    assert errors == []
    # offline: the page itself is the only thing the browser fetched
    assert [u for u in log["requests"] if not u.startswith(("data:", "blob:"))] == [
        log["path"].as_uri()
    ]
    assert 0 < log["first_draw_ms"] < 90_000


def test_every_view_is_drawn(browser_page):
    page, _ = browser_page
    for name in ("fixed", "moving", "warped"):
        px = _canvas(page, name)
        bright = (px.mean(axis=2) > 40).mean()
        assert bright > 0.05, f"{name}: only {bright:.1%} of the canvas is drawn"
        assert px.std() > 20, f"{name}: no structure drawn"


def test_click_moves_the_crosshair_in_every_view(browser_page):
    page, _ = browser_page
    before = {v: _crosshair_mm(page, v) for v in ("fixed", "moving", "warped")}
    pixels = _canvas(page, "fixed")
    box = page.locator("#view-fixed").bounding_box()
    # the multiplanar layout's top-left tile; 35 % across and 30 % down lands inside it
    page.mouse.click(box["x"] + 0.15 * box["width"], box["y"] + 0.15 * box["height"])
    page.wait_for_timeout(500)
    after = {v: _crosshair_mm(page, v) for v in ("fixed", "moving", "warped")}
    assert np.linalg.norm(after["fixed"] - before["fixed"]) > 2.0
    for v in ("moving", "warped"):  # linked in world mm
        assert np.allclose(after[v], after["fixed"], atol=2.5), (v, after[v], after["fixed"])
    assert np.abs(_canvas(page, "fixed") - pixels).mean() > 0.5


def test_fade_slider_and_checkerboard_change_the_warped_view(browser_page):
    page, _ = browser_page
    _set(page, "#fade", "e.value = 0; e.dispatchEvent(new Event('input'))")
    fixed_only = _canvas(page, "warped")
    _set(page, "#fade", "e.value = 100; e.dispatchEvent(new Event('input'))")
    warped_only = _canvas(page, "warped")
    assert np.abs(warped_only - fixed_only).mean() > 2.0
    # at 0 the panel shows the fixed image, as the fixed view does (same crosshair, same slices)
    assert (
        np.abs(fixed_only - _canvas(page, "fixed")).mean()
        < np.abs(warped_only - _canvas(page, "fixed")).mean()
    )
    _set(page, "#checker", "e.click()")
    checker = _canvas(page, "warped")
    assert np.abs(checker - warped_only).mean() > 1.0
    _set(page, "#checker", "e.click()")
    _set(page, "#fade", "e.value = 50; e.dispatchEvent(new Event('input'))")


def test_overlays_draw_and_label_rows_lead_to_their_label(browser_page):
    page, _ = browser_page
    plain = _canvas(page, "warped")
    _set(page, "#jacobian", "e.click()")
    assert np.abs(_canvas(page, "warped") - plain).mean() > 1.0
    _set(page, "#jacobian", "e.click()")
    rows = page.evaluate("Array.from(document.querySelectorAll('#labels tr[data-label]'))"
                         ".map(r => Number(r.dataset.label))")  # fmt: skip
    data = page.evaluate("JSON.parse(document.getElementById('unireg-data').textContent)")
    dice = [r["dice"] for r in data["labels"]]
    assert rows == [r["label"] for r in data["labels"]] and len(rows) > 100
    assert dice[0] == min(d for d in dice if d is not None)  # worst first
    target = data["labels"][3]
    _set(page, f'#labels tr[data-label="{target["label"]}"]', "e.click()")
    for v in ("fixed", "warped"):
        assert np.allclose(_crosshair_mm(page, v), target["centre"], atol=1.5)
    # the read-out under the views names the label the crosshair is in, with its Dice
    where = page.evaluate("document.getElementById('location').textContent")
    assert f"label {target['label']}, Dice {target['dice']:.3f}" in where
    _set(page, f'#labels tr[data-label="{target["label"]}"]', "e.click()")
    _set(page, "#plane", "e.value = 'axial'; e.dispatchEvent(new Event('change'))")
    axial = _canvas(page, "warped")
    _set(page, "#grid", "e.click()")
    assert np.abs(_canvas(page, "warped") - axial).mean() > 1.0
    assert page.evaluate("window.unireg.errors") == []


def test_readout_marks_the_fold(browser_page):
    page, log = browser_page
    mm = log["metrics"]["fold_mm"]
    page.evaluate(f"window.unireg.moveTo({mm})")
    page.wait_for_timeout(300)
    where = page.evaluate("document.getElementById('location').textContent")
    assert "folded here" in where and "Jacobian det" in where
    page.evaluate(f"window.unireg.moveTo([{mm[0] + 30}, {mm[1]}, {mm[2]}])")
    page.wait_for_timeout(300)
    assert "folded here" not in page.evaluate("document.getElementById('location').textContent")


def test_pointer_readout_names_the_label_under_it(browser_page):
    page, _ = browser_page
    box = page.locator("#view-warped").bounding_box()
    seen = set()
    for fx in (0.1, 0.15, 0.2, 0.25, 0.3, 0.35):
        page.mouse.move(box["x"] + fx * box["width"], box["y"] + 0.15 * box["height"])
        page.wait_for_timeout(100)
        seen.add(page.evaluate("document.getElementById('location').textContent"))
    hovered = [t for t in seen if t.startswith("pointer: ")]
    assert len(hovered) >= 3 and any("label " in t for t in hovered)
    page.mouse.move(box["x"] - 20, box["y"] - 20)  # off the canvas: back to the crosshair
    page.wait_for_timeout(100)
    assert not page.evaluate("document.getElementById('location').textContent").startswith(
        "pointer"
    )


def test_open_report_waits_for_a_page_that_draws_late_under_its_csp(browser_page, tmp_path):
    # the report's Content-Security-Policy forbids eval: waiting must not poll inside the page
    # (the browser of the module's page; a second Playwright cannot start in this thread)
    from unireg.viewer.browser import open_report

    page_file = tmp_path / "late.html"
    page_file.write_text(
        '<!doctype html><html><head><meta http-equiv="Content-Security-Policy" '
        "content=\"default-src 'none'; script-src 'unsafe-inline'\"></head><body><script>"
        "window.unireg = {ready: false, errors: []};"
        "setTimeout(() => { window.unireg.ready = true; }, 800);</script></body></html>"
    )
    browser = browser_page[0].context.browser
    late, _ = open_report(browser, page_file)
    try:
        assert late.evaluate("window.unireg.ready") is True
    finally:
        late.close()
