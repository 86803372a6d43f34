"""Progress display: a tqdm bar on a terminal, plain periodic lines otherwise."""

from __future__ import annotations

import re

from conftest import TinyClassifier, make_batches

from lossless_trainer import Trainer, hooks


def test_plain_lines_when_stdout_is_not_a_terminal(capsys, tmp_path):
    Trainer(TinyClassifier(), make_batches(12), log_every=4, log_dir=str(tmp_path)).fit()
    lines = [line for line in capsys.readouterr().out.splitlines()
             if line.startswith("[lossless_trainer]")]
    # the first flush prints only after the interval, the last always prints
    assert lines, "no progress line printed"
    assert re.match(r"\[lossless_trainer\] step 12/12  ce=[0-9.e-]+  total=[0-9.e-]+  "
                    r"[0-9.]+ steps/s  elapsed \d\d:\d\d$", lines[-1])


def test_no_output_with_progress_off(capsys, tmp_path):
    Trainer(TinyClassifier(), make_batches(3), log_dir=str(tmp_path), progress=False).fit()
    assert capsys.readouterr().out == ""


def test_tqdm_bar_on_a_terminal(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(hooks, "stdout_is_terminal", lambda: True)
    Trainer(TinyClassifier(), make_batches(10), log_every=5, log_dir=str(tmp_path)).fit()
    out = capsys.readouterr().out
    assert "10/10" in out and "ce=" in out and "step/s" in out
    assert "[lossless_trainer]" not in out
