"""Label Studio's JSON, in and out: the labelling config, interactive prompts, and brush results.

Label Studio gives positions in percent of the image: a keypoint is (x, y) and a rectangle (x, y, width,
height), each in [0, 100] of `original_width` / `original_height`. samkit takes (x, y) pixels and XYXY
pixel boxes; this module converts between the two. Masks go back as `brushlabels` results in Label
Studio's brush RLE, encoded and decoded by the format's own library (`label_studio_converter.brush`).
"""

from __future__ import annotations

import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any

import numpy as np

from samkit.errors import InputError, SamkitError

PROMPT_TYPES = ("keypointlabels", "rectanglelabels")


@dataclass(frozen=True)
class LabelConfig:
    """What of a project's labelling config the backend writes to.

    brush_name: the `<BrushLabels name=...>` masks go to; image_name: the `<Image name=...>` it labels;
    image_key: the task data field holding the image URL (`value="$image"` -> "image"); labels: the
    BrushLabels' label values, in config order.
    """

    brush_name: str
    image_name: str
    image_key: str
    labels: tuple[str, ...]


def parse_label_config(xml: str) -> LabelConfig:
    """The first `<BrushLabels>` of a labelling config and the `<Image>` it points at."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise InputError(f"the project's labelling config is not valid XML: {exc}") from None
    images = {el.get("name"): el for el in root.iter() if el.tag == "Image"}
    for el in root.iter():
        if el.tag != "BrushLabels":
            continue
        name, to_name = el.get("name"), el.get("toName")
        image = images.get(to_name)
        if not name or image is None:
            raise InputError(
                f"<BrushLabels name={name!r}> must have a toName naming an <Image> of the config"
            )
        value = image.get("value", "")
        if not value.startswith("$"):
            raise InputError(f'<Image name={to_name!r}> needs value="$field" naming the task\'s image field')
        labels = tuple(lab.get("value", "") for lab in el.iter() if lab.tag == "Label")
        return LabelConfig(name, str(to_name), value[1:], labels)
    raise InputError("the project's labelling config has no <BrushLabels> for samkit to write masks into")


@dataclass
class Prompt:
    """One interactive prompt in image pixels.

    points: (N, 2) XY original-image pixels; point_labels: (N,) 1 foreground, 0 background; box: (4,)
    XYXY original-image pixels or None; label: the label the user picked on the prompt tool (or None);
    size: (height, width) of the image, as Label Studio reports it.
    """

    points: np.ndarray
    point_labels: np.ndarray
    box: np.ndarray | None
    label: str | None
    size: tuple[int, int]

    @property
    def single_click(self) -> bool:
        """One point and no box: ambiguous, so SAM's three candidates are worth asking for."""
        return len(self.points) == 1 and self.box is None


def prompt_from_context(context: dict[str, Any] | None) -> Prompt | None:
    """The prompt in a `/predict` request's `params.context`, or None when there is no interaction.

    Keypoints (`keypointlabels`) are positive unless `is_positive` is false (the negative click of
    Label Studio's smart tools); the last rectangle (`rectanglelabels`) is the box.
    """
    results = [r for r in (context or {}).get("result") or [] if r.get("type") in PROMPT_TYPES]
    if not results:
        return None
    points: list[tuple[float, float]] = []
    labels: list[int] = []
    box = None
    label = None
    size = None
    for r in results:
        try:
            w, h = int(r["original_width"]), int(r["original_height"])
            v = r["value"]
            x, y = float(v["x"]) * w / 100.0, float(v["y"]) * h / 100.0
            if r["type"] == "keypointlabels":
                points.append((x, y))
                labels.append(1 if r.get("is_positive", True) else 0)
            else:
                bw, bh = float(v["width"]) * w / 100.0, float(v["height"]) * h / 100.0
                box = np.array([x, y, x + bw, y + bh], dtype=np.float64)
        except (KeyError, TypeError, ValueError):
            raise InputError(
                f"a {r.get('type')} prompt needs original_width/height and value x, y (and width, height "
                "for a rectangle) in percent"
            ) from None
        if size is not None and size != (h, w):
            raise InputError(f"prompts disagree on the image size: {size} and {(h, w)} (height, width)")
        size = (h, w)
        names = v.get(r["type"]) or []
        label = names[0] if names else label
    assert size is not None
    return Prompt(
        np.array(points, dtype=np.float64).reshape(-1, 2),
        np.array(labels, dtype=np.int64),
        box,
        label,
        size,
    )


def converter_brush() -> Any:
    """Label Studio's own brush RLE codec (`label_studio_converter.brush`), from the labelstudio extra."""
    try:
        from label_studio_converter import brush
    except ImportError:
        raise SamkitError(
            "the Label Studio backend needs label-studio-converter: pip install 'samkit[labelstudio]'"
        ) from None
    return brush


def brush_result(mask: np.ndarray, score: float, config: LabelConfig, label: str | None) -> dict[str, Any]:
    """A `brushlabels` result for one (H, W) bool mask, with the predicted IoU as its score.

    The IoU head can overshoot 1 a little; Label Studio shows scores as percentages, so it is clipped to [0, 1].

    label: a label of the BrushLabels; any other (or None) falls back to its first label.
    """
    brush = converter_brush()
    if label not in config.labels:
        label = config.labels[0] if config.labels else None
    h, w = mask.shape
    rle = brush.mask2rle(mask.astype(np.uint8) * 255)
    return {
        "id": uuid.uuid4().hex[:10],
        "from_name": config.brush_name,
        "to_name": config.image_name,
        "type": "brushlabels",
        "original_width": int(w),
        "original_height": int(h),
        "image_rotation": 0,
        "value": {"format": "rle", "rle": [int(v) for v in rle], "brushlabels": [label] if label else []},
        "score": min(max(float(score), 0.0), 1.0),
        "readonly": False,
    }


def decode_brush(result: dict[str, Any]) -> np.ndarray:
    """The (H, W) bool mask of a `brushlabels` result (Label Studio's brush RLE, alpha channel)."""
    brush = converter_brush()
    value = result.get("value", result)
    h, w = int(result["original_height"]), int(result["original_width"])
    pixels = brush.decode_rle(value["rle"])
    if pixels.size != h * w * 4:
        raise InputError(f"brush RLE holds {pixels.size} values, not {h} x {w} x 4")
    return pixels.reshape(h, w, 4)[:, :, 3] > 127
