"""Typed training config: sections as dataclasses, one-line errors for unknown keys, wrong types, bad values."""

from __future__ import annotations

import pytest

from samkit.train.config import (
    AugmentConfig,
    ConfigError,
    DataConfig,
    OptimConfig,
    TrainConfig,
    load_config,
    task_of,
)

SOURCE = {"type": "synthetic", "count": 4}


def _load(*overrides: str, **values):
    return load_config({"data": {"train": [SOURCE]}}, list(overrides), **values)


def _one_line_error(*overrides: str, **values) -> str:
    with pytest.raises(ConfigError) as info:
        _load(*overrides, **values)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_sections_are_typed_and_keep_the_defaults():
    cfg = _load("optim.lr=3e-4", "optim.steps=20", "data.augment.hflip=0.5", "export.official_pth=true")
    assert isinstance(cfg, TrainConfig)
    assert isinstance(cfg.optim, OptimConfig) and isinstance(cfg.data, DataConfig)
    assert isinstance(cfg.data.augment, AugmentConfig)
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)  # "3e-4" is a string to YAML 1.1
    assert cfg.optim.steps == 20 and cfg.data.augment.hflip == 0.5 and cfg.export.official_pth is True
    assert cfg.optim.betas == [0.9, 0.999] and cfg.recipe.rounds == 11 and cfg.lora.targets == ["qkv", "proj"]
    assert cfg.data.train == [SOURCE]


def test_a_config_round_trips_through_its_dict_form():
    cfg = _load("mode=lora", "lora.rank=8", "val_per_image=3", "data.val={type: synthetic, count: 2}")
    assert load_config(cfg.to_dict()) == cfg
    assert load_config(cfg) == cfg
    assert load_config(cfg, ["optim.steps=5"]).optim.steps == 5


def test_a_single_training_source_may_be_given_without_a_list():
    assert load_config({"data": {"train": SOURCE}}).data.train == [SOURCE]


def test_integers_are_accepted_where_numbers_are_asked_and_whole_floats_where_counts_are():
    cfg = _load("optim.lr=1", "optim.steps=2.0")
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.steps == 2 and isinstance(cfg.optim.steps, int)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lrr=1", "unknown key 'lrr'"),
        ("nope=1", "unknown key 'nope'"),
        ("data.augment.rotate=0.5", "unknown key 'rotate'"),
    ],
)
def test_unknown_keys_are_named(override, message):
    assert message in _one_line_error(override)


def test_unknown_keys_in_a_file_are_named_with_their_section(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  train: [{type: synthetic}]\noptim: {lr: 1.0e-4, step: 10}\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.step'; known keys here: steps, epochs"):
        load_config(path)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr=fast", "optim.lr must be a number, got 'fast'"),
        ("optim.steps=2.5", "optim.steps must be a whole number, got 2.5"),
        ("data.precache=maybe", "data.precache must be true or false, got 'maybe'"),
        ("data.batch_size=true", "data.batch_size must be a whole number, got True"),
        ("optim.decay_steps=100", "optim.decay_steps must be a list, got 100"),
        ("optim.decay_steps=[10, x]", "optim.decay_steps.1 must be a whole number, got 'x'"),
        ("model.init=3", "model.init must be a string, got 3"),
        ("model.arch=[1]", "model.arch must be a mapping, got [1]"),
        ("mode=everything", "mode 'everything' is not one of scratch, decoder, frozen_encoder"),
        ("amp=fp8", "amp 'fp8' is not one of auto, off, bf16, fp16"),
        ("recipe.loss_resolution=high", "recipe.loss_resolution 'high' is not one of low, full"),
    ],
)
def test_wrong_types_are_named(override, message):
    assert message in _one_line_error(override)


def test_a_section_given_as_a_value_is_refused():
    assert "optim must be a mapping of keys" in _one_line_error(optim=3)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("recipe.rounds=0", "recipe.rounds must be at least 1, got 0"),
        ("data.workers=-1", "data.workers must be at least 0, got -1"),
        ("log_every=0", "log_every must be at least 1, got 0"),
        ("data.cache_variants=0", "data.cache_variants must be at least 1, got 0"),
        ("data.augment.scale=[1.2, 0.8]", "data.augment.scale must be [low, high] with 0 < low <= high"),
        ("data.augment.hflip=2", "data.augment.hflip is a probability between 0 and 1, got 2.0"),
        ("optim.betas=[0.9]", "optim.betas must be two numbers in [0, 1)"),
        ("mode=distill", "mode distill needs `teacher:`"),
        ("model.init=scratch", "model.init scratch needs model.arch"),
    ],
)
def test_bad_values_are_named(override, message):
    assert message in _one_line_error(override)


def test_tasks_tell_trainers_apart(tmp_path):
    assert task_of({}) == "sam" and task_of({"task": "prompt_head"}) == "prompt_head"
    with pytest.raises(ConfigError, match="task 'segment' is not one of sam, prompt_head"):
        task_of({"task": "segment"})
    path = tmp_path / "head.yaml"
    path.write_text("task: prompt_head\n")
    with pytest.raises(ConfigError, match="is a `task: prompt_head` config, not a SAM training config"):
        load_config(path)
    path.write_text("task: sam\ndata:\n  train: [{type: synthetic}]\n")
    assert load_config(path).mode == "decoder"
