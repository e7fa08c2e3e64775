"""The Label Studio ML backend without a Label Studio server: its JSON, image access, cache and endpoints."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fastapi import FastAPI, Request

from samkit.errors import InputError

pytest.importorskip(
    "label_studio_converter", reason="needs the labelstudio extra: pip install 'samkit[labelstudio]'"
)

from label_studio_converter import brush  # noqa: E402

from samkit.labelstudio import protocol  # noqa: E402
from samkit.labelstudio.images import ImageAccessError, ImageReader  # noqa: E402

DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
GRABCUT = DATASETS / "interactive" / "GrabCut"

CONFIG = """<View>
  <Image name="img" value="$image" zoom="true"/>
  <BrushLabels name="mask" toName="img">
    <Label value="Object" background="#ff0000"/><Label value="Background" background="#0000ff"/>
  </BrushLabels>
  <KeyPointLabels name="click" toName="img" smart="true"><Label value="Object" smart="true"/></KeyPointLabels>
  <RectangleLabels name="box" toName="img" smart="true"><Label value="Background"/></RectangleLabels>
</View>"""


def keypoint(x: float, y: float, w: int, h: int, positive: bool = True, label: str = "Object") -> dict:
    """A smart keypoint as the labelling UI sends it: (x, y) in percent of the image."""
    return {
        "type": "keypointlabels",
        "from_name": "click",
        "to_name": "img",
        "original_width": w,
        "original_height": h,
        "image_rotation": 0,
        "is_positive": positive,
        "value": {"x": x, "y": y, "width": 0.5, "keypointlabels": [label]},
    }


def rectangle(x: float, y: float, bw: float, bh: float, w: int, h: int, label: str = "Background") -> dict:
    return {
        "type": "rectanglelabels",
        "from_name": "box",
        "to_name": "img",
        "original_width": w,
        "original_height": h,
        "value": {"x": x, "y": y, "width": bw, "height": bh, "rotation": 0, "rectanglelabels": [label]},
    }


# --- protocol ------------------------------------------------------------------------------------------


def test_label_config_names_brush_image_and_labels():
    cfg = protocol.parse_label_config(CONFIG)
    assert cfg == protocol.LabelConfig("mask", "img", "image", ("Object", "Background"))


@pytest.mark.parametrize(
    "xml, words",
    [
        ('<View><Image name="i" value="$image"/></View>', "no <BrushLabels>"),
        ('<View><BrushLabels name="m" toName="x"/><Image name="i" value="$image"/></View>', "toName"),
        ('<View><BrushLabels name="m" toName="i"/><Image name="i" value="image"/></View>', "$field"),
        ("<View><Image", "not valid XML"),
    ],
)
def test_label_config_errors_say_what_is_missing(xml, words):
    with pytest.raises(InputError, match=words.replace("$", r"\$")):
        protocol.parse_label_config(xml)


def test_prompt_percent_coordinates_become_pixels():
    ctx = {
        "result": [
            keypoint(50, 25, 640, 480),
            keypoint(10, 90, 640, 480, positive=False),
            rectangle(10, 20, 50, 40, 640, 480),
        ]
    }
    p = protocol.prompt_from_context(ctx)
    assert p is not None and p.size == (480, 640)
    np.testing.assert_allclose(p.points, [[320, 120], [64, 432]])
    assert p.point_labels.tolist() == [1, 0]
    np.testing.assert_allclose(p.box, [64, 96, 64 + 320, 96 + 192])  # XYXY pixels
    assert p.label == "Background" and not p.single_click


def test_prompt_without_interaction_is_none_and_keypoint_defaults_to_positive():
    assert protocol.prompt_from_context(None) is None
    assert protocol.prompt_from_context({"result": []}) is None
    assert protocol.prompt_from_context({"result": [{"type": "brushlabels", "value": {}}]}) is None
    kp = keypoint(1, 2, 100, 50)
    del kp["is_positive"]
    p = protocol.prompt_from_context({"result": [kp]})
    assert p.point_labels.tolist() == [1] and p.single_click


def test_malformed_prompts_are_input_errors():
    kp = keypoint(1, 2, 100, 50)
    del kp["original_width"]
    with pytest.raises(InputError, match="original_width"):
        protocol.prompt_from_context({"result": [kp]})
    with pytest.raises(InputError, match="disagree"):
        protocol.prompt_from_context({"result": [keypoint(1, 2, 100, 50), keypoint(1, 2, 100, 60)]})


def test_brush_result_round_trips_through_label_studios_codec():
    rng = np.random.default_rng(0)
    mask = np.zeros((37, 53), bool)
    mask[5:30, 7:40] = True
    mask ^= rng.random(mask.shape) < 0.05  # ragged runs of every length
    cfg = protocol.parse_label_config(CONFIG)
    r = protocol.brush_result(mask, 0.875, cfg, "Background")
    assert r["type"] == "brushlabels" and r["from_name"] == "mask" and r["to_name"] == "img"
    assert (r["original_width"], r["original_height"]) == (53, 37)
    assert r["value"]["format"] == "rle" and r["value"]["brushlabels"] == ["Background"]
    assert r["score"] == 0.875
    assert protocol.brush_result(mask, 1.03, cfg, None)["score"] == 1.0  # an overshooting IoU head
    json.dumps(r)  # plain JSON types only
    rgba = brush.decode_rle(r["value"]["rle"]).reshape(37, 53, 4)
    assert np.array_equal(rgba[:, :, 3] == 255, mask) and set(np.unique(rgba)) <= {0, 255}
    assert np.array_equal(protocol.decode_brush(r), mask)
    # a label the BrushLabels does not have falls back to its first
    assert protocol.brush_result(mask, 0.5, cfg, "Cat")["value"]["brushlabels"] == ["Object"]


# --- images --------------------------------------------------------------------------------------------


def test_reader_reads_local_files_only_under_the_allowed_roots(tmp_path):
    root, other = tmp_path / "root", tmp_path / "other"
    (root / "sub").mkdir(parents=True)
    other.mkdir()
    (root / "sub" / "a.png").write_bytes(b"inside")
    (other / "b.png").write_bytes(b"outside")
    (root / "link.png").symlink_to(other / "b.png")
    reader = ImageReader(document_root=tmp_path, roots=[root])
    assert reader.read("/data/local-files/?d=root/sub/a.png") == b"inside"
    assert reader.read(str(root / "sub" / "a.png")) == b"inside"
    for ref in [
        "/data/local-files/?d=other/b.png",
        "/data/local-files/?d=root/../other/b.png",
        "/data/local-files/?d=root/link.png",  # a symlink out of the root
        str(other / "b.png"),
        str(root / ".." / "other" / "b.png"),
        "/etc/passwd",
    ]:
        with pytest.raises(ImageAccessError, match="outside the allowed roots"):
            reader.read(ref)
    with pytest.raises(ImageAccessError, match="outside the allowed roots: none"):
        ImageReader().read(str(root / "sub" / "a.png"))


def test_reader_refuses_other_hosts_and_schemes():
    reader = ImageReader(url="http://127.0.0.1:8080", api_key="k")
    for ref in ["http://example.com/a.jpg", "http://127.0.0.1:9999/data/upload/1/a.jpg", "s3://bucket/a.jpg"]:
        with pytest.raises(ImageAccessError):
            reader.read(ref)
    with pytest.raises(ImageAccessError, match="--label-studio-url"):
        ImageReader().read("/data/upload/1/a.jpg")
    with pytest.raises(ImageAccessError, match="--api-key"):
        ImageReader(url="http://127.0.0.1:8080").read("/data/upload/1/a.jpg")


def test_reader_fetches_uploads_and_local_files_from_the_server_with_its_token():
    from helpers_http import serve

    with serve() as server:
        server.files["/data/upload/3/x.jpg"] = b"uploaded"
        server.files["/data/local-files/?d=imgs/y.jpg"] = b"local"
        reader = ImageReader()
        reader.connect(server.base, "legacy-token")  # as learnt from /setup
        assert reader.read("/data/upload/3/x.jpg") == b"uploaded"
        assert reader.read(server.url("/data/upload/3/x.jpg")) == b"uploaded"  # absolute URL, same server
        assert reader.read("/data/local-files/?d=imgs/y.jpg") == b"local"  # no --allow-root: via the server
        assert {h["Authorization"] for _, h in server.requests} == {"Token legacy-token"}
        with pytest.raises(ImageAccessError, match="answered 404"):
            reader.read("/data/upload/3/missing.jpg")
        reader.connect("http://elsewhere:1", "other")  # configured values win over /setup's
        assert reader.url == server.base and reader.api_key == "legacy-token"


def test_reader_exchanges_a_personal_access_token_and_renews_it():
    from fastapi.responses import JSONResponse, Response
    from helpers_annotate import ThreadedServer

    app = FastAPI()
    issued: list[str] = []
    valid: dict[str, str | None] = {"token": None}

    @app.post("/api/token/refresh")
    async def refresh(request: Request):
        if (await request.json()).get("refresh") != "a.b.c":
            return JSONResponse({"detail": "invalid"}, status_code=401)
        issued.append(f"access{len(issued)}")
        valid["token"] = issued[-1]
        return {"access": issued[-1]}

    @app.get("/data/upload/1/z.jpg")
    def upload(request: Request):
        ok = request.headers.get("authorization") == f"Bearer {valid['token']}"
        return Response(b"pixels") if ok else Response(status_code=401)

    with ThreadedServer(app) as srv:
        reader = ImageReader(srv.url, "a.b.c")
        assert reader.read("/data/upload/1/z.jpg") == b"pixels"
        assert reader.read("/data/upload/1/z.jpg") == b"pixels" and issued == ["access0"]  # kept
        valid["token"] = None  # the access token expires
        assert reader.read("/data/upload/1/z.jpg") == b"pixels" and issued == ["access0", "access1"]
        with pytest.raises(ImageAccessError, match="refused the API token"):
            ImageReader(srv.url, "x.y.z").read("/data/upload/1/z.jpg")
        with pytest.raises(ImageAccessError, match=r"refused the API token \(401\); pass a valid --api-key"):
            ImageReader(srv.url, "a-legacy-token").read("/data/upload/1/z.jpg")


# --- backend -------------------------------------------------------------------------------------------


def _need(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"missing {path}")


def _object_prompt(stem: str) -> tuple[np.ndarray, tuple[float, float], tuple[float, float, float, float]]:
    """The image, a pixel inside the object (its mask's innermost point) and the mask's XYXY box."""
    import cv2

    from samkit.image import load_image

    image = load_image(next((GRABCUT / "images").glob(f"{stem}.*")))
    gt = np.array(load_image(GRABCUT / "masks" / f"{stem}.png"))[..., 0] == 255
    dist = cv2.distanceTransform(gt.astype(np.uint8), cv2.DIST_L2, 5)
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    ys, xs = np.nonzero(gt)
    return image, (float(x), float(y)), (float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max()))


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    _need(GRABCUT)
    from fastapi.testclient import TestClient

    from samkit.labelstudio import BackendConfig, create_app

    cache = tmp_path_factory.mktemp("ls-cache")
    config = BackendConfig(
        model="nano",
        auto=True,
        points_per_side=8,
        document_root=str(DATASETS),
        allow_roots=[str(GRABCUT)],
        cache_dir=str(cache),
    )
    with TestClient(create_app(config)) as c:
        yield c


def _encodes(backend) -> list[int]:
    """A counter of image-encoder runs on `backend`'s model (a forward hook)."""
    calls: list[int] = []
    backend.model.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    return calls


def _task(stem: str, tid: int = 1) -> dict:
    name = next((GRABCUT / "images").glob(f"{stem}.*")).name
    return {"id": tid, "data": {"image": f"/data/local-files/?d=interactive/GrabCut/images/{name}"}}


def _predict(client, task: dict, results: list[dict] | None, status: int = 200) -> dict:
    body = {"tasks": [task], "label_config": CONFIG, "project": "1.1700000000", "params": {}}
    if results is not None:
        body["params"] = {"login": None, "password": None, "context": {"result": results}}
    r = client.post("/predict", json=body)
    assert r.status_code == status, r.text
    return r.json()


def test_health_setup_and_webhook(client):
    backend = client.app.state.backend
    h = client.get("/health").json()
    assert h["status"] == "UP" and h["model_version"] == backend.model_version
    assert client.get("/").json() == h
    r = client.post("/setup", json={"project": "1.17", "schema": CONFIG, "hostname": "http://ls:8080"})
    assert r.status_code == 200 and r.json() == {"model_version": backend.model_version}
    assert backend.images.url == "http://ls:8080"
    r = client.post("/setup", json={"project": "1.17", "schema": "<View/>"})
    assert r.status_code == 400 and "BrushLabels" in r.json()["error"]
    r = client.post("/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": 1}})
    assert r.status_code == 200 and r.json()["trained"] is False
    assert client.get("/versions").json() == {"versions": [backend.model_version]}


