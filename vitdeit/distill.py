"""DistillationLoss: wraps any base loss; `none` passes the base loss through, so there is one training path."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def soft_distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """KL(teacher_tau || student_tau) * tau^2, summed and divided by batch * classes.

    The tau^2 factor keeps gradient magnitudes independent of tau (Hinton et al.); the division by
    numel (not by batch) is how the DeiT reference normalises it (deit/losses.py), kept so that its
    alpha values carry over.
    """
    return F.kl_div(F.log_softmax(student_logits / tau, dim=1), F.log_softmax(teacher_logits / tau, dim=1),
                    reduction="sum", log_target=True) * (tau * tau) / student_logits.numel()


def hard_distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against the teacher's argmax (DeiT's better-performing variant)."""
    return F.cross_entropy(student_logits, teacher_logits.argmax(dim=1))


class DistillationLoss(nn.Module):
    """total = (1 - alpha) * base(class head, labels) + alpha * distillation(distillation head, teacher).

    The teacher runs here, on the same augmented batch as the student, frozen and without gradients.
    """

    def __init__(self, base: nn.Module, teacher: nn.Module | None, kind: str = "none",
                 alpha: float = 0.5, tau: float = 1.0):
        super().__init__()
        if kind != "none" and teacher is None:
            raise ValueError(f"distillation type {kind!r} needs a teacher")
        self.base, self.teacher, self.kind, self.alpha, self.tau = base, teacher, kind, alpha, tau

    def forward(self, images: torch.Tensor, outputs, targets: torch.Tensor) -> torch.Tensor:
        cls_logits, dist_logits = outputs if isinstance(outputs, tuple) else (outputs, None)
        base = self.base(cls_logits, targets)
        if self.kind == "none":
            return base
        if dist_logits is None:
            raise ValueError("distillation needs a model with a distillation head (deit_tiny_distill)")
        with torch.no_grad():
            teacher_logits = self.teacher(images)
        kd = (soft_distillation(dist_logits, teacher_logits, self.tau) if self.kind == "soft"
              else hard_distillation(dist_logits, teacher_logits))
        return (1 - self.alpha) * base + self.alpha * kd
