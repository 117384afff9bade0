"""Entry points: a problem the user can fix is one line on stderr and exit 1; anything else keeps its traceback."""

import pytest
import torch

import pack_shards
import train
import viz
from vitdeit.checkpoint import load_checkpoint
from vitdeit.errors import DataError


@pytest.mark.parametrize("entry, flags", [
    (pack_shards, ["--data-path", "{missing}", "--out", "{tmp}/shards"]),
    (train, ["--data-path", "{missing}", "--device", "cpu"]),
    (viz, ["--vit", "{missing}", "--deit", "{missing}"]),
])
def test_a_missing_input_is_one_line_naming_it_and_exit_1(entry, flags, tmp_path, capsys):
    missing = tmp_path / "not_here"
    rc = entry.main([f.format(missing=missing, tmp=tmp_path) for f in flags])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("error: ") and str(missing) in err and "Traceback" not in err


def test_out_of_memory_in_training_is_not_turned_into_a_one_line_message(monkeypatch):
    def oom(cfg):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train, "train", oom)
    with pytest.raises(torch.OutOfMemoryError):
        train.main(["--device", "cpu"])


def test_a_truncated_checkpoint_is_a_data_error_naming_the_file(tmp_path):
    whole = tmp_path / "whole.pth"
    torch.save({"model": {"w": torch.zeros(1000)}, "best_top1": 1.0, "epoch": 0, "config": {}, "classes": []}, whole)
    assert load_checkpoint(whole)["epoch"] == 0
    cut = tmp_path / "cut.pth"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(DataError, match=r"cut\.pth: cannot be read as a checkpoint"):
        load_checkpoint(cut)
