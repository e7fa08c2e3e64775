"""Shared fixtures: paths to the shared data sets, and the reference implementations on the refshim stand-ins.

A checkout without ../shared (the data sets and the refshim stand-ins) still runs the suite: every test that
needs something from there is skipped with one line naming the missing folder (`needs_shared`, and
`pytest_runtest_makereport` for tests that open a shared file directly); the rest run as usual.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DATASETS = SHARED / "datasets"
REFSHIM = SHARED / "refshim"

# The references import torchvision/timm helpers; the stand-ins must win over anything installed.
if str(REFSHIM) not in sys.path:
    sys.path.insert(0, str(REFSHIM))

torch.set_num_threads(2)

COCO_TRAIN = DATASETS / "instances" / "coco_mini" / "train" / "images"
PHOTO = COCO_TRAIN / "000000000790.jpg"
# Named, not globbed: without ../shared the paths still exist as names, and opening one says which is missing.
PHOTOS = [COCO_TRAIN / f"{n:012d}.jpg" for n in (790, 30752, 37666, 54718)]
# Modules the references import that only the refshim stand-ins provide here.
REFSHIM_MODULES = ("torchvision", "timm")


def _missing_shared_folder(path: Path) -> Path:
    """The outermost missing folder on the way to `path` (../shared itself on a checkout without it)."""
    for parent in [*reversed(path.parents), path]:
        if not parent.exists():
            return parent
    return path


def needs_shared(path: Path) -> Path:
    """`path` (under ../shared) if present; otherwise skip the calling test with one line naming the folder."""
    if not path.exists():
        pytest.skip(f"needs {_missing_shared_folder(path)} (shared data sets / reference stand-ins): missing")
    return path


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Without ../shared, a test that fails on opening a file in it (or on importing a refshim stand-in)
    is reported as skipped, with one line naming the missing folder. With ../shared present nothing changes."""
    outcome = yield
    report = outcome.get_result()
    if SHARED.is_dir() or call.excinfo is None or report.outcome != "failed":
        return
    exc = call.excinfo.value
    text = str(exc)
    names_shared = str(SHARED) in text or f"{ROOT}/../shared" in text  # a path resolved or not
    if names_shared or (isinstance(exc, ModuleNotFoundError) and exc.name in REFSHIM_MODULES):
        report.outcome = "skipped"
        report.longrepr = (
            str(item.path),
            item.location[1] or 0,
            f"Skipped: needs {SHARED} (shared data sets / reference stand-ins): missing",
        )


@pytest.fixture(scope="session")
def photo() -> np.ndarray:
    """A real 640x422 RGB photo from a train split."""
    from samkit.image import load_image

    return load_image(needs_shared(PHOTO))


def _save_reference(kind: str, path: Path, seed: int, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    if kind == "vit_t":
        from mobile_sam import sam_model_registry as registry

        ref = registry["vit_t"]()
    elif overrides:
        from functools import partial

        from segment_anything.build_sam import _build_sam

        ref = partial(_build_sam, **overrides)()
    else:
        from segment_anything import sam_model_registry as registry

        ref = registry[kind]()
    _randomise(ref)
    torch.save(ref.state_dict(), path)
    return ref.eval()


def _randomise(model: torch.nn.Module) -> None:
    """Give zero-initialised tensors (rel-pos tables, pos_embed, BN stats) non-trivial values."""
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif (
                "rel_pos" in name
                or "pos_embed" in name
                or "attention_biases" in name
                or name.endswith("running_mean")
            ):
                t.copy_(torch.randn(t.shape, generator=g) * 0.02)


@pytest.fixture(scope="session")
def ref_checkpoint(tmp_path_factory):
    """Factory: (kind, **overrides) -> (reference model, path of its saved state_dict). Cached per session."""
    cache: dict = {}

    def make(kind: str, **overrides):
        needs_shared(REFSHIM)
        key = (kind, repr(sorted(overrides.items())))
        if key not in cache:
            path = tmp_path_factory.mktemp("ckpt") / f"{kind}.pth"
            cache[key] = (_save_reference(kind, path, seed=len(cache), **overrides), path)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> str:
    """A tiny random ViT SAM (256 input) saved as a samkit checkpoint: loads and segments in a blink."""
    import samkit
    from samkit.models.build import SamConfig, build_sam

    torch.manual_seed(0)
    cfg = SamConfig("vit", embed_dim=32, depth=1, num_heads=1, global_attn_indexes=(0,), image_size=256)
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    samkit.save(build_sam(cfg), path)
    return str(path)


@pytest.fixture
def one_thread():
    """One torch thread for the test (small ops run faster on one than on two contended cores); restored after.
    Use per module with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# A tiny ViT SAM and a toy TinyViT's stage fields: train in seconds on CPU.
TINY_ARCH = {
    "encoder": "vit",
    "embed_dim": 32,
    "depth": 1,
    "num_heads": 2,
    "global_attn_indexes": [0],
    "window_size": 8,
    "image_size": 128,
}
TOY_TINY_VIT = {
    "tiny_embed_dims": [16, 32, 64, 320],
    "tiny_depths": [1, 1, 1, 1],
    "tiny_num_heads": [1, 1, 2, 5],
    "tiny_window_sizes": [7, 7, 7, 7],
}


def tiny_train_config(out, **over) -> dict:
    """A `samkit.train` config for TINY_ARCH from scratch on 8 synthetic 128 px scenes, 6 steps. Overrides:
    `key=value` replaces a top-level key or a whole section, `section__leaf=value` one leaf of a section."""
    cfg = {
        "out": str(out),
        "mode": "scratch",
        "model": {"init": "scratch", "arch": dict(TINY_ARCH)},
        "data": {
            "train": [{"type": "synthetic", "count": 8, "size": 128}],
            "masks_per_image": 2,
            "batch_size": 1,
        },
        "recipe": {"rounds": 3},
        "optim": {"steps": 6, "lr": 3.0e-4, "warmup": 2},
        "log_every": 1,
        "checkpoint_every": 3,
        "val_every": 0,
    }
    for key, value in over.items():
        section, _, leaf = key.partition("__")
        if leaf:
            cfg[section][leaf] = value
        else:
            cfg[key] = value
    return cfg
