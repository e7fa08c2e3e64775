"""Faults and bad input in the library: huge and tiny images, EXIF orientation, damaged weights and
checkpoints, inference mode, and the engine's output folder (cut-off manifest, two runs, full or
read-only disk). Each test pins a defect that once gave a traceback, a wrong frame or a silent NaN."""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_faults import fill, jpeg_with_orientation, png_claiming, tmpfs_mounts
from PIL import Image

import samkit
from samkit.engine.local import LOCK, MANIFEST, process_image, read_manifest, run_local
from samkit.errors import CheckpointError, DownloadError, ImageError, OutputError
from samkit.everything.grids import crop_boxes
from samkit.image import image_size, load_image
from samkit.masks.upscale import BlockMasks
from samkit.models.build import SamConfig, build_sam

FAST = dict(points_per_side=2, pred_iou_thresh=0.0, stability_score_thresh=0.0, output_mode="coco_rle")


@pytest.fixture(name="tmpfs")
def _tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    yield from tmpfs_mounts(tmp_path)


@pytest.fixture(scope="module")
def generator(tiny_ckpt: str) -> samkit.MaskGenerator:
    return samkit.MaskGenerator(samkit.load(tiny_ckpt), **FAST)


@pytest.fixture
def photo_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    return folder


# --- images: pixel cap, EXIF orientation, tiny images ----------------------------------------------------


def test_pixel_cap_is_checked_from_the_header_before_decoding(tmp_path: Path) -> None:
    bomb = png_claiming(tmp_path / "bomb.png", 20000, 20000)
    assert bomb.stat().st_size < 200
    with pytest.raises(
        ImageError, match=r"20000x20000 = 400,000,000 pixels, more than the limit of 100,000,000"
    ):
        load_image(bomb)


def test_pixel_cap_is_configurable_and_covers_every_input_kind(tmp_path: Path, monkeypatch) -> None:
    small = np.zeros((20, 30, 3), np.uint8)
    Image.fromarray(small).save(tmp_path / "s.png")
    monkeypatch.setenv("SAMKIT_MAX_PIXELS", "500")
    for image in (tmp_path / "s.png", Image.fromarray(small), small):
        with pytest.raises(
            ImageError, match=r"30x20 = 600 pixels, more than the limit of 500; .*SAMKIT_MAX_PIXELS"
        ):
            load_image(image)
    monkeypatch.setenv("SAMKIT_MAX_PIXELS", "600")
    assert load_image(tmp_path / "s.png").shape == (20, 30, 3)
    monkeypatch.setenv("SAMKIT_MAX_PIXELS", "lots")
    with pytest.raises(ImageError, match="SAMKIT_MAX_PIXELS must be a positive number"):
        load_image(small)


@pytest.mark.parametrize("orientation", [6, 8, 3])
def test_exif_orientation_is_applied_on_load(tmp_path: Path, orientation: int) -> None:
    path = tmp_path / "phone.jpg"
    stored = jpeg_with_orientation(path, orientation)
    rotate = {6: Image.Transpose.ROTATE_270, 8: Image.Transpose.ROTATE_90, 3: Image.Transpose.ROTATE_180}
    shown = np.asarray(Image.fromarray(stored).transpose(rotate[orientation]))
    for image in (path, Image.open(path)):
        loaded = load_image(image)
        assert loaded.shape == shown.shape
        assert np.abs(loaded.astype(int) - shown.astype(int)).mean() < 8  # JPEG noise only
    assert image_size(path) == (shown.shape[1], shown.shape[0])


def test_predictor_works_in_the_displayed_frame(tmp_path: Path, tiny_ckpt: str) -> None:
    path = tmp_path / "phone.jpg"
    jpeg_with_orientation(path, 6)  # stored 40 x 20, shown 20 x 40
    pred = samkit.Predictor(samkit.load(tiny_ckpt))
    pred.set_image(path)
    assert pred.original_size == (40, 20)
    masks, _, _ = pred.predict([[15, 35]], [1])  # a point only inside the shown frame
    assert masks.shape[1:] == (40, 20)


