"""Models: timm ViT-Tiny and DeiT-Tiny (distillation token), torchvision ResNet-18 (the teacher).

The teacher comes from a checkpoint of `train.py --model resnet18`, or from torchvision's ImageNet-1k
weights with the 1000-way classifier sliced to the dataset's WNIDs (every ImageNet-100 class is an
ImageNet-1k class, so that teacher needs no fine-tuning).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from .checkpoint import load_checkpoint, torch_load
from .classes import ClassMap
from .config import saved_setting
from .errors import DataError, MissingFile, SettingError, first_line

TIMM_NAMES = {"vit_tiny": "vit_tiny_patch16_224", "deit_tiny_distill": "deit_tiny_distilled_patch16_224"}
RESNET18_IMAGENET1K = "https://download.pytorch.org/models/resnet18-f37072fd.pth"  # torchvision IMAGENET1K_V1


def create_model(model: str, num_classes: int, img_size: int = 224, patch_size: int = 16,
                 drop_path: float = 0.0) -> nn.Module:
    if model == "resnet18":
        import torchvision

        return torchvision.models.resnet18(num_classes=num_classes)
    import timm

    net = timm.create_model(TIMM_NAMES[model], pretrained=False, num_classes=num_classes, img_size=img_size,
                            patch_size=patch_size, drop_path_rate=drop_path)
    if model == "deit_tiny_distill":
        net.set_distilled_training(True)  # train mode returns (class head, distillation head) logits
    return net


def head_logits(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """Each head's logits: [class, distillation] for DeiT, [logits] otherwise. The prediction is their mean."""
    if hasattr(model, "head_dist"):
        feats = model.forward_features(images)
        return [model.head(feats[:, 0]), model.head_dist(feats[:, 1])]
    return [model(images)]


def imagenet1k_indices(wnids) -> list[int]:
    """Positions of `wnids` in ImageNet-1k's class order (timm ships the synset list)."""
    from timm.data import ImageNetInfo

    order = {w: i for i, w in enumerate(ImageNetInfo().label_names())}
    missing = [w for w in wnids if w not in order]
    if missing:
        raise DataError(f"WNIDs not in ImageNet-1k: {missing[:10]}; an ImageNet-1k teacher cannot predict them. "
                        f"Train a teacher on this data instead (train.py --model resnet18) and pass --teacher-ckpt.")
    return [order[w] for w in wnids]


def check_download_hash(path: Path) -> None:
    """The file under torchvision's own name (resnet18-f37072fd.pth: NAME-HASH.pth) must start its SHA-256 with
    that HASH, as torch.hub checks a download with check_hash=True: a copy cut short, or another file under the
    name, is refused. Only that name: a name of the user's own may hold a hex-looking date (resnet18-20240101.pth)."""
    name = RESNET18_IMAGENET1K.rsplit("/", 1)[1]
    if path.name != name:
        return
    promised = torch.hub.HASH_REGEX.search(name).group(1)
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    if not sha.hexdigest().startswith(promised):
        raise DataError(f"--teacher-weights {path}: its SHA-256 starts {sha.hexdigest()[:len(promised)]}, not the "
                        f"{promised} its name promises: a copy cut short or another file; download it again "
                        f"({RESNET18_IMAGENET1K}).")


def check_weights_file(weights: str) -> None:
    """--teacher-weights PATH (not 'imagenet1k'): the file must be there."""
    if weights not in ("", "imagenet1k") and not Path(weights).is_file():
        raise MissingFile(f"--teacher-weights {weights}: file not found (give 'imagenet1k' or a local "
                          f"copy of {RESNET18_IMAGENET1K}).")


def load_imagenet1k_resnet18(weights: str) -> dict:
    if weights != "imagenet1k":
        check_weights_file(weights)
        check_download_hash(Path(weights))
        return torch_load(Path(weights), "--teacher-weights")
    try:
        return torch.hub.load_state_dict_from_url(RESNET18_IMAGENET1K, map_location="cpu", progress=False,
                                                  check_hash=True)  # (a fresh download; a cached file is not)
    except Exception as e:  # offline, proxy, ...
        raise MissingFile(
            f"could not download torchvision's ResNet-18 ImageNet-1k weights ({type(e).__name__}: {e}). "
            f"Download {RESNET18_IMAGENET1K} on a machine with internet and pass --teacher-weights /path/to/it, "
            f"or train a teacher here (train.py --model resnet18) and pass --teacher-ckpt."
        ) from e


