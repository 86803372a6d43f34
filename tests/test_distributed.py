"""Distributed training: real torchrun, 2 processes, gloo on CPU (see dist_script.py)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import lm_batches, lm_sequences, read_metrics
from dist_script import MEAN_STEPS, AccuracyLM, Regressor, TwoHeads, dataset
from torch.utils.data import DataLoader

from lossless_trainer import Trainer, write_summary
from lossless_trainer.checkpoint import CheckpointError, save_atomic
from lossless_trainer.distributed import MAX_VOTE_STEPS, _WindowLayout, combine_totals

SCRIPT = Path(__file__).resolve().parent / "dist_script.py"


def torchrun(mode: str, out: Path, env: dict[str, str] | None = None,
             expect_ok: bool = True) -> subprocess.CompletedProcess[str]:
    out.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(SCRIPT), mode, str(out)],
        capture_output=True, text=True, timeout=240, cwd=out, check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )
    if expect_ok:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def load(out: Path, name: str, rank: int = 0) -> dict:
    return torch.load(out / f"{name}-rank{rank}.pt", weights_only=True)


def single_process(tmp_path: Path, name: str, steps: int = 12,
                   momentum: float = 0.0) -> tuple[Regressor, list[dict]]:
    """The reference: one process, batch 16 (the 2 ranks' 8 + 8), same SGD and steps."""
    torch.manual_seed(0)
    model = Regressor()
    Trainer(model, DataLoader(dataset(), batch_size=16, shuffle=False),
            optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=momentum),
            max_steps=steps, log_every=1,
            log_dir=str(tmp_path / name), progress=False, keep_last=0).fit()
    return model, read_metrics(str(tmp_path / name))


def test_ddp_two_ranks_equal_one_process_with_the_double_batch(tmp_path):
    out = tmp_path / "ddp"
    torchrun("equivalence", out)
    reference, reference_log = single_process(tmp_path, "single")
    for name in ("plain", "accum"):  # accum: batch 4 per rank, 2 micro-batches per step
        rank0, rank1 = load(out, name, 0), load(out, name, 1)
        assert rank0["sampler"] == "DistributedSampler" and rank0["world"] == 2
        for key, value in reference.state_dict().items():
            assert torch.allclose(rank0["params"][key], value, atol=1e-5), (name, key)
            assert torch.equal(rank0["params"][key], rank1["params"][key]), (name, key)
        # The tiny model's gradients fit in one bucket: one all-reduce per optimizer step,
        # so no_sync held back the first micro-batch of every accumulated step.
        assert rank0["allreduces"] == 12, name
        # Read on rank 0 alone after the logging hook, a record is its step's, though
        # the ranks combine it while the next step runs; except where the evaluation's
        # results are new tags, whose layout the ranks agree on at the next step.
        assert rank0["reads"] == [(step, step - (step == 6)) for step in range(1, 13)], name
        assert rank1["reads"] == []
        # A checkpoint put its step's record on disk before it was written.
        assert rank0["on_disk"] == [4, 8], name

    log = read_metrics(str(out / "plain"))
    assert [r["step"] for r in log] == list(range(1, 13))
    # Every rank evaluated the whole eval set; rank 0's result was written.
    assert [r["step"] for r in log if "eval/mse" in r] == [6, 12]
    x, y = dataset(40).tensors
    reference.eval()
    with torch.no_grad():
        expected_mse = torch.nn.functional.mse_loss(reference((x, y)), y).item()
    assert math.isclose(log[-1]["eval/mse"], expected_mse, rel_tol=1e-4)
    for ours, theirs in zip(log, reference_log):  # the losses are averaged across ranks
        assert math.isclose(ours["loss/mse"], theirs["loss/mse"], rel_tol=1e-5)
        assert math.isclose(ours["loss/total"], theirs["loss/total"], rel_tol=1e-5)
    first = log[0]
    assert first["rank/mean"] == 0.5  # ranks 0 and 1
    assert first["rank/sum"] == 3.0  # 1 + 2
    assert first["rank/max"] == 1.0
    assert first["rank/none"] == 10.0  # rank 0's own
    assert first["only_rank1"] == 3.0  # a key on one rank only: no deadlock, no crash
    # Only rank 0 writes: one event file and one metrics file, nothing from rank 1, and
    # the run directory's lock, which rank 0 took.
    files = sorted(os.listdir(out / "plain"))
    assert [f for f in files if f.startswith("events.out.tfevents")] == [files[2]]
    assert files == [".lossless_trainer.lock", "checkpoints", files[2], "metrics.jsonl"]
    assert not (out / "runs").exists()


