import json

from PIL import Image

from conftest import LABELS, small_dataset
from vitdeit.classes import load_labels


def test_demo_writes_the_imagenet100_layout(tiny_data):
    assert sorted(p.name for p in tiny_data.iterdir()) == ["Labels.json", "train.X1", "train.X2", "train.X3",
                                                            "train.X4", "val.X"]
    labels = json.loads((tiny_data / "Labels.json").read_text())
    assert len(labels) == 4 and set(labels) <= set(load_labels(LABELS))  # real WNIDs from the class list
    for wnid in labels:
        train = [f for k in range(1, 5) for f in (tiny_data / f"train.X{k}" / wnid).iterdir()]
        val = list((tiny_data / "val.X" / wnid).iterdir())
        assert len(train) == 24 and len(val) == 6
        assert all(f.name.startswith(wnid + "_") and f.suffix == ".JPEG" for f in train)
        assert all(f.name.startswith("ILSVRC2012_val_") and f.suffix == ".JPEG" for f in val)
        with Image.open(train[0]) as im:
            assert im.format == "JPEG" and im.mode == "RGB"


def test_demo_is_deterministic(tmp_path):
    a, b = small_dataset(tmp_path / "a", 2, 4, 2), small_dataset(tmp_path / "b", 2, 4, 2)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*.JPEG"))
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*.JPEG"))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files_a)
