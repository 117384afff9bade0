"""Entry points: a problem the user can fix is one line on stderr and exit 1; anything else keeps its traceback."""

import errno
import json
import os
import re
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import pack_shards
import train
import viz
from conftest import checkpoint_state, torchrun, zip_record
from vitdeit.checkpoint import load_checkpoint, save_checkpoint
from vitdeit.errors import DataError, WriteFailed


@pytest.mark.parametrize("entry, flags", [
    (pack_shards, ["--data-path", "{missing}", "--out", "{tmp}/shards"]),
    (train, ["--data-path", "{missing}", "--device", "cpu"]),
    (viz, ["--vit", "{missing}", "--deit", "{missing}"]),
])
def test_a_missing_input_is_one_line_naming_it_and_exit_1(entry, flags, tmp_path, capsys):
    missing = tmp_path / "not_here"
    rc = entry.main([f.format(missing=missing, tmp=tmp_path) for f in flags])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("error: ") and str(missing) in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("where", ["cuda", "cpu"])
def test_out_of_memory_keeps_its_traceback_then_names_the_two_settings_to_lower(monkeypatch, capsys, tmp_path, where):
    def oom(cfg):
        if where == "cuda":  # what the CUDA caching allocator raises (no GPU here to make one run out)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        torch.empty(2**50, dtype=torch.uint8)  # the CPU allocator's own refusal (1 PiB): a RuntimeError

    monkeypatch.setattr(train, "train", oom)
    assert train.main(["--device", "cpu", "--output-dir", str(tmp_path), "--batch-size", "96",
                       "--img-size", "192"]) == 1
    err = capsys.readouterr().err  # its whole traceback, down to where it was raised, then what to change
    assert err.startswith("Traceback (most recent call last):\n") and ", in oom\n" in err
    raised, hint = err.rstrip().split("\n\n")[-2:]
    assert raised.endswith("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB" if where == "cuda"
                           else "can't allocate memory: you tried to allocate 1125899906842624 bytes. Error code 12 "
                                "(Cannot allocate memory)")
    assert hint == ("out of memory at --batch-size 96 (images per process) and --img-size 192 px: lower --batch-size "
                    "(--lr is per 512 images of global batch, so the peak lr follows it) or --img-size")


def test_the_out_of_memory_line_names_only_the_settings_the_command_can_change():
    from vitdeit.errors import out_of_memory

    oom, at = torch.OutOfMemoryError("CUDA out of memory."), "out of memory at --batch-size 64 (images per process)"
    lr = "--batch-size (--lr is per 512 images of global batch, so the peak lr follows it)"
    assert out_of_memory(oom, 64, 224, resume=False, eval_only=True) == f"{at}: lower --batch-size"  # its own size
    assert out_of_memory(oom, 64, 224, resume=True, eval_only=False) == (
        f"{at} and --img-size 224 px: lower {lr}; a resumed run keeps its --img-size")  # another size is refused
    assert out_of_memory(MemoryError(), 64, 224, resume=False, eval_only=False) == (  # Python's (numpy's too)
        f"{at} and --img-size 224 px: lower {lr} or --img-size")
    assert out_of_memory(RuntimeError("Connection reset by peer"), 64, 224, resume=False, eval_only=False) is None


def test_dalis_own_failed_allocations_get_the_out_of_memory_line():
    from vitdeit.data import dali_available
    from vitdeit.errors import out_of_memory

    said = [  # DALI 2.4's, as its libraries spell them (no GPU here to run out of): each in its pipeline's error
        "Critical error in pipeline:\nError in GPU operator `nvidia.dali.fn.decoders.image`,\nencountered:\n\n"
        "Can't allocate 1073741824 bytes on device 0.", "Critical error in pipeline:\nencountered:\n\nCUDA "
        "allocation failed", "Critical error in pipeline:\nencountered:\n\nCannot allocate memory",
        "Critical error in pipeline:\nencountered:\n\nnvImageCodec failure: '#5'",
        "Critical error when building pipeline:\nCan't allocate 268435456 bytes on device 0."]  # (its set-up)
    if dali_available():  # and one it raises here: 4 TiB of host memory asked for
        from nvidia.dali import fn, pipeline_def

        @pipeline_def(batch_size=1, num_threads=1, device_id=None)
        def too_big():
            return fn.random.uniform(shape=[2**20, 2**20])  # float32

        with pytest.raises(RuntimeError) as raised:
            pipe = too_big()
            pipe.build()
            pipe.run()
        said.append(str(raised.value))
        assert "std::bad_alloc" in said[-1]
    hint = ("out of memory at --batch-size 64 (images per process) and --img-size 224 px: lower --batch-size (--lr is "
            "per 512 images of global batch, so the peak lr follows it) or --img-size")
    assert [out_of_memory(RuntimeError(text), 64, 224, resume=False, eval_only=False) for text in said] == (
        [hint] * len(said))
    # where it names the image it was decoding: that image too (a damaged header can claim a size past memory)
    text = ("Critical error in pipeline:\nError in GPU operator `nvidia.dali.fn.decoders.image_random_crop`,\n"
            "encountered:\n\nFailed to decode sample #4 : /d/s/train-000003.tar:331776:n01930112_13.jpg\n"
            "nvImageCodec failure: '#5'")
    image = (" (DALI ran out decoding /d/s/train-000003.tar: the image n01930112_13; if a lower --batch-size runs out "
             "on it too, its header may be damaged: --loader torch refuses one claiming over 178,956,970 px)")
    assert out_of_memory(RuntimeError(text), 64, 224, resume=False, eval_only=False) == hint + image
    assert out_of_memory(RuntimeError(text), 64, 224, resume=False, eval_only=True) == (
        "out of memory at --batch-size 64 (images per process): lower --batch-size" + image)
    for other in ("Critical error in pipeline:\nencountered:\n\nnvImageCodec failure: '#4'",  # a damaged JPEG
                  # the same words outside DALI, about other limits: InfiniBand's locked memory, a process count
                  "NCCL WARN Call to ibv_reg_mr failed with error Cannot allocate memory",
                  "[Errno 12] Cannot allocate memory"):
        assert out_of_memory(RuntimeError(other), 64, 224, resume=False, eval_only=False) is None, other


def test_a_checkpoint_changed_in_place_is_a_data_error_naming_the_record_unless_saved_without_crcs(tmp_path):
    import zipfile

    path, tensor = tmp_path / "c.pth", torch.zeros(1000)
    torch.save({"model": {"w": tensor}}, path)
    info, start = zip_record(path, "/data/0")  # the tensor's bytes (after its header's name, extra: 64-B alignment)
    with open(path, "r+b") as f:  # one byte of the tensor's data
        f.seek(start + 100)
        f.write(b"\x7f")
    assert torch.load(path, weights_only=True)["model"]["w"].count_nonzero() == 1  # torch.load takes it as it is
    fix = ": the file changed after it was written (a damaged copy or disk); copy it again or pass another file."
    with pytest.raises(DataError) as e:
        load_checkpoint(path)
    assert str(e.value) == (f"checkpoint {path}: its record {info.filename} does not match the CRC-32 torch.save "
                            f"wrote for it{fix}")
    torch.save({"model": {"w": tensor}}, path)  # whole again
    whole = path.read_bytes()
    pkl, start = zip_record(path, "/data.pkl")
    said = set()
    for at in range(pkl.compress_size):  # each byte of the pickle in turn: torch.load fails in many ways, or not
        damaged = bytearray(whole)
        damaged[start + at] ^= 0x41
        path.write_bytes(damaged)
        with pytest.raises(DataError) as e:
            load_checkpoint(path)
        said.add(str(e.value))
    assert said == {f"checkpoint {path}: its record {pkl.filename} does not match the CRC-32 torch.save wrote for "
                    f"it{fix}"}
    directory = bytearray(whole)  # its central directory's first entry, the version needed to extract it (6.5)
    directory[whole.index(b"PK\x01\x02") + 6] ^= 0x41
    path.write_bytes(directory)
    assert torch.load(path, weights_only=True)["model"]["w"].count_nonzero() == 0  # as saved: torch.load skips it
    with pytest.raises(DataError) as e:
        load_checkpoint(path)
    assert str(e.value) == (f"checkpoint {path}: its zip directory does not read (NotImplementedError: zip file "
                            f"version 6.5){fix}")
    before = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)  # records saved without CRCs (all 0): nothing to check them by
    try:
        torch.save(checkpoint_state(["n00000001"]), path)
    finally:
        torch.serialization.set_crc32_options(before)
    assert {i.CRC for i in zipfile.ZipFile(path).infolist()} == {0} and load_checkpoint(path)["epoch"] == 0


