import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
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


def test_a_class_count_that_four_folders_do_not_divide_is_dealt_whole(tmp_path):
    data = small_dataset(tmp_path / "d", num_classes=2, train_per_class=10, val_per_class=3)
    for wnid in json.loads((data / "Labels.json").read_text()):
        assert [len(list((data / f"train.X{k}" / wnid).iterdir())) for k in range(1, 5)] == [3, 3, 2, 2]  # 10
        assert len(list((data / "val.X" / wnid).iterdir())) == 3


def test_a_second_generation_replaces_the_first_and_nothing_the_demo_did_not_write(tmp_path):
    from vitdeit.errors import SettingError
    from vitdeit.packing import PackOptions, pack

    small_dataset(tmp_path / "d", num_classes=12, train_per_class=4, val_per_class=1)  # its most classes, then fewer
    data = small_dataset(tmp_path / "d", num_classes=3, train_per_class=4, val_per_class=1)
    assert len(json.loads((data / "Labels.json").read_text())) == 3
    assert len({p.name for p in data.glob("*/*")}) == 3 and len(list(data.glob("*/*/*"))) == 15
    m = pack(data, tmp_path / "s", opts=PackOptions(workers=1), progress=False)
    assert m["splits"]["train"]["num_samples"] == 12
    (data / "train.X1.bak").mkdir()  # not a split folder: not the demo's to remove
    small_dataset(tmp_path / "d", num_classes=2, train_per_class=4, val_per_class=1)
    assert (data / "train.X1.bak").is_dir()
    shutil.copy(LABELS, data / "Labels.json")  # the real ImageNet-100 unpacked over it: refused, untouched
    with pytest.raises(SettingError, match="a dataset the demo did not write"):
        small_dataset(tmp_path / "d", num_classes=2, train_per_class=4, val_per_class=1)
    assert len(list(data.glob("*/*/*"))) == 10


def test_demo_is_deterministic(tmp_path):
    a, b = small_dataset(tmp_path / "a", 2, 4, 2), small_dataset(tmp_path / "b", 2, 4, 2)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*.JPEG"))
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*.JPEG"))
    assert len(files_a) == 2 * (4 + 2) and all((a / f).read_bytes() == (b / f).read_bytes() for f in files_a)


