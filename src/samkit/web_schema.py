"""The prompt every samkit web app takes (`samkit serve`'s POST /predict, `samkit annotate`'s predict and
accept routes), as a pydantic model.

Only JSON types are checked here. Every value (how many points, the labels, coordinates inside the image,
the order of a box's corners) is checked where every front end checks it, `samkit.prompts.check_prompts`,
so a bad prompt gets the same one-line message from the Python API, the CLI and each web app.
Frames: points (x, y) and boxes XYXY in original-image pixels.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from samkit.prompts import MAX_POINTS


class PromptFields(BaseModel):
    """One prompt: points with their labels, and/or a box.

    Points come in either of two forms: `points` [[x, y], ...] with `labels` [1, 0, ...] (`samkit serve`'s
    form), or `points` [[x, y, label], ...] without `labels` (the annotator's form).
    """

    points: list[list[float]] | None = Field(
        None,
        description=f"[[x, y], ...] with `labels`, or [[x, y, label], ...]; original-image pixels, "
        f"{MAX_POINTS} at most",
    )
    labels: list[float] | None = Field(
        None, description="one per point in [[x, y], ...]: 1 foreground, 0 background (-1: padding, ignored)"
    )
    box: list[float] | None = Field(None, description="[x0, y0, x1, y1] (XYXY) in original-image pixels")
    multimask: bool | None = Field(
        None, description="3 candidate masks (true) or 1; default: 3 for one point or a lone box, else 1"
    )

    def predict_args(self) -> tuple[list | None, list | None, list | None]:
        """(point_coords (N, 2), point_labels (N,), box (4,)) as `Predictor.predict` takes them, None where
        absent. Not checked here: `Predictor.predict` checks shapes and values with `check_prompts`."""
        rows, labels = self.points or None, self.labels or None
        if rows is not None and labels is None and all(len(r) == 3 for r in rows):
            rows, labels = [r[:2] for r in rows], [r[2] for r in rows]
        return rows, labels, self.box
