"""File-system faults during a run: a full disk while saving a checkpoint, while writing
logs and while rewriting metrics.jsonl on a resume; a file system that turns read-only.
Each gives a StorageError naming the file, the intact checkpoints and the fix, leaves no
temporary file, and after the fault is cleared a rerun finishes bit-identical.

These mount a small tmpfs, which needs root; they skip otherwise. The same errors are
also checked without root by failing writes on purpose.
"""

from __future__ import annotations

import errno
import os

import pytest
import torch
from conftest import read_metrics, same_params, tmpfs, train

from lossless_trainer import StorageError
from lossless_trainer.checkpoint import (
    checkpoint_path,
    list_checkpoints,
    load_checkpoint,
    save_atomic,
)


@pytest.fixture
def small_fs(tmp_path):
    """A 1 MiB tmpfs; `fill(leave)` writes a ballast file leaving `leave` bytes free,
    `free()` deletes it."""
    mount = tmp_path / "fs"

    class FS:
        path = mount
        ballast = mount / "ballast"

        def fill(self, leave: int = 0) -> None:
            available = os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize
            with open(self.ballast, "ab") as f:
                f.write(b"\0" * max(available - leave, 0))

        def free(self) -> None:
            self.ballast.unlink(missing_ok=True)

    with tmpfs(tmp_path / "fs"):
        yield FS()


def temporaries(directory) -> list[str]:
    return [name for _, _, names in os.walk(directory) for name in names
            if name.startswith(".tmp") or name.endswith(".tmp")]


def test_a_checkpoint_save_on_a_full_disk_names_the_file_and_the_intact_ones(small_fs):
    directory = small_fs.path / "checkpoints"
    first = checkpoint_path(str(directory), 1)
    save_atomic({"format": 2, "w": torch.ones(1000)}, first)
    small_fs.fill(leave=4096)
    second = checkpoint_path(str(directory), 2)
    with pytest.raises(StorageError) as caught:
        save_atomic({"format": 2, "w": torch.zeros(100_000)}, second)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == second
    message = str(caught.value)
    assert message.startswith(f"writing checkpoint {second} failed: No space left on device "
                              "(ENOSPC). The 1 earlier checkpoint(s) in ")
    assert "the newest is step-000000001.pt, which a rerun of the same command resumes from" \
        in message
    assert "Free space on that file system" in message
    assert temporaries(directory) == [] and not os.path.exists(second)
    assert torch.equal(load_checkpoint(first)["w"], torch.ones(1000))


def test_a_run_that_fills_the_disk_stops_clearly_and_resumes_exactly_after(small_fs,
                                                                           uninterrupted):
    log_dir = small_fs.path / "run"
    train(log_dir, max_steps=6)  # one checkpoint and some logs: now fill what is left
    size = os.path.getsize(checkpoint_path(str(log_dir / "checkpoints"), 6))
    small_fs.fill(leave=size + size // 2)  # room for one more checkpoint, not two
    with pytest.raises(StorageError) as caught:
        train(log_dir, keep_last=10)
    assert caught.value.errno == errno.ENOSPC
    assert "No space left on device (ENOSPC)" in str(caught.value)
    assert "earlier checkpoint(s)" in str(caught.value)
    assert temporaries(log_dir) == []
    saved = [step for step, _ in list_checkpoints(str(log_dir / "checkpoints"))]
    assert saved[0] == 6 and all(load_checkpoint(p) for _, p in
                                 list_checkpoints(str(log_dir / "checkpoints")))
    small_fs.free()
    trainer, model = train(log_dir)  # the same command, with space again
    assert trainer.resumed_from.endswith(f"step-{saved[-1]:09d}.pt")
    assert same_params(model, uninterrupted[0])
    steps = [row["step"] for row in read_metrics(log_dir)]
    assert steps == sorted(set(steps)) and steps[-1] == 24


def test_rewriting_metrics_on_a_full_disk_keeps_the_file_and_leaves_no_temporary(small_fs):
    log_dir = small_fs.path / "run"
    train(log_dir, max_steps=12)
    before = (log_dir / "metrics.jsonl").read_bytes()
    small_fs.fill()
    with pytest.raises(StorageError, match=r"rewriting .*metrics\.jsonl failed: No space left "
                                           r"on device \(ENOSPC\)\. The 2 earlier"):
        train(log_dir, max_steps=24)
    assert (log_dir / "metrics.jsonl").read_bytes() == before
    assert not (log_dir / "metrics.jsonl.tmp").exists()


@pytest.mark.parametrize(("code", "reason", "fix"), [
    (errno.EROFS, "Read-only file system (EROFS)", "The file system is read-only"),
    (errno.EACCES, "Permission denied (EACCES)", "Give this process write permission"),
])
def test_a_read_only_or_forbidden_checkpoint_directory_is_named(tmp_path, monkeypatch, code,
                                                                reason, fix):
    # Simulated (a file system cannot be remounted read-only while a run has files open
    # on it): the temporary file cannot be created.
    from lossless_trainer import checkpoint

    train(tmp_path, max_steps=6)

    def refused(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(checkpoint.tempfile, "mkstemp", refused)
    with pytest.raises(StorageError) as caught:
        train(tmp_path, max_steps=12)
    assert caught.value.errno == code
    assert f"step-000000012.pt failed: {reason}. The 1 earlier checkpoint(s)" in str(caught.value)
    assert fix in str(caught.value)


def test_a_failed_log_write_names_the_file_without_root(tmp_path, monkeypatch):
    # A writer thread that hits a full disk, simulated: the error names metrics.jsonl.
    from lossless_trainer import writers

    def full(self, record):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writers.JSONLinesWriter, "write", full)
    with pytest.raises(StorageError, match=r"writing logs to .*metrics\.jsonl failed: No space "
                                           r"left on device \(ENOSPC\)"):
        train(tmp_path, max_steps=12)
