"""The recipe's parts: prompt simulation, the SAM losses, LoRA, config handling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from samkit.train.config import ConfigError, TrainConfig, load_config, read_yaml, task_of
from samkit.train.lora import LoRALinear, add_lora, merge_lora
from samkit.train.losses import sam_loss
from samkit.train.prompts import error_points, first_points, jittered_boxes, round_plan


def _disc(h=64, w=64, cx=30, cy=20, r=10):
    yy, xx = np.mgrid[:h, :w]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2


def test_first_points_lie_in_the_mask():
    m = np.stack([_disc(), _disc(cx=50, cy=50, r=5)])
    pts = first_points(m, np.random.default_rng(0))
    for k in range(2):
        x, y = pts[k, 0].astype(int)
        assert m[k, y, x]


def test_box_jitter_is_bounded():
    big = np.zeros((1, 400, 400), bool)
    big[0, 50:350, 50:350] = True
    rng = np.random.default_rng(0)
    boxes = np.concatenate([jittered_boxes(big, rng) for _ in range(200)])
    dev = np.abs(boxes - [50, 50, 349, 349])
    assert dev.max() <= 20.0 + 1e-4  # capped at 20 px although 10% of 300 px would be 30
    assert dev.mean() > 5  # but it does move
    assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()


def test_error_points_are_positive_on_misses_and_negative_on_false_alarms():
    gt = torch.zeros(3, 8, 8, dtype=torch.bool)
    pred = torch.zeros(3, 8, 8, dtype=torch.bool)
    gt[0, 2:4, 2:4] = True  # all missed -> positive
    pred[1, 5:7, 5:7] = True  # false alarm -> negative
    gt[2, 1, 1] = pred[2, 1, 1] = True  # exact -> padding
    coords, labels = error_points(pred, gt, 4.0, np.random.default_rng(0))
    assert labels[:, 0].tolist() == [1, 0, -1]
    x, y = coords[0, 0]
    assert 8 <= x < 16 and 8 <= y < 16  # cells 2..3 of a 4-px grid


def test_round_plan_follows_the_paper():
    plan = round_plan(11, np.random.default_rng(3))
    assert len(plan) == 11 and not plan[0] and not plan[-1]
    assert sum(plan) == 8  # one initial prompt, 8 new points, 2 rounds with only the previous mask


def test_loss_picks_the_lowest_loss_candidate():
    target = torch.zeros(2, 1, 16, 16)
    target[:, :, 4:12, 4:12] = 1
    good = target * 20 - 10
    logits = torch.stack([-good[:, 0], good[:, 0], torch.zeros(2, 16, 16)], 1)
    iou_pred = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    loss, stats, best = sam_loss(logits, iou_pred, target)
    assert best.tolist() == [1, 1]
    assert stats["iou"] == 1.0
    assert loss < 0.1


def test_lora_starts_as_identity_and_merges_exactly():
    torch.manual_seed(0)
    net = torch.nn.Sequential()
    net.qkv = torch.nn.Linear(8, 24)
    net.other = torch.nn.Linear(8, 8)
    x = torch.randn(5, 8)
    before = net.qkv(x)
    assert add_lora(net, rank=2, alpha=4, targets=["qkv"]) == 1
    assert isinstance(net.qkv, LoRALinear) and not isinstance(net.other, LoRALinear)
    assert torch.allclose(net.qkv(x), before)
    with torch.no_grad():
        net.qkv.lora_b.normal_()
    adapted = net.qkv(x)
    assert not torch.allclose(adapted, before)
    assert merge_lora(net) == 1
    assert type(net.qkv) is torch.nn.Linear
    assert torch.allclose(net.qkv(x), adapted, atol=1e-5)


def test_config_overrides_and_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("mode: decoder\ndata:\n  train:\n    - {type: synthetic, count: 4}\n")
    cfg = load_config(path, ["optim.lr=3e-4", "data.batch_size=4", "recipe.rounds=3"])
    assert cfg.optim.lr == 3e-4 and cfg.data.batch_size == 4 and cfg.recipe.rounds == 3
    assert cfg.recipe.focal_weight == 20.0  # the paper's default survives
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(path, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="mode"):
        load_config(path, ["mode=everything"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_shipped_configs_load_and_their_data_exists():
    from conftest import ROOT

    from samkit.train.data import build_source

    configs = sorted((ROOT / "configs").glob("*.yaml"))
    assert {p.stem for p in configs} >= {
        "tiny_scratch",
        "finetune_decoder",
        "finetune_lora",
        "finetune_frozen_encoder",
        "distill_encoder",
        "dsb2018_decoder",
        "dsb2018_lora",
        "dsb2018_full",
    }
    for path in configs:
        if task_of(read_yaml(path)) != "sam":  # another trainer's config (e.g. task: prompt_head)
            continue
        cfg = load_config(path)
        assert isinstance(cfg, TrainConfig), path
        for spec in [*cfg.data.train, cfg.data.val]:
            if spec and spec["type"] in ("coco", "masks", "sa1b"):
                assert len(build_source(spec, ROOT)) > 0
