import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from samkit import Predictor, load
from samkit.eval import GrabCutPredictor, ProtocolError, format_table, run_eval
from samkit.eval.datasets import EdgeItem, ImageItem, ObjectItem
from samkit.eval.metrics import boundary_summary
from samkit.eval.protocols import clicks, edge_map, edges, point_grid, proposals, single_point, tight_box

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets"
GRABCUT = DATA / "interactive" / "GrabCut"
REFSHIM = ROOT.parent / "shared" / "refshim"
needs_data = pytest.mark.skipif(not GRABCUT.is_dir(), reason=f"shared data set not present: {GRABCUT}")


class DiskModel:
    """A fake PromptModel: always the disk of radius 10 at (32, 24) in a 48 x 64 image, logits to match."""

    name = "disk"

    def __init__(self):
        yy, xx = np.mgrid[:48, :64]
        self.mask = (xx - 32) ** 2 + (yy - 24) ** 2 <= 100
        self.calls = []

    def set_image(self, image):
        self.image = image

    def predict(self, point_coords=None, point_labels=None, box=None, mask_input=None, multimask_output=True):
        self.calls.append((point_coords, point_labels, box, mask_input, multimask_output))
        n = 3 if multimask_output else 1
        scale = 256 / 64
        yy, xx = np.mgrid[:256, :256] + 0.5
        d = np.hypot(xx / scale - 32, yy / scale - 24)
        logits = np.repeat(((10 - d) * 2)[None].astype(np.float32), n, axis=0)
        return np.repeat(self.mask[None], n, axis=0), np.linspace(0.9, 0.7, n), logits


def _disk_item(ignore=None):
    return ObjectItem("disk", Path("x.png"), DiskModel().mask, ignore)


def test_single_point_clicks_deepest_point_and_scores_three_outputs():
    model = DiskModel()
    r = single_point(model, _disk_item())
    assert r["click"] == [32, 24]
    assert r["iou_top"] == r["iou_oracle"] == r["iou_single"] == 1.0
    assert [c[4] for c in model.calls] == [True, False]


def test_clicks_feed_back_logits_and_use_single_mask_after_first():
    gt = DiskModel().mask.copy()
    gt[:, 40:] = False  # the model over-segments the right side: the simulator must click negative there
    model = DiskModel()
    r = clicks(model, ObjectItem("d", Path("x"), gt, None), max_clicks=3)
    assert len(r["ious"]) == 3 and r["labels"][0] == 1 and r["labels"][1] == 0
    multimask = [c[4] for c in model.calls]
    assert multimask == [True, False, False]
    assert model.calls[0][3] is None and model.calls[1][3].shape == (1, 256, 256)
    assert len(model.calls[2][0]) == 3  # all clicks so far are given


def test_box_is_tight_xyxy():
    m = np.zeros((10, 10), dtype=bool)
    m[2:5, 3:9] = True
    np.testing.assert_array_equal(tight_box(m), [3, 2, 8, 4])


def test_point_grid_cell_centres():
    g = point_grid(2, 100, 200)
    np.testing.assert_allclose(g, [[50, 25], [150, 25], [50, 75], [150, 75]])


def test_edge_map_finds_the_disk_boundary():
    model = DiskModel()
    e = edge_map(model, 48, 64, points_per_side=2)
    assert len(model.calls) == 4 and e.max() == pytest.approx(1.0)
    yy, xx = np.mgrid[:48, :64]
    d = np.hypot(xx - 32, yy - 24)
    assert e[np.abs(d - 10) < 1.5].mean() > 5 * e[np.abs(d - 10) > 4].mean()
    ring = np.abs(d - 10) < 0.75
    result, counts = edges(model, EdgeItem("d", Path("x"), [ring]), 48, 64, points_per_side=2)
    assert boundary_summary([counts])["ODS"] > 0.5 and result["OIS_F"] > 0.5


def test_proposals_rank_by_score_and_cut_to_budget():
    gt = DiskModel().mask
    other = np.zeros_like(gt)
    other[:5, :5] = True
    item = ImageItem("i", Path("x"), [gt, other], None)
    r = proposals(lambda _: ([other, gt], np.array([0.1, 0.9])), item)
    assert r["best_iou@100"] == [1.0, 1.0] and r["areas"] == [int(gt.sum()), 25]


@needs_data
def test_grabcut_baseline_end_to_end(tmp_path):
    out = tmp_path / "clicks.json"
    report = run_eval("clicks", GRABCUT, "grabcut", limit=2, out=out, max_clicks=3, progress=False)
    assert out.is_file() and out.with_suffix(".png").is_file()
    saved = json.loads(out.read_text())
    assert saved["meta"]["model"] == "grabcut" and saved["meta"]["settings"]["max_clicks"] == 3
    assert [it["id"] for it in saved["items"]] == ["106024", "124080"]
    s = report["summary"]
    assert s["n_items"] == 2 and 0.5 < s["mIoU@3"] <= 1.0 and 1 <= s["NoC@90"] <= 3
    box = run_eval("box", GRABCUT, GrabCutPredictor(), limit=2, progress=False)
    assert box["summary"]["mIoU"] > 0.8  # GrabCut from a tight box is good on its own benchmark
    assert "mIoU" in format_table(box)