def test_optional_losses_train_under_ddp_and_stops_are_agreed(tmp_path):
    out = tmp_path / "optional"
    torchrun("optional", out)
    for rank in (0, 1):
        error = load(out, "strict", rank)["error"]
        assert "b.weight, b.bias" in error and "find_unused_parameters=True" in error
        assert f"rank {rank}" in error
    rank0, rank1 = load(out, "optional", 0), load(out, "optional", 1)
    for key in ("b.weight", "a.weight", "body.weight"):
        assert not torch.equal(rank0["before"][key], rank0["after"][key])  # it trained
        assert torch.equal(rank0["after"][key], rank1["after"][key])
    log = read_metrics(str(out / "optional"))
    assert all("loss/a" in r and "loss/b" in r for r in log)
    for record in read_metrics(str(out / "aux")):  # rank 1's own key counts on rank 0
        assert math.isclose(record["loss/total"],
                            record["loss/mse"] + record["loss/aux"] / 2, rel_tol=1e-6)
    # Rank 1 alone asked to stop after step 3: the next flush (log_every=2, step 4) sent
    # it, and both ranks stopped together at the step after it, where the flush's
    # windows are combined: the same step in every run.
    assert load(out, "stop", 0) == {"step": 5, "reason": "stopped on another rank"}
    assert load(out, "stop", 1) == {"step": 5, "reason": "rank 1 asked"}
    # A SIGTERM on rank 1 alone after step 5, no flush before step 1000: the vote, every
    # few steps (how many depends on the step time), stops both at the same step, within
    # twice the longest interval.
    sigterm = [load(out, "sigterm", rank) for rank in (0, 1)]
    assert sigterm[0]["step"] == sigterm[1]["step"]
    assert 5 < sigterm[0]["step"] < 5 + 2 * MAX_VOTE_STEPS < 1000
    assert (sigterm[0]["reason"], sigterm[1]["reason"]) == ("stopped on another rank",
                                                            "SIGTERM")
    # A stop asked between epochs, on one rank, holds every rank at the epoch boundary.
    assert load(out, "epoch_stop", 0) == {"step": 4, "epoch": 1,  # 4 batches per rank
                                          "reason": "stopped on another rank"}
    assert load(out, "epoch_stop", 1) == {"step": 4, "epoch": 1,
                                          "reason": "rank 1 asked after the epoch"}
    for rank in (0, 1):
        unsharded = load(out, "unsharded", rank)
        assert any("every rank got the same batch at step 1" in w
                   for w in unsharded["warnings"]), unsharded["warnings"]
        assert "different number of batches per rank ([3, 6])" in unsharded["uneven"]
        assert "different number of batches per rank ([3, None])" in unsharded["mixed"]
        assert "'aux' first at step 2 on rank 1" in load(out, "aux", rank)["error"]
        nonfinite = load(out, "nonfinite", rank)
        assert "'mse' first at step 3 on rank 1" in nonfinite["flush"]
        assert "at the flush of step 4" in nonfinite["flush"]
        assert "at step 3: rank 1: 'mse'" in nonfinite["step"]
        assert "The optimizer did not step" in nonfinite["step"]
        # The flush of step 4 found it; its record landed at step 5, before the
        # optimizer stepped again: the run ended after step 4, through on_exception.
        assert nonfinite["flush_at"] == [4, "NonFiniteLossError", "NonFiniteLossError"]
        assert "'mse' first at step 3 on rank 1" in nonfinite["last"]
        assert nonfinite["last_at"] == [4, "NonFiniteLossError", "NonFiniteLossError"]
    writers = load(out, "writers", 0), load(out, "writers", 1)
    assert writers[0]["open"] == "OSError: the tracking server is down"
    assert writers[1]["open"].startswith("RuntimeError: rank 0 could not open the summary")
    for rank in (0, 1):
        assert writers[rank]["save"].startswith(
            "RuntimeError: writing summaries failed in the background: OSError('disk full')")
    assert writers[1]["save"].endswith("(raised on rank 0)")