def test_a_truncated_checkpoint_is_a_data_error_naming_the_file(tmp_path):
    whole = tmp_path / "whole.pth"
    torch.save(checkpoint_state(["n00000001"]), whole)
    assert load_checkpoint(whole)["epoch"] == 0
    cut = tmp_path / "cut.pth"
    for size in (whole.stat().st_size // 2, 5000):  # torch.load: RuntimeError; OSError (a tensor cut)
        cut.write_bytes(whole.read_bytes()[:size])
        with pytest.raises(DataError, match=r"cut\.pth: cannot be read by torch\.load"):
            load_checkpoint(cut)


def test_a_run_folder_where_a_checkpoint_belongs_is_named_a_folder_with_its_checkpoints(tmp_path):
    from vitdeit.errors import MissingFile

    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(MissingFile) as e:
        load_checkpoint(run, what="--resume")
    assert str(e.value) == (f"--resume {run}: a folder, not a checkpoint; pass a checkpoint file (train.py writes "
                            f"OUTPUT_DIR/RUN_NAME/best.pth and last.pth).")
    for name in ("last.pth", "best.pth"):
        (run / name).write_bytes(b"")
    with pytest.raises(MissingFile) as e:
        load_checkpoint(run, what="--teacher-ckpt")
    assert str(e.value) == (f"--teacher-ckpt {run}: a folder, not a checkpoint; pass a checkpoint file in it: "
                            f"{run / 'last.pth'} or {run / 'best.pth'}.")


def test_a_pth_that_holds_no_dict_is_not_a_checkpoint(tmp_path):
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")  # e.g. a tensor saved by hand
    with pytest.raises(DataError, match=re.escape(f"--resume {tmp_path / 'tensor.pth'}: not a vitdeit checkpoint (a "
                                                  f"Tensor, not a dict).")):
        load_checkpoint(tmp_path / "tensor.pth", what="--resume")


def test_weights_alone_given_for_a_checkpoint_name_where_they_go(tmp_path):
    import timm
    import torchvision

    resnet18, resnet50, deit, timm_ckpt = (tmp_path / f"{n}.pth" for n in ("resnet18", "resnet50", "deit", "timm"))
    torch.save(torchvision.models.resnet18(num_classes=4).state_dict(), resnet18)  # what torchvision's download holds
    torch.save(torchvision.models.resnet50(num_classes=4).state_dict(), resnet50)
    weights = timm.create_model("vit_tiny_patch16_224", num_classes=4, img_size=32, patch_size=8).state_dict()
    torch.save({"model": weights}, deit)  # as the DeiT reference releases its weights
    torch.save({"epoch": 3, "arch": "vit_tiny", "state_dict": weights, "version": 2}, timm_ckpt)  # timm's train.py
    n18, n50 = (len(torch.load(p, weights_only=True)) for p in (resnet18, resnet50))
    run = "without a run's best_top1, epoch, config, classes)"
    for what in ("--teacher-ckpt", "--resume"):  # a ResNet-18's: the flag that takes them, whatever was given
        with pytest.raises(DataError) as e:
            load_checkpoint(resnet18, what=what)
        assert str(e.value) == (f"{what} {resnet18}: not a vitdeit checkpoint (a model's weights, {n18} tensors, "
                                f"{run}; a ResNet-18's weights (torchvision's) go to --teacher-weights.")
    with pytest.raises(DataError) as e:  # another ResNet: not for --teacher-weights, which slices a ResNet-18's
        load_checkpoint(resnet50, what="--teacher-ckpt")
    assert str(e.value) == (f"--teacher-ckpt {resnet50}: not a vitdeit checkpoint (a model's weights, {n50} tensors, "
                            f"{run}; train a teacher with train.py --model resnet18.")
    for path, held, missing in ((deit, "under 'model'", "best_top1, epoch, config, classes"),
                                (timm_ckpt, "under 'state_dict'", "best_top1, config, classes")):
        for what, hint in (("--teacher-ckpt", "train a teacher with train.py --model resnet18"),
                           ("--resume", "train.py writes its run's checkpoints, RUN_DIR/best.pth and last.pth")):
            with pytest.raises(DataError) as e:
                load_checkpoint(path, what=what)
            assert str(e.value) == (f"{what} {path}: not a vitdeit checkpoint (a model's weights, {len(weights)} "
                                    f"tensors {held}, without a run's {missing}); {hint}.")


def test_a_checkpoint_missing_a_required_key_or_holding_pickled_code_is_refused_unrun(tmp_path):
    class RunsCode:  # unpickling calls os.mkdir(MARKER): what a crafted .pth can do under weights_only=False
        def __reduce__(self):
            return os.mkdir, (str(tmp_path / "ran"),)

    whole = {"model": {"w": torch.zeros(2)}, "best_top1": 1.0, "epoch": 0, "config": {}, "classes": ["n00000001"]}
    for key in ("config", "classes"):  # what the report and --resume read next: a KeyError otherwise
        torch.save({k: v for k, v in whole.items() if k != key}, tmp_path / f"no_{key}.pth")
        with pytest.raises(DataError, match=re.escape(f"no_{key}.pth: not a vitdeit checkpoint (missing ['{key}'])")):
            load_checkpoint(tmp_path / f"no_{key}.pth")
    torch.save({**whole, "extra": RunsCode()}, tmp_path / "code.pth")
    with pytest.raises(DataError, match=r"code\.pth: cannot be read by torch\.load\(weights_only=True\) \(it holds "
                                        r"more than tensors and plain containers: Trying to load unsupported GLOBAL "
                                        r"posix\.mkdir") as e:  # the reason, not torch's page of advice
        load_checkpoint(tmp_path / "code.pth")
    assert str(e.value).endswith("); pass a checkpoint train.py wrote (another tool's may pickle its settings: the "
                                 "DeiT reference's argparse.Namespace).")
    torch.save({**whole, "best_top1": np.float64(71.2)}, tmp_path / "numpy.pth")  # torch's other form of refusal
    with pytest.raises(DataError, match=r"numpy\.pth: .*\(it holds more than tensors and plain containers: "
                                        r"Unsupported global: GLOBAL numpy"):
        load_checkpoint(tmp_path / "numpy.pth")
    for name, text in (("labels.pth", '{"n00000001": "a"}'), ("notes.pth", "hello world\n")):  # text, not a .pth
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=re.escape(f"{name}: not a file torch.save wrote (it starts with "
                                                      f"{text[:4].encode()!r}, not a zip archive or a pickle)")):
            load_checkpoint(tmp_path / name)
    assert not (tmp_path / "ran").exists()


EDITED = ("not what train.py writes (edited, made by another tool, or saved with a timm or torchvision whose models "
          "differ); pass another checkpoint.")


