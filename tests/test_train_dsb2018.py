"""The dsb2018 decoder-only fine-tune (configs/dsb2018_decoder.yaml), shortened: it must learn, and its
result must open in samkit.load and in the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import DATASETS, ROOT

import samkit
from samkit.cli import main as cli_main
from samkit.train import load_config, read_metrics, train

CONFIG = ROOT / "configs" / "dsb2018_decoder.yaml"
TRAIN = DATASETS / "instances" / "dsb2018" / "train"


pytestmark = pytest.mark.usefixtures("one_thread")


def test_shipped_config_holds_out_validation_from_training():
    cfg = load_config(CONFIG)
    (source,) = cfg.data.train
    assert cfg.data.val is not None
    stop = source["range"][1]
    start = cfg.data.val["range"][0]
    assert cfg.mode == "decoder" and cfg.data.precache
    assert source["path"] == cfg.data.val["path"]  # both slices of dsb2018/train, never /val
    assert "/val" not in source["path"]
    assert 0 < stop and start < 0 and stop <= 564 + start  # the slices do not overlap


@pytest.mark.skipif(not TRAIN.is_dir(), reason="shared dsb2018 data set not present")
def test_short_decoder_finetune_raises_validation_iou_and_exports_a_usable_model(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the config's data paths are relative to the project root
    out, cache = tmp_path / "run", tmp_path / "emb"
    steps = 8
    result = train(
        CONFIG,
        [
            "data.train.0.range=[0, 3]",
            "data.val.range=[-1, null]",
            "data.masks_per_image=4",
            f"optim.steps={steps}",
            "optim.lr=3e-4",
            "optim.warmup=2",
            "optim.decay_steps=[]",
            f"val_every={steps}",
            "val_objects=12",
            "val_per_image=12",
            "log_every=1",
        ],
        progress=False,
        out=str(out),
        data={"cache_dir": str(cache)},
    )

    # Embeddings were cached once, before training: 3 training images + 1 validation image.
    assert len(list(cache.glob("*/*.safetensors"))) == 4
    rows, vals = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert [v["step"] for v in vals] == [0, steps]
    before, after = vals[0]["val"]["mIoU_top"], vals[-1]["val"]["mIoU_top"]
    assert vals[0]["val"]["objects"] == 12
    assert after > before + 0.03, (before, after)

    path = result["model"]
    tuned = samkit.load(path)
    base = samkit.load("vit_t")
    enc_t, enc_b = tuned.image_encoder.state_dict(), base.image_encoder.state_dict()
    assert all(torch.equal(enc_t[k], enc_b[k]) for k in enc_b)
    dec_t, dec_b = tuned.mask_decoder.state_dict(), base.mask_decoder.state_dict()
    assert any(not torch.equal(dec_t[k], dec_b[k]) for k in dec_b)

    image = sorted((TRAIN / "images").iterdir())[0]
    seg = tmp_path / "seg"
    assert (
        cli_main(["segment", str(image), "--point", "100,100", "--model", str(path), "--out", str(seg)]) == 0
    )
    scores = json.loads((seg / f"{image.stem}_scores.json").read_text())
    assert len(scores["masks"]) == 3
    assert len(list(seg.glob(f"{image.stem}_mask*.png"))) == 3
