"""End to end: a real Label Studio server, `samkit labelstudio` connected to a project, prompts through
Label Studio's API, and the masks it stores compared with `samkit.Predictor` on the same prompts.

One Label Studio start (~45 s on 2 cores) serves the whole module.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip(
    "label_studio_converter", reason="needs the labelstudio extra: pip install 'samkit[labelstudio]'"
)

import helpers_labelstudio as hls  # noqa: E402
from label_studio_converter import brush  # noqa: E402

GRABCUT = hls.DATASETS / "interactive" / "GrabCut"
UPLOADED = ["llama.png", "teddy.jpg"]
LOCAL = "flower.jpg"
OUTSIDE = "instances/coco_mini/train/images/000000000790.jpg"


def _decode(result: dict) -> np.ndarray:
    """A stored brushlabels result as an (H, W) bool mask, by Label Studio's own codec."""
    h, w = result["original_height"], result["original_width"]
    return brush.decode_rle(result["value"]["rle"]).reshape(h, w, 4)[:, :, 3] > 127


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def _prompts(stem: str):
    """A point inside the object (its mask's innermost pixel), a background point, and the object's box."""
    import cv2

    from samkit.image import load_image

    gt = np.array(load_image(GRABCUT / "masks" / f"{stem}.png"))[..., 0] == 255
    dist = cv2.distanceTransform(gt.astype(np.uint8), cv2.DIST_L2, 5)
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    ys, xs = np.nonzero(gt)
    bg = np.argwhere(~gt)[len(np.argwhere(~gt)) // 3]
    box = (float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max()))
    return (float(x), float(y)), (float(bg[1]), float(bg[0])), box


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    if not GRABCUT.exists():
        pytest.skip(f"missing {GRABCUT}")
    if not hls.LS_BIN.exists():
        pytest.skip(f"missing {hls.LS_VENV} (Label Studio's own environment, made by scripts/test.sh)")
    tmp = tmp_path_factory.mktemp("labelstudio")
    backend_args = ["--model", "nano", "--auto", "--points-per-side", "8"]
    backend_args += ["--allow-root", str(GRABCUT), "--document-root", str(hls.DATASETS)]
    backend_args += ["--cache-dir", str(tmp / "cache")]
    with hls.LabelStudio(tmp / "ls") as ls, hls.Backend(*backend_args, tmp=tmp) as backend:
        project = ls.create_project()
        ml = ls.connect_backend(project, backend.url)
        tasks = {name: ls.upload(project, GRABCUT / "images" / name) for name in UPLOADED}
        ls.call(
            "POST", f"/api/projects/{project}/import", json=[{"image": f"/data/local-files/?d={OUTSIDE}"}]
        )
        outside = max(t["id"] for t in ls.tasks(project))
        ls.add_local_files(project, GRABCUT / "images")
        for t in ls.tasks(project):
            ref = t["data"]["image"]
            if ref.endswith("/" + LOCAL):
                tasks[LOCAL] = t["id"]
        yield {"ls": ls, "backend": backend, "project": project, "ml": ml, "tasks": tasks, "outside": outside}


@pytest.fixture(scope="module")
def predictor():
    import samkit

    return samkit.Predictor(samkit.load("nano"))


def test_backend_is_connected_with_its_model_version(stack):
    import httpx

    ls = stack["ls"]
    (ml,) = ls.call("GET", "/api/ml", params={"project": stack["project"]})
    version = httpx.get(stack["backend"].url + "/health").json()["model_version"]
    assert ml["readable_state"] == "Connected" and ml["is_interactive"]
    assert ml["model_version"] == version and version.startswith("samkit-nano-")
    data = [t["data"]["image"] for t in ls.tasks(stack["project"])]
    assert sum(d.startswith("/data/upload/") for d in data) == len(UPLOADED)
    assert sum(d.startswith("/data/local-files/?d=interactive/GrabCut/images/") for d in data) == 50


@pytest.mark.parametrize("name", [*UPLOADED, LOCAL])
def test_prompts_through_label_studio_give_the_predictors_masks(stack, predictor, name):
    from samkit.image import load_image

    image = load_image(GRABCUT / "images" / name)
    h, w = image.shape[:2]
    predictor.set_image(image)
    inside, outside, box = _prompts(Path(name).stem)
    cases = [
        ([hls.keypoint(*inside, w, h)], dict(point_coords=[inside], point_labels=[1])),
        (
            [hls.keypoint(*inside, w, h), hls.keypoint(*outside, w, h, positive=False)],
            dict(point_coords=[inside, outside], point_labels=[1, 0], multimask_output=False),
        ),
        ([hls.rectangle(box, w, h)], dict(box=list(box), multimask_output=False)),
    ]
    for results, kwargs in cases:
        data = stack["ls"].interactive(stack["ml"], stack["tasks"][name], results)
        (r,) = data["result"]
        assert r["type"] == "brushlabels" and r["value"]["format"] == "rle"
        assert (r["original_width"], r["original_height"]) == (w, h)
        masks, scores, _ = predictor.predict(**kwargs)
        best = int(np.argmax(scores))
        assert _iou(_decode(r), masks[best]) >= 0.99
        assert r["score"] == pytest.approx(min(1.0, float(scores[best])), abs=1e-3)


def test_auto_prelabels_tasks_as_predictions(stack):
    import samkit
    from samkit.image import load_image

    ls, project = stack["ls"], stack["project"]
    task = stack["tasks"][UPLOADED[1]]
    body = {"selectedItems": {"all": False, "included": [task]}}
    ls.call(
        "POST", "/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": project}, json=body
    )
    (prediction,) = ls.call("GET", "/api/predictions", params={"task": task})
    records = samkit.MaskGenerator(samkit.load("nano"), points_per_side=8).generate(
        load_image(GRABCUT / "images" / UPLOADED[1])
    )
    results = prediction["result"]
    assert prediction["model_version"].startswith("samkit-nano-")
    assert len(records) > 0 and len(results) == len(records)
    ious = [_iou(_decode(r), rec["segmentation"]) for r, rec in zip(results, records, strict=True)]
    assert min(ious) >= 0.99, ious


def test_images_outside_the_allowed_roots_are_refused(stack):
    ls = stack["ls"]
    out = ls.call(
        "POST",
        f"/api/ml/{stack['ml']}/interactive-annotating",
        json={"task": stack["outside"], "context": {"result": [hls.keypoint(10, 10, 640, 422)]}},
    )
    assert "data" not in out and "403" in out["errors"][0]
    assert "outside the allowed roots" in stack["backend"].log.read_text()