def test_sigkill_of_one_rank_then_the_same_command_resumes_exactly(tmp_path):
    reference = tmp_path / "reference"
    torchrun("resume", reference)
    out = tmp_path / "killed"
    killed = torchrun("resume", out, env={"KILL_AT": "7"}, expect_ok=False)
    assert killed.returncode != 0
    checkpoints = sorted(os.listdir(out / "run" / "checkpoints"))
    assert checkpoints[-1] == "step-000000006.pt"
    torchrun("resume", out)  # the same command again

    expected, resumed = load(reference, "resume"), load(out, "resume")
    assert resumed["resumed_from"].endswith("step-000000006.pt")
    assert resumed["step"] == expected["step"] == 24  # 2 epochs of 96 samples per rank
    for key, value in expected["params"].items():
        assert torch.equal(resumed["params"][key], value), key
        assert torch.equal(load(out, "resume", 1)["params"][key], value), key
    for key, value in expected["optimizer"]["state"][0].items():
        assert torch.equal(resumed["optimizer"]["state"][0][key], value), key
    ours, theirs = read_metrics(str(out / "run")), read_metrics(str(reference / "run"))
    assert [r["step"] for r in ours] == [r["step"] for r in theirs]  # no duplicates
    assert [r["loss/mse"] for r in ours] == [r["loss/mse"] for r in theirs]


def test_fsdp_two_ranks_equal_one_process_and_save_full_checkpoints(tmp_path):
    out = tmp_path / "fsdp"
    torchrun("fsdp", out)
    reference, reference_log = single_process(tmp_path, "single", momentum=0.9)
    for name in ("plain", "accum"):  # accum: batch 4 per rank, 2 micro-batches per step
        saved = load(out, name)
        params = saved["params"]  # from the checkpoint: full, unsharded tensors
        assert params.keys() == reference.state_dict().keys()
        for key, value in reference.state_dict().items():
            assert torch.allclose(params[key], value, atol=1e-5), (name, key)
        # One gradient reduce-scatter per optimizer step: the first micro-batch's
        # backward ran without a sync.
        assert saved["allreduces"] == 12, name
    log = read_metrics(str(out / "plain"))
    for ours, theirs in zip(log, reference_log):
        assert math.isclose(ours["loss/mse"], theirs["loss/mse"], rel_tol=1e-5)
    # A second run in the same directory resumed from that checkpoint to step 14.
    resumed = load(out, "resumed")
    assert resumed["resumed_from"].endswith("step-000000012.pt")
    reference, _ = single_process(tmp_path, "single14", steps=14, momentum=0.9)
    for key, value in reference.state_dict().items():
        assert torch.allclose(resumed["params"][key], value, atol=1e-5), key


def test_mean_losses_under_torchrun_equal_one_process_with_the_whole_batch(tmp_path):
    """2 ranks x batch 4, and 2 ranks x 2 micro-batches x batch 2, equal one process with
    batch 8, under DDP and FSDP: the ranks' token counts differ, and each step divides by
    their sum. The logged values are pooled over the ranks' tokens too. (FSDP hooks the
    backward on the tensors of the output, and DDP with find_unused_parameters searches
    the output for them: both must find the total inside the Mean.)"""
    out = tmp_path / "means"
    torchrun("means", out)
    torch.manual_seed(0)
    reference = AccuracyLM()
    Trainer(reference, lm_batches(lm_sequences(8 * MEAN_STEPS), 8),
            optimizer=lambda p: torch.optim.SGD(p, lr=0.5), max_steps=MEAN_STEPS,
            log_every=1, log_dir=str(tmp_path / "single"), progress=False, keep_last=0).fit()
    expected = read_metrics(tmp_path / "single")
    for name in ("ddp-plain", "ddp-accum", "fsdp-plain", "fsdp-accum", "ddp-unused-plain",
                 "ddp-unused-accum"):
        params = load(out, name)["params"]
        for key, value in reference.state_dict().items():
            torch.testing.assert_close(params[key], value, atol=1e-5, rtol=0, msg=name)
        log = read_metrics(out / name)
        assert [r["step"] for r in log] == list(range(1, MEAN_STEPS + 1))
        for ours, theirs in zip(log, expected):
            for tag in ("loss/nll", "loss/total", "token_accuracy"):
                assert math.isclose(ours[tag], theirs[tag], rel_tol=1e-5), (name, tag)
    for rank in (0, 1):  # the error of a Mean under accumulation, on every rank
        error = load(out, "uncounted", rank)["error"]
        assert error and "'nll' at step 1 is a Mean" in error and "count_items" in error
        # torchmetrics as evaluators: the 40 evaluation samples counted once, not per rank.
        results = load(out, "metrics", rank)
        assert results["count"] == 40
        assert results["mean_squared_error"] == pytest.approx(results["mse"], rel=1e-6)


