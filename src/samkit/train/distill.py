"""Decoupled distillation (MobileSAM): the student's image encoder learns the teacher's image embeddings
(MSE); the student keeps the teacher's prompt encoder and mask decoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from samkit.models.sam import Sam
from samkit.train.config import ConfigError
from samkit.train.data import Batch
from samkit.train.embeddings import EmbeddingCache, encoder_input
from samkit.train.setup import Precision
from samkit.transforms import ImagePipeline


def load_teacher(name: str, student: Sam, device: torch.device) -> Sam:
    """The frozen teacher `name` (zoo name or checkpoint path); copies its prompt encoder and mask decoder
    into `student`."""
    import samkit

    teacher = samkit.load(name, device=device, dtype="fp32")
    if teacher.image_size != student.image_size:
        raise ConfigError(
            f"teacher input size {teacher.image_size} differs from the student's {student.image_size}"
        )
    student.prompt_encoder.load_state_dict(teacher.prompt_encoder.state_dict())
    student.mask_decoder.load_state_dict(teacher.mask_decoder.state_dict())
    return teacher.requires_grad_(False).eval()


class Distillation:
    """The student's embedding loss against the teacher's: cached on disk (`cache`) or, without a cache,
    the teacher run on the same (augmented) batch."""

    def __init__(
        self, student: Sam, teacher: Sam, cache: EmbeddingCache | None, precision: Precision
    ) -> None:
        self.student, self.teacher, self.cache, self.precision = student, teacher, cache, precision
        self.student_pipeline = ImagePipeline.of(student)
        self.teacher_pipeline = ImagePipeline.of(teacher)

    def targets(self, batch: Batch) -> torch.Tensor:
        """(B, 256, g, g) fp32 teacher embeddings of the batch's input-frame images."""
        device = self.precision.device
        if self.cache is not None:
            return self.cache.batch(batch).to(device).float()
        x = encoder_input(batch, self.teacher_pipeline, device)
        with torch.no_grad(), self.precision.autocast():
            return self.teacher.image_encoder(x).float()

    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """MSE between the student's and the teacher's embeddings (with grad into the student)."""
        x = encoder_input(batch, self.student_pipeline, self.precision.device)
        target = self.targets(batch)
        with self.precision.autocast():
            student = self.student.image_encoder(x)
        loss = F.mse_loss(student.float(), target)
        return loss, {"mse": float(loss.detach())}
