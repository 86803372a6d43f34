"""lossless_trainer.checkpoint: atomic writes, bad files refused or skipped, newer set aside."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import TinyClassifier, make_batches, same_params, train

from lossless_trainer import Trainer
from lossless_trainer.checkpoint import (
    CheckpointError,
    checkpoint_path,
    list_checkpoints,
    load_checkpoint,
    save_atomic,
)


def test_save_atomic_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = str(tmp_path / "step-000000001.pt")
    save_atomic({"format": 1, "value": torch.ones(2)}, path)

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_atomic({"format": 1, "value": torch.zeros(2)}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["value"], torch.ones(2))
    assert os.listdir(tmp_path) == ["step-000000001.pt"]  # the temporary file is gone


def test_truncated_newest_checkpoint_warns_and_falls_back(tmp_path, uninterrupted):
    train(tmp_path, max_steps=18)
    newest = checkpoint_path(str(tmp_path / "checkpoints"), 18)
    with open(newest, "r+b") as f:
        f.truncate(os.path.getsize(newest) // 2)
    with pytest.warns(UserWarning, match=r"step-000000018\.pt cannot be loaded.*falling back"):
        trainer, model = train(tmp_path)
    assert trainer.resumed_from.endswith("step-000000012.pt")
    assert same_params(model, uninterrupted[0])


class Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    train(tmp_path, max_steps=6)
    marker = tmp_path / "pwned"
    evil = checkpoint_path(str(tmp_path / "checkpoints"), 99)
    torch.save({"format": 1, "payload": Evil(str(marker))}, evil)
    with pytest.warns(UserWarning, match=r"step-000000099\.pt cannot be loaded"):
        trainer, _ = train(tmp_path, max_steps=12)
    assert trainer.resumed_from.endswith("step-000000006.pt")
    with pytest.raises(CheckpointError, match="step-000000099.pt cannot be loaded"):
        load_checkpoint(evil)
    with pytest.raises(CheckpointError, match="cannot be loaded"):
        Trainer(TinyClassifier(), make_batches(2), resume=evil, progress=False,
                log_dir=str(tmp_path / "other")).fit()
    assert not marker.exists()


def test_no_valid_checkpoint_at_all_is_a_clear_error(tmp_path):
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    (directory / "step-000000005.pt").write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning), pytest.raises(CheckpointError,
                                                  match="no valid checkpoint in .*move .* aside"):
        train(tmp_path)


def test_resuming_sets_newer_checkpoints_aside_and_never_prunes_the_new_one(tmp_path):
    train(tmp_path, max_steps=12, keep_last=5)
    older = checkpoint_path(str(tmp_path / "checkpoints"), 6)
    trainer, _ = train(tmp_path, max_steps=9, resume=older, keep_last=1)
    assert trainer.resumed_from == older
    assert [s for s, _ in list_checkpoints(str(tmp_path / "checkpoints"))] == [9]
    assert (tmp_path / "checkpoints" / "step-000000012.pt.superseded").exists()
