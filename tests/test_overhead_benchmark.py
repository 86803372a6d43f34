"""benchmarks/overhead.py: its interleaved rounds time both sides on the same batches, and
the Trainer and the hand-written loop end with bitwise-equal weights."""

from __future__ import annotations

import pytest
import torch
from conftest import loaded_benchmark


@pytest.fixture(scope="module")
def overhead():
    with loaded_benchmark("overhead.py") as module:
        yield module


@pytest.mark.parametrize("name", ["tiny", "tiny-log1", "summary-heavy", "tiny-bf16",
                                  "tiny-accum4", "tiny-mean-accum4"])
def test_each_round_times_both_sides_and_ends_with_equal_weights(overhead, tmp_path, name):
    case = next(c for c in overhead.CASES if c.name == name)
    cpu = torch.device("cpu")
    batches = overhead.make_batches(case, 96, cpu, seed=0)
    twin = overhead.build(case, cpu, seed=0)
    data = overhead.Interleaved(batches, overhead.copies(batches), case.raw, twin, chunk=24,
                                warmup=24, device=cpu)
    trainer = overhead.make_trainer(case, data, cpu, 0, str(tmp_path))
    trainer.fit()
    # Chunks start at 0, 12, 36, 60, 84 (half a chunk off, so flushes fall inside the
    # Trainer's chunks); those before 24 are warm-up, and the Trainer's last chunk is
    # never followed by a request for a batch, so it cannot be timed.
    assert sorted(data.raw_times) == [36, 60, 84] and sorted(data.trainer) == [36, 60]
    assert len(data.pairs()) == 2 and all(t > 0 and r > 0 for (t, _), (r, _) in data.pairs())
    assert trainer.state.step == 96 // case.accumulation
    assert overhead.same_weights(trainer.model, twin[0])
    # The raw chunks ran with summaries off: the last window holds the Trainer's own
    # values only, one per micro-batch since the flush at step 50 (if there was one).
    steps = trainer.state.step
    every = case.trainer_kwargs.get("log_every", 50)
    window_steps = steps - (steps - 1) // every * every
    record = trainer.last_summary
    assert record is not None and record.step == steps
    tag = "heads/head1/probs/min" if name == "summary-heavy" else "logits/abs_mean"
    assert record.counts[tag] == window_steps * case.accumulation
    if name == "summary-heavy":  # 20 scalars from three nested scopes, and a histogram
        assert len([t for t in record.scalars if t.startswith("heads/")]) == 20
        assert [(kind, tag) for kind, tag, _, _ in record.others] == [("histogram", "logits")]


def test_a_round_and_the_table(overhead, tmp_path, capsys):
    case = next(c for c in overhead.CASES if c.name == "tiny")
    result = overhead.bench_case(case, torch.device("cpu"), quick=True, rounds=1, chunk=50,
                                 seed=0, log_root=str(tmp_path))
    assert len(result.rounds) == 1 and result.weights_match
    assert result.rounds[0].trainer > 0 and result.rounds[0].raw > 0
    overhead.print_table([result])
    row = next(line for line in capsys.readouterr().out.splitlines()
               if line.startswith("tiny "))
    assert "WARNING" not in row and ("PASS" in row or "MISS" in row)


@pytest.mark.parametrize("name", ["gpt2", "gpt2-accum4"])
def test_the_hugging_face_cases_match_the_loop_on_the_bare_model(overhead, tmp_path, name):
    # The Trainer through adapters.HuggingFace and the hand-written loop on the bare
    # model (for gpt2-accum4, Hugging Face's own num_items_in_batch recipe) do the same
    # arithmetic: bitwise-equal weights after the round.
    pytest.importorskip("transformers")
    case = next(c for c in overhead.CASES if c.name == name)
    result = overhead.bench_case(case, torch.device("cpu"), quick=True, rounds=1, chunk=8,
                                 seed=0, log_root=str(tmp_path))
    assert result.weights_match and result.rounds[0].trainer > 0 < result.rounds[0].raw


def test_the_idiomatic_mode_times_a_third_loop_on_host_batches(overhead, tmp_path, capsys):
    """--idiomatic (the default on CUDA): batches stay on the host, every side moves them,
    and the loop with an .item() per step is timed and ends with the same weights."""
    case = next(c for c in overhead.CASES if c.name == "tiny")
    result = overhead.bench_case(case, torch.device("cpu"), quick=True, rounds=1, chunk=50,
                                 seed=0, log_root=str(tmp_path), idiomatic=True)
    assert result.weights_match and result.rounds[0].others["idiomatic"] > 0
    assert result.ratio_to("idiomatic") > 0
    overhead.print_table([result])
    out = capsys.readouterr().out
    assert "T/idiom" in out and "WARNING" not in out
    moved = overhead.OnDevice(overhead.make_batches(case, 4, torch.device("cpu"), 0),
                              torch.device("cpu"))
    assert len(moved[1:3]) == 2 and torch.equal(moved[0][0], moved[0][0])