@pytest.mark.parametrize("edit, said", [
    (lambda s: s.update(config=["vit_tiny"]), "its config is a list, not a dict of settings"),
    (lambda s: s["config"].update(model="vit_base"), "its config's model is 'vit_base', not one of vit_tiny, "
                                                     "deit_tiny_distill, resnet18"),
    (lambda s: s["config"].update(patch_size=5), "its config's img_size 32 and patch_size 5 are not sizes a "
                                                 "vit_tiny can have"),
    (lambda s: s["config"].update(img_size="32"), "its config's img_size '32' and patch_size 8 are not sizes"),
    (lambda s: s.update(classes="n00000001"), "its classes are not a list of WNIDs (a str)"),
    (lambda s: s.update(model=None), "its weights are not a state dict of tensors (a NoneType)"),
    # the weights against the model the config and classes describe: the first key missing, unexpected or misshapen
    (lambda s: s["config"].pop("patch_size"), "its weights do not fit the vit_tiny of 2 classes (32 px, 16 px "
                                              "patches) its config and classes describe: pos_embed of shape "
                                              "[1, 17, 192], not [1, 5, 192]"),
    (lambda s: s["config"].update(model="deit_tiny_distill"), "its weights do not fit the deit_tiny_distill of 2 "
                                                              "classes (32 px, 8 px patches) its config and classes "
                                                              "describe: no dist_token"),
    (lambda s: s["config"].update(model="resnet18"), "its weights do not fit the resnet18 of 2 classes (32 px) its "
                                                     "config and classes describe: no bn1.bias"),
    (lambda s: s["model"].update(extra=torch.zeros(1)), "its weights do not fit the vit_tiny of 2 classes (32 px, "
                                                        "8 px patches) its config and classes describe: an "
                                                        "unexpected extra"),
    (lambda s: s.update(classes=["n00000001"]), "its weights do not fit the vit_tiny of 1 class (32 px, 8 px "
                                                "patches) its config and classes describe: head.weight of shape "
                                                "[2, 192], not [1, 192]"),
    (lambda s: s.update(ema={"w": torch.zeros(1)}), "its EMA weights do not fit the vit_tiny of 2 classes"),
])
def test_a_checkpoint_whose_config_classes_or_weights_do_not_fit_each_other_is_refused_naming_what(tmp_path, edit,
                                                                                                   said):
    state = checkpoint_state(["n00000001", "n00000002"], ema=None)
    torch.save(state, tmp_path / "whole.pth")
    assert load_checkpoint(tmp_path / "whole.pth")["epoch"] == 0
    edit(state)
    torch.save(state, tmp_path / "edited.pth")
    with pytest.raises(DataError) as e:
        load_checkpoint(tmp_path / "edited.pth", what="--resume")
    assert str(e.value).startswith(f"--resume {tmp_path / 'edited.pth'}: {said}") and str(e.value).endswith(
        f": {EDITED}"), str(e.value)


@pytest.mark.parametrize("img_size", [40, 100])  # (no multiple of the default 16 px patch)
def test_a_resnet18_checkpoint_at_a_size_no_patch_divides_loads_as_a_vits_does_not(tmp_path, img_size):
    from vitdeit.models import create_model

    state = checkpoint_state(["n00000001", "n00000002"], ema=None)
    state["config"].update(model="resnet18", img_size=img_size, patch_size=16)  # a CNN: any size (config.py's too)
    state["model"] = create_model("resnet18", 2, img_size).state_dict()
    torch.save(state, tmp_path / "teacher.pth")
    assert load_checkpoint(tmp_path / "teacher.pth", what="--teacher-ckpt")["config"]["img_size"] == img_size
    vit = checkpoint_state(["n00000001", "n00000002"], ema=None)
    vit["config"].update(img_size=img_size, patch_size=16)  # a transformer's size is whole patches
    torch.save(vit, tmp_path / "vit.pth")
    with pytest.raises(DataError, match="are not sizes a vit_tiny can have"):
        load_checkpoint(tmp_path / "vit.pth")


def test_a_checkpoint_loaded_for_another_class_map_is_refused_naming_its_shards(tmp_path):
    from vitdeit.classes import ClassMap

    path = tmp_path / "x.pth"
    state = checkpoint_state(["n00000001", "n00000002"])
    torch.save({**state, "config": {**state["config"], "data_path": "old_shards"}}, path)
    other = ClassMap.from_labels({"n00000001": "a", "n00000003": "c", "n00000004": "d"})
    with pytest.raises(DataError, match=re.escape(f"{path} was trained on another class map (2 classes, against these "
                                                  f"shards' 3: 1 of its classes not in these shards (n00000002), 2 of "
                                                  f"these shards' classes not in it (n00000003, n00000004))")
                       + ".*data_path: old_shards"):
        load_checkpoint(path, other)
    assert load_checkpoint(path, ClassMap.from_labels({"n00000002": "b", "n00000001": "a"}))["epoch"] == 0


def test_a_checkpoint_of_as_many_classes_but_other_ones_is_another_class_map_not_another_order(tmp_path):
    from vitdeit.classes import ClassMap

    path = tmp_path / "x.pth"
    torch.save(checkpoint_state(["n00000001", "n00000002"]), path)
    other = ClassMap.from_labels({"n00000001": "a", "n00000003": "c"})  # two classes, one of them another
    with pytest.raises(DataError, match=re.escape(f"{path} was trained on another class map (2 classes, against these "
                                                  f"shards' 2: 1 of its classes not in these shards (n00000002), 1 of "
                                                  f"these shards' classes not in it (n00000003))")):
        load_checkpoint(path, other)


def test_a_checkpoint_torch_saved_in_its_format_before_1_6_is_read(tmp_path):
    path = tmp_path / "old.pth"  # the legacy format: a bare pickle stream, not a zip archive
    saved = checkpoint_state(["n00000001"], best_top1=12.5, epoch=4)
    torch.save(saved, path, _use_new_zipfile_serialization=False)
    assert path.read_bytes()[:1] == b"\x80"
    state = load_checkpoint(path)
    assert (state["epoch"], state["best_top1"]) == (4, 12.5)
    assert all(torch.equal(state["model"][k], v) for k, v in saved["model"].items())


def test_a_full_disk_said_by_torchs_zip_writer_without_the_enforce_prefix_is_a_write_that_failed(tmp_path,
                                                                                                 monkeypatch):
    path = tmp_path / "best.pth"

    def full_disk(obj, f):  # torch's TORCH_CHECK form of the zip writer's refusal: no "inline_container.cc" in it
        open(f, "wb").write(b"PK" * 100)
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(WriteFailed, match=r"^could not write .*best\.pth: PytorchStreamWriter failed writing file "
                                          r"data/0: file write failed \(.* GiB free on its disk\); no best\.pth was "
                                          r"written\. Free space there or pass another --output-dir$"):
        save_checkpoint(path, {"epoch": 0})
    assert list(tmp_path.iterdir()) == []  # no best.pth.tmp left behind


# what torch.save raised on full disks: on CI's, and on a 1 MB tmpfs
@pytest.mark.parametrize("message", ["[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing "
                                     "file data/3: file write failed",
                                     "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"])
def test_a_checkpoint_write_that_fails_keeps_the_previous_file_and_leaves_no_partial_one(tmp_path, monkeypatch,
                                                                                          message):
    path = tmp_path / "last.pth"
    save_checkpoint(path, {"epoch": 0})
    before = path.read_bytes()

    def full_disk(obj, f):  # what torch.save does when the disk fills: part of the file, then an error
        open(f, "wb").write(b"PK" * 100)
        raise RuntimeError(message)

    monkeypatch.setattr(torch, "save", full_disk)
    kept = r"last\.pth: \[enforce fail.*GiB free on its disk\); the previous last\.pth is kept"
    with pytest.raises(WriteFailed, match=kept):
        save_checkpoint(path, {"epoch": 1})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pth"]  # no last.pth.tmp left behind


