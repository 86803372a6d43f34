"""benchmarks/memory.py: the styles it compares compute the same thing, and it reports a ratio."""

from __future__ import annotations

import re
import sys

import pytest
import torch
from conftest import loaded_benchmark


@pytest.fixture(scope="module")
def memory():
    with loaded_benchmark("memory.py") as module:
        yield module


@pytest.mark.parametrize("case", ["multiscale", "vocab"])
def test_styles_give_the_same_loss_and_gradients(memory, case):
    check = memory.check_equivalence(memory.get_case(case, quick=True), torch.device("cpu"))
    assert check.ok
    assert set(check.losses) == set(memory.STYLES)
    losses = list(check.losses.values())
    assert losses[0] > 0 and all(abs(v - losses[0]) < 1e-5 for v in losses)
    assert all(d < 1e-6 for d in check.max_grad_diff.values())


def test_checkpointed_head_never_keeps_the_full_predictions(memory):
    # What autograd keeps from forward for backward: in the separated style, one
    # full-resolution tensor per scale (the log-probabilities); under checkpointing, none.
    case = memory.get_case("multiscale", quick=True)
    full_size_saved = {}
    for style in ("separated", "owned-ckpt"):
        model, batch = case.build(style, torch.device("cpu"), 0)
        full = batch[1].numel() * model.net.heads[0].out_channels
        storages: set[int] = set()

        def pack(t: torch.Tensor, storages: set[int] = storages,
                 full: int = full) -> torch.Tensor:
            if t.numel() >= full:
                storages.add(t.untyped_storage().data_ptr())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            losses = model(batch)
        full_size_saved[style] = len(storages)
        del losses
    assert full_size_saved == {"separated": len(model.net.heads), "owned-ckpt": 0}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_quick_run_reports_the_ratio(memory, capsys):
    threads = torch.get_num_threads()
    try:
        status = memory.main(["--quick", "--cases", "multiscale", "--steps", "1"])
    finally:
        torch.set_num_threads(threads)  # main() sets 1 thread; later tests keep theirs
    out = capsys.readouterr().out
    assert status == 0
    assert "-> MATCH" in out
    assert re.search(r"method: (CPU peak RSS|CUDA)", out)
    ratio = float(re.search(r"ratio separated/owned-ckpt \(multiscale\): ([0-9.]+)",
                            out).group(1))
    # 4 predictions of 2.1 MB each are alive at once only in the separated style.
    assert ratio > 1.3