def test_a_mid_epoch_checkpoint_of_other_processes_needs_an_order_it_can_continue(tmp_path):
    # One process with a shuffling RandomSampler has no global order another number of
    # processes could recompute (a DistributedSampler's or a sequential one would).
    kwargs = {"log_dir": str(tmp_path / "run"), "progress": False}
    Trainer(Regressor(), DataLoader(dataset(32), batch_size=8, shuffle=True), max_steps=2,
            **kwargs).fit()
    path = tmp_path / "run" / "checkpoints" / "step-000000002.pt"
    state = torch.load(path, weights_only=True)
    state["world_size"] = 2
    state["ranks"] = [{k: state[k] for k in ("rng", "data", "order", "hooks", "summary")}] * 2
    save_atomic(state, str(path))  # with the checksum of what it now holds
    trainer = Trainer(Regressor(), DataLoader(dataset(32), batch_size=8, shuffle=True),
                      max_steps=4, **kwargs)
    with pytest.raises(CheckpointError, match=r"another number of processes in the middle of "
                       r"an epoch \(after 2 batches per process\), and its data has no global "
                       r"sample order.*Resume with the number of processes that wrote it"):
        trainer.fit()


def test_single_process_ignores_the_strategy_and_trains_plainly(tmp_path):
    model = TwoHeads()
    data = DataLoader(dataset(32), batch_size=8, shuffle=True)
    trainer = Trainer(model, data, strategy="fsdp", find_unused_parameters=True, max_steps=2,
                      log_dir=str(tmp_path / "run"), progress=False)
    assert not trainer.dist.enabled and trainer.dist.world_size == 1 and trainer.dist.is_main
    assert trainer._train_model is model and trainer.data is data
    trainer.fit()
    with pytest.raises(ValueError, match="strategy must be 'auto', 'ddp' or 'fsdp'"):
        Trainer(model, data, strategy="horovod", log_dir=str(tmp_path / "r2"), progress=False)


def test_combine_totals_pools_means_and_keeps_keys_of_single_ranks():
    rank0 = ({"loss": (2.0, 2, None), "n": (4.0, 2, None), "peak": (1.0, 1, None),
              "own": (5.0, 1, None)}, {"n": "sum", "peak": "max", "own": "none"})
    rank1 = ({"loss": (9.0, 3, None), "n": (9.0, 3, None), "peak": (7.0, 1, None),
              "own": (6.0, 1, None), "extra": (1.5, 1, None)}, {"n": "sum", "peak": "max",
                                                              "own": "none"})
    values, nonfinite = combine_totals([rank0, rank1])
    assert values["loss"] == (11.0 / 5, 5)  # every value of every rank
    assert values["n"] == (2.0 + 3.0, 5)  # the ranks' means, added
    assert values["peak"] == (7.0, 2)
    assert values["own"] == (5.0, 2)  # rank 0's
    assert values["extra"] == (1.5, 1)
    assert nonfinite == {}


def test_combine_totals_names_the_first_bad_step_and_its_rank():
    nan = float("nan")
    rank0 = ({"loss": (1.0, 2, None), "m": (3.0, 1, None)}, {"m": "max"})
    rank1 = ({"loss": (nan, 2, 7), "m": (nan, 1, 9)}, {"m": "max"})
    rank2 = ({"loss": (nan, 2, 8)}, {})
    values, nonfinite = combine_totals([rank0, rank1, rank2])
    assert nonfinite == {"loss": (7, 1), "m": (9, 1)}
    assert math.isnan(values["loss"][0]) and math.isnan(values["m"][0])  # max keeps NaN


