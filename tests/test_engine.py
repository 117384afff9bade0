"""engine.evaluate: exact counts against logits chosen here, for one head and for DeiT's two."""

import json
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import spawn_two, torchrun_env
from vitdeit.distributed import Dist, process_group
from vitdeit.engine import Step, evaluate, train_one_epoch

torch.manual_seed(0)
N, C = 13, 10  # more classes than top-5, a last batch of 3
CLS, DIST = torch.randn(N, C), torch.randn(N, C)
LABELS = torch.randint(0, C, (N,))
LABELS[0] = CLS[0].argsort(descending=True)[4]  # a label at rank 5 exactly: in the top-5, not the top-4
LABELS[1] = ((CLS + DIST) / 2)[1].argsort(descending=True)[4]  # and one for DeiT's prediction
BATCHES = [(torch.arange(i, min(i + 5, N)).float().view(-1, 1, 1, 1), LABELS[i : i + 5]) for i in range(0, N, 5)]


class OneHead(nn.Module):  # the "image" is its row index into the fixed logits
    def forward(self, x):
        return CLS[x.view(-1).long()]


class TwoHeads(nn.Module):  # what head_logits reads of a timm DeiT: forward_features, head, head_dist
    head, head_dist = nn.Identity(), nn.Identity()

    def forward_features(self, x):
        i = x.view(-1).long()
        return torch.stack([CLS[i], DIST[i]], dim=1)


def sgd_step(model, loss_fn, lr: float = 0.0, scaler=None, clip_grad: float = 0.0) -> Step:
    """engine.Step with plain SGD at `lr` (0: the weights stay) and, unless given, float32's pass-through scaler."""
    return Step(model, loss_fn, torch.optim.SGD(model.parameters(), lr=lr),
                scaler or torch.amp.GradScaler("cpu", enabled=False), clip_grad=clip_grad)


def counted(logits):
    """(top-1 %, top-5 %, mean loss) of `logits` over all N images, from counts."""
    top5 = logits.topk(5, dim=1).indices
    hits1, hits5 = int((top5[:, 0] == LABELS).sum()), int((top5 == LABELS[:, None]).any(1).sum())
    return 100 * hits1 / N, 100 * hits5 / N, F.cross_entropy(logits.double(), LABELS).item()


def test_one_head_top1_top5_and_loss_over_every_image_once():
    out = evaluate(OneHead(), BATCHES, Dist(), progress=False)
    top1, top5, loss = counted(CLS)
    assert out["val_samples"] == N and out["val_top1"] == top1 and out["val_top5"] == top5
    assert abs(out["val_loss"] - loss) < 1e-5 and top5 > top1  # top-5 is not top-1 here
    assert int((CLS.topk(4, dim=1).indices == LABELS[:, None]).any(1).sum()) < top5 * N / 100  # nor top-4
    assert "val_top1_cls_head" not in out


def test_deit_predicts_by_the_mean_of_its_heads_and_reports_each():
    out = evaluate(TwoHeads(), BATCHES, Dist(), progress=False)
    top1, top5, loss = counted((CLS + DIST) / 2)
    assert out["val_top1"] == top1 and out["val_top5"] == top5 and abs(out["val_loss"] - loss) < 1e-5
    assert int(((CLS + DIST) / 2).topk(4, dim=1).indices.eq(LABELS[:, None]).any(1).sum()) < top5 * N / 100
    assert out["val_top1_cls_head"] == counted(CLS)[0] and out["val_top1_dist_head"] == counted(DIST)[0]
    assert len({out["val_top1"], out["val_top1_cls_head"], out["val_top1_dist_head"]}) > 1  # the three differ


def test_top5_with_fewer_than_five_classes_is_every_image():
    class ThreeClasses(nn.Module):  # e.g. the demo's 4 classes: topk(5) would raise
        def forward(self, x):
            return CLS[x.view(-1).long(), :3]

    labels = torch.tensor([0, 1, 2, 0, 1])
    out = evaluate(ThreeClasses(), [(torch.arange(5.0).view(-1, 1, 1, 1), labels)], Dist(), progress=False)
    hits = int((CLS[:5, :3].argmax(1) == labels).sum())
    assert out["val_top5"] == 100.0 and out["val_top1"] == 100 * hits / 5 and out["val_samples"] == 5