def test_prompts_give_the_predictors_mask_and_reuse_the_embedding(client):
    import samkit

    backend = client.app.state.backend
    image, (x, y), (x0, y0, x1, y1) = _object_prompt("llama")
    h, w = image.shape[:2]
    reference = samkit.Predictor(samkit.load("nano"))
    reference.set_image(image)
    encodes = _encodes(backend)

    cases = [
        ([keypoint(100 * x / w, 100 * y / h, w, h)], dict(point_coords=[[x, y]], point_labels=[1])),
        (
            [keypoint(100 * x / w, 100 * y / h, w, h), keypoint(2, 2, w, h, positive=False)],
            dict(point_coords=[[x, y], [0.02 * w, 0.02 * h]], point_labels=[1, 0], multimask_output=False),
        ),
        (
            [rectangle(100 * x0 / w, 100 * y0 / h, 100 * (x1 - x0) / w, 100 * (y1 - y0) / h, w, h)],
            dict(box=[x0, y0, x1, y1], multimask_output=False),
        ),
    ]
    for results, kwargs in cases:
        pred = _predict(client, _task("llama"), results)["results"][0]
        masks, scores, _ = reference.predict(**kwargs)
        best = int(np.argmax(scores))
        (r,) = pred["result"]
        assert np.array_equal(protocol.decode_brush(r), masks[best])
        assert r["score"] == pytest.approx(min(1.0, float(scores[best])), abs=1e-5) == pred["score"]
        assert pred["model_version"] == backend.model_version
    assert pred["result"][0]["value"]["brushlabels"] == ["Background"]  # the rectangle's label
    assert len(encodes) == 1  # three prompts on one image: encoded once

    _predict(client, _task("teddy", 2), [keypoint(50, 50, 284, 398)])
    _predict(client, _task("llama"), [keypoint(50, 50, w, h)])
    assert len(encodes) == 2  # back on llama: read from the disk cache, not encoded again
    assert (backend.predictor.misses, backend.predictor.hits) == (2, 1)