def test_the_flush_tensor_layout_gives_what_the_object_gather_gives():
    """Two ranks' flushes through `_WindowLayout`, as `reduce_totals` runs it: the first
    window, and any window with a new tag, other reductions or another share, misfits
    and is gathered as objects; a window that fits combines to the same values, counts,
    first bad steps and shares from the float64 rows alone."""
    nan = float("nan")
    layouts = [_WindowLayout(), _WindowLayout()]

    def flush(windows):
        rows = [layout.pack(*window) for layout, window in zip(layouts, windows)]
        if any(row[0] for row in rows):
            for layout, (_, modes, share) in zip(layouts, windows):
                layout.agree(windows, modes, share)
            return "objects", None
        unpacked = [layout.unpack(rows) for layout in layouts]
        assert unpacked[0] == unpacked[1]
        shares = [(value, bool(row[1])) for value, row in zip(layouts[0].shares, rows)]
        return combine_totals(unpacked[0]), shares

    keys = (["mse"], [])
    first = [({"loss/mse": (2.5, 2, None), "n": (4.0, 2, None)}, {"n": "sum"}, (keys, False)),
             ({"loss/mse": (1.0, 2, None), "aux": (3.0, 1, None)}, {"n": "sum"},
              (keys, False))]
    assert flush(first)[0] == "objects"  # nothing agreed yet
    assert list(layouts[0].index) == ["loss/mse", "n", "aux"] == list(layouts[1].index)
    # Fits: a tag missing on a rank, a NaN with its step, a stop asked on rank 1, an
    # exact float sum and a Mean's fractional count.
    window = [({"loss/mse": (0.1 + 0.2, 2, None), "n": (nan, 2, 7)}, {"n": "sum"},
               (keys, False)),
              ({"loss/mse": (1e-17, 2.5, None)}, {"n": "sum"}, (keys, True))]
    (values, nonfinite), shares = flush(window)
    expected = combine_totals([(t, m) for t, m, _ in window])[0]
    assert values["loss/mse"] == expected["loss/mse"] == (math.fsum([0.1 + 0.2, 1e-17]) / 4.5, 4.5)
    assert math.isnan(values["n"][0]) and values["n"][1] == 2
    assert nonfinite == {"n": (7, 0)}
    assert shares == [(keys, False), (keys, True)]
    # Misfits, each then agreed: a new tag, a reduction changed, a new share value.
    plain = ({"loss/mse": (1.0, 1, None)}, {"n": "sum"}, (keys, False))
    new_keys = (["mse", "aux"], [])
    for windows in ([({"loss/mse": (1.0, 1, None), "new": (1.0, 1, None)}, {"n": "sum"},
                      (keys, False)), plain],
                    [plain, ({"loss/mse": (1.0, 1, None)}, {"n": "max"}, (keys, False))],
                    [({"loss/mse": (1.0, 1, None)}, {"n": "sum"}, (new_keys, False)),
                     ({"loss/mse": (1.0, 1, None)}, {"n": "max"}, (keys, False))]):
        assert flush(windows)[0] == "objects"
        (values, _), shares = flush(windows)  # now agreed: it fits
        assert values == combine_totals([(t, m) for t, m, _ in windows])[0]
        assert shares == [(share, False) for _, _, (share, _) in windows]
    assert "new" in layouts[0].index  # grown by the new tag


def test_reduce_is_checked_and_a_tag_keeps_one_reduction(tmp_path):
    class Logs(Regressor):
        def __init__(self, second: str) -> None:
            super().__init__()
            self.second = second

        def forward(self, batch):
            write_summary("count", 1.0, reduce="sum")
            write_summary("count", 2.0, reduce=self.second)
            return super().forward(batch)

    data = DataLoader(dataset(16), batch_size=8)
    with pytest.raises(ValueError, match=r"'count'.*reduce='sum' before and reduce='max' now"):
        Trainer(Logs("max"), data, max_steps=1, log_dir=str(tmp_path / "a"),
                progress=False).fit()
    with pytest.raises(ValueError, match=r"unknown reduce='avg'; use one of mean, sum, max"):
        Trainer(Logs("avg"), data, max_steps=1, log_dir=str(tmp_path / "b"),
                progress=False).fit()
    Trainer(Logs("sum"), data, max_steps=2, log_every=2, log_dir=str(tmp_path / "c"),
            progress=False).fit()
    assert read_metrics(str(tmp_path / "c"))[0]["count"] == 1.5  # one process: the mean


