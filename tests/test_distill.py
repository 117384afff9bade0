import math

import pytest
import torch
from torch import nn

from vitdeit.distill import DistillationLoss, hard_distillation, soft_distillation


def logits(seed, b=6, c=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, generator=g) * 3


class FixedTeacher(nn.Module):
    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, x):
        return self.out


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_soft_loss_is_kl_times_tau_squared_over_numel(tau):
    s, t = logits(0), logits(1)
    kl = 0.0
    for i in range(s.shape[0]):  # sum_j p_j (log p_j - log q_j), one row at a time, in float64
        p = [math.exp(v / tau) for v in t[i].double().tolist()]
        q = [math.exp(v / tau) for v in s[i].double().tolist()]
        p, q = [v / sum(p) for v in p], [v / sum(q) for v in q]
        kl += sum(pj * (math.log(pj) - math.log(qj)) for pj, qj in zip(p, q))
    expected = kl * tau * tau / s.numel()  # DeiT's normalisation: by batch * classes
    assert soft_distillation(s, t, tau).item() == pytest.approx(expected, rel=1e-5)


def test_hard_loss_is_cross_entropy_against_teacher_argmax():
    s, t = logits(2), logits(3)
    targets = [max(range(t.shape[1]), key=lambda j: t[i, j].item()) for i in range(t.shape[0])]
    expected = sum(-torch.log_softmax(s[i].double(), 0)[targets[i]].item() for i in range(s.shape[0])) / s.shape[0]
    assert hard_distillation(s, t).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("kind", ["soft", "hard"])
def test_total_is_the_alpha_mix_of_label_and_distillation_losses(kind):
    cls, dist, teacher, y = logits(4), logits(5), logits(6), torch.tensor([0, 1, 2, 3, 4, 0])
    base = nn.CrossEntropyLoss(label_smoothing=0.1)  # the labels' loss smooths; the teacher's argmax is not smoothed
    loss = DistillationLoss(base, FixedTeacher(teacher), kind, alpha=0.3, tau=2.0)
    kd = soft_distillation(dist, teacher, 2.0) if kind == "soft" else -torch.log_softmax(dist, 1).gather(
        1, teacher.argmax(1, keepdim=True)).mean()
    expected = 0.7 * base(cls, y) + 0.3 * kd
    assert loss(torch.zeros(6, 3, 4, 4), (cls, dist), y).item() == pytest.approx(expected.item(), rel=1e-6)


def test_none_passes_the_base_loss_through_on_the_class_head():
    cls, dist, y = logits(7), logits(8), torch.tensor([1, 1, 2, 2, 3, 3])
    loss = DistillationLoss(nn.CrossEntropyLoss(), None, "none")
    assert loss(None, (cls, dist), y).item() == pytest.approx(nn.CrossEntropyLoss()(cls, y).item())
    assert loss(None, cls, y).item() == pytest.approx(nn.CrossEntropyLoss()(cls, y).item())


def test_teacher_gets_no_gradient_and_sees_the_student_batch():
    seen = []

    class Teacher(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))

        def forward(self, x):
            seen.append(x)
            return x.flatten(1)[:, :5] * self.w

    teacher, x = Teacher(), torch.randn(6, 3, 4, 4)
    dist = logits(9).requires_grad_()
    loss = DistillationLoss(nn.CrossEntropyLoss(), teacher, "soft")
    y = torch.zeros(6, dtype=torch.long)
    total = loss(x, (logits(10), dist), y)
    total.backward()
    assert seen[0] is x and teacher.w.grad is None and dist.grad is not None
    # each student row is distilled from the teacher's logits of its own image (they differ row by row here)
    expected = 0.5 * nn.CrossEntropyLoss()(logits(10), y) + 0.5 * soft_distillation(dist, x.flatten(1)[:, :5], 1.0)
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)


def test_deit_train_top1_scores_the_mean_of_its_heads_as_val_does():
    from types import SimpleNamespace

    from vitdeit.distributed import Dist
    from vitdeit.engine import Step, train_one_epoch

    class TwoHeads(torch.nn.Module):  # each head alone is right on half of the images, their mean on all
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x):  # image 0 of a pair: label 1; image 1: label 0
            cls_head = torch.tensor([[1.0, 0.0], [3.0, 0.0]]).repeat(len(x) // 2, 1) + self.w
            return cls_head, torch.tensor([[0.0, 3.0], [0.0, 1.0]]).repeat(len(x) // 2, 1) + self.w

    model = TwoHeads()
    loader = [(torch.zeros(4, 3, 2, 2), torch.tensor([1, 0, 1, 0]))] * 2
    loss_fn = lambda images, outputs, y: sum(o.sum() for o in outputs) * 0  # noqa: E731
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    step = Step(model, loss_fn, opt, torch.amp.GradScaler("cpu", enabled=False))
    out = train_one_epoch(step, loader, SimpleNamespace(step_update=lambda i: None), 0, Dist(), progress=False)
    assert out["train_top1"] == 100.0 and out["train_samples"] == 8  # either head alone: 50 %