def test_top1_takes_the_first_of_tied_classes_as_each_heads_top1_and_top5_counts_it():
    tied = torch.zeros(N, C)  # every class tied (a zero head, or logits rounded alike in bf16), ...
    tied[1::2, 3:9] = 1.0  # ... or six tied at the top (the top-5 holds five of them)

    class Tied(TwoHeads):
        def forward_features(self, x):
            return tied[x.view(-1).long()][:, None].expand(-1, 2, -1)

    labels = torch.tensor([0, 3, 0, 8, 5, 3, 1, 4, 0, 3, 0, 3, 2])  # rows 0, 2, ...: class 0 first; 1, 3, ...: 3
    out = evaluate(Tied(), list(zip([b[0] for b in BATCHES], labels.split(5))), Dist(), progress=False)
    first = torch.tensor([0, 3] * 6 + [0])
    top1 = 100 * int((first == labels).sum()) / N  # rows 0, 1, 2, 5, 8, 9, 10, 11: 8 of 13
    assert out["val_top1"] == out["val_top1_cls_head"] == out["val_top1_dist_head"] == top1 == 100 * 8 / N
    # top-5: the label among topk's five picks or the argmax, whichever five of the tied classes topk picks here
    in_top5 = (tied.topk(5, dim=1).indices == labels[:, None]).any(1) | (first == labels)
    assert out["val_top5"] == 100 * int(in_top5.sum()) / N and out["val_top5"] >= out["val_top1"]


def _evaluate_as_rank(rank, world, port, out_dir):
    torchrun_env(rank, world, port)
    with process_group("cpu") as dist:  # each rank its own batches: rank 0 batches 0 and 2 (8 images), rank 1 batch 1
        out = evaluate(TwoHeads(), BATCHES[rank::world], dist, progress=False)
    (Path(out_dir) / f"{rank}.json").write_text(json.dumps(out))


def test_every_rank_reports_the_counts_summed_over_all_ranks():
    outs = spawn_two(_evaluate_as_rank)
    top1, top5, loss = counted((CLS + DIST) / 2)
    for out in outs:
        assert out["val_samples"] == N and out["val_top1"] == top1 and out["val_top5"] == top5
        assert abs(out["val_loss"] - loss) < 1e-5
        assert out["val_top1_cls_head"] == counted(CLS)[0] and out["val_top1_dist_head"] == counted(DIST)[0]


class TrainTwoHeads(nn.Module):  # a timm DeiT in training mode: (class head, distillation head) logits
    def forward(self, x):
        i = x.view(-1).long()
        return CLS[i], DIST[i]


@pytest.mark.parametrize("heads", [OneHead, TrainTwoHeads])
def test_the_train_loss_is_the_mean_over_images_not_over_batches_and_top1_counts_the_prediction(heads):
    class Model(heads):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))

    class NoSchedule:
        def step_update(self, t):
            pass

    model = Model()
    loss_fn = lambda images, outputs, targets: images.mean() + 0 * model.w  # the batch's mean row index
    out = train_one_epoch(sgd_step(model, loss_fn), BATCHES, NoSchedule(), 0, Dist(), progress=False)
    assert out["train_samples"] == N
    assert abs(out["train_loss"] - sum(range(N)) / N) < 1e-12  # 6.0; the mean of the 3 batch means is 6.67
    # DeiT: the mean of its heads, as evaluate() scores val (here not the class head's own top-1)
    predicted = CLS if heads is OneHead else (CLS + DIST) / 2
    assert out["train_top1"] == counted(predicted)[0]
    assert heads is OneHead or counted(predicted)[0] != counted(CLS)[0]


def test_under_mixup_or_cutmix_the_train_top1_is_scored_against_the_loaders_labels_not_the_targets():
    """Mixup/CutMix's soft targets, here each image's whole mass on another class than its label: the train top-1
    counts the prediction against the loader's labels (so it reads low under mixing, as the README says)."""
    model = OneHead()
    model.w = nn.Parameter(torch.zeros(()))
    augment = lambda x, y: (x, F.one_hot((y + 1) % C, C).float())  # noqa: E731
    loss_fn = lambda images, outputs, targets: 0 * model.w  # noqa: E731
    out = train_one_epoch(sgd_step(model, loss_fn), BATCHES, NoSchedule(), 0, Dist(), augment=augment, progress=False)
    against_labels, against_targets = counted(CLS)[0], 100 * int((CLS.argmax(1) == (LABELS + 1) % C).sum()) / N
    assert out["train_top1"] == against_labels != against_targets