def test_the_distributed_example_runs_under_torchrun(tmp_path):
    example = Path(__file__).resolve().parent.parent / "examples" / "distributed.py"
    log_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(example), "--fast", "--log-dir", str(log_dir)],
        capture_output=True, text=True, timeout=240, cwd=tmp_path, check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-6000:]
    assert "processes: 2  strategy: ddp" in result.stdout
    assert result.stdout.count("held-out accuracy") == 1  # printed by rank 0 only
    accuracy = float(result.stdout.split("held-out accuracy: ")[1].split()[0])
    assert accuracy >= 0.85
    log = read_metrics(str(log_dir))
    assert log[-1]["eval/accuracy"] == pytest.approx(accuracy, abs=1e-3)
    assert "misclassified_per_step" in log[-1]
    assert len([f for f in os.listdir(log_dir) if f.startswith("events.out")]) == 1


def test_combine_totals_of_one_rank_alone_keeps_its_rank_number():
    # After an error a rank reduces only its own window; a NaN there is still its own.
    values, nonfinite = combine_totals([({"loss": (float("nan"), 1, 5)}, {})], ranks=[1])
    assert nonfinite == {"loss": (5, 1)} and values["loss"][1] == 1


def test_a_held_run_directory_stops_every_rank_with_the_holders_name(tmp_path):
    from lossless_trainer.rundir import RunLock

    out = tmp_path / "locked"
    (out / "held").mkdir(parents=True)
    lock = RunLock.acquire(str(out / "held"))  # this process holds the job's directory
    try:
        result = torchrun("locked", out, expect_ok=False)
    finally:
        lock.release()
    assert result.returncode != 0
    for rank in (0, 1):  # both ranks raised it at once: none waited for the other
        message = load(out, "locked", rank)["error"]
        assert f"is in use by another run: pid {os.getpid()}" in message
    assert "(raised on rank 0)" in load(out, "locked", 1)["error"]
    assert os.listdir(out / "held") == [".lossless_trainer.lock"]  # nothing else written


# --------------------------------------------------------------------------- elastic restarts


@pytest.fixture(scope="module")
def elastic_reference(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("elastic-reference")
    torchrun("elastic", out)
    return load(out, "elastic")


# A worker SIGKILLed inside a forward, halfway through writing a checkpoint (rank 0), as
# an epoch begins, after a step, and twice (then again in the restart's first step); and
# halfway through a checkpoint written in the background (async_checkpoint).
@pytest.mark.parametrize("kill", ["forward:7", "save:9", "epoch:12", "after_step:20",
                                  "first:8", "save:9:async"])
def test_torchrun_max_restarts_recovers_from_a_killed_worker_bit_identically(
        tmp_path, kill, elastic_reference):
    out = tmp_path / "elastic"
    out.mkdir()
    env = {key: value for key, value in os.environ.items()
           if key != "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"}  # torchrun's default: shared
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "--max-restarts=3", str(SCRIPT), "elastic", str(out)],
        capture_output=True, text=True, timeout=240, cwd=out, check=False,
        env={**env, "OMP_NUM_THREADS": "1", "KILL": kill.removesuffix(":async"),
             "ASYNC": "1" if kill.endswith(":async") else "0"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert (out / "killed").exists()  # the kill happened, and torchrun restarted the workers
    for rank in (0, 1):
        final = load(out, "elastic", rank)
        assert final["restarts"] == (2 if kill.startswith("first") else 1)
        assert final["resumed_from"] is not None and final["step"] == 36
        for key, value in elastic_reference["params"].items():
            assert torch.equal(final["params"][key], value), (kill, rank, key)
        for index, state in elastic_reference["optimizer"]["state"].items():
            for key, value in state.items():
                assert torch.equal(final["optimizer"]["state"][index][key], value)