def test_grabcut_is_repeatable_and_repeats_its_mask():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 60, (40, 50, 3), dtype=np.uint8)
    img[10:30, 15:35] += 150
    p = GrabCutPredictor()
    p.set_image(img)
    masks, scores, logits = p.predict(box=np.array([12, 8, 37, 32]))
    assert masks.shape == (3, 40, 50) and logits.shape == (3, 256, 256) and (scores == 1).all()
    assert (masks[0] == masks[1]).all() and masks[0][20, 25] and not masks[0][2, 2]
    again, _, _ = p.predict(box=np.array([12, 8, 37, 32]), multimask_output=False)
    np.testing.assert_array_equal(again[0], masks[0])
    pts, _, _ = p.predict(
        point_coords=np.array([[25, 20]]), point_labels=np.array([1]), multimask_output=False
    )
    assert pts.shape == (1, 40, 50) and pts[0][20, 25]


def test_bad_protocol_and_limit_are_one_line_errors():
    with pytest.raises(ProtocolError, match="unknown protocol"):
        run_eval("nope", ".", "grabcut")
    with pytest.raises(ProtocolError, match="limit"):
        run_eval("box", ".", "grabcut", limit=0)


# --- reference equality ----------------------------------------------------------------------------------


class _EncodeOnce:
    """Wraps a predictor so that the three protocol runs encode each image once (keeps the test fast)."""

    def __init__(self, predictor):
        self.predictor = predictor
        self.embeddings = {}

    def set_image(self, image):
        key = hash(image.tobytes())
        if key not in self.embeddings:
            self.predictor.set_image(image)
            self.embeddings[key] = self.predictor.__dict__.copy()
        self.predictor.__dict__.update(self.embeddings[key])

    def predict(self, **kwargs):
        return self.predictor.predict(**kwargs)


@pytest.fixture(scope="module")
def ref_and_ours(tmp_path_factory):
    """(reference SamPredictor, samkit Predictor) on the same random tiny MobileSAM checkpoint."""
    if not REFSHIM.is_dir():
        pytest.skip(f"reference shims not present: {REFSHIM}")
    sys.path.insert(0, str(REFSHIM))
    try:
        from mobile_sam.modeling import MaskDecoder, PromptEncoder, Sam, TinyViT, TwoWayTransformer
        from mobile_sam.predictor import SamPredictor
    finally:
        sys.path.remove(str(REFSHIM))
    torch.manual_seed(0)
    torch.set_num_threads(2)
    # MobileSAM's architecture with one block per stage: a cheap random model samkit.load detects by keys.
    encoder = TinyViT(
        img_size=1024,
        embed_dims=[64, 128, 160, 320],
        depths=[1, 1, 1, 1],
        num_heads=[2, 4, 5, 10],
        window_sizes=[7, 7, 14, 7],
    )
    prompt = PromptEncoder(
        embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024), mask_in_chans=16
    )
    decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
        transformer_dim=256,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    ref_model = Sam(encoder, prompt, decoder, [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]).eval()
    ckpt = tmp_path_factory.mktemp("ref") / "random_tiny.pt"
    torch.save(ref_model.state_dict(), ckpt)
    return _EncodeOnce(SamPredictor(ref_model)), _EncodeOnce(Predictor(load(ckpt, dtype="fp32")))


def _assert_same_reports(rows, ref, ours):
    for protocol, ds, kwargs in rows:
        a = run_eval(protocol, ds, ref, limit=1, progress=False, **kwargs)
        b = run_eval(protocol, ds, ours, limit=1, progress=False, **kwargs)
        for ia, ib in zip(a["items"], b["items"], strict=True):
            for key, va in ia.items():
                if isinstance(va, float):
                    assert ib[key] == pytest.approx(va, abs=1e-3), (protocol, key)
                else:
                    assert ib[key] == va, (protocol, key)
        for key, va in a["summary"].items():
            assert b["summary"][key] == pytest.approx(va, abs=1e-3, nan_ok=True), (protocol, key)


@needs_data
def test_harness_gives_the_same_numbers_on_reference_and_samkit(ref_and_ours):
    """Same random checkpoint, reference SamPredictor vs samkit Predictor: the same per-item results and
    summaries for the prompt protocols."""
    rows = [("single-point", GRABCUT, {}), ("box", GRABCUT, {}), ("clicks", GRABCUT, {"max_clicks": 3})]
    _assert_same_reports(rows, *ref_and_ours)


