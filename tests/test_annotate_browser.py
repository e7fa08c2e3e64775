"""End to end in a real headless chromium (Debian's, driven by Playwright): click, cycle, accept, reload,
undo, box, select/relabel/delete, auto mode, export checked with pycocotools, and a screenshot."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers_annotate import CHROMIUM, ThreadedServer, launch_chromium, make_project_dir, model
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from samkit.annotate import Project
from samkit.annotate.app import create_app
from samkit.cli import main as cli

pytest.importorskip("playwright")
if not CHROMIUM.exists():
    pytest.skip("Debian chromium not installed (scripts/test.sh installs it)", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
WOMAN = (520.0, 300.0)  # image pixels in 000000000790.jpg (640x422): the woman's blue top
MAN = (430.0, 200.0)  # the man's black shirt
TIMEOUT = 120_000  # ms; the shared 2-core machine can be slow


def _screen(page, x: float, y: float) -> tuple[float, float]:
    """Image pixels -> page coordinates through the page's current view."""
    v = page.evaluate("window.samkit.view")
    box = page.locator("#canvas").bounding_box()
    return box["x"] + v["tx"] + x * v["s"], box["y"] + v["ty"] + y * v["s"]


def _snapshot(page) -> None:
    """Keep the canvas pixels in the page, for `_changed_pixels` (the pixels never cross the wire)."""
    page.evaluate("() => { window._snap = ctx.getImageData(0, 0, canvas.width, canvas.height).data; }")


def _changed_pixels(page) -> int:
    """Canvas pixels whose colour moved by more than 30 (sum over RGB) since `_snapshot`."""
    return page.evaluate(
        """() => { const now = ctx.getImageData(0, 0, canvas.width, canvas.height).data, old = window._snap;
        let n = 0;
        for (let i = 0; i < now.length; i += 4) {
          const d = Math.abs(now[i] - old[i]) + Math.abs(now[i + 1] - old[i + 1]) + Math.abs(now[i + 2] - old[i + 2]);
          if (d > 30) n++;
        }
        return n; }"""
    )


def _wait_drawn(page, previous: str | None) -> str:
    """Wait until a new predicted mask has been drawn; returns its sequence number."""
    page.wait_for_function(
        "prev => canvas.dataset.drawnSeq !== undefined && canvas.dataset.drawnSeq !== prev",
        arg=previous,
        timeout=TIMEOUT,
    )
    return page.evaluate("canvas.dataset.drawnSeq")


def _near(got, want, tol: float = 1.5) -> bool:
    """Equal shapes and values within `tol` image pixels (the mouse moves in whole screen pixels)."""
    got, want = np.asarray(got, dtype=float), np.asarray(want, dtype=float)
    return got.shape == want.shape and bool(np.abs(got - want).max() <= tol)


def _objects(page) -> int:
    return page.locator("#object-list li").count()


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    images, db = make_project_dir(tmp_path_factory.mktemp("annotate-browser"))
    project = Project(images, db, model(), log=lambda _: None)
    with ThreadedServer(create_app(project)) as server:
        yield project, server


@pytest.fixture(scope="module")
def page(app):
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with sync_playwright() as pw:
        browser = launch_chromium(pw)
        pg = browser.new_page(viewport={"width": 1400, "height": 800})
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.goto(app[1].url)
        pg.wait_for_function("window.samkit.img !== null && window.samkit.image !== null", timeout=TIMEOUT)
        yield pg
        browser.close()
    assert not errors, errors


def test_click_cycle_accept_reload(app, page):
    assert page.locator("#image-list li").count() == 2
    assert page.locator("#image-list li").first.get_attribute("data-status") == "todo"
    _snapshot(page)
    page.mouse.click(*_screen(page, *WOMAN))
    _wait_drawn(page, None)
    info = page.locator("#cand-info")
    assert info.get_attribute("data-count") == "3" and info.get_attribute("data-candidate") == "0"
    assert "IoU 0." in info.text_content()
    assert page.evaluate("canvas.dataset.live") == "1"
    assert _changed_pixels(page) > 500  # the mask (and the point) are drawn on the canvas

    scores = page.evaluate("window.samkit.candidates.map(c => c.score)")
    texts = [info.text_content()]
    page.keyboard.press("Tab")
    assert info.get_attribute("data-candidate") == "1"
    texts.append(info.text_content())
    page.click("#cand-next")
    assert info.get_attribute("data-candidate") == "2"
    texts.append(info.text_content())
    assert [t.split("IoU ")[1] for t in texts] == [f"{s:.3f}" for s in scores]
    page.keyboard.press("Shift+Tab")
    page.keyboard.press("Shift+Tab")
    assert info.get_attribute("data-candidate") == "0"
    page.keyboard.press("Enter")
    page.wait_for_function("document.querySelectorAll('#object-list li').length === 1", timeout=TIMEOUT)
    assert info.text_content() == "no mask"
    assert page.locator("#image-list li").first.get_attribute("data-status") == "in progress"

    page.reload()
    page.wait_for_function("document.querySelectorAll('#object-list li').length === 1", timeout=TIMEOUT)
    assert page.locator("#object-list li .meta").first.text_content().startswith("manual")
    project = app[0]
    (obj,) = project.store.objects(project.store.images()[0]["id"])
    assert _near(obj.prompt["points"], [[*WOMAN, 1]]) and obj.source == "manual"
    assert project.store.events("accept")[-1]["duration_ms"] > 0