def test_repeated_clicks_on_a_task_decode_its_image_once(client, monkeypatch):
    import samkit.image

    decodes: list[int] = []
    real = samkit.image.load_image
    monkeypatch.setattr(samkit.image, "load_image", lambda im: decodes.append(1) or real(im))
    for x in (30, 50, 70):
        _predict(client, _task("teddy", 2), [keypoint(x, 50, 284, 398)])
    assert len(decodes) == 1


def test_embedding_cache_is_keyed_by_encoder_weights_not_the_model_name(client, tmp_path):
    import torch

    import samkit
    from samkit.labelstudio import Backend, BackendConfig

    base = client.app.state.backend
    model = samkit.load("nano")
    decoder_only = tmp_path / "nano_decoder_ft.safetensors"
    with torch.no_grad():
        model.mask_decoder.iou_prediction_head.layers[0].bias.add_(0.1)
    samkit.save(model, decoder_only, name="nano")
    encoder_too = tmp_path / "nano_encoder_ft.safetensors"
    with torch.no_grad():
        next(model.image_encoder.parameters()).add_(0.01)
    samkit.save(model, encoder_too, name="nano")

    cache = base.config.cache_dir
    same = Backend(BackendConfig(model=str(decoder_only), cache_dir=cache))
    other = Backend(BackendConfig(model=str(encoder_too), cache_dir=cache))
    assert same.predictor.root == base.predictor.root  # same encoder weights: the embeddings are shared
    assert other.predictor.root != base.predictor.root
    assert other.model_version != base.model_version


