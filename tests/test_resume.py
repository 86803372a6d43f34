"""Exact resume after SIGKILL, SIGTERM and a kill during a checkpoint write, in real
subprocesses; fallback past bad checkpoints; checkpoints that cannot run code."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

SCRIPT = Path(__file__).with_name("resume_script.py")
FLUSH_STEPS = list(range(5, 61, 5))


def start(log_dir: Path, out: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(SCRIPT), str(log_dir), str(out)],
                            env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def run(log_dir: Path, out: Path, **env: str) -> subprocess.CompletedProcess:
    proc = start(log_dir, out, **env)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def checkpoint_steps(log_dir: Path) -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in (log_dir / "checkpoints").glob("step-*.pt"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The same command, never interrupted."""
    root = tmp_path_factory.mktemp("reference")
    run(root / "run", root / "out.pt")
    return torch.load(root / "out.pt", weights_only=True)


def assert_identical(out: Path, reference: dict) -> None:
    final = torch.load(out, weights_only=True)
    assert final["step"] == 60 and final["stop_reason"] == "max_steps"
    assert final["model"].keys() == reference["model"].keys()
    for key, value in reference["model"].items():
        assert torch.equal(final["model"][key], value), key
    mine, ref = final["optimizer"], reference["optimizer"]
    assert mine["param_groups"] == ref["param_groups"]
    for index, state in ref["state"].items():
        for key, value in state.items():
            assert torch.equal(mine["state"][index][key], value), (index, key)


def assert_clean_logs(log_dir: Path) -> None:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    for tag in ("loss/ce", "loss/total", "body/mean", "lr"):
        assert [e.step for e in events.Scalars(tag)] == FLUSH_STEPS, tag
    with open(log_dir / "metrics.jsonl", encoding="utf-8") as f:
        assert [json.loads(line)["step"] for line in f] == FLUSH_STEPS


def test_sigkill_mid_step_then_rerun_is_bit_identical(tmp_path, reference):
    log_dir, out = tmp_path / "run", tmp_path / "out.pt"
    proc = start(log_dir, out, PAUSE_AT="37")
    wait_for(log_dir / "paused", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not out.exists()
    assert checkpoint_steps(log_dir) == [10, 20, 30]

    rerun = run(log_dir, out, PAUSE_AT="37")
    assert "resumed from" in rerun.stderr and "step-000000030.pt at step 30" in rerun.stderr
    assert_identical(out, reference)
    assert_clean_logs(log_dir)
    assert checkpoint_steps(log_dir) == [40, 50, 60]  # keep_last=3


def test_sigterm_saves_the_current_step_exits_0_and_resumes_exactly(tmp_path, reference):
    log_dir, out = tmp_path / "run", tmp_path / "out.pt"
    proc = start(log_dir, out, PAUSE_AT="23")
    wait_for(log_dir / "paused", proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "SIGTERM received: stopping after the current step" in stderr
    stopped = torch.load(out, weights_only=True)
    assert (stopped["step"], stopped["stop_reason"]) == (23, "SIGTERM")
    assert checkpoint_steps(log_dir) == [10, 20, 23]

    rerun = run(log_dir, out, PAUSE_AT="23")
    assert "step-000000023.pt at step 23" in rerun.stderr
    assert_identical(out, reference)
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    steps = [e.step for e in events.Scalars("loss/total")]
    assert steps == sorted(set(steps))  # no step twice (23 is the preemption's flush)
    assert set(FLUSH_STEPS) <= set(steps)


def test_sigkill_during_checkpoint_write_keeps_the_previous_one(tmp_path, reference):
    log_dir, out = tmp_path / "run", tmp_path / "out.pt"
    proc = start(log_dir, out, SLOW_SAVE_AT="20")
    wait_for(log_dir / "saving", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    files = sorted(p.name for p in (log_dir / "checkpoints").iterdir())
    assert files[-1] == "step-000000010.pt" and files[0].startswith(".tmp-")  # half-written

    rerun = run(log_dir, out)
    assert "step-000000010.pt at step 10" in rerun.stderr
    assert not any(p.name.startswith(".tmp-") for p in (log_dir / "checkpoints").iterdir())
    assert_identical(out, reference)
    assert_clean_logs(log_dir)