def test_a_checkpoint_whose_rename_fails_is_a_write_that_failed_and_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    save_checkpoint(path, {"epoch": 0})

    def refused(src, dst):  # e.g. a network file system that went read-only between the write and the rename
        raise PermissionError(13, "Permission denied", str(dst))

    monkeypatch.setattr(os, "replace", refused)
    with pytest.raises(WriteFailed, match=r"could not write .*last\.pth: \[Errno 13\] Permission denied.*the "
                                          r"previous last\.pth is kept\. Pass another --output-dir"):
        save_checkpoint(path, {"epoch": 1})
    assert torch.load(path, weights_only=True) == {"epoch": 0} and [p.name for p in tmp_path.iterdir()] == [
        "last.pth"]


def test_a_checkpoint_write_that_fails_for_another_reason_keeps_its_own_error(tmp_path, monkeypatch):
    def cuda_error(obj, f):  # e.g. copying a CUDA tensor to the host: not the disk, so not a WriteFailed
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch, "save", cuda_error)
    with pytest.raises(RuntimeError, match="illegal memory access") as info:
        save_checkpoint(tmp_path / "last.pth", {"epoch": 1})
    assert not isinstance(info.value, WriteFailed)


def _break_manifest(shards):
    (shards / "manifest.json").write_text('{"classes": [')


def _break_index(shards):
    (shards / "val-000000.idx").write_text("v1.2 3\nnot an index line\n")


def _shorten_index(shards):  # a whole index, one sample short: another pack's, or one edited by hand
    idx = shards / "val-000000.idx"
    lines = idx.read_text().splitlines()[1:-1]
    idx.write_text(f"v1.2 {len(lines)}\n" + "".join(line + "\n" for line in lines))


def _garble_index_line(shards):
    idx = shards / "val-000000.idx"
    header, first, *rest = idx.read_text().splitlines()
    idx.write_text("\n".join([header, "jpg x", *rest]) + "\n")


def _old_index_header(shards):  # the right count under another version's header
    idx = shards / "val-000000.idx"
    header, *rest = idx.read_text().splitlines()
    idx.write_text("\n".join([header.replace("v1.2", "v1.1"), *rest]) + "\n")


def _grow_tar(shards):  # bytes added at its end: another pack's tar, or a copy gone wrong
    with open(shards / "val-000000.tar", "ab") as f:
        f.write(bytes(512))


GROWN = r"val-000000\.tar: (\d+) bytes, but .*manifest\.json says (?!\1)\d+; the file is cut short or not this pack's"
SHORTENED = r"val-000000\.idx: 23 samples, but .*manifest\.json says 24"
CUT = r"val-000000\.idx: not a whole wds2idx v1\.2 index \(header 'v1\.2 3' for 1 sample lines\)"


@pytest.mark.parametrize("damage, named, backend", [  # (the manifest and each line's fields: read before DALI)
    (_break_manifest, r"manifest\.json: not valid JSON", "torch"),
    (_break_index, CUT, "torch"), (_break_index, CUT, "dali"),
    (_shorten_index, SHORTENED, "torch"), (_shorten_index, SHORTENED, "dali"),
    (_garble_index_line, r"val-000000\.idx: not a wds2idx v1\.2 index \(line 'jpg x'", "torch"),
    (_old_index_header, r"val-000000\.idx: not a whole wds2idx v1\.2 index \(header 'v1\.1 24' for 24", "torch"),
    (_grow_tar, GROWN, "torch"), (_grow_tar, GROWN, "dali")])
def test_damaged_shard_files_are_data_errors_naming_them(tiny_shards, tmp_path, damage, named, backend):
    import shutil

    from vitdeit.classes import load_manifest
    from vitdeit.data import dali_available
    from vitdeit.data.torch_loader import ShardSamples

    if backend == "dali" and not dali_available():
        pytest.skip("DALI not installed")
    copy = tmp_path / "s"
    shutil.copytree(tiny_shards, copy)
    assert load_manifest(copy)["splits"]["val"]["shards"][0]["num_samples"] == 24  # (what the messages say)
    damage(copy)
    with pytest.raises(DataError, match=named):
        if backend == "torch":
            ShardSamples(copy, load_manifest(copy), "val")
        else:  # DALI reads the index itself: before this check, a shortened one lost its last sample silently
            from vitdeit.data.dali_loader import DaliLoader

            DaliLoader(copy, load_manifest(copy), "val", batch_size=8, img_size=32, workers=1)


def test_a_partial_metrics_line_is_a_data_error_naming_the_line(tmp_path):
    from vitdeit.metrics import MetricsLog, read_metrics

    (tmp_path / "metrics.jsonl").write_text('{"epoch": 0, "val_top1": 50.0}\n{"epoch": 1, "val_to')
    with pytest.raises(DataError, match=r"metrics\.jsonl line 2: not a JSON object"):
        read_metrics(tmp_path)
    with pytest.raises(DataError, match=r"metrics\.jsonl line 2: not a JSON object"):  # a resume from before it too
        MetricsLog(tmp_path, enabled=True, resume_epoch=1)
    MetricsLog(tmp_path, enabled=True, resume_epoch=0)  # after the resumed epoch's line: the epoch it redoes
    assert (tmp_path / "metrics.jsonl").read_text() == '{"epoch": 0, "val_top1": 50.0}\n'
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 0}\n\n{"epoch": 1}\n  \n')  # blank lines (a hand edit)
    assert read_metrics(tmp_path) == [{"epoch": 0}, {"epoch": 1}]


def test_a_metrics_log_on_a_rank_that_does_not_log_leaves_the_file_alone(tmp_path):
    # under torchrun every rank makes one; rank 0 alone may cut the file back (the others would race its copy)
    from vitdeit.metrics import MetricsLog

    text = "".join(f'{{"epoch": {e}, "val_top1": {10.0 * e}}}\n' for e in range(3))
    (tmp_path / "metrics.jsonl").write_text(text)
    for resume_epoch in (None, 0):
        log = MetricsLog(tmp_path, enabled=False, resume_epoch=resume_epoch)
        log.write({"epoch": 1})
        assert (tmp_path / "metrics.jsonl").read_text() == text
    MetricsLog(tmp_path, enabled=True, resume_epoch=0)  # the logging rank's cut, for contrast
    assert (tmp_path / "metrics.jsonl").read_text() == text.splitlines(keepends=True)[0]


def test_a_metrics_line_that_cannot_be_written_is_one_error_naming_the_file(tmp_path):
    from vitdeit.metrics import MetricsLog

    log = MetricsLog(tmp_path, enabled=True)
    (tmp_path / "metrics.jsonl").mkdir()  # open(..., "a") fails with an OSError (IsADirectoryError), not the disk's
    path = re.escape(str(tmp_path / "metrics.jsonl"))
    with pytest.raises(WriteFailed, match=rf"could not write {path}: \[Errno 21\] Is a directory: .*; its earlier "
                                          rf"lines are kept\. Pass another --output-dir$"):
        log.write({"epoch": 0})


@pytest.mark.parametrize("error, fix", [
    (OSError(errno.ENOSPC, "No space left on device"), "Free space there or pass another --out"),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), "Free space there or pass another --out"),
    (OSError(errno.EFBIG, "File too large"), "The file is over a size limit (`ulimit -f`, or the file system's own, "
                                             "e.g. FAT32's 4 GiB): raise it or pass another --out"),
    (RuntimeError("PytorchStreamWriter failed writing file data/3: file write failed"),  # torch.save: no errno
     "Free space there or pass another --out"),
    (PermissionError(errno.EACCES, "Permission denied"), "Pass another --out"),
    (OSError(errno.EROFS, "Read-only file system"), "Pass another --out"),
])
def test_a_write_error_asks_to_free_space_only_where_space_can_be_the_cause(tmp_path, error, fix):
    from vitdeit.errors import write_failed

    message = str(write_failed(tmp_path / "x.tar", error, "nothing else was written", flag="--out"))
    assert message.startswith(f"could not write {tmp_path / 'x.tar'}: ") and message.endswith(
        ("GiB free on its disk); " if fix.startswith("Free") else f"{error}; ") + f"nothing else was written. {fix}")
    # (the space left only where space can be the cause: not beside a read-only disk's error)


