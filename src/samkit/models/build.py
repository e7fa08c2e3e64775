"""Builders: an architecture description -> an untrained `Sam`. The architecture numbers live here only."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from samkit.models.mask_decoder import MaskDecoder
from samkit.models.nano import NanoEncoder
from samkit.models.prompt_encoder import PromptEncoder
from samkit.models.sam import Sam
from samkit.models.tiny_vit import TinyViT
from samkit.models.transformer import TwoWayTransformer
from samkit.models.vit import ImageEncoderViT


@dataclass(frozen=True)
class SamConfig:
    """Everything needed to build a SAM-family model. `encoder` is "vit" (SAM), "tiny_vit" (MobileSAM) or
    "nano" (samkit-nano: the tiny_vit numbers run at `nano_input_size` px, see samkit.models.nano).

    Preprocessing travels with the architecture: `resize` is how the longest side is brought to
    `image_size` ("bilinear": PIL bilinear as SAM does; "area": OpenCV INTER_AREA as LiteMedSAM does) and
    `normalize` is "mean_std" (subtract `pixel_mean`, divide by `pixel_std`, 0..255 scale) or "minmax"
    (each image's own min and max over all channels -> [0, 1], LiteMedSAM); both before zero padding.
    """

    encoder: str
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    window_size: int = 14
    tiny_embed_dims: tuple[int, ...] = (64, 128, 160, 320)
    tiny_depths: tuple[int, ...] = (2, 2, 6, 2)
    tiny_num_heads: tuple[int, ...] = (2, 4, 5, 10)
    tiny_window_sizes: tuple[int, ...] = (7, 7, 14, 7)
    tiny_patch_stride: int = 4
    tiny_classifier_head: bool = True
    nano_input_size: int = 512
    image_size: int = 1024
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    resize: str = "bilinear"
    normalize: str = "mean_std"
    extra: dict = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("extra")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SamConfig:
        known = {
            k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in cls.__dataclass_fields__
        }
        return cls(**known)


VIT_B = SamConfig("vit", 768, 12, 12, (2, 5, 8, 11))
VIT_L = SamConfig("vit", 1024, 24, 16, (5, 11, 17, 23))
VIT_H = SamConfig("vit", 1280, 32, 16, (7, 15, 23, 31))
VIT_T = SamConfig("tiny_vit")
# LiteMedSAM: MobileSAM's TinyViT with a stride-1 stem on a 256 x 256 input (still a 64 x 64 embedding).
MEDSAM_LITE = SamConfig(
    "tiny_vit",
    tiny_patch_stride=1,
    tiny_classifier_head=False,
    image_size=256,
    resize="area",
    normalize="minmax",
)

# samkit-nano: MobileSAM's TinyViT on a 512 px input (windows widened to tile its smaller token maps).
NANO = SamConfig("nano", tiny_window_sizes=(7, 8, 16, 8), tiny_classifier_head=False)


def build_sam(cfg: SamConfig) -> Sam:
    """Build an untrained model (in eval mode) for `cfg`."""
    if cfg.encoder == "vit":
        encoder = ImageEncoderViT(
            img_size=cfg.image_size,
            embed_dim=cfg.embed_dim,
            depth=cfg.depth,
            num_heads=cfg.num_heads,
            window_size=cfg.window_size,
            global_attn_indexes=cfg.global_attn_indexes,
        )
    elif cfg.encoder in ("tiny_vit", "nano"):
        # samkit-nano is a TinyViT too: the same stages, run at its own input size inside.
        tiny = {
            "embed_dims": cfg.tiny_embed_dims,
            "depths": cfg.tiny_depths,
            "num_heads": cfg.tiny_num_heads,
            "window_sizes": cfg.tiny_window_sizes,
        }
        if cfg.encoder == "nano":
            encoder = NanoEncoder(img_size=cfg.image_size, inner=cfg.nano_input_size, **tiny)
        else:
            encoder = TinyViT(
                img_size=cfg.image_size,
                patch_stride=cfg.tiny_patch_stride,
                classifier_head=cfg.tiny_classifier_head,
                **tiny,
            )
    else:
        raise ValueError(f"unknown encoder type {cfg.encoder!r}")
    grid = cfg.image_size // 16 if cfg.encoder == "vit" else encoder.embed_resolution
    prompt_encoder = PromptEncoder(256, (grid, grid), (cfg.image_size, cfg.image_size), 16)
    decoder = MaskDecoder(256, TwoWayTransformer(depth=2, embedding_dim=256, num_heads=8, mlp_dim=2048))
    model = Sam(
        encoder,
        prompt_encoder,
        decoder,
        cfg.image_size,
        cfg.pixel_mean,
        cfg.pixel_std,
        normalize=cfg.normalize,
        resize=cfg.resize,
    )
    model.config = cfg
    return model.eval()