def sliced_resnet18(state_dict: dict, wnids) -> nn.Module:
    """An ImageNet-1k ResNet-18 whose classifier keeps only the rows of `wnids`, in their order."""
    import torchvision

    net = torchvision.models.resnet18(num_classes=1000)
    net.load_state_dict(state_dict)
    idx = torch.tensor(imagenet1k_indices(wnids))
    fc = nn.Linear(net.fc.in_features, len(idx))
    with torch.no_grad():
        fc.weight.copy_(net.fc.weight[idx])
        fc.bias.copy_(net.fc.bias[idx])
    net.fc = fc
    return net


def model_from_checkpoint(state: dict) -> nn.Module:
    """The network a vitdeit checkpoint (load_checkpoint's dict) holds, with its weights, on the CPU."""
    cfg = state["config"]  # (its sizes read as load_checkpoint's check read them)
    sizes = (saved_setting(cfg, k) for k in ("img_size", "patch_size"))
    net = create_model(cfg["model"], len(state["classes"]), *sizes)
    net.load_state_dict(state["model"])
    return net


class FullPrecisionLinear(nn.Linear):
    """The teacher's classifier, run in float32 under autocast: in bf16 its logits near 10 come in steps of 0.0625,
    enough to tie or swap two close classes in hard distillation's argmax (the reference's fp16 autocast rounds 8x
    finer). One 512 x classes matmul per batch; the same parameter names as the nn.Linear it replaces."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


def full_precision_head(fc: nn.Linear) -> FullPrecisionLinear:
    head = nn.utils.skip_init(FullPrecisionLinear, fc.in_features, fc.out_features, bias=fc.bias is not None,
                              device=fc.weight.device, dtype=fc.weight.dtype)  # no random init, no RNG draw
    head.load_state_dict(fc.state_dict())
    return head


# said by train.py when it distils from torchvision's weights, and by viz.py's report of such a DeiT
OUTSIDE_DATA = ("the teacher is an ImageNet-1k ResNet-18 (torchvision's, unless --teacher-weights named another "
                "file), cut to these classes: it learnt from ImageNet-1k's 1.28M train images of 1,000 classes, the "
                "students only from their own train shards, so part of a DeiT gain over a ViT trained on those may "
                "come from that data rather than from distillation. For a like-for-like comparison, train the teacher "
                "on the students' shards (train.py --model resnet18) and distil from its best.pth with train.py "
                "--teacher-ckpt")


def load_teacher(ckpt: str, weights: str, class_map: ClassMap) -> nn.Module:
    """A frozen ResNet-18 teacher for `class_map`, in eval mode; `.interpolation` and `.img_size` are the resize
    filter and crop size (px) of the images it was trained on (torchvision's ImageNet-1k ResNet-18: bilinear, 224)."""
    interpolation, img_size = "bilinear", 224
    if ckpt:
        state = load_checkpoint(ckpt, class_map, what="--teacher-ckpt")
        if state["config"]["model"] != "resnet18":
            raise SettingError(f"--teacher-ckpt {ckpt}: a {state['config']['model']} checkpoint; the teacher must be "
                               f"a resnet18 (train one with train.py --model resnet18).")
        net = model_from_checkpoint(state)
        interpolation, img_size = saved_setting(state["config"], "interpolation"), state["config"]["img_size"]
    else:
        imagenet1k_indices(class_map.wnids)  # classes it cannot predict: said before a download, not after
        state = load_imagenet1k_resnet18(weights or "imagenet1k")
        if isinstance(state, dict) and {"model", "config"} <= state.keys():
            raise SettingError(f"--teacher-weights {weights}: a train.py checkpoint, not torchvision's ImageNet-1k "
                               f"weights; pass it as --teacher-ckpt {weights}.")
        try:
            net = sliced_resnet18(state, class_map.wnids)
        except (RuntimeError, AttributeError) as e:  # load_state_dict: missing/unexpected keys, wrong shapes
            raise DataError(f"--teacher-weights {weights or 'imagenet1k'}: not the state dict of torchvision's "
                            f"ResNet-18 for ImageNet-1k ({first_line(e)}); pass "
                            f"{RESNET18_IMAGENET1K.rsplit('/', 1)[1]}.") from e
    net = frozen_teacher(net)
    net.interpolation, net.img_size = interpolation, img_size
    return net


def frozen_teacher(net: nn.Module) -> nn.Module:
    """A ResNet-18 as the teacher runs: eval mode, no gradients, float32 logits under autocast
    (FullPrecisionLinear). The benchmark's teacher is made by this too."""
    net.fc = full_precision_head(net.fc)
    return net.eval().requires_grad_(False)