def test_everything_json_has_the_displayed_width_and_height(tmp_path: Path, generator) -> None:
    path = tmp_path / "phone.jpg"
    jpeg_with_orientation(path, 6)
    result = process_image(path, generator, tmp_path / "out", Path("phone.json"), 0)
    assert result.status == "done", result.reason
    info = json.loads((tmp_path / "out" / "phone.json").read_text())["image"]
    assert (info["width"], info["height"]) == (20, 40)


def test_packed_blocks_of_no_exact_block() -> None:
    # A 1-pixel image: every block is wholly in or out of the masks, none is computed pixel by pixel.
    none = BlockMasks(
        torch.ones(2, 1, 1, dtype=torch.bool),
        torch.zeros(0, 3, dtype=torch.int64),
        torch.zeros(0, 16, 16, dtype=torch.bool),
    )
    packed = none.packed()
    assert packed.exact_bits.shape == (0, 32)
    assert packed.bits().shape == (0, 16, 16)


def test_crops_of_a_few_pixel_image_are_never_empty() -> None:
    for size in [(1, 1), (1, 50), (50, 2), (3, 3)]:
        for crop in crop_boxes(size, 2, 512 / 1500):
            x0, y0, x1, y1 = crop.box
            assert x1 > x0 and y1 > y0, (size, crop)


@pytest.mark.parametrize("size", [(1, 1), (2, 2), (3, 3), (1, 50), (50, 1)])
def test_everything_on_tiny_images(tiny_ckpt: str, size: tuple[int, int]) -> None:
    gen = samkit.MaskGenerator(samkit.load(tiny_ckpt), **{**FAST, "crop_n_layers": 1})
    records = gen.generate(np.full((*size, 3), 128, np.uint8))
    for r in records:
        assert r["segmentation"]["size"] == list(size)


# --- models: inference mode, damaged weights, bad checkpoints ---------------------------------------------

TOY_TINY_VIT = SamConfig(
    "tiny_vit",
    tiny_embed_dims=(16, 32, 64, 320),
    tiny_depths=(1, 1, 1, 1),
    tiny_num_heads=(1, 1, 2, 5),
    tiny_window_sizes=(7, 7, 7, 7),
)


@pytest.mark.parametrize("config", ["tiny_vit", "vit"])
def test_load_inside_inference_mode_then_two_images(tmp_path: Path, tiny_ckpt: str, config: str) -> None:
    path = tiny_ckpt
    if config == "tiny_vit":
        torch.manual_seed(0)
        path = str(samkit.save(build_sam(TOY_TINY_VIT), tmp_path / "tv.safetensors"))
    image = np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    with torch.inference_mode():
        pred = samkit.Predictor(samkit.load(path))
        pred.set_image(image)
        first = pred.predict([[10, 10]], [1])[1]
        pred.set_image(image[::-1].copy())
        pred.set_image(image)
        again = pred.predict([[10, 10]], [1])[1]
    np.testing.assert_allclose(first, again, rtol=1e-5, atol=1e-6)