def test_negative_point_undo_and_discard(page):
    page.wait_for_function("window.samkit.img !== null", timeout=TIMEOUT)
    seq = page.evaluate("canvas.dataset.drawnSeq ?? null")
    page.mouse.click(*_screen(page, *MAN))
    seq = _wait_drawn(page, seq)
    page.mouse.click(*_screen(page, 470, 330), button="right")
    seq = _wait_drawn(page, seq)
    assert _near(page.evaluate("window.samkit.prompt.points"), [[*MAN, 1], [470, 330, 0]])
    assert page.locator("#cand-info").get_attribute("data-count") == "1"  # two points: one mask
    page.keyboard.press("Control+z")
    seq = _wait_drawn(page, seq)
    assert _near(page.evaluate("window.samkit.prompt.points"), [[*MAN, 1]])
    assert page.locator("#cand-info").get_attribute("data-count") == "3"
    page.keyboard.press("Escape")
    assert page.evaluate("window.samkit.prompt.points.length") == 0
    assert page.evaluate("canvas.dataset.live") == "0"
    assert _objects(page) == 1


def test_box_prompt_select_relabel_delete(app, page):
    seq = page.evaluate("canvas.dataset.drawnSeq ?? null")
    x0, y0 = _screen(page, 360, 150)
    x1, y1 = _screen(page, 520, 330)
    page.mouse.move(x0, y0)
    page.mouse.down()
    page.mouse.move((x0 + x1) / 2, (y0 + y1) / 2, steps=4)
    page.mouse.move(x1, y1, steps=4)
    page.mouse.up()
    _wait_drawn(page, seq)
    assert _near(page.evaluate("window.samkit.prompt.box"), [360, 150, 520, 330])
    page.keyboard.press("Enter")
    page.wait_for_function("document.querySelectorAll('#object-list li').length === 2", timeout=TIMEOUT)
    project = app[0]
    box_obj = project.store.objects(project.store.images()[0]["id"])[-1]
    assert _near(box_obj.prompt["box"], [360, 150, 520, 330])
    bx, by, bw, bh = box_obj.bbox
    assert bx >= 355 and by >= 145 and bx + bw <= 525 and by + bh <= 335  # the mask stays in its box

    # Shift+click selects the box object, L relabels it, Delete removes it.
    ys, xs = np.nonzero(mask_utils.decode({**box_obj.rle, "counts": box_obj.rle["counts"].encode()}))
    inside = int(np.argmin((xs - xs.mean()) ** 2 + (ys - ys.mean()) ** 2))
    page.keyboard.down("Shift")
    page.mouse.click(*_screen(page, xs[inside] + 0.5, ys[inside] + 0.5))
    page.keyboard.up("Shift")
    assert page.evaluate("window.samkit.selected") == box_obj.id
    page.keyboard.press("l")
    page.keyboard.type("man")
    page.keyboard.press("Enter")
    page.wait_for_function(f"window.samkit.objects.find(o => o.id === {box_obj.id}).label === 'man'")
    assert project.store.object(box_obj.id).label == "man"
    page.keyboard.down("Shift")
    page.mouse.click(*_screen(page, 5, 5))  # an empty spot: deselects
    page.keyboard.up("Shift")
    assert page.evaluate("window.samkit.selected") is None
    page.locator(f"#object-list li[data-id='{box_obj.id}'] .oid").click()
    page.keyboard.press("Delete")
    page.wait_for_function("document.querySelectorAll('#object-list li').length === 1", timeout=TIMEOUT)
    assert project.store.object(box_obj.id) is None