class Bias(nn.Module):  # outputs its parameter: the gradient is whatever the loss says
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2))

    def forward(self, x):
        return torch.zeros(x.shape[0], 2) + self.w


class NoSchedule:
    def step_update(self, t):
        pass


@pytest.mark.parametrize("scaled", [False, True])
def test_clipping_bounds_the_unscaled_gradient_norm(scaled):
    m = Bias()
    loss_fn = lambda images, outputs, targets: (outputs * torch.tensor([3.0, 4.0])).sum() / len(outputs)  # noqa
    batches = [(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long))]  # gradient (3, 4): norm 5
    scaler = torch.amp.GradScaler("cpu", enabled=scaled, init_scale=1024.0)  # fp16's scaler: unscaled before clipping
    train_one_epoch(sgd_step(m, loss_fn, lr=1.0, scaler=scaler, clip_grad=1.0), batches, NoSchedule(), 0, Dist(),
                    progress=False)
    assert torch.allclose(m.w.detach(), torch.tensor([-0.6, -0.8]))  # one SGD step along -(3, 4) / 5


def test_data_wait_is_the_time_blocked_on_the_loader_not_the_step():
    import time

    class SlowLoader:
        def __len__(self):
            return 4

        def __iter__(self):
            for _ in range(4):
                time.sleep(0.1)
                yield torch.zeros(2, 1), torch.zeros(2, dtype=torch.long)

    class SlowModel(Bias):
        def forward(self, x):
            time.sleep(0.1)
            return super().forward(x)

    loss_fn = lambda images, outputs, targets: outputs.sum()  # noqa
    fast = [(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long))] * 4
    for model, loader, low, high in ((Bias(), SlowLoader(), 0.8, 1.0), (SlowModel(), fast, 0.0, 0.2)):
        out = train_one_epoch(sgd_step(model, loss_fn), loader, NoSchedule(), 0, Dist(), progress=False)
        assert low < out["data_wait_frac"] <= high


def test_the_epochs_rate_is_every_ranks_images_over_the_time_counted_once(monkeypatch):
    """images_per_s: the images all ranks trained (summed once) per second of the epoch, on a clock that ticks 1 s
    per reading: a second rank with the same batches doubles the rate, no more."""
    import types

    from vitdeit import engine

    loss_fn = lambda images, outputs, targets: outputs.sum()  # noqa
    batches = [(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long))] * 3
    rates = {}
    for world in (1, 2):
        ticks = iter(range(1000))
        monkeypatch.setattr(engine, "time", types.SimpleNamespace(perf_counter=lambda: float(next(ticks))))
        # the sums as two ranks with these same batches would add them up; the one rank's as they are
        monkeypatch.setattr(engine, "all_reduce_sum", lambda t: t.mul_(world))
        m = Bias()
        rates[world] = train_one_epoch(sgd_step(m, loss_fn), batches, NoSchedule(), 0, Dist(rank=0, world=world),
                                       progress=False)
    assert rates[1]["train_samples"] == 6 and rates[2]["train_samples"] == 12
    assert rates[2]["images_per_s"] == 2 * rates[1]["images_per_s"] > 0


def test_the_model_trains_in_train_mode_and_evaluates_in_eval_mode():
    """Dropout, drop-path and BatchNorm statistics follow the module's mode: ResNet and ViT (no error either way)
    depend on train_one_epoch and evaluate setting it, whatever mode the model was left in."""
    class Recorder(Bias):
        modes: list = []

        def forward(self, x):
            self.modes.append(self.training)
            return super().forward(x)

    m, batches = Recorder(), [(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long))] * 3
    m.eval()
    train_one_epoch(sgd_step(m, lambda images, outputs, targets: outputs.sum()), batches, NoSchedule(), 0, Dist(),
                    progress=False)
    assert m.modes == [True] * 3
    evaluate(m, batches, Dist(), progress=False)
    assert m.modes == [True] * 3 + [False] * 3


def test_compile_mode_auto_is_cuda_graphs_for_one_process_on_a_gpu_and_default_elsewhere():
    from vitdeit.engine import compile_mode

    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")  # (no GPU needed: only the device's type is read)
    assert compile_mode("auto", gpu, 1) == "reduce-overhead"
    assert compile_mode("auto", gpu, 8) == "default"  # under DDP: CUDA graphs never ran here
    assert compile_mode("auto", cpu, 1) == "default"
    assert [compile_mode(m, d, w) for m in ("default", "reduce-overhead") for d, w in ((gpu, 1), (cpu, 2))] == [
        "default", "default", "reduce-overhead", "reduce-overhead"]  # a mode named is the mode used