def test_teacher_weights_of_another_network_are_a_data_error(tmp_path):
    from vitdeit.classes import ClassMap
    from vitdeit.models import load_teacher

    wrong = tmp_path / "vit.pth"
    torch.save({"head.weight": torch.zeros(2, 2)}, wrong)
    with pytest.raises(DataError, match=r"vit\.pth: not the state dict of torchvision's ResNet-18"):
        load_teacher("", str(wrong), ClassMap(("n01440764",), ("tench",)))


def test_a_train_py_checkpoint_given_as_teacher_weights_names_the_right_flag(tmp_path):
    from vitdeit.classes import ClassMap
    from vitdeit.errors import SettingError
    from vitdeit.models import load_teacher

    ckpt = tmp_path / "best.pth"
    torch.save({"model": {}, "config": {"model": "resnet18"}, "classes": ["n01440764"]}, ckpt)
    with pytest.raises(SettingError, match=f"a train.py checkpoint.*pass it as --teacher-ckpt {ckpt}"):
        load_teacher("", str(ckpt), ClassMap(("n01440764",), ("tench",)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_viz_on_a_machine_without_a_gpu_names_the_device_flag(capsys):
    assert viz.main(["--device", "cuda"]) == 1
    assert "--device cuda: no CUDA GPU" in capsys.readouterr().err


def test_train_pointed_at_the_image_folders_is_told_to_pack_them_into_a_folder_of_their_own(tiny_data, capsys):
    from vitdeit.classes import load_manifest

    out = tiny_data.resolve().parent / f"{tiny_data.resolve().name}-shards"
    for given in (tiny_data, tiny_data / "train.X1"):  # the dataset, or one of its split folders
        with pytest.raises(DataError, match=re.escape(f"holds image folders, not packed shards. Pack them once: python "
                                                      f"pack_shards.py --data-path {tiny_data.resolve()} --out {out}, "
                                                      f"then pass --data-path {out}")):
            load_manifest(given)
    with pytest.raises(DataError, match="is not a packed dataset"):  # elsewhere, the general advice
        load_manifest(tiny_data.parent / "nothing_here")


def test_shards_named_by_a_file_are_told_to_name_the_folder(tiny_shards, tmp_path):
    from vitdeit.classes import load_manifest

    for name in ("manifest.json", "train-000000.tar"):  # the folder's own files: the folder is named
        with pytest.raises(DataError, match=re.escape(f"{tiny_shards / name}: a file, not a folder; pass the shards' "
                                                      f"folder (pack_shards.py's --out, here {tiny_shards})")):
            load_manifest(tiny_shards / name)
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'notes.txt'}: a file, not a folder; pass the shards' "
                                                  f"folder (pack_shards.py's --out)")):
        load_manifest(tmp_path / "notes.txt")  # (some other file: no folder to suggest)


@pytest.mark.parametrize("key", ["classes", "labels", "splits"])
def test_a_manifest_without_a_key_it_needs_is_named_with_the_fix(tiny_shards, tmp_path, key, capsys):
    import shutil

    copy = tmp_path / "shards"
    shutil.copytree(tiny_shards, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest[key]  # (hand-edited, or another tool's)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert train.main(["--data-path", str(copy), "--output-dir", str(tmp_path / "runs"), "--device", "cpu",
                       "--workers", "0"]) == 1
    assert capsys.readouterr().err == (f"error: {copy / 'manifest.json'}: missing key {key!r}; re-run "
                                       f"pack_shards.py to rewrite it.\n")
    assert not (tmp_path / "runs").exists()


def _drop_last_class(m):
    m["classes"].pop()


def _miscount(m):
    m["splits"]["train"]["num_samples"] = 150


def _miscount_classes(m):  # the shards and the total agree; one class's count does not
    m["splits"]["train"]["class_counts"][m["classes"][0]] += 1


def _unname(m):
    del m["labels"][m["classes"][1]]


def _reorder(m):
    m["classes"].reverse()


def _duplicate(m):
    m["classes"].append(m["classes"][0])


def _replace_last(m):  # another class in its place, named in 'labels': as many classes, other ones
    m["labels"]["n09999999"] = "new"
    m["classes"][-1] = "n09999999"


def _drop_shard(m):  # a train shard left out, every count made to agree: only the files found tell
    train = m["splits"]["train"]
    n = train["shards"].pop()["num_samples"]
    train["num_samples"] -= n
    first = m["classes"][0]
    train["class_counts"][first] -= n  # (24: the first class's count of tiny_shards)


def _count_as_float(m):
    m["splits"]["val"]["class_counts"][m["classes"][0]] = 6.0


def _class_count_as_text(m):
    m["splits"]["train"]["class_counts"][m["classes"][0]] = "24"


def _skipped_not_a_list(m):
    m["skipped"] = 5


def _val_copies_not_listed(m):  # --allow-train-val-copies' list, edited into one path
    m["train_val_same_bytes"] = [{"train": ["a.JPEG"], "val": "b.JPEG", "classes": [m["classes"][0]]}]


def _classes_as_text(m):  # the list edited into one string
    m["classes"] = ",".join(m["classes"])


def _count_as_text(m):
    m["splits"]["train"]["num_samples"] = str(m["splits"]["train"]["num_samples"])


def _drop_val(m):
    del m["splits"]["val"]


def _splits_as_list(m):
    m["splits"] = []


def _options_null(m):
    m["options"] = None


def _bytes_as_text(m):  # (it read "92160 bytes, but ... says 92160")
    shard = m["splits"]["train"]["shards"][0]
    shard["bytes"] = str(shard["bytes"])


def _file_null(m):
    m["splits"]["train"]["shards"][0]["file"] = None


def _no_bytes(m):
    del m["splits"]["val"]["shards"][0]["bytes"]


def _shard_twice(m):  # the first shard listed in another's place, the counts agreeing: read twice, one never
    shards = m["splits"]["train"]["shards"]
    shards[1] = dict(shards[0], num_samples=shards[1]["num_samples"])


@pytest.mark.parametrize("edit, said", [
    (_drop_shard, "split 'train' packed 72 samples and skipped 0, but 96 image files were found: its shards are not "
                  "the ones the packer wrote"),
    (_count_as_text, "split 'train': num_samples is '96', not a whole number"),
    (_drop_val, "'splits' lacks val"),
    (_splits_as_list, "'splits' lacks its {{split: ...}} object"),
    (_options_null, "'options' is not an object"),
    (_bytes_as_text, "split 'train': shards[0].bytes is '{bytes0}', not a whole number"),
    (_file_null, "split 'train': shards[0].file is None, not a file name"),
    (_no_bytes, "split 'val' lacks its counts (KeyError: 'bytes')"),
    (_shard_twice, "it lists train-000000.idx, train-000000.tar more than once"),
    (_classes_as_text, "'classes' is not a list of WNIDs"),
    (_count_as_float, "split 'val': class_counts[{first}] is 6.0, not a whole number"),
    (_class_count_as_text, "split 'train': class_counts[{first}] is '24', not a whole number"),
    (_skipped_not_a_list, "'skipped' is int, not a list"),
    (_val_copies_not_listed, "'train_val_same_bytes' is not a list of {{train, val, classes}} entries"),
    # was IndexError in the loss; the WNID named is the one dropped
    (_drop_last_class,
     "split 'train' counts 4 classes, but 'classes' lists 3: 1 counted but not in 'classes' ({last})"),
    (_miscount, "split 'train' says 150 samples, but its shards hold 96 and its class counts add up to 96"),
    (_miscount_classes, "split 'train' says 96 samples, but its shards hold 96 and its class counts add up to 97"),
    (_unname, "'labels' has no name for 1 of its classes ({second})"),  # its second class's WNID
    (_reorder, "split 'train' counts its classes in another order"),
    (_duplicate, "'classes' lists {first} more than once"),  # was: "counts its classes in another order"
    (_replace_last, "split 'train' counts other classes than 'classes' lists: 1 counted but not in 'classes' "
                    "({last}), 1 in 'classes' but not counted (n09999999)"),
])
def test_a_manifest_that_contradicts_itself_is_named_with_the_fix(tiny_shards, tmp_path, edit, said, capsys):
    import shutil

    copy = tmp_path / "shards"
    shutil.copytree(tiny_shards, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    said = said.format(first=manifest["classes"][0], second=manifest["classes"][1], last=manifest["classes"][-1],
                       bytes0=manifest["splits"]["train"]["shards"][0]["bytes"])
    edit(manifest)  # (edited by hand)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert train.main(["--data-path", str(copy), "--output-dir", str(tmp_path / "runs"), "--device", "cpu",
                       "--workers", "0"]) == 1
    assert capsys.readouterr().err == (f"error: {copy / 'manifest.json'}: {said}: edited by hand, or not this pack's; "
                                       f"re-run pack_shards.py to rewrite it.\n")


