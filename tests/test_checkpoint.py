"""lossless_trainer.checkpoint: atomic writes, bad files refused or skipped, newer set aside."""

from __future__ import annotations

import os
import time

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
    state_digest,
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


# --------------------------------------------------------------------------- checksums


def flip_bit_in(path: str, tensor: torch.Tensor, byte: int = 0, bit: int = 0) -> None:
    """Flip one bit of the second float32 of `tensor`, where the file stores it: by
    default its lowest mantissa bit (a finite, tiny change)."""
    with open(path, "rb") as f:
        data = bytearray(f.read())
    raw = tensor.detach().contiguous().view(torch.uint8).numpy().tobytes()
    at = data.find(raw)
    assert at >= 0 and data.find(raw, at + 1) < 0, "the tensor's bytes are not unique"
    data[at + 4 + byte] ^= 1 << bit
    with open(path, "wb") as f:
        f.write(data)


def test_a_flipped_bit_in_a_tensor_is_detected_and_the_previous_checkpoint_used(
        tmp_path, uninterrupted):
    train(tmp_path, max_steps=18)
    newest = checkpoint_path(str(tmp_path / "checkpoints"), 18)
    weight = torch.load(newest, weights_only=True)["model"]["head.weight"]
    flip_bit_in(newest, weight)
    # torch.load itself does not notice: the flipped value is finite and loads.
    flipped = torch.load(newest, weights_only=True)["model"]["head.weight"]
    assert torch.isfinite(flipped).all() and not torch.equal(flipped, weight)
    with pytest.raises(CheckpointError, match=r"step-000000018\.pt is corrupt: its contents "
                                              r"do not match the checksum"):
        load_checkpoint(newest)
    with pytest.warns(UserWarning, match=r"step-000000018\.pt is corrupt.*falling back"):
        trainer, model = train(tmp_path)
    assert trainer.resumed_from.endswith("step-000000012.pt")
    assert same_params(model, uninterrupted[0])  # bit-identical to the uninterrupted run


@pytest.mark.parametrize("damage", ["zero-byte", "random", "truncated-end", "exponent-bit"])
def test_damaged_checkpoints_fall_back_with_a_warning(tmp_path, uninterrupted, damage):
    train(tmp_path, max_steps=18)
    newest = checkpoint_path(str(tmp_path / "checkpoints"), 18)
    size = os.path.getsize(newest)
    if damage == "zero-byte":
        open(newest, "wb").close()
    elif damage == "random":
        with open(newest, "wb") as f:
            f.write(torch.randint(0, 256, (size,), dtype=torch.uint8,
                                  generator=torch.Generator().manual_seed(0)).numpy().tobytes())
    elif damage == "truncated-end":
        with open(newest, "r+b") as f:
            f.truncate(size - 30)
    else:  # the top exponent bit: a weight of about 0.1 becomes about 1e37
        weight = torch.load(newest, weights_only=True)["model"]["head.weight"]
        flip_bit_in(newest, weight, byte=3, bit=6)
    with pytest.warns(UserWarning, match=r"step-000000018\.pt .*falling back"):
        trainer, model = train(tmp_path)
    assert trainer.resumed_from.endswith("step-000000012.pt")
    assert same_params(model, uninterrupted[0])


def test_the_checksum_covers_the_values_around_the_tensors(tmp_path):
    base = {"format": 2, "trainer": {"step": 6, "epoch": 0}, "w": torch.arange(6.0),
            "rng": (3, [1, 2], None), "flag": True}
    digest = state_digest(base)
    assert state_digest({**base}) == digest  # deterministic
    for changed in ({**base, "trainer": {"step": 7, "epoch": 0}},
                    {**base, "w": torch.arange(6.0).view(2, 3)},  # same bytes, other shape
                    {**base, "w": torch.arange(6.0).double()},
                    {**base, "rng": (3, [1, 2], 0)}, {**base, "flag": 1}):
        assert state_digest(changed) != digest
    path = str(tmp_path / "step-000000006.pt")
    save_atomic(base, path)
    assert "checksum" not in base  # the caller's dict is left as it was
    assert load_checkpoint(path).keys() == base.keys()
    legacy = str(tmp_path / "legacy.pt")  # format 1, before checksums: still loads
    torch.save({"format": 1, "w": torch.ones(2)}, legacy)
    assert torch.equal(load_checkpoint(legacy)["w"], torch.ones(2))
    unchecked = str(tmp_path / "unchecked.pt")
    torch.save({"format": 2, "w": torch.ones(2)}, unchecked)
    with pytest.raises(CheckpointError, match="has no checksum"):
        load_checkpoint(unchecked)


# --------------------------------------------------------------------------- what a resume trusts


def test_another_optimizer_class_is_refused_naming_both(tmp_path):
    train(tmp_path, max_steps=6)  # AdamW
    with pytest.raises(CheckpointError, match=r"written with the optimizer torch\.optim\.adamw\."
                                              r"AdamW, and this run's is torch\.optim\.sgd\.SGD"):
        train(tmp_path, max_steps=12,
              optimizer=lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9))