def test_embedding_files_are_bounded_least_recently_used_first(tmp_path):
    _need(GRABCUT)
    from fastapi.testclient import TestClient

    from samkit.image import load_image
    from samkit.labelstudio import Backend, BackendConfig, create_app

    roots = dict(document_root=str(DATASETS), allow_roots=[str(GRABCUT)])
    backend = Backend(BackendConfig(model="nano", cache_dir=str(tmp_path), max_embeddings=2, **roots))
    with TestClient(create_app(backend=backend)) as c:
        for stem in ["teddy", "llama", "teddy", "flower"]:
            w, h = load_image(next((GRABCUT / "images").glob(f"{stem}.*"))).shape[1::-1]
            _predict(c, _task(stem), [keypoint(50, 50, w, h)])
    kept = {p.name for p in backend.predictor.root.glob("*.safetensors")}
    expect = {
        backend.predictor.path_for(load_image(next((GRABCUT / "images").glob(f"{s}.*")))).name
        for s in ["teddy", "flower"]
    }
    assert kept == expect  # llama, the least recently used, was evicted


def test_auto_prelabels_a_task_with_segment_everything(client):
    import samkit

    backend = client.app.state.backend
    image, _, _ = _object_prompt("banana1")
    pred = _predict(client, _task("banana1", 3), None)["results"][0]
    records = samkit.MaskGenerator(samkit.load("nano"), points_per_side=8).generate(image)
    assert len(records) > 0 and len(pred["result"]) == len(records)
    for r, rec in zip(pred["result"], records, strict=True):
        assert np.array_equal(protocol.decode_brush(r), rec["segmentation"])
        assert r["score"] == pytest.approx(min(1.0, rec["predicted_iou"]), abs=1e-5)
        assert r["value"]["brushlabels"] == ["Object"]
    assert pred["score"] == pytest.approx(
        np.mean([min(1.0, rec["predicted_iou"]) for rec in records]), abs=1e-5
    )
    backend.config.auto = False
    try:
        assert _predict(client, _task("banana1", 3), None)["results"] == [
            {"result": [], "score": 0.0, "model_version": backend.model_version}
        ]
    finally:
        backend.config.auto = True