@pytest.mark.parametrize("text, said", [
    (b"null", "its JSON is null, not the object pack_shards.py writes"),
    (b"[1]", "its JSON is an array, not the object pack_shards.py writes"),
    (b"\xff\xfe{", "not valid JSON ('utf-8' codec can't decode byte 0xff in position 0: invalid start byte)")])
def test_a_manifest_that_is_no_json_object_is_named_with_the_fix(tiny_shards, tmp_path, text, said):
    import shutil

    from vitdeit.classes import load_manifest

    copy = tmp_path / "shards"
    shutil.copytree(tiny_shards, copy)
    (copy / "manifest.json").write_bytes(text)
    with pytest.raises(DataError) as e:
        load_manifest(copy)
    assert str(e.value) == f"{copy / 'manifest.json'}: {said}; re-run pack_shards.py to rewrite it."


@pytest.mark.parametrize("where", ["output_dir", "parent", "run_name"])
def test_an_output_dir_or_run_name_that_is_a_file_is_named_with_the_fix(tiny_shards, tmp_path, where, capsys):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    out, name = {"output_dir": (afile, "r"), "parent": (afile / "runs", "r"), "run_name": (tmp_path, "afile")}[where]
    assert train.main(["--data-path", str(tiny_shards), "--output-dir", str(out), "--run-name", name, "--device",
                       "cpu", "--workers", "0"]) == 1
    flag, value = ("--run-name", name) if where == "run_name" else ("--output-dir", out)
    assert capsys.readouterr().err == (f"error: {flag} {value}: {afile} is a file, not a folder; pass another {flag} "
                                       f"(the run goes to --output-dir/--run-name, here {out / name})\n")
    assert afile.read_text() == "not a folder"


def test_a_missing_data_path_says_where_the_path_came_from(tmp_path, monkeypatch, capsys):
    """Left out: the demo's default folder, not a pack command aimed at it; relative: the folder it is seen from
    (a --config of a run started elsewhere)."""
    monkeypatch.chdir(tmp_path)
    assert train.main(["--model", "vit_tiny", "--epochs", "1"]) == 1
    assert capsys.readouterr().err == (f"error: --data-path not given, and its default, demo_shards (the folder python "
                                       f"-m vitdeit.demo packs the demo data into), holds no manifest.json seen from "
                                       f"{tmp_path}: pass --data-path with the --out folder of pack_shards.py\n")
    assert os.listdir(tmp_path) == []  # (refused before the run folder is made)
    # --eval-only with no run to evaluate: that is named first (its shards were to come from its checkpoint)
    assert train.main(["--model", "vit_tiny", "--eval-only"]) == 1
    assert capsys.readouterr().err == ("error: --eval-only checkpoint runs/vit_tiny/best.pth: file not found; train "
                                       "one with train.py (it writes OUTPUT_DIR/RUN_NAME/best.pth and last.pth) or "
                                       "pass the right path.\n")
    (tmp_path / "cfg.json").write_text('{"data_path": "data/shards"}')
    assert train.main(["--config", "cfg.json", "--model", "vit_tiny"]) == 1
    assert capsys.readouterr().err.startswith(f"error: data/shards/manifest.json not found (a relative path: seen "
                                              f"from {tmp_path}): data/shards is not a packed dataset.")


@pytest.mark.parametrize("encode", [lambda t: b"\xef\xbb\xbf" + t.encode(),  # Notepad's "UTF-8 with BOM"
                                    lambda t: t.encode("utf-16")])  # Notepad's "Unicode"
def test_a_labels_json_in_the_encodings_windows_editors_save_is_read(tmp_path, encode):
    from vitdeit.classes import load_labels

    path = tmp_path / "Labels.json"
    path.write_bytes(encode('{"n01440764": "tench, Tinca tinca", "n01443537": "goldfish, Carassius auratus, café"}'))
    assert load_labels(path) == {"n01440764": "tench, Tinca tinca",
                                 "n01443537": "goldfish, Carassius auratus, café"}


def test_a_labels_json_in_latin_1_is_a_data_error_naming_it(tmp_path):
    from vitdeit.classes import load_labels

    path = tmp_path / "Labels.json"
    path.write_bytes('{"n01440764": "café"}'.encode("latin-1"))
    with pytest.raises(DataError, match=r"Labels\.json: not UTF-8 text \(.*\); save it as UTF-8"):
        load_labels(path)


def test_viz_workers_minus_one_is_this_machines_share_as_in_train_and_no_report_asks_for_none(monkeypatch, tmp_path):
    seen = []
    from vitdeit import config

    monkeypatch.setattr(config, "default_workers", lambda: 5)
    # make_all's 8th argument: the report's folder (None: no report); its last: the val loader's workers
    monkeypatch.setattr(viz, "make_all", lambda *a, **k: seen.append((a[7], a[-1])) or {"notes": [], "figure": "p.png"})
    for given in ("-1", "3"):
        assert viz.main(["--workers", given, "--out", str(tmp_path / "p.png"), "--no-report"]) == 0
    assert viz.main(["--workers", "3", "--out", str(tmp_path / "p.png"), "--report-dir", str(tmp_path / "r")]) == 0
    assert seen == [(None, 5), (None, 3), (str(tmp_path / "r"), 3)]


def test_first_line_keeps_a_short_first_line_and_cuts_a_long_one_to_the_limit():
    from vitdeit.errors import first_line

    assert first_line("x" * 160) == "x" * 160 and first_line(ValueError("a\nb\nc")) == "a" and first_line("") == ""
    assert first_line("y" * 200) == "y" * 157 + "..." and len(first_line("y" * 200, limit=40)) == 40


def test_say_error_writes_its_line_in_one_write(monkeypatch):
    # one write: lines of two processes printing at once may then interleave, but not inside a line
    from vitdeit.errors import DataError, say_error

    writes = []

    class Recorder:
        def write(self, text):
            writes.append(text)

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stderr", Recorder())
    say_error(DataError("the manifest is damaged"))
    assert writes == ["error: the manifest is damaged\n"]


HERE = Path(__file__).resolve().parent  # a folder that exists


@pytest.mark.parametrize("flags, said", [(["--out", "picture"], "--out picture: end it in one of matplotlib's"),
                                         (["--out", "p.txt"], "--out p.txt: end it in one of matplotlib's"),
                                         (["--out", str(HERE)], f"--out {HERE}: a folder; name the picture file, "
                                                                f"e.g. --out {HERE / 'vit_vs_deit_random10.png'}"),
                                         (["--workers", "-2"], "--workers -2: must be >= 0"),
                                         (["--no-report", "--report-dir", "r"], "--no-report with --report-dir r: "
                                                                                "--no-report writes no report"),
                                         (["--out", ""], "--out '': empty; name a file"),
                                         (["--report-dir", " "], "--report-dir ' ': empty; name a folder"),
                                         (["--data-path", ""], "--data-path '': empty; name a folder")])