def test_registry_file_damaged_with_same_size_and_mtime_is_caught(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SAMKIT_HOME", str(tmp_path))
    path = samkit.zoo.checkpoint_path("nano", progress=False)
    good = path.read_bytes()
    stat = path.stat()
    with open(path, "r+b") as f:  # bit rot: same size, mtime put back
        f.seek(len(good) // 2)
        f.write(bytes(4096))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert samkit.zoo.checkpoint_path("nano", progress=False) == path
    assert path.read_bytes() == good  # re-copied from its source, not used damaged


def test_damaged_cached_file_without_a_source_is_one_line(tmp_path: Path) -> None:
    from samkit.download import UrlSource, fetch, sha256_file

    (tmp_path / "m.pt").write_bytes(b"x" * 100)
    sha = sha256_file(tmp_path / "m.pt")
    assert fetch("m.pt", [], tmp_path, sha, 100, progress=False) == tmp_path / "m.pt"
    stat = (tmp_path / "m.pt").stat()
    (tmp_path / "m.pt").write_bytes(b"y" * 100)  # damaged in place: same size, mtime put back
    os.utime(tmp_path / "m.pt", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    dead = UrlSource((tmp_path / "missing.pt").as_uri())
    with pytest.raises(DownloadError, match=r"cached .*m.pt has sha256 \w+, expected " + sha) as info:
        fetch("m.pt", [dead], tmp_path, sha, 100, progress=False)
    assert "\n" not in str(info.value)


def test_nan_weights_are_refused_at_load(tmp_path: Path, tiny_ckpt: str) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(tiny_ckpt, "pt") as f:
        meta = f.metadata()
        sd = {k: f.get_tensor(k) for k in f.keys()}
    key = "mask_decoder.iou_prediction_head.layers.0.weight"
    sd[key][0, 0] = float("nan")
    save_file(sd, str(tmp_path / "nan.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match=f"is damaged: {key} holds NaN"):
        samkit.load(tmp_path / "nan.safetensors")


@pytest.mark.parametrize("part", ["image_encoder", "mask_decoder.iou_prediction_head"])
def test_nan_embedding_or_scores_raise_instead_of_empty_masks(tiny_ckpt: str, part: str) -> None:
    model = samkit.load(tiny_ckpt)
    with torch.no_grad():
        next(model.get_submodule(part).parameters()).fill_(float("nan"))
    pred = samkit.Predictor(model)
    with pytest.raises(CheckpointError, match="NaN or infinite values") as info:
        pred.set_image(np.zeros((20, 30, 3), np.uint8))
        pred.predict([[5, 5]], [1])
    assert "\n" not in str(info.value)


def _resave(tmp_path: Path, tiny_ckpt: str, name: str, config: str | None = None, keep=None) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(tiny_ckpt, "pt") as f:
        meta = dict(f.metadata())
        sd = {k: f.get_tensor(k) for k in f.keys() if keep is None or keep(k)}
    if config is None:
        meta.pop("samkit_config")
    else:
        meta["samkit_config"] = config
    save_file(sd, str(tmp_path / name), metadata=meta)
    return tmp_path / name


def _config(**change) -> str:
    fields = SamConfig("vit", embed_dim=32, depth=1, num_heads=1, global_attn_indexes=(0,), image_size=256)
    return json.dumps({**fields.to_dict(), **change})


@pytest.mark.parametrize(
    "config, keep, message",
    [
        ("{not json", None, "samkit_config metadata is not JSON"),
        ("[1, 2]", None, 'not an object with an "encoder" name'),
        ('"vit"', None, 'not an object with an "encoder" name'),
        (_config(encoder="vit_z"), None, "describes an architecture samkit cannot build"),
        (_config(embed_dim="wide"), None, "describes an architecture samkit cannot build"),
        (_config(num_heads=0), None, "describes an architecture samkit cannot build"),
        (None, lambda k: "blocks" not in k, "is incomplete"),
        (None, lambda k: k.startswith("image_encoder.pos_embed"), "is incomplete"),
        (None, lambda k: k.startswith("image_encoder."), "does not match the vit architecture"),
    ],
)
def test_bad_checkpoint_metadata_or_keys_are_one_line(tmp_path, tiny_ckpt, config, keep, message) -> None:
    path = _resave(tmp_path, tiny_ckpt, "bad.safetensors", config, keep)
    with pytest.raises(CheckpointError, match=message) as info:
        samkit.load(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


# --- the engine's output folder ---------------------------------------------------------------------------


def test_cut_off_manifest_line_is_repaired_before_appending(
    photo_dir: Path, tmp_path: Path, generator
) -> None:
    out = tmp_path / "out"
    images = sorted(photo_dir.glob("*.png"))
    run_local(images[:1], generator, out, progress=False)
    with open(out / MANIFEST, "ab") as f:  # a run killed while logging b.png
        f.write(b'{"image": "b.png", "json": "b.js')
    summary = run_local(images, generator, out, progress=False)
    assert [r.status for r in summary.results] == ["skipped", "done"]
    lines = (out / MANIFEST).read_text().splitlines()
    assert [json.loads(line)["json"] for line in lines] == ["a.json", "b.json"]


def test_second_run_into_a_held_output_folder_is_refused(photo_dir: Path, tmp_path: Path, generator) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with open(out / LOCK, "ab") as held:  # what a running `samkit everything` holds
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(OutputError, match=f"another samkit run is writing to {out}"):
            run_local(sorted(photo_dir.glob("*.png")), generator, out, progress=False)
    assert not list(out.glob("*.json")) and not (out / MANIFEST).exists()
    summary = run_local(sorted(photo_dir.glob("*.png")), generator, out, progress=False)  # lock released
    assert [r.status for r in summary.results] == ["done", "done"]


def test_lock_is_released_after_a_run(photo_dir: Path, tmp_path: Path, generator) -> None:
    out = tmp_path / "out"
    run_local(sorted(photo_dir.glob("*.png"))[:1], generator, out, progress=False)
    with open(out / LOCK, "ab") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if the run still held it


def test_output_folder_under_a_file_is_one_line(photo_dir: Path, tmp_path: Path, generator) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="cannot write to the output folder"):
        run_local(sorted(photo_dir.glob("*.png")), generator, tmp_path / "file" / "out", progress=False)


def test_read_only_output_is_one_error_not_a_failure_per_image(photo_dir, generator, tmpfs) -> None:
    out = tmpfs("ro,size=1m")
    with pytest.raises(OutputError, match="Read-only file system"):
        run_local(sorted(photo_dir.glob("*.png")), generator, out, progress=False)


def test_full_disk_stops_the_run_and_leaves_nothing_half_written(photo_dir, generator, tmpfs) -> None:
    out = tmpfs("size=64k")
    fill(out, 2048)
    with pytest.raises(OutputError, match="No space left on device"):
        run_local(sorted(photo_dir.glob("*.png")), generator, out, overlay=True, progress=False)
    (out / "filler").unlink()
    left = sorted(p.name for p in out.iterdir())
    assert left in ([LOCK], [LOCK, MANIFEST]), left  # no JSON, overlay, temp file or empty manifest
    if MANIFEST in left:
        assert (out / MANIFEST).stat().st_size > 0 and read_manifest(out / MANIFEST)


def test_manifest_append_on_a_full_disk_leaves_the_manifest_as_it_was(tmp_path: Path, tmpfs) -> None:
    from samkit.engine.local import append_entry

    out = tmpfs("size=64k")
    append_entry(out / MANIFEST, {"json": "a.json", "status": "done"})
    before = (out / MANIFEST).read_bytes()
    fill(out, 0)
    with pytest.raises(OutputError, match="No space left on device"):
        append_entry(out / MANIFEST, {"json": "b.json", "status": "done", "pad": "x" * 8192})
    assert (out / MANIFEST).read_bytes() == before


def test_staged_files_are_all_or_nothing(tmp_path: Path) -> None:
    from samkit.formats import atomic_write_bytes, staged_files

    out = tmp_path / "out"
    with pytest.raises(OSError):
        with staged_files(out) as stage:
            atomic_write_bytes(stage / "one.png", b"1")
            raise OSError(28, "No space left on device")
    assert list(out.iterdir()) == []
    with staged_files(out) as stage:
        atomic_write_bytes(stage / "one.png", b"1")
        atomic_write_bytes(stage / "two.json", b"2")
    assert sorted(p.name for p in out.iterdir()) == ["one.png", "two.json"]