def test_auto_with_learned_prompts_needs_a_head_for_the_model(client, tmp_path):
    """`prompts="learned"`: the shipped head (vit_t's) stops a nano backend at start in one line; a head
    file trained for nano pre-labels with exactly MaskGenerator's learned masks."""
    import dataclasses

    import torch

    import samkit
    from samkit.everything.learned import head_metadata, save_head
    from samkit.labelstudio.backend import Backend
    from samkit.models.prompt_head import PromptHead

    config = dataclasses.replace(client.app.state.backend.config, prompts="learned")
    with pytest.raises(InputError, match="trained on vit_t"):
        Backend(config)
    torch.manual_seed(0)
    head = save_head(PromptHead(), tmp_path / "nano_head.safetensors", head_metadata(samkit.load("nano")))
    backend = Backend(dataclasses.replace(config, prompt_head=str(head)))
    image, _, _ = _object_prompt("banana1")
    records = samkit.MaskGenerator(samkit.load("nano"), prompts="learned", prompt_head=head).generate(image)
    body = {"tasks": [_task("banana1", 3)], "label_config": CONFIG, "params": {}}
    pred = backend.predict(body)["results"][0]
    assert len(pred["result"]) == len(records)
    for r, rec in zip(pred["result"], records, strict=True):
        assert np.array_equal(protocol.decode_brush(r), rec["segmentation"])


def test_bad_requests_get_one_line_errors(client):
    outside = {"id": 9, "data": {"image": "/data/local-files/?d=instances/coco_mini/train/images/x.jpg"}}
    r = _predict(client, outside, [keypoint(50, 50, 10, 10)], status=403)
    assert "outside the allowed roots" in r["error"]
    r = _predict(client, _task("llama"), [keypoint(50, 50, 10, 10)], status=400)
    assert "10x10 image" in r["error"] and "\n" not in r["error"]


def test_cli_builds_the_backend_config(monkeypatch):
    import samkit.labelstudio as ls
    from samkit.cli import main

    seen = {}
    monkeypatch.setattr(
        ls, "serve", lambda config, host, port: seen.update(config=config, host=host, port=port)
    )
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "from-env")
    argv = [
        "labelstudio",
        "--model",
        "nano",
        "--auto",
        "--port",
        "9191",
        "--allow-root",
        "/a",
        "--allow-root",
        "/b",
        "--prompts",
        "learned",
        "--prompt-head",
        "head.safetensors",
    ]
    assert main([*argv, "--label-studio-url", "http://ls:8080"]) == 0
    c = seen["config"]
    assert c.prompts == "learned" and c.prompt_head == "head.safetensors"
    assert (seen["host"], seen["port"]) == ("127.0.0.1", 9191)
    assert c.model == "nano" and c.auto and c.allow_roots == ["/a", "/b"]
    assert c.label_studio_url == "http://ls:8080" and c.api_key == "from-env"


def test_missing_extra_is_a_one_line_error(monkeypatch):
    import builtins

    from samkit.errors import SamkitError

    real_import = builtins.__import__

    def no_converter(name, *args, **kwargs):
        if name.startswith("label_studio_converter"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_converter)
    with pytest.raises(SamkitError, match=r"samkit\[labelstudio\]"):
        protocol.converter_brush()