def test_viz_refuses_an_output_name_or_worker_count_it_cannot_use_before_any_work(flags, said, capsys, monkeypatch):
    monkeypatch.setattr(viz, "make_all", lambda *a, **k: pytest.fail("predicted before checking its flags"))
    with pytest.raises(SystemExit) as e:
        viz.main(flags)
    assert e.value.code == 2 and said in capsys.readouterr().err


@pytest.mark.parametrize("out", ["p.png", "P.PNG", "p.Jpg", "p.pdf", "p.svg"])
def test_viz_takes_a_picture_name_in_any_case_of_matplotlibs_formats(out, monkeypatch, capsys):
    made = []
    monkeypatch.setattr(viz, "make_all", lambda *a, **k: made.append(a[6]) or {"notes": [], "figure": a[6]})
    assert viz.main(["--out", out, "--no-report"]) == 0 and made == [out]  # (matplotlib saves P.PNG as a PNG)


@pytest.mark.parametrize("before, flags, during, offered", [
    (False, [], True, True),  # the run finished an epoch, then Ctrl-C
    (False, [], False, False),  # Ctrl-C before its first epoch ended
    (True, ["--overwrite"], False, False),  # the old run's last.pth, not yet replaced: resuming it is not this run
    (True, ["--resume", "RUNS/r/last.pth"], False, True),  # a resumed run, stopped before its next epoch ended
    (True, ["--eval-only", "--resume", "RUNS/r/last.pth"], False, False),  # an evaluation: nothing to go on with
    (False, ["--resume", "auto"], True, "auto"),  # a new run by --resume auto: the same command goes on
    (True, ["--resume", "auto"], False, "auto"),  # a run --resume auto resumed, stopped before its next epoch ended
])
def test_ctrl_c_in_training_is_one_line_that_says_how_to_go_on(tmp_path, monkeypatch, capsys, before, flags, during,
                                                               offered):
    last = tmp_path / "runs" / "r" / "last.pth"
    if before:  # a run's last.pth already in the folder
        last.parent.mkdir(parents=True)
        last.write_bytes(b"old")
        os.utime(last, ns=(10**18, 10**18))

    def interrupted(cfg):
        if during:  # the run got past an epoch before Ctrl-C
            last.parent.mkdir(parents=True, exist_ok=True)
            last.write_bytes(b"new")
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "train", interrupted)
    monkeypatch.setattr(train, "evaluate_checkpoint", interrupted)
    flags = [f.replace("RUNS", str(tmp_path / "runs")) for f in flags]
    assert train.main(["--device", "cpu", "--output-dir", str(tmp_path / "runs"), "--run-name", "r", *flags]) == 130
    err = capsys.readouterr().err.strip()
    again = " (its --resume auto continues from it)" if offered == "auto" else f" and --resume {last}"
    assert err == (f"interrupted; the epochs finished so far are in {last}: go on with the same command{again}"
                   if offered else "interrupted")


@pytest.mark.parametrize("rank, local_rank, says", [("0", "0", True), ("1", "1", False), ("2", "0", True)])
def test_ctrl_c_under_torchrun_is_said_by_each_nodes_first_process(tmp_path, monkeypatch, capsys, rank, local_rank,
                                                                    says):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    monkeypatch.setattr(train, "train", lambda cfg: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert train.main(["--device", "cpu", "--output-dir", str(tmp_path / "runs"), "--run-name", "r"]) == 130
    assert capsys.readouterr().err.strip() == ("interrupted" if says else "")


TORCHRUN = {"TORCHELASTIC_RUN_ID": "job", "WORLD_SIZE": "4"}  # two nodes of two processes


@pytest.mark.parametrize("env, during, line", [
    ({}, True, "stopped by the error above; "),  # one process, after an epoch: how to go on
    ({}, False, None),  # before its first epoch ended: nothing to go on from
    ({"RANK": "0", "WORLD_SIZE": "2"}, True, "stopped by the error above (if it is a lost connection, another "
                                            "process stopped first: its own output says why); "),
    ({**TORCHRUN, "RANK": "1", "LOCAL_RANK": "1"}, True, None),  # its node's local rank 0 says it
    ({**TORCHRUN, "RANK": "2", "LOCAL_RANK": "0"}, True, "stopped by the error above (if it is a lost "
     "connection, another process stopped first: its own output says why); "),  # another node's first, on a shared disk
])
def test_a_crash_keeps_its_traceback_then_says_how_to_go_on(tmp_path, monkeypatch, capsys, env, during, line):
    last = tmp_path / "runs" / "r" / "last.pth"
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)

    def crashed(cfg):  # e.g. gloo's error when another node's process is gone, or CUDA out of memory
        if during:
            last.parent.mkdir(parents=True)
            last.write_bytes(b"new")
        raise RuntimeError("Connection reset by peer")

    import signal
    import traceback

    handlers, print_exc = [], traceback.print_exc  # torchrun's SIGTERM to the node's others must not cut the lines
    monkeypatch.setattr(train.traceback, "print_exc", lambda: handlers.append(signal.getsignal(signal.SIGTERM))
                        or print_exc())
    monkeypatch.setattr(train, "train", crashed)
    assert train.main(["--device", "cpu", "--output-dir", str(tmp_path / "runs"), "--run-name", "r"]) == 1
    assert handlers == [signal.SIG_IGN]
    err = capsys.readouterr().err.strip()
    assert err.startswith("Traceback (most recent call last):") and "RuntimeError: Connection reset by peer" in err
    tail = err.split("RuntimeError: Connection reset by peer")[1].strip()
    assert tail == ("" if line is None else f"{line}the epochs finished so far are in {last}: once its cause is "
                                            f"mended, go on with the same command and --resume {last}")


def test_sigterm_stops_training_as_ctrl_c_does_with_how_to_go_on_and_the_handler_is_put_back(tmp_path, monkeypatch,
                                                                                                capsys):
    import signal
    import time

    last = tmp_path / "runs" / "r" / "last.pth"

    during = []

    def cancelled(cfg):  # a scheduler's cancel or time limit, after an epoch finished
        last.parent.mkdir(parents=True)
        last.write_bytes(b"new")
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)
            pytest.fail("SIGTERM did not stop the run")
        finally:  # the clean-up: a second SIGTERM (Slurm's, then torchrun's) must not interrupt it
            during.append(signal.getsignal(signal.SIGTERM))

    monkeypatch.setattr(train, "train", cancelled)
    before = signal.getsignal(signal.SIGTERM)
    assert train.main(["--device", "cpu", "--output-dir", str(tmp_path / "runs"), "--run-name", "r"]) == 143
    assert capsys.readouterr().err.strip() == (
        f"terminated (SIGTERM: a scheduler's cancel or time limit, or torchrun ending this process after another "
        f"failed: see above); the epochs finished so far are in {last}: go on with the same command and --resume "
        f"{last}")
    assert during == [signal.SIG_IGN] and signal.getsignal(signal.SIGTERM) is before


