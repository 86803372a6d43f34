"""One run per directory (rundir.py): the lock, its holder in the error, no stale lock
after a SIGKILL, refusing bad log_dirs before anything starts; and a SIGTERM that ends
the process's training, not one fit. Real processes, real signals, real files."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TinyClassifier, make_batches, read_metrics, tmpfs

from lossless_trainer import Hook, RunDirectoryError, RunDirectoryInUseError, Trainer
from lossless_trainer.resume import clear_termination, termination_signal
from lossless_trainer.rundir import LOCK_NAME, RunLock

SCRIPT = Path(__file__).resolve().parent / "rundir_script.py"
ROOT = Path(__file__).resolve().parent.parent


def start(log_dir: Path, *args: str, **env: str) -> subprocess.Popen:
    environ = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.Popen([sys.executable, str(SCRIPT), str(log_dir), *args], env=environ,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.communicate()[1][-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{path} did not appear")
        time.sleep(0.02)


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    """Every file under `directory`: (size, modification time in ns)."""
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def trainer(log_dir: Path, **kwargs) -> Trainer:
    torch.manual_seed(0)
    return Trainer(TinyClassifier(), make_batches(4), log_dir=str(log_dir), progress=False,
                   **kwargs)


def test_a_second_run_on_a_live_directory_fails_at_once_and_changes_nothing(tmp_path):
    log_dir = tmp_path / "run"
    live = start(log_dir, STEPS="60")
    try:
        wait_for(log_dir / "checkpoints" / "step-000000010.pt", live)
        live.send_signal(signal.SIGSTOP)  # frozen, holding its lock: the files stand still
        before = snapshot(log_dir)
        with pytest.raises(RunDirectoryInUseError) as caught:
            trainer(log_dir, max_steps=3).fit()
        assert snapshot(log_dir) == before  # nothing deleted, renamed or rewritten
        message = str(caught.value)
        assert f"log_dir {log_dir} is in use by another run" in message
        assert f"pid {live.pid} on host {socket.gethostname()}, started 20" in message
        assert "rundir_script.py" in message  # the holder's command line
    finally:
        live.send_signal(signal.SIGCONT)
    _, stderr = live.communicate(timeout=120)
    assert live.returncode == 0, stderr[-2000:]
    # The live run finished undisturbed: every flush of its own is in its metrics.
    assert [row["step"] for row in read_metrics(log_dir)] == list(range(5, 61, 5))
    assert not list((log_dir / "checkpoints").glob("*.superseded"))


def survivors(log_dir: Path) -> list[int]:
    """Processes still running the script on `log_dir`: its orphaned DataLoader workers."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(SCRIPT).encode() in command and str(log_dir).encode() in command:
            found.append(int(entry.name))
    return found


def test_a_sigkilled_run_leaves_no_stale_lock_even_with_forked_workers(tmp_path):
    log_dir = tmp_path / "run"
    live = start(log_dir, WORKERS="2")
    wait_for(log_dir / "checkpoints" / "step-000000005.pt", live)
    workers = survivors(log_dir)
    live.send_signal(signal.SIGKILL)
    live.wait(timeout=30)
    # At once, while its persistent workers may still be alive (they notice their
    # parent is gone within seconds): they never held the lock, as POSIX locks are not
    # inherited across fork, so the directory is free the moment its run died.
    lingering = [pid for pid in survivors(log_dir) if pid in workers]
    lock = RunLock.acquire(str(log_dir))
    lock.release()
    assert len(workers) == 3 and (log_dir / LOCK_NAME).exists()  # the file stays
    for pid in lingering:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_a_rerun_after_a_sigkill_resumes_without_a_stale_lock(tmp_path):
    log_dir = tmp_path / "run"
    live = start(log_dir, STEPS="30")
    wait_for(log_dir / "checkpoints" / "step-000000010.pt", live)
    live.send_signal(signal.SIGKILL)
    live.wait(timeout=30)
    rerun = start(log_dir, STEPS="30", SLEEP="0")
    _, stderr = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, stderr[-2000:]
    assert "resumed from" in stderr
    assert read_metrics(log_dir)[-1]["step"] == 30