def test_zoom_pan_and_next_image(page):
    v0 = page.evaluate("window.samkit.view")
    page.mouse.move(*_screen(page, *WOMAN))
    page.mouse.wheel(0, -300)
    v1 = page.evaluate("window.samkit.view")
    assert v1["s"] > v0["s"] * 1.2
    x, y = _screen(page, *WOMAN)
    page.keyboard.down(" ")
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x - 100, y - 50, steps=3)
    page.mouse.up()
    page.keyboard.up(" ")
    v2 = page.evaluate("window.samkit.view")
    assert v2["tx"] == pytest.approx(v1["tx"] - 100, abs=1) and v2["ty"] == pytest.approx(
        v1["ty"] - 50, abs=1
    )
    assert page.evaluate("window.samkit.prompt.points.length") == 0  # panning is no click
    page.keyboard.press("f")
    assert page.evaluate("window.samkit.view.s") == pytest.approx(v0["s"])
    page.keyboard.press("n")
    page.wait_for_function("window.samkit.image && window.samkit.image.path === '0001.jpg'", timeout=TIMEOUT)
    page.wait_for_function("window.samkit.img !== null", timeout=TIMEOUT)
    assert "0001.jpg" in page.locator("#image-name").text_content()
    page.keyboard.press("p")
    page.wait_for_function("window.samkit.image.path === '000000000790.jpg'", timeout=TIMEOUT)
    page.wait_for_function("window.samkit.img !== null", timeout=TIMEOUT)


def test_auto_mode(app, page):
    manual_before = sum(
        m.startswith("manual") for m in page.locator("#object-list li .meta").all_text_contents()
    )
    page.fill("#auto-pps", "4")
    page.fill("#auto-iou", "0.7")
    page.fill("#auto-stab", "0.85")
    page.click("#auto-run")
    page.wait_for_function(
        "document.getElementById('status').textContent.startsWith('auto mode:') &&"
        " !document.getElementById('status').textContent.includes('generating')",
        timeout=300_000,
    )
    metas = page.locator("#object-list li .meta").all_text_contents()
    assert any(m.startswith("auto") for m in metas)
    assert sum(m.startswith("manual") for m in metas) == manual_before  # auto mode keeps manual objects
    assert page.evaluate("canvas.dataset.objects") == str(len(metas))
    # learned prompts: the grid size no longer applies; the run replaces the grid's auto masks
    page.select_option("#auto-prompts", "learned")
    assert page.is_disabled("#auto-pps")
    with page.expect_response(lambda r: r.url.endswith("/auto")) as answer:
        page.click("#auto-run")
    assert answer.value.status == 200 and answer.value.request.post_data_json["prompts"] == "learned"
    page.wait_for_function(
        "document.getElementById('status').textContent.startsWith('auto mode:') &&"
        " !document.getElementById('status').textContent.includes('generating')",
        timeout=300_000,
    )
    metas = page.locator("#object-list li .meta").all_text_contents()
    assert sum(m.startswith("auto") for m in metas) == len(answer.value.json()["objects"])
    assert sum(m.startswith("manual") for m in metas) == manual_before
    page.select_option("#auto-prompts", "grid")


def test_export_and_screenshot(app, page, tmp_path):
    project = app[0]
    out = tmp_path / "coco"
    assert cli(["export", "--db", str(project.store.path), "--format", "coco", "--out", str(out)]) == 0
    coco = COCO(str(out / "annotations.json"))
    img = coco.dataset["images"][0]
    assert img["file_name"] == "000000000790.jpg" and (img["width"], img["height"]) == (640, 422)
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]]))
    stored = project.store.objects(project.store.images()[0]["id"])
    assert len(anns) == len(stored) >= 1
    for ann, obj in zip(anns, stored, strict=True):
        mask = coco.annToMask(ann)
        assert mask.shape == (422, 640) and int(mask.sum()) == ann["area"] == obj.area
    woman = coco.annToMask(anns[0]).astype(bool)
    assert woman[int(WOMAN[1]), int(WOMAN[0])]  # the first object covers the clicked point
    assert (
        cli(["export", "--db", str(project.store.path), "--format", "sa1b", "--out", str(tmp_path / "sa")])
        == 0
    )
    assert (tmp_path / "sa" / "000000000790.json").is_file()

    # Leave a live candidate on screen for the picture.
    seq = page.evaluate("canvas.dataset.drawnSeq ?? null")
    page.mouse.click(*_screen(page, *MAN))
    _wait_drawn(page, seq)
    shot = ROOT / "artifacts" / "annotate-e2e.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shot))
    # The documentation's picture is refreshed on request only: a test run leaves tracked files alone.
    if os.environ.get("SAMKIT_UPDATE_DOCS_IMAGES") == "1":
        shutil.copyfile(shot, ROOT / "docs" / "images" / "annotate.png")
    assert shot.stat().st_size > 10_000
