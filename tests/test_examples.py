"""Examples run in their fast mode, so they cannot rot."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_quickstart_reaches_090_held_out_accuracy(tmp_path):
    log_dir = tmp_path / "quickstart"
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "quickstart.py"), "--fast", "--log-dir", str(log_dir)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr
    accuracy = float(re.search(r"held-out accuracy: ([0-9.]+)", result.stdout).group(1))
    assert accuracy >= 0.90
    assert f"tensorboard --logdir {log_dir}" in result.stdout
    files = os.listdir(log_dir)
    assert "metrics.jsonl" in files and any(f.startswith("events.out.tfevents") for f in files)