def test_compile_auto_compiles_on_a_gpu_only_and_on_or_off_is_obeyed_anywhere():
    from vitdeit.config import Config
    from vitdeit.trainer import compile_setting

    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert [compile_setting(Config(compile=c), d, 1)[0] for c in ("auto", "on", "off") for d in (gpu, cpu)] == [
        True, False, True, True, False, False]
    assert compile_setting(Config(), gpu, 1) == (True, "reduce-overhead")  # train.py's default on one GPU


def test_the_model_and_the_loss_with_its_teacher_see_the_augmented_batch_and_its_targets():
    """DeiT's teacher runs on the student's mixed/erased images (the loss gets them): not the loader's batch."""
    seen = {}

    class Recorder(Bias):
        def forward(self, x):
            seen.setdefault("model", []).append(x.clone())
            return super().forward(x)

    def loss_fn(images, outputs, targets):
        seen.setdefault("loss", []).append((images.clone(), targets.clone()))
        return outputs.sum()

    batches = [(torch.full((2, 1), float(i)), torch.tensor([i, 1 - i])) for i in range(2)]
    augment = lambda x, y: (x * 10 + 1, F.one_hot(y, 2).float() * 0.9 + 0.05)  # noqa: E731 (mixed: soft targets)
    m = Recorder()
    train_one_epoch(sgd_step(m, loss_fn), batches, NoSchedule(), 0, Dist(), None, augment, progress=False)
    for (x, y), fed, (to_loss, targets) in zip(batches, seen["model"], seen["loss"]):
        assert torch.equal(fed, x * 10 + 1) and torch.equal(to_loss, fed)
        assert torch.equal(targets, F.one_hot(y, 2).float() * 0.9 + 0.05)


def test_each_step_applies_its_own_gradient_and_the_schedule_counts_steps_across_epochs():
    m, steps = Bias(), []

    class Schedule:
        def step_update(self, t):
            steps.append(t)

    loss_fn = lambda images, outputs, targets: (outputs * torch.tensor([3.0, 4.0])).sum() / len(outputs)  # noqa
    batches = [(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long))] * 3  # gradient (3, 4) every step
    train_one_epoch(sgd_step(m, loss_fn, lr=1.0), batches, Schedule(), 2, Dist(), progress=False)
    assert torch.equal(m.w.detach(), torch.tensor([-9.0, -12.0]))  # 3 steps of (3, 4), not 1 + 2 + 3 of them
    assert steps == [6, 7, 8]  # epoch 2 of 3-step epochs: the lr of global steps 6..8


@pytest.mark.parametrize("kind, priority", [("high", -100), ("side", 0)])
@pytest.mark.parametrize("fails", [False, True])
def test_the_step_stream_runs_the_block_on_its_own_stream_and_the_caller_waits_for_it_after(monkeypatch, kind,
                                                                                          priority, fails):
    """--step-stream on CUDA, with recorders for torch.cuda's streams (no GPU here): 'high' at CUDA's highest
    priority (lower is higher), 'side' at the default; the block's work after what was queued before it, and what
    the caller queues after it (the next epoch, a checkpoint's copy) after the block's, an error included."""
    from contextlib import contextmanager

    from vitdeit.engine import step_stream

    said = []

    class Stream:
        def __init__(self, name, priority=None):
            self.name, self.priority = name, priority

        def wait_stream(self, other):
            said.append(f"{self.name} waits for {other.name}")

    current = Stream("default")

    @contextmanager
    def on(stream):  # as torch.cuda.stream: back to the stream before it, an error too
        said.append(f"on {stream.name}")
        try:
            yield
        finally:
            said.append(f"off {stream.name}")

    made = []
    monkeypatch.setattr(torch.cuda, "Stream", lambda device, priority: made.append(Stream("step", priority))
                        or made[-1])
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: current)
    monkeypatch.setattr(torch.cuda, "stream", on)
    with pytest.raises(RuntimeError) if fails else nullcontext():
        with step_stream(kind, torch.device("cuda", 0)):
            said.append("block")
            if fails:
                raise RuntimeError("a failed step")
    assert said == ["step waits for default", "on step", "block", "off step", "default waits for step"]
    assert [m.priority for m in made] == [priority]
    with step_stream("default", torch.device("cuda", 0)):
        pass
    assert len(said) == 5  # PyTorch's own stream: nothing made, nothing waited for