def test_two_fits_on_one_directory_in_one_process_are_refused(tmp_path):
    inner_errors = []

    class Nested(Hook):
        def after_step(self, outer):
            try:
                trainer(tmp_path, max_steps=1).fit()
            except RunDirectoryInUseError as exc:
                inner_errors.append(str(exc))
            outer.request_stop("done")

    trainer(tmp_path, max_steps=5, callbacks=[Nested()]).fit()
    assert len(inner_errors) == 1
    assert f"in use by another fit() in this process (pid {os.getpid()})" in inner_errors[0]
    trainer(tmp_path, max_steps=2).fit()  # released when the outer fit ended


def test_the_lock_is_released_when_fit_raises(tmp_path):
    class Fails(Hook):
        def after_step(self, outer):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        trainer(tmp_path, max_steps=3, callbacks=[Fails()]).fit()
    trainer(tmp_path, max_steps=3).fit()


def test_a_file_or_an_uncreatable_log_dir_is_refused_before_training(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(RunDirectoryError, match=f"log_dir {afile} is a file, not a directory"):
        trainer(afile, max_steps=1).fit()
    below = afile / "run"
    with pytest.raises(RunDirectoryError, match=f"log_dir {below} cannot be created: Not a "
                                                "directory"):
        trainer(below, max_steps=1).fit()
    assert afile.read_text() == "x"


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory on a file system the test can make read-only: a tmpfs (needs root)."""
    with tmpfs(tmp_path / "ro") as mount:
        yield mount


def test_a_finished_run_in_a_read_only_directory_is_refused_clearly(tmp_path, read_only_dir):
    finished = trainer(read_only_dir / "run", max_steps=2)
    finished.fit()
    subprocess.run(["mount", "-o", "remount,ro", str(read_only_dir)], check=True)
    with pytest.raises(RunDirectoryError, match="is not writable .*read-only file system"):
        trainer(read_only_dir / "run", max_steps=2).fit()  # nothing left to do, still clear
    with pytest.raises(RunDirectoryError, match="cannot be created: Read-only file system"):
        trainer(read_only_dir / "new", max_steps=2).fit()


def test_after_a_sigterm_later_fits_of_the_process_return_at_once(tmp_path):
    proc = start(tmp_path, "3", STEPS="200")
    wait_for(tmp_path / "started", proc)
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    lines = out.splitlines()
    assert lines[0].startswith("stage 0: SIGTERM in ")
    for line in lines[1:3]:  # the later stages trained nothing
        stage, rest = line.split(": ", 1)
        reason, seconds = rest.split(" in ")
        assert reason == "SIGTERM" and float(seconds.rstrip("s")) < 0.5, line
    assert not (tmp_path / "stage1").exists()  # nothing written: no fit happened there
    assert lines[3] == "evaluated"  # a script carries on unless it exits (docs/checkpoints.md)
    assert not (tmp_path / "stage2" / "checkpoints").exists()
    assert "a SIGTERM stopped an earlier fit of this process: fit returns at once" in stderr


def test_a_sigint_stops_only_the_fit_it_interrupts(tmp_path):
    class Interrupt(Hook):
        def after_step(self, outer):
            if outer.state.step == 2:
                os.kill(os.getpid(), signal.SIGINT)

    first = trainer(tmp_path / "a", max_steps=6, callbacks=[Interrupt()])
    assert first.fit().stop_reason == "SIGINT"
    assert termination_signal() is None
    assert trainer(tmp_path / "b", max_steps=3).fit().stop_reason == "max_steps"


def test_clear_termination_lets_the_process_train_again(tmp_path, monkeypatch):
    import lossless_trainer.resume as resume

    monkeypatch.setattr(resume, "_terminated", "SIGTERM")
    assert trainer(tmp_path, max_steps=3).fit().stop_reason == "SIGTERM"
    assert not (tmp_path / "checkpoints").exists()
    clear_termination()
    assert trainer(tmp_path, max_steps=3).fit().stop_reason == "max_steps"
