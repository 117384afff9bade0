import re

import pytest
import torch
import torchvision

from conftest import checkpoint_state
from vitdeit.classes import ClassMap
from vitdeit.errors import DataError
from vitdeit.models import create_model, head_logits, imagenet1k_indices, load_teacher, sliced_resnet18


def test_teacher_slicing_keeps_the_logits_of_the_datasets_wnids(tmp_path):
    from timm.data import ImageNetInfo

    synsets = ImageNetInfo().label_names()
    wnids = sorted(["n01440764", "n02102040", "n03000134", "n01530575"])
    expected_idx = [synsets.index(w) for w in wnids]
    assert imagenet1k_indices(wnids) == expected_idx
    torch.manual_seed(0)
    full = torchvision.models.resnet18(num_classes=1000).eval()
    torch.save(full.state_dict(), tmp_path / "r18.pth")
    sliced = load_teacher("", str(tmp_path / "r18.pth"), ClassMap(tuple(wnids), tuple(wnids)))
    assert not any(p.requires_grad for p in sliced.parameters()) and not sliced.training  # frozen, as returned
    # the filter torchvision's own eval transform for these weights resizes with (reading it downloads nothing)
    tv = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.transforms()
    assert (sliced.interpolation, [sliced.img_size]) == (tv.interpolation.value, tv.crop_size)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(sliced(x), full(x)[:, expected_idx], atol=1e-5)


@pytest.mark.parametrize("weights", ["", "imagenet1k"])  # (train.py's default is "": torchvision's, downloaded)
def test_no_teacher_weights_given_is_torchvisions_imagenet1k_resnet18_downloaded_with_its_hash_checked(monkeypatch,
                                                                                                     weights):
    torch.manual_seed(0)
    full, asked = torchvision.models.resnet18(num_classes=1000).eval(), []
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url",
                        lambda url, **k: asked.append((url, k["check_hash"])) or full.state_dict())
    teacher = load_teacher("", weights, ClassMap(("n01440764", "n01443537"), ("tench", "goldfish")))  # 0 and 1
    assert asked == [(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url, True)]  # (torchvision's own name of it)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(teacher(x), full(x)[:, :2], atol=1e-5)


def test_the_teachers_logits_are_float32_under_bf16_autocast(tmp_path):
    """Its classifier runs outside autocast on the bf16 features: the logits hard distillation takes the argmax of
    are not rounded to bf16's 3 digits; the rest of the network keeps autocast's bf16."""
    wnids = ["n01440764", "n01530575", "n02102040"]
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=1000).state_dict(), tmp_path / "r18.pth")
    teacher = load_teacher("", str(tmp_path / "r18.pth"), ClassMap(tuple(wnids), tuple(wnids)))
    assert set(teacher.state_dict()) == set(torchvision.models.resnet18().state_dict())  # the same names
    features = {}
    teacher.avgpool.register_forward_hook(lambda m, i, out: features.setdefault("x", out.flatten(1)))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        logits = teacher(x)
    assert features["x"].dtype == torch.bfloat16 and logits.dtype == torch.float32
    expected = features["x"].double() @ teacher.fc.weight.double().T + teacher.fc.bias.double()
    assert torch.allclose(logits.double(), expected, atol=1e-5)
    assert not torch.allclose(expected.bfloat16().double(), expected, atol=1e-5)  # what a bf16 head would give


def test_a_wnid_outside_imagenet1k_is_a_clear_error():
    with pytest.raises(DataError, match="n00000001.*--teacher-ckpt"):
        sliced_resnet18(torchvision.models.resnet18().state_dict(), ["n01440764", "n00000001"])


def test_a_wnid_outside_imagenet1k_is_said_before_any_download(monkeypatch):
    from vitdeit import models

    monkeypatch.setattr(models, "load_imagenet1k_resnet18", lambda w: pytest.fail("downloaded first"))
    with pytest.raises(DataError, match=r"WNIDs not in ImageNet-1k: \['n00000001'\]"):
        load_teacher("", "imagenet1k", ClassMap(("n00000001", "n01440764"), ("x", "tench")))


def test_missing_local_weights_name_the_options():
    with pytest.raises(FileNotFoundError, match="imagenet1k"):
        load_teacher("", "/nonexistent/r18.pth", ClassMap(("n01440764",), ("tench",)))


def test_local_weights_under_torchvisions_name_must_match_the_hash_in_it(tmp_path):
    import hashlib

    from vitdeit import models

    state = torchvision.models.resnet18().state_dict()  # random weights, torchvision's keys and shapes
    unnamed = tmp_path / "r18.pth"
    torch.save(state, unnamed)
    digest = hashlib.sha256(unnamed.read_bytes()).hexdigest()
    assert models.load_imagenet1k_resnet18(str(unnamed)).keys() == state.keys()  # the user's own name: no check
    dated, bad = tmp_path / "resnet18-20240101.pth", tmp_path / "resnet18-f37072fd.pth"  # (a date: hex digits too)
    for f in (dated, bad):
        f.write_bytes(unnamed.read_bytes())
    assert models.load_imagenet1k_resnet18(str(dated)).keys() == state.keys()
    with pytest.raises(DataError, match=re.escape(f"--teacher-weights {bad}: its SHA-256 starts {digest[:8]}, not the "
                                                  f"f37072fd its name promises")):
        models.load_imagenet1k_resnet18(str(bad))


@pytest.mark.parametrize("name,heads", [("vit_tiny", 1), ("deit_tiny_distill", 2), ("resnet18", 1)])
def test_models_take_the_class_count_and_image_size_from_arguments(name, heads):
    net = create_model(name, 7, img_size=32, patch_size=8).eval()
    out = head_logits(net, torch.randn(2, 3, 32, 32))
    assert len(out) == heads and all(o.shape == (2, 7) for o in out)
    if name == "deit_tiny_distill":
        net.train()
        out = net(torch.randn(3, 3, 32, 32))  # training mode: both heads, for the distillation loss
        assert isinstance(out, tuple) and [o.shape for o in out] == [(3, 7), (3, 7)]
        net.eval()
        with torch.no_grad():
            x = torch.randn(2, 3, 32, 32)
            assert torch.allclose(net(x), sum(head_logits(net, x)) / 2, atol=1e-5)  # timm's eval = mean of heads


def test_a_student_checkpoint_as_teacher_is_named_with_the_fix(tmp_path):
    from vitdeit.checkpoint import save_checkpoint
    from vitdeit.errors import SettingError

    wnids = ("n01440764", "n01443537")
    save_checkpoint(tmp_path / "best.pth", checkpoint_state(list(wnids)))  # a vit_tiny's
    with pytest.raises(SettingError, match=re.escape(f"--teacher-ckpt {tmp_path / 'best.pth'}: a vit_tiny checkpoint; "
                                                     "the teacher must be a resnet18 (train one with train.py "
                                                     "--model resnet18).")):
        load_teacher(str(tmp_path / "best.pth"), "", ClassMap(wnids, wnids))
