"""The model side of the ML backend: prompts -> one mask, or a whole task -> every mask (`auto`).

One `Predictor` answers every request, behind a lock. Its embeddings are cached on disk under a
fingerprint of the image encoder's weights, one file per image named by a hash of its pixels, so a
fine-tuned checkpoint never reuses another model's embeddings and a restarted backend does not encode
an image twice; the image of the last request stays set, so further clicks on a task only run the
mask decoder.
"""

from __future__ import annotations

import hashlib
import io
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from samkit.embedding_file import fingerprint
from samkit.errors import ImageError
from samkit.everything.settings import DEFAULTS
from samkit.labelstudio.images import ImageReader
from samkit.labelstudio.protocol import (
    LabelConfig,
    Prompt,
    brush_result,
    converter_brush,
    parse_label_config,
    prompt_from_context,
)


@dataclass
class BackendConfig:
    """What the backend loads and where it may read images.

    model: zoo name or checkpoint path (None: the default model). auto: answer `/predict` calls without
    a prompt with segment-everything masks (pre-labelling). points_per_side / pred_iou_thresh /
    stability_score_thresh / min_mask_region_area / prompts / prompt_head: MaskGenerator options for
    `auto` (with prompts "learned", the head is loaded and checked against the model at start). auto_label:
    the BrushLabels label of automatic masks (default: the config's first). label_studio_url / api_key:
    the server uploads are fetched from (else learnt from `/setup`). document_root: Label Studio's
    LOCAL_FILES_DOCUMENT_ROOT; allow_roots: folders whose files may be read from disk. cache_dir: where
    embeddings are kept (default $SAMKIT_HOME/labelstudio); max_embeddings: how many (least recently
    used evicted first; a vit_t embedding is 4 MB).
    """

    model: str | None = None
    auto: bool = False
    points_per_side: int | None = DEFAULTS.points_per_side
    pred_iou_thresh: float = DEFAULTS.pred_iou_thresh
    stability_score_thresh: float = DEFAULTS.stability_score_thresh
    min_mask_region_area: int = DEFAULTS.min_mask_region_area
    prompts: str = DEFAULTS.prompts
    prompt_head: str = DEFAULTS.prompt_head
    auto_label: str | None = None
    label_studio_url: str | None = None
    api_key: str | None = None
    document_root: str | None = None
    allow_roots: list[str] = field(default_factory=list)
    cache_dir: str | None = None
    max_embeddings: int = 256