def test_sigterm_while_an_epoch_is_written_stops_once_it_is_with_143_and_how_to_go_on(tiny_shards, tmp_path,
                                                                                       monkeypatch, capsys):
    import signal

    import torch

    from vitdeit import trainer

    save = trainer.save_checkpoint

    def cancelled(path, state):  # the scheduler's time limit, as epoch 1's last.pth is being written
        if state["epoch"] == 1 and path.name == "last.pth":
            os.kill(os.getpid(), signal.SIGTERM)
        save(path, state)

    monkeypatch.setattr(trainer, "save_checkpoint", cancelled)
    before = signal.getsignal(signal.SIGTERM)
    runs = tmp_path / "runs"
    assert train.main(["--data-path", str(tiny_shards), "--model", "resnet18", "--img-size", "32", "--batch-size",
                       "32", "--workers", "0", "--epochs", "4", "--device", "cpu", "--output-dir", str(runs),
                       "--run-name", "r", "--progress", "false"]) == 143
    last = runs / "r" / "last.pth"
    assert torch.load(last, weights_only=True)["epoch"] == 1 and not list((runs / "r").glob("*.tmp"))
    out, err = capsys.readouterr()
    assert "\nepoch 1: " in out and "\nepoch 2: " not in out  # epoch 1 whole, said, then the stop
    assert err.strip().splitlines() == [
        "SIGTERM: stopping once this epoch's checkpoint is written",
        "", f"terminated (SIGTERM: a scheduler's cancel or time limit, or torchrun ending this process after another "
            f"failed: see above); the epochs finished so far are in {last}: go on with the same command and --resume "
            f"{last}"]
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_batch_too_large_error_raised_in_a_worker_process_arrives_whole():
    import pickle

    from vitdeit.errors import BatchTooLarge

    e = pickle.loads(pickle.dumps(BatchTooLarge("train", 3, 8)))  # as multiprocessing sends it back
    assert isinstance(e, BatchTooLarge) and (e.split, e.per_rank, e.batch_size) == ("train", 3, 8)
    assert str(e) == "train: 3 samples per rank < --batch-size 8; lower --batch-size (or use fewer processes)."


def test_under_torchrun_a_usage_error_is_said_once_per_node():
    r = torchrun("train.py", "--model", "vit_tiyn")  # every rank parses the same flags: local rank 0 says it
    said = "train.py: error: --model 'vit_tiyn': choose one of"
    assert r.returncode != 0 and sum(line.startswith(said) for line in r.stderr.splitlines()) == 1, r.stderr[-3000:]


def test_under_torchrun_a_usage_error_is_said_even_when_local_rank_0_gets_there_last(tmp_path):
    script = tmp_path / "late.py"  # rank 0 slow to start (imports on a busy machine): rank 1 stops first
    script.write_text("import os, time\nfrom vitdeit.config import parse_args\n"
                      "time.sleep(3.0 if os.environ['LOCAL_RANK'] == '0' else 0.0)\nparse_args(['--amp', 'fp8'])\n")
    r = torchrun(str(script))
    said = "late.py: error: --amp 'fp8': choose auto, bf16, fp16 or off"
    assert r.returncode != 0 and r.stderr.splitlines().count(said) == 1, r.stderr[-3000:]


@pytest.mark.parametrize("torchrun_", [False, True])
def test_an_error_every_rank_meets_alike_is_local_rank_0s_to_say_one_that_may_differ_every_ranks(
        tiny_shards, tmp_path, monkeypatch, capsys, torchrun_):
    from vitdeit import errors

    monkeypatch.setattr(errors, "QUIET_RANK_WAIT_S", 0.0)  # (torchrun would end the quiet rank's wait)
    monkeypatch.setenv("LOCAL_RANK", "1")
    if torchrun_:
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    else:
        monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    # the manifest, on the node's disk: every local rank reads the same
    missing = f"error: {tmp_path / 'not_here'}/manifest.json not found"
    if torchrun_:  # torchrun ends the quiet rank's wait (with SIGTERM) once local rank 0 has said it and exited
        def ended_by_torchrun():
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # dies by it quietly: no traceback from here
            raise SystemExit(-signal.SIGTERM)

        monkeypatch.setattr(train, "wait_for_local_rank_0", ended_by_torchrun)
        with pytest.raises(SystemExit):
            train.main(["--data-path", str(tmp_path / "not_here"), "--device", "cpu"])
        assert capsys.readouterr().err == ""
        monkeypatch.setattr(train, "wait_for_local_rank_0", lambda: None)  # the wait ran out: local rank 0 did not
    assert train.main(["--data-path", str(tmp_path / "not_here"), "--device", "cpu"]) == 1  # meet it: said here
    assert capsys.readouterr().err.startswith(missing)
    # a rank's train share: the same count on every rank (ceil or floor of N / processes), so alike too
    waited = []
    monkeypatch.setattr(train, "wait_for_local_rank_0", lambda: waited.append(1))
    assert train.main(["--data-path", str(tiny_shards), "--device", "cpu", "--workers", "0", "--batch-size", "1000",
                       "--output-dir", str(tmp_path / "runs")]) == 1
    assert capsys.readouterr().err.startswith("error: train: 96 samples per rank < --batch-size 1000")
    assert waited == ([1] if torchrun_ else [])  # a quiet rank leaves it to local rank 0 first
    # a damaged image in a rank's own share: it may differ by rank, so each says its own, at once
    monkeypatch.setattr(train, "wait_for_local_rank_0", lambda: pytest.fail("a rank's own error waited"))
    monkeypatch.setattr(train, "train", lambda cfg: (_ for _ in ()).throw(DataError("shard x: damaged sample y")))
    assert train.main(["--data-path", str(tiny_shards), "--device", "cpu"]) == 1
    assert capsys.readouterr().err == "error: shard x: damaged sample y\n"


def test_under_torchrun_a_run_folder_already_taken_is_said_once_per_node(tiny_shards, tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "last.pth").write_bytes(b"another run's")  # a decision gathered from both ranks
    r = torchrun("train.py", "--data-path", str(tiny_shards), "--output-dir", str(tmp_path), "--run-name", "r",
                 "--device", "cpu", "--workers", "0")
    said = f"error: {tmp_path / 'r'} already holds a run (last.pth): continue it with --resume"
    assert r.returncode != 0 and sum(line.startswith(said) for line in r.stderr.splitlines()) == 1, r.stderr[-3000:]
    # the quiet rank, ended by torchrun's SIGTERM in its wait, dies by it: no traceback of its own
    assert "During handling" not in r.stderr and "Terminated" not in r.stderr and "vitdeit.errors" not in r.stderr


# (None, False): no launcher; ("1", False): LOCAL_RANK from another launcher, which need not stop the rest
@pytest.mark.parametrize("local_rank, torchrun_, says", [(None, False, True), ("0", True, True), ("1", True, False),
                                                         ("1", False, True)])
def test_a_usage_error_is_local_rank_0s_to_say_and_every_rank_stops(local_rank, torchrun_, says, monkeypatch, capsys):
    from vitdeit import errors

    monkeypatch.setattr(errors, "QUIET_RANK_WAIT_S", 0.0)  # (torchrun would end the others' wait)
    for var, value in (("LOCAL_RANK", local_rank), ("TORCHELASTIC_RUN_ID", "test" if torchrun_ else None)):
        if value is None:
            monkeypatch.delenv(var, raising=False)
        else:
            monkeypatch.setenv(var, value)
    with pytest.raises(SystemExit) as e:
        train.main(["--amp", "fp8"])
    err = capsys.readouterr().err
    assert e.value.code == 2
    if says:  # argparse's usage block, then its error line
        assert err.startswith("usage: ") and "[--amp STR]" in err  # (prog: pytest's, here)
        assert err.endswith(": error: --amp 'fp8': choose auto, bf16, fp16 or off\n")
    else:
        assert err == ""


def test_a_run_error_is_said_with_torchruns_sigterm_ignored(tmp_path, monkeypatch):
    import signal

    from vitdeit.errors import DataError

    for var in ("LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    handlers = []  # the node's other processes stop as this one does: torchrun's SIGTERM must not cut its line
    monkeypatch.setattr(train, "say_error", lambda e: handlers.append((signal.getsignal(signal.SIGTERM), str(e))))
    monkeypatch.setattr(train, "train", lambda cfg: (_ for _ in ()).throw(DataError("a damaged shard")))
    before = signal.getsignal(signal.SIGTERM)
    assert train.main(["--device", "cpu", "--output-dir", str(tmp_path)]) == 1
    assert handlers == [(signal.SIG_IGN, "a damaged shard")] and signal.getsignal(signal.SIGTERM) is before