def test_the_readme_demo_command_runs_end_to_end(tmp_path):
    """`python -m vitdeit.demo` (here --quick): generate -> pack -> teacher, ViT, DeiT -> picture and report."""
    import subprocess
    import sys

    from conftest import ROOT

    r = subprocess.run([sys.executable, "-m", "vitdeit.demo", "--quick", "--out", str(tmp_path), "--workers", "1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    for run in ("teacher_resnet18", "baseline_vit_tiny", "deit_tiny_distill"):
        assert (tmp_path / "demo_runs" / run / "best.pth").is_file()
    assert (tmp_path / "vit_vs_deit_random10.png").stat().st_size > 10_000
    report = (tmp_path / "demo_runs" / "report" / "report.md").read_text()
    assert "| ViT |" in report and "| DeiT |" in report and "| teacher |" in report
    assert "demo finished" in r.stdout


class Step:
    """subprocess.Popen's stand-in for a demo step: records its command and each wait(timeout); a step that Ctrl-C
    reached raises KeyboardInterrupt at its first wait, then ends with exit 130 or, if it hangs, times out."""

    def __init__(self, cmd, log: list, interrupted: bool = False, hangs: bool = False):
        self.cmd, self.log, self.interrupted, self.hangs, self.waits = cmd, log, interrupted, hangs, []
        log.append(self)

    def wait(self, timeout=None):
        self.waits.append(timeout)
        if self.interrupted and len(self.waits) == 1:
            raise KeyboardInterrupt
        if self.hangs:
            import subprocess

            raise subprocess.TimeoutExpired(self.cmd, timeout)
        return 130 if self.interrupted else 0

    def kill(self):
        self.waits.append("kill")


def test_the_full_demo_runs_hard_distillation_and_gives_the_teacher_half_the_epochs(tmp_path, monkeypatch):
    import subprocess

    from vitdeit import demo

    steps = []
    monkeypatch.setattr(subprocess, "Popen", lambda cmd: Step(cmd, steps))
    assert demo.main(["--epochs", "6", "--out", str(tmp_path), "--workers", "1"]) == 0
    ran = [s.cmd for s in steps]
    scripts = [c[2] if c[1] == "-m" else Path(c[1]).name for c in ran]
    assert scripts == ["vitdeit.demo", "pack_shards.py", "train.py", "train.py", "train.py", "viz.py"]
    teacher, vit, deit = (c for c in ran if c[1].endswith("train.py"))
    flag = lambda cmd, name: cmd[cmd.index(name) + 1]  # noqa: E731
    assert [flag(c, "--model") for c in (teacher, vit, deit)] == ["resnet18", "vit_tiny", "deit_tiny_distill"]
    assert [flag(c, "--epochs") for c in (teacher, vit, deit)] == ["3", "6", "6"]
    assert flag(deit, "--distillation-type") == "hard" and "--allow-weak-teacher" not in deit  # --quick only
    assert all("--overwrite" in c for c in (teacher, vit, deit))  # an earlier demo's runs are replaced
    assert flag(deit, "--teacher-ckpt") == str(tmp_path / "demo_runs" / "teacher_resnet18" / "best.pth")
    viz = ran[-1]  # each model's checkpoint in its own place, and the demo's worker count
    assert (flag(viz, "--vit"), flag(viz, "--deit")) == tuple(str(tmp_path / "demo_runs" / run / "best.pth")
                                                              for run in ("baseline_vit_tiny", "deit_tiny_distill"))
    assert flag(viz, "--workers") == "1" and all(flag(c, "--workers") == "1" for c in (teacher, vit, deit))
    steps.clear()  # one epoch: the teacher still trains one (half of 1 is 0, which train.py refuses)
    assert demo.main(["--epochs", "1", "--out", str(tmp_path), "--workers", "1"]) == 0
    assert [flag(c, "--epochs") for c in (s.cmd for s in steps) if c[1].endswith("train.py")] == ["1", "1", "1"]
    for flags, counts in (([], ["4", "8", "8"]), (["--quick"], ["1", "1", "1"]), (["--quick", "--epochs", "3"],
                                                                                ["1", "3", "3"])):
        steps.clear()  # the default; --quick's; --quick's small images for the epochs given
        assert demo.main([*flags, "--out", str(tmp_path), "--workers", "1"]) == 0
        assert [flag(c, "--epochs") for c in (s.cmd for s in steps) if c[1].endswith("train.py")] == counts


def test_the_demos_classes_are_spread_over_the_class_list():
    from vitdeit.demo import demo_classes

    wnids = sorted(load_labels(LABELS))  # 100: every 25th for 4 classes, not the first 4
    assert list(demo_classes(load_labels(LABELS), 4)) == wnids[0::25]


def test_the_demo_replaces_its_own_runs_but_refuses_a_run_on_other_data(tmp_path, monkeypatch, capsys):
    import subprocess

    from vitdeit import demo

    steps = []
    monkeypatch.setattr(subprocess, "Popen", lambda cmd: Step(cmd, steps))
    run = tmp_path / "demo_runs" / "baseline_vit_tiny"
    run.mkdir(parents=True)
    (run / "last.pth").write_bytes(b"")
    (run / "config.json").write_text(json.dumps({"data_path": str(tmp_path / "demo_shards")}))  # an earlier demo's
    assert demo.main(["--out", str(tmp_path), "--workers", "1"]) == 0
    vit = [s.cmd for s in steps if "--model" in s.cmd and s.cmd[s.cmd.index("--model") + 1] == "vit_tiny"]
    assert len(vit) == 1 and "--overwrite" in vit[0]  # train.py replaces the earlier demo's run
    (run / "config.json").write_text(json.dumps({"data_path": "/data/in100-shards"}))  # the README's real run
    assert demo.main(["--out", str(tmp_path), "--workers", "1"]) == 1
    err = capsys.readouterr().err
    assert f"{run} holds a run on /data/in100-shards, not on the demo's {tmp_path / 'demo_shards'}" in err


@pytest.mark.parametrize("quick, size", [(False, "64"), (True, "32")])
def test_the_demo_prints_each_training_flag_once(tmp_path, quick, size):
    from vitdeit import demo

    train_cmds = [c for c in demo.demo_commands(tmp_path, {"resnet18": 1, "vit": 2}, 1, quick)
                  if c[1].endswith("train.py")]
    for cmd in train_cmds:
        flags = [a for a in cmd if a.startswith("--")]
        assert len(flags) == len(set(flags)), cmd
        assert cmd[cmd.index("--img-size") + 1] == size


def test_generate_only_writes_demo_data_under_out_as_the_full_demo_does(tmp_path, capsys):
    from vitdeit import demo

    assert demo.main(["--generate-only", "--quick", "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo_data"]
    assert (tmp_path / "demo_data" / "Labels.json").is_file() and len(list(tmp_path.glob("demo_data/val.X/*/*"))) == 48
    assert f"to {tmp_path / 'demo_data'}" in capsys.readouterr().out


@pytest.mark.parametrize("flags, said", [(["--epochs", "0"], "--epochs 0: must be >= 1"),
                                         (["--workers", "0"], "--workers 0: must be >= 1"),
                                         (["--generate-only", "--epochs", "0"], "--generate-only writes the images "
                                                                                "and trains nothing: drop --epochs 0"),
                                         (["--generate-only", "--workers", "3"],
                                          "--generate-only writes the images in this one process: drop --workers 3")])
def test_the_demo_refuses_counts_it_cannot_use_before_generating_anything(tmp_path, monkeypatch, capsys, flags, said):
    import subprocess

    from vitdeit import demo

    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("ran a step before checking its flags"))
    with pytest.raises(SystemExit) as e:
        demo.main([*flags, "--out", str(tmp_path)])
    assert e.value.code == 2 and said in capsys.readouterr().err and not list(tmp_path.iterdir())


@pytest.mark.parametrize("generate_only", [True, False])
def test_a_demo_out_that_is_a_file_is_one_error_naming_it(tmp_path, capsys, generate_only):
    from vitdeit import demo
    (tmp_path / "file").write_text("x")
    assert demo.main(["--out", str(tmp_path / "file"), "--quick"] + (["--generate-only"] if generate_only else [])) == 1
    assert capsys.readouterr().err == f"error: --out {tmp_path / 'file'}: a file, not a folder; pass a folder (it is " \
                                      f"made if missing).\n"
    (tmp_path / "demo_data").write_text("x")  # a file where the demo writes its data set
    assert demo.main(["--out", str(tmp_path), "--quick", "--generate-only"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'demo_data'}: cannot be made (") and len(err.splitlines()) == 1


@pytest.mark.parametrize("hangs", [False, True])
def test_ctrl_c_in_the_demo_lets_the_step_stop_and_is_one_line_and_exit_130(tmp_path, monkeypatch, capsys, hangs):
    import subprocess

    from vitdeit import demo

    steps = []  # the first step, which Ctrl-C reaches too: waited for (30 s at most) to say where it stopped
    monkeypatch.setattr(subprocess, "Popen", lambda cmd: Step(cmd, steps, interrupted=True, hangs=hangs))
    assert demo.main(["--out", str(tmp_path), "--quick"]) == 130
    assert len(steps) == 1 and steps[0].waits == [None, 30] + (["kill"] if hangs else [])
    assert capsys.readouterr().err == ("demo: interrupted; the same command runs the demo again from its first step "
                                       "(or finish the step above by hand, as it says).\n")


def test_each_class_has_its_own_shape_and_about_half_its_images_its_own_hue(tmp_path, monkeypatch):
    import colorsys

    import numpy as np

    from vitdeit import demo

    drawn = []  # (shape, hue, hue width) of every image, in the order drawn

    def record(shape, rng, size, hue=None, hue_width=0.05):
        drawn.append((shape, hue, hue_width))
        return real(shape, rng, size, hue, hue_width)

    real = demo.draw_sample
    monkeypatch.setattr(demo, "draw_sample", record)
    out = demo.make_demo_dataset(tmp_path / "d", LABELS, num_classes=4, train_per_class=40, val_per_class=10,
                                 min_size=24, max_size=24)
    assert len(drawn) == 4 * 50
    for ci in range(4):  # 50 images per class, drawn class after class
        ours = drawn[50 * ci: 50 * (ci + 1)]
        assert {shape for shape, _, _ in ours} == {demo.SHAPES[ci]}
        cued = [hue for _, hue, _ in ours if hue is not None]
        assert set(cued) == {ci / 4} and 15 <= len(cued) <= 35  # colour_cue 0.5 of 50
    assert sorted(p.name for p in out.glob("train.X1/*")) == sorted(json.loads((out / "Labels.json").read_text()))
    rng = np.random.default_rng(0)
    for hue in (0.0, 0.25, 0.5, 0.75):  # the fill colour lies within +-width/2 of the class's hue (in turns)
        for _ in range(50):
            got = colorsys.rgb_to_hsv(*(v / 255 for v in demo._class_colour(rng, hue, 0.125)))[0]
            assert min(abs(got - hue), 1 - abs(got - hue)) <= 0.0625 + 0.01  # (+ 8-bit rounding)


@pytest.mark.parametrize("cue, cued", [(1.0, 16), (0.0, 0)])
def test_colour_cue_is_the_share_of_images_filled_with_their_class_hue(tmp_path, monkeypatch, cue, cued):
    from vitdeit import demo

    hues, real = [], demo.draw_sample
    monkeypatch.setattr(demo, "draw_sample", lambda s, rng, size, hue=None, hue_width=0.05:
                        (hues.append(hue), real(s, rng, size, hue, hue_width))[1])
    demo.make_demo_dataset(tmp_path / "d", LABELS, num_classes=2, train_per_class=4, val_per_class=4,
                           min_size=16, max_size=16, colour_cue=cue)
    assert len(hues) == 16 and sum(h is not None for h in hues) == cued  # (2 classes x (4 + 4) images)


@pytest.mark.parametrize("num_classes", [1, 13])
def test_a_class_count_the_demo_cannot_draw_is_refused_before_anything_is_written(tmp_path, num_classes):
    from vitdeit.errors import SettingError

    with pytest.raises(SettingError, match=rf"^num_classes={num_classes}: the demo supports 2\.\.12\.$"):
        small_dataset(tmp_path / "d", num_classes=num_classes, train_per_class=4, val_per_class=1)
    assert not (tmp_path / "d").exists()


def test_a_split_folder_that_is_a_link_is_replaced_and_what_it_points_to_kept(tmp_path):
    data = small_dataset(tmp_path / "d", num_classes=2, train_per_class=4, val_per_class=1)
    elsewhere = tmp_path / "elsewhere"
    shutil.move(data / "train.X1", elsewhere)
    (data / "train.X1").symlink_to(elsewhere)  # a user's own folder, linked in
    kept = sorted(p.relative_to(elsewhere) for p in elsewhere.rglob("*"))
    small_dataset(tmp_path / "d", num_classes=2, train_per_class=4, val_per_class=1)
    assert not (data / "train.X1").is_symlink() and len(list(data.glob("train.X1/*/*"))) == 2
    assert sorted(p.relative_to(elsewhere) for p in elsewhere.rglob("*")) == kept


@pytest.mark.parametrize("config", [None, "{", '{"epochs": 3}'])
def test_a_run_whose_data_cannot_be_read_is_not_replaced(tmp_path, config):
    from vitdeit.demo import check_demo_runs
    from vitdeit.errors import SettingError

    run = tmp_path / "demo_runs" / "baseline_vit_tiny"
    run.mkdir(parents=True)
    (run / "last.pth").write_bytes(b"")
    if config is not None:
        (run / "config.json").write_text(config)
    with pytest.raises(SettingError, match=f"^{run} holds a run on unknown data, not on the demo's"):
        check_demo_runs(tmp_path)


def test_the_quick_demo_lets_its_one_epoch_teacher_teach_and_the_full_one_does_not():
    from vitdeit.demo import demo_commands

    for quick in (True, False):
        deit = demo_commands(Path("/o"), {"resnet18": 1, "vit": 1}, 1, quick)[4]
        assert deit[deit.index("--model") + 1] == "deit_tiny_distill"
        assert ("--allow-weak-teacher" in deit) == quick


def test_the_demo_set_is_10_classes_of_240_train_and_50_val_images_each_side_drawn_in_56_to_88_px(tmp_path,
                                                                                                  monkeypatch):
    import numpy as np

    from vitdeit import demo

    sizes, widths = [], set()

    def asked(shape, rng, size, hue=None, hue_width=0.05):  # no drawing: the counts, sizes and hue bands asked for
        sizes.append(size)
        widths.add(hue_width)
        return Image.new("RGB", (1, 1))

    monkeypatch.setattr(demo, "draw_sample", asked)
    out = demo.make_demo_dataset(tmp_path / "d", LABELS)  # at the defaults, as `python -m vitdeit.demo` makes it
    train = Counter(p.parent.name for p in out.glob("train.X*/*/*.JPEG"))
    val = Counter(p.parent.name for p in out.glob("val.X/*/*.JPEG"))
    assert len(train) == 10 and set(train.values()) == {240}  # 10 classes of 240 train images
    assert val.keys() == train.keys() and set(val.values()) == {50}  # and of 50 val images
    assert max(widths) * 10 <= 1  # the 10 classes' hue bands (hue i / 10 +- width / 2) do not overlap
    w, h = np.array(sizes).T
    assert w.min() == h.min() == 56 and w.max() == h.max() == 88  # both ends of [min_size, max_size] reached
    assert (w != h).mean() > 0.9 and abs(np.corrcoef(w, h)[0, 1]) < 0.1  # each side drawn on its own


def test_each_shape_is_drawn_at_a_random_position_size_and_rotation_inside_the_image(monkeypatch):
    import numpy as np

    from vitdeit import demo

    drawn, polygon = [], demo._polygon
    monkeypatch.setattr(demo, "_polygon", lambda kind, cx, cy, r, rot: drawn.append((cx, cy, r, rot)) or polygon(
        kind, cx, cy, r, rot))
    rng = np.random.default_rng(0)
    for _ in range(300):
        demo.draw_sample("square", rng, (80, 60))
    cx, cy, r, rot = np.array(drawn).T
    assert (r >= 0.28 * 60).all() and (r <= 0.42 * 60).all() and r.std() > 1.5  # 0.28-0.42 of the short side
    assert (cx >= r).all() and (cx <= 80 - r).all() and (cy >= r).all() and (cy <= 60 - r).all()  # inside the image
    assert cx.std() > 5 and cy.std() > 1.5  # not always centred (measured: std 10.7 and 5.2 px)
    assert np.abs(rot).max() <= 0.35 and rot.std() > 0.15  # within +-20 degrees, spread (uniform: std 0.20)