@needs_data
def test_harness_edges_and_proposals_same_on_reference_and_samkit(ref_and_ours):
    """The same for edges and proposals, on the first GrabCut image (already encoded by the test above when
    both run): its object's outline as the one annotator, its object as the one proposal target. A 2x2 grid
    and 2 thresholds keep it short; the wrappers have no `.model`, so proposals use grid prompts on both
    sides."""
    from scipy.ndimage import binary_erosion

    from samkit.eval.datasets import Dataset, MaskFolder

    obj = next(MaskFolder(GRABCUT).objects())

    class OneImage(Dataset):
        kind = "test"

        def _stems(self):
            return [obj.id]

        def edges(self):
            yield EdgeItem(obj.id, obj.image, [obj.mask & ~binary_erosion(obj.mask)])

        def images(self):
            yield ImageItem(obj.id, obj.image, [obj.mask], obj.ignore)

    ds = OneImage(GRABCUT)
    rows = [("edges", ds, {"points_per_side": 2, "thresholds": 2}), ("proposals", ds, {"points_per_side": 2})]
    _assert_same_reports(rows, *ref_and_ours)


@needs_data
def test_cli_eval_prints_table_and_writes_report(tmp_path, capsys):
    from samkit.cli import main

    out = tmp_path / "r.json"
    assert (
        main(["eval", "box", "--data", str(GRABCUT), "--model", "grabcut", "--limit", "1", "--out", str(out)])
        == 0
    )
    assert "mIoU" in capsys.readouterr().out
    assert json.loads(out.read_text())["summary"]["n_items"] == 1
    assert main(["eval", "box", "--data", str(tmp_path / "none"), "--model", "grabcut"]) == 2
    assert "data set not found" in capsys.readouterr().err


def test_objects_inside_ignore_regions_are_skipped(tmp_path):
    from PIL import Image

    from samkit.eval.datasets import Dataset

    model = DiskModel()
    image = tmp_path / "a.png"
    Image.new("RGB", (64, 48)).save(image)

    class Two(Dataset):
        kind = "test"

        def objects(self):
            yield ObjectItem("hidden", image, model.mask, model.mask.copy())
            yield ObjectItem("seen", image, model.mask, None)

    report = run_eval("box", Two(Path(".")), model, progress=False)
    assert [it["id"] for it in report["items"]] == ["seen"] and report["summary"]["n_skipped"] == 1


def _tiny_confident_sam():
    """A tiny random samkit SAM whose masks pass MaskGenerator's default filters (IoU and stability)."""
    from samkit.models.build import SamConfig, build_sam

    torch.manual_seed(0)
    cfg = SamConfig("vit", embed_dim=32, depth=1, num_heads=1, global_attn_indexes=(0,), image_size=256)
    sam = build_sam(cfg).eval()
    with torch.no_grad():
        sam.mask_decoder.iou_prediction_head.layers[-1].bias.fill_(2.0)  # predicted IoU > 0.88
        for mlp in sam.mask_decoder.output_hypernetworks_mlps:  # huge logits: stable under +-1 offsets
            mlp.layers[-1].weight.mul_(1000)
            mlp.layers[-1].bias.mul_(1000)
    return sam


def test_proposals_use_the_real_mask_generator(tmp_path):
    """A samkit model's proposals are MaskGenerator's masks, scored against the COCO objects (crowd ignored)."""
    from PIL import Image
    from pycocotools import mask as mask_utils

    import samkit

    image = np.zeros((48, 64, 3), np.uint8)
    image[10:30, 20:44] = 200
    (tmp_path / "images").mkdir()
    Image.fromarray(image).save(tmp_path / "images" / "a.png")
    obj = np.zeros((48, 64), np.uint8)
    obj[10:30, 20:44] = 1
    crowd = np.zeros((48, 64), np.uint8)
    crowd[40:, :8] = 1

    def ann(i, m, iscrowd):
        rle = mask_utils.encode(np.asfortranarray(m))
        rle["counts"] = rle["counts"].decode()
        return {"id": i, "image_id": 1, "category_id": 1, "segmentation": rle, "iscrowd": iscrowd}

    coco = {
        "images": [{"id": 1, "file_name": "a.png", "height": 48, "width": 64}],
        "annotations": [ann(1, obj, 0), ann(2, crowd, 1)],
        "categories": [{"id": 1, "name": "thing"}],
    }
    (tmp_path / "annotations.json").write_text(json.dumps(coco))

    sam = _tiny_confident_sam()
    records = samkit.MaskGenerator(sam, points_per_side=4).generate(image)
    assert len(records) >= 1
    want = max(
        float(
            mask_utils.iou(
                [mask_utils.encode(np.asfortranarray(r["segmentation"].astype(np.uint8)))],
                [mask_utils.encode(np.asfortranarray(obj))],
                [0],
            )[0, 0]
        )
        for r in records
    )
    out = tmp_path / "p.json"
    report = run_eval("proposals", tmp_path, sam, points_per_side=4, out=out, progress=False)
    (item,) = report["items"]
    assert item["n_proposals"] == len(records)  # the generator's output, not the grid fallback's
    assert item["areas"] == [int(obj.sum())]  # the crowd region is not an object
    assert item["best_iou@100"] == item["best_iou@1000"] == [pytest.approx(want)]
    s = report["summary"]
    assert s["n_objects"] == 1 and 0.0 <= s["AR@100"] <= 1.0 and s["AR@100"] == s["AR@1000"]
    assert json.loads(out.read_text())["meta"]["settings"]["points_per_side"] == 4