def test_changed_hyperparameters_are_this_runs_and_each_is_named(tmp_path):
    train(tmp_path, max_steps=6)  # AdamW, lr 1e-2, weight_decay 0.01
    saved = load_checkpoint(checkpoint_path(str(tmp_path / "checkpoints"), 6))["optimizer"]
    with pytest.warns(UserWarning, match=r"differ from the checkpoint's, and this run's are "
                                         r"used: group 0 lr: 0\.01 -> 0\.001; group 0 "
                                         r"weight_decay: 0\.01 -> 0\.5") as warned:
        trainer, _ = train(tmp_path, max_steps=7, optimizer=lambda p: torch.optim.AdamW(
            p, lr=1e-3, weight_decay=0.5))
    assert len([w for w in warned if "hyperparameters differ" in str(w.message)]) == 1
    group = trainer.optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"]) == (1e-3, 0.5)
    # The optimizer's state came from the checkpoint: step 6, then one more.
    assert int(trainer.optimizer.state_dict()["state"][0]["step"]) == 7
    assert int(saved["state"][0]["step"]) == 6


def test_a_changed_lr_under_a_scheduler_is_refused(tmp_path):
    def schedule(opt):
        return torch.optim.lr_scheduler.StepLR(opt, step_size=4)

    train(tmp_path, max_steps=6, lr_scheduler=schedule)
    with pytest.raises(CheckpointError, match=r"lr of parameter group 0 is 0\.001 in this run "
                                              r"and was 0\.01, but the lr_scheduler continues"):
        train(tmp_path, max_steps=12, lr_scheduler=schedule,
              optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    trainer, _ = train(tmp_path, max_steps=12, lr_scheduler=schedule)  # the same: resumes
    assert trainer.resumed_from.endswith("step-000000006.pt")


@pytest.mark.parametrize(("field", "value", "named"), [
    ("step", 5, "trainer.step is 5, but the file is named for step 12"),
    ("step", -3, "trainer.step is -3, not a count"),
    ("batch_in_epoch", 999, "trainer.batch_in_epoch is 999, past the end of an epoch of"),
    ("epoch", 1.5, "trainer.epoch is 1.5, not a count"),
])
def test_counters_that_cannot_be_true_are_refused_naming_the_field(tmp_path, field, value,
                                                                     named):
    train(tmp_path, max_steps=12)
    path = checkpoint_path(str(tmp_path / "checkpoints"), 12)
    state = load_checkpoint(path)
    state["trainer"][field] = value
    save_atomic(state, path)  # a valid checksum: the counters themselves are wrong
    with pytest.raises(CheckpointError, match=f"step-000000012.pt .*{named}"):
        train(tmp_path, max_steps=24)


# --------------------------------------------------------------------------- async_checkpoint


def test_async_checkpoints_equal_blocking_ones_and_keep_last_holds(tmp_path):
    blocking, model = train(tmp_path / "blocking", keep_last=2)
    background, async_model = train(tmp_path / "async", keep_last=2, async_checkpoint=True)
    assert same_params(model, async_model)
    steps = [s for s, _ in list_checkpoints(str(tmp_path / "async" / "checkpoints"))]
    assert steps == [s for s, _ in list_checkpoints(str(tmp_path / "blocking" / "checkpoints"))]
    assert steps == [18, 24]
    for step in steps:
        ours = load_checkpoint(checkpoint_path(str(tmp_path / "async" / "checkpoints"), step))
        theirs = load_checkpoint(checkpoint_path(str(tmp_path / "blocking" / "checkpoints"),
                                                 step))
        for key, value in theirs["model"].items():
            assert torch.equal(ours["model"][key], value), (step, key)
        # Everything else too (optimizer, RNG states, data position, summary window).
        assert state_digest(ours) == state_digest(theirs)


def test_the_step_goes_on_while_a_checkpoint_is_written(tmp_path, monkeypatch):
    from lossless_trainer import Hook, checkpoint

    real = checkpoint.save_atomic
    monkeypatch.setattr(checkpoint, "save_atomic",
                        lambda state, path: (time.sleep(0.5), real(state, path)))
    seen = {}

    class Watch(Hook):
        def after_step(self, trainer):
            seen[trainer.state.step] = trainer._saver.busy

    started = time.perf_counter()
    trainer, _ = train(tmp_path, max_steps=8, checkpoint_every=6, async_checkpoint=True,
                       callbacks=[Watch()])
    # Step 6 saved in the background: steps 7 and 8 ran while it was being written, and
    # fit waited for the last checkpoint (step 8) before it returned.
    assert seen[7] and seen[8] and not seen[5]
    assert time.perf_counter() - started >= 1.0  # both writes happened, one after the other
    assert [s for s, _ in list_checkpoints(str(tmp_path / "checkpoints"))] == [6, 8]
    assert not trainer._saver.busy


def test_a_failed_background_write_is_raised_by_fit(tmp_path, monkeypatch):
    from lossless_trainer import StorageError, checkpoint

    def full(state, path):
        raise StorageError(f"writing checkpoint {path} failed: No space left on device", 28,
                           path)

    monkeypatch.setattr(checkpoint, "save_atomic", full)
    with pytest.raises(StorageError, match="step-000000006.pt failed: No space left"):
        train(tmp_path, max_steps=24, async_checkpoint=True)