class Backend:
    """A loaded model that turns Label Studio `/predict` requests into `brushlabels` predictions."""

    def __init__(self, config: BackendConfig) -> None:
        import samkit
        from samkit.download import cache_dir
        from samkit.eval.cache import CachedPredictor
        from samkit.serve.cache import EmbeddingCache

        converter_brush()  # fail now, not on the first click, when the extra is not installed
        self.config = config
        self.model = samkit.load(config.model)
        self.name = Path(str(config.model)).stem if config.model else samkit.DEFAULT_MODEL
        self.fingerprint = fingerprint(self.model)
        self.model_version = f"samkit-{self.name}-{self.fingerprint[:8]}"
        root = Path(config.cache_dir) if config.cache_dir else cache_dir() / "labelstudio"
        self.predictor = CachedPredictor(self.model, root)
        self.embeddings = EmbeddingCache(self.predictor.root, config.max_embeddings)
        self.images = ImageReader(
            config.label_studio_url, config.api_key, config.document_root, list(config.allow_roots)
        )
        self._generator: Any = None
        self._current: Path | None = None
        self._decoded: tuple[str, np.ndarray] | None = None  # (sha1 of the file, its pixels)
        self._lock = threading.Lock()
        if config.auto and config.prompts == "learned":
            self._mask_generator()  # a head that does not suit the model stops the backend at start

    # --- requests --------------------------------------------------------------------------------------

    def setup(self, body: dict[str, Any]) -> dict[str, Any]:
        """`/setup`: check the project's config and learn the server's URL and token."""
        parse_label_config(body.get("schema") or "")
        self.images.connect(body.get("hostname"), body.get("access_token"))
        return {"model_version": self.model_version}

    def predict(self, body: dict[str, Any]) -> dict[str, Any]:
        """`/predict`: one prediction per task, `{"results": [{"result": [...], "score", "model_version"}]}`.

        With a prompt in `params.context` (the labelling UI's smart keypoint or rectangle) the one task
        gets the mask of that prompt; without one, every task gets its segment-everything masks if the
        backend runs with `auto`, and an empty prediction otherwise.
        """
        config = parse_label_config(body.get("label_config") or "")
        tasks = body.get("tasks") or []
        prompt = prompt_from_context((body.get("params") or {}).get("context"))
        if prompt is not None:
            return {"results": [self._interactive(tasks[0], prompt, config)] if tasks else []}
        if not self.config.auto:
            return {"results": [self._prediction([]) for _ in tasks]}
        return {"results": [self._automatic(task, config) for task in tasks]}

    # --- work ------------------------------------------------------------------------------------------

    def _interactive(self, task: dict[str, Any], prompt: Prompt, config: LabelConfig) -> dict[str, Any]:
        image = self._image(task, config)
        if image.shape[:2] != prompt.size:
            raise ImageError(
                f"the prompt is for a {prompt.size[1]}x{prompt.size[0]} image but the task's image is "
                f"{image.shape[1]}x{image.shape[0]}"
            )
        with self._lock:
            self._set_image(image)
            masks, scores, _ = self.predictor.predict(
                prompt.points if len(prompt.points) else None,
                prompt.point_labels if len(prompt.points) else None,
                prompt.box,
                multimask_output=prompt.single_click,
                low_res_logits=False,
            )
        best = int(np.argmax(scores))
        result = brush_result(masks[best], float(scores[best]), config, prompt.label)
        return self._prediction([result], result["score"])

    def _automatic(self, task: dict[str, Any], config: LabelConfig) -> dict[str, Any]:
        image = self._image(task, config)
        with self._lock:
            self._set_image(image)
            records = self._mask_generator().generate(image, embedded=self.predictor)
        label = self.config.auto_label
        results = [brush_result(r["segmentation"], r["predicted_iou"], config, label) for r in records]
        score = float(np.mean([r["score"] for r in results])) if results else 0.0
        return self._prediction(results, score)

    def _prediction(self, results: list[dict[str, Any]], score: float = 0.0) -> dict[str, Any]:
        return {"result": results, "score": score, "model_version": self.model_version}

    def _image(self, task: dict[str, Any], config: LabelConfig) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        from samkit.image import load_image

        ref = (task.get("data") or {}).get(config.image_key)
        data = self.images.read(ref)
        digest = hashlib.sha1(data).hexdigest()
        last = self._decoded
        if last is not None and last[0] == digest:  # the next click on the same task: skip decoding
            return last[1]
        try:
            with Image.open(io.BytesIO(data)) as im:
                image = load_image(im)
        except (UnidentifiedImageError, OSError) as exc:
            raise ImageError(
                f"task {task.get('id')}: {ref} is not an image Pillow can read ({exc})"
            ) from None
        self._decoded = (digest, image)
        return image

    def _set_image(self, image: np.ndarray) -> None:
        """Set `image` on the predictor unless it is already set (same pixels, same encoder weights)."""
        key = self.predictor.path_for(image)
        if key != self._current or not self.predictor.is_image_set:
            self.predictor.set_image(image)  # from the disk cache when the file is there
            self._current = key
            self.embeddings.get(key.stem)  # marks it used
            self.embeddings.added(key.stem)  # evicts beyond max_embeddings

    def _mask_generator(self) -> Any:
        if self._generator is None:
            import samkit

            c = self.config
            self._generator = samkit.MaskGenerator(
                self.model,
                points_per_side=c.points_per_side,
                pred_iou_thresh=c.pred_iou_thresh,
                stability_score_thresh=c.stability_score_thresh,
                min_mask_region_area=c.min_mask_region_area,
                prompts=c.prompts,  # type: ignore[arg-type]
                prompt_head=c.prompt_head,
            )
        return self._generator
