"""Checkpoints at scale: sharded (DCP) checkpoints, asynchronous sharded saves, resuming
on another number of processes, several torchrun agents (see scale_script.py)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import same_params, train
from scale_script import SAMPLES, Net

from lossless_trainer import relayout, sharded
from lossless_trainer.checkpoint import list_checkpoints
from lossless_trainer.export import export_model

SCRIPT = Path(__file__).resolve().parent / "scale_script.py"


def launch(out: Path, run: Path, nproc: int, env: dict[str, str] | None = None,
           expect_ok: bool = True, agents: int = 1) -> subprocess.CompletedProcess[str]:
    """scale_script.py on `nproc` processes (plain python for 1); with `agents`, as many
    torchrun agents of `nproc` each, meeting at a c10d rendezvous as separate nodes do."""
    out.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "OMP_NUM_THREADS": "1",
                "PYTHONPATH": str(SCRIPT.parent), **(env or {})}
    if nproc == 1 and agents == 1:
        command = [[sys.executable, str(SCRIPT), str(out), str(run)]]
    elif agents == 1:
        command = [[sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={nproc}", str(SCRIPT), str(out), str(run)]]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        command = [[sys.executable, "-m", "torch.distributed.run", f"--nnodes={agents}",
                    f"--nproc_per_node={nproc}", "--rdzv-backend=c10d",
                    f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=scale",
                    str(SCRIPT), str(out), str(run)]] * agents
    processes = [subprocess.Popen(c, cwd=out, env=full_env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for c in command]
    results = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=240)
        results.append(subprocess.CompletedProcess(process.args, process.returncode,
                                                   stdout, stderr))
    if expect_ok:
        for result in results:
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return results[0]


def final(out: Path, tag: str) -> dict:
    return torch.load(out / f"final-{tag}.pt", weights_only=True)


def assert_same_state(a: dict, b: dict) -> None:
    """Model and optimizer state (full, gathered) bit for bit."""
    assert a["model"].keys() == b["model"].keys()
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for name, entries in a["optimizer"]["state"].items():
        for key, value in entries.items():
            assert torch.equal(torch.as_tensor(value),
                               torch.as_tensor(b["optimizer"]["state"][name][key])), (name, key)


def served(out: Path, tag: str, ranks: int) -> list[dict]:
    entries = []
    for rank in range(ranks):
        with open(out / f"served-{tag}-rank{rank}.jsonl") as f:
            entries += [json.loads(line) for line in f]
    return entries


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """2 ranks under FSDP, sharded checkpoints every 4 steps, 2 epochs of 12 steps."""
    out = tmp_path_factory.mktemp("reference")
    launch(out, out / "run", 2, {"TAG": "ref"})
    return out


@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> Path:
    """The same run, rank 1 SIGKILLed after step 6: the newest checkpoint is step 4's."""
    out = tmp_path_factory.mktemp("killed")
    result = launch(out, out / "run", 2, {"TAG": "killed", "KILL_AT": "6"}, expect_ok=False)
    assert result.returncode != 0
    return out


def copy_run(killed: Path, tmp_path: Path) -> tuple[Path, Path]:
    shutil.copytree(killed / "run", tmp_path / "run")
    for name in os.listdir(killed):
        if name.startswith("served-killed"):
            shutil.copy(killed / name, tmp_path / name)
    return tmp_path, tmp_path / "run"


def test_fsdp_writes_sharded_checkpoints_and_a_rerun_after_sigkill_is_bit_identical(
        reference, killed, tmp_path):
    checkpoints = killed / "run" / "checkpoints"
    assert [os.path.basename(p) for _, p in list_checkpoints(str(checkpoints))] == \
        ["step-000000004"]
    step4 = checkpoints / "step-000000004"
    files = sorted(os.listdir(step4))
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "trainer.pt", "complete.json"} \
        <= set(files)  # each rank wrote its own shard file
    marker = json.loads((step4 / "complete.json").read_text())
    assert marker["step"] == 4 and marker["world_size"] == 2
    assert set(marker["files"]) == set(files) - {"complete.json"}
    assert final(reference, "ref")["format"] == "sharded"  # FSDP's default

    out, run = copy_run(killed, tmp_path)
    launch(out, run, 2, {"TAG": "rerun"})
    loaded = torch.load(out / "loaded-rerun.pt", weights_only=True)
    assert loaded["step"] == 4 and loaded["resumed_from"].endswith("step-000000004")
    assert final(out, "rerun")["step"] == 24
    assert_same_state(final(out, "rerun"), final(reference, "ref"))


@pytest.mark.parametrize("nproc", [1, 3])
def test_a_two_rank_run_killed_mid_epoch_resumes_on_another_number_of_processes(
        killed, tmp_path, nproc):
    out, run = copy_run(killed, tmp_path)
    result = launch(out, run, nproc, {"TAG": "resumed"})
    checkpoint = killed / "run" / "checkpoints" / "step-000000004"  # the copy's is pruned
    # Right after the load, the model and optimizer are the checkpoint's, resharded.
    loaded = torch.load(out / "loaded-resumed.pt", weights_only=True)
    assert loaded["step"] == 4
    assert_same_state(loaded, sharded.read_full(str(checkpoint)))
    # Every sample of the interrupted epoch exactly once: steps 1-4 of the killed run
    # (2 ranks x 4 samples), then the rest on `nproc` processes; and the next epoch too.
    before = [e for e in served(out, "killed", 2) if e["step"] <= 4]
    after = served(out, "resumed", nproc)
    assert min(e["step"] for e in after) == 5
    first_epoch = [i for e in before + after if e["epoch"] == 0 for i in e["indices"]]
    second_epoch = [i for e in after if e["epoch"] == 1 for i in e["indices"]]
    assert sorted(first_epoch) == list(range(SAMPLES))
    assert sorted(second_epoch) == list(range(SAMPLES))
    # 64 samples were left: 16 steps of 4 on one process; on 3, 5 steps of 12 and one
    # of 4 (2 + 1 + 1 samples).
    steps = {e["step"] for e in after if e["epoch"] == 0}
    assert len(steps) == (16 if nproc == 1 else 6)
    message = "the global batch changes: the checkpoint was trained with 2 process(es)"
    assert message in result.stderr
    assert ("set grad_accum_steps=2" in result.stderr) == (nproc == 1)
    if nproc == 1:  # the same checkpoint on the same number again: the same run
        again, run_again = copy_run(killed, tmp_path / "again")
        launch(again, run_again, nproc, {"TAG": "resumed"})
        assert_same_state(final(again, "resumed"), final(out, "resumed"))


def test_an_async_sharded_save_killed_before_its_marker_is_never_resumed(
        reference, tmp_path):
    out = tmp_path
    env = {"TAG": "async", "ASYNC": "1", "KILL_MARKER_AT": "8"}
    result = launch(out, out / "run", 2, env, expect_ok=False)
    assert result.returncode != 0
    incomplete = out / "run" / "checkpoints" / "step-000000008"
    assert incomplete.is_dir() and not (incomplete / "complete.json").exists()
    assert (incomplete / "trainer.pt").exists()  # everything but the marker was written
    result = launch(out, out / "run", 2, {"TAG": "async", "ASYNC": "1"})
    assert "is incomplete: it has no complete.json" in result.stderr
    assert "falling back to the previous checkpoint" in result.stderr
    loaded = torch.load(out / "loaded-async.pt", weights_only=True)
    assert loaded["resumed_from"].endswith("step-000000004")
    assert (out / "run" / "checkpoints" / "step-000000008.superseded").is_dir()
    assert_same_state(final(out, "async"), final(reference, "ref"))


def test_two_torchrun_agents_on_one_host_train_as_two_local_ranks(reference, tmp_path):
    launch(tmp_path, tmp_path / "run", 1, {"TAG": "nodes"}, agents=2)
    assert_same_state(final(tmp_path, "nodes"), final(reference, "ref"))


def test_a_full_ddp_checkpoint_resumes_on_one_process(tmp_path):
    env = {"STRATEGY": "ddp", "FORMAT": "full", "EPOCHS": "1"}
    result = launch(tmp_path, tmp_path / "run", 2, {**env, "TAG": "killed", "KILL_AT": "6"},
                    expect_ok=False)
    assert result.returncode != 0
    checkpoint = tmp_path / "run" / "checkpoints" / "step-000000004.pt"
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["world_size"] == 2
    launch(tmp_path, tmp_path / "run", 1, {**env, "TAG": "resumed"})
    loaded = torch.load(tmp_path / "loaded-resumed.pt", weights_only=True)
    for key, value in saved["model"].items():
        assert torch.equal(loaded["model"][key], value)
    before = [e for e in served(tmp_path, "killed", 2) if e["step"] <= 4]
    after = served(tmp_path, "resumed", 1)
    first_epoch = [i for e in before + after if e["epoch"] == 0 for i in e["indices"]]
    assert sorted(first_epoch) == list(range(SAMPLES))


def test_the_export_of_a_sharded_fsdp_checkpoint_loads_into_the_plain_model(
        reference, tmp_path):
    newest = list_checkpoints(str(reference / "run" / "checkpoints"))[-1][1]
    assert newest.endswith("step-000000024")
    expected = final(reference, "ref")["model"]
    for name in ("model.pt", "model.safetensors"):
        export_model(reference / "run", tmp_path / name)  # the run's newest checkpoint
        if name.endswith(".pt"):
            weights = torch.load(tmp_path / name, weights_only=True)
        else:
            from safetensors.torch import load_file
            weights = load_file(tmp_path / name)
        net = Net()
        net.load_state_dict(weights)
        net.eval()
        reference_net = Net()
        reference_net.load_state_dict(expected)
        reference_net.eval()
        x = torch.randn(5, 8)
        assert torch.equal(net((x, None)), reference_net((x, None)))


# ------------------------------------------------------------------ the order, in one process


@pytest.mark.parametrize("n,old,new,batch,steps_done,drop_last", [
    (96, 2, 3, 4, 4, False), (96, 2, 1, 4, 4, False), (97, 2, 3, 4, 5, False),
    (50, 4, 3, 2, 3, False), (41, 3, 2, 5, 1, False), (41, 3, 2, 5, 1, True),
    (20, 2, 5, 3, 1, False), (12, 4, 3, 1, 2, False)])
def test_the_rest_of_an_epoch_is_every_remaining_sample_once(
        n, old, new, batch, steps_done, drop_last):
    from torch.utils.data import DataLoader, DistributedSampler

    data = list(range(n))
    served = []
    layouts = []
    for rank in range(old):
        loader = DataLoader(data, batch_size=batch, drop_last=drop_last,
                            sampler=DistributedSampler(data, old, rank, shuffle=True, seed=3))
        loader.sampler.set_epoch(2)
        served += [i for b in list(loader)[:steps_done] for i in b.tolist()]
        layouts.append(relayout.describe(loader))
    order = layouts[0]
    start = relayout.position(order, steps_done)
    assert start == steps_done * old * batch
    new_loader = DataLoader(data, batch_size=batch, drop_last=drop_last)
    rest = []
    lengths = set()
    for rank in range(new):
        mine, layout = relayout.remaining_batches(order, start, steps_done, new_loader,
                                                  rank, new)
        lengths.add(len(mine))
        assert all(b for b in mine)  # no empty batch
        rest += [i for b in mine for i in b]
    assert len(lengths) == 1  # every rank runs the same number of steps
    assert relayout.position(layout, steps_done + lengths.pop()) == layout["end"]
    everything = served + rest
    if drop_last:  # what an uninterrupted epoch trains on, less at most a step's worth
        assert len(set(everything)) == len(everything)
        assert n - len(everything) < new * batch + old * batch
    else:
        assert sorted(set(everything)) == list(range(n)) and len(everything) == n


def test_fewer_samples_left_than_processes_repeat_one_with_a_warning():
    from torch.utils.data import DataLoader

    order = relayout.describe(DataLoader(list(range(10)), batch_size=2))
    with pytest.warns(UserWarning, match="only 2 sample"):
        batches = [relayout.remaining_batches(order, 8, 4, DataLoader(list(range(10)),
                                                                      batch_size=2), r, 3)[0]
                   for r in range(3)]
    assert [len(b) for b in batches] == [1, 1, 1]
    assert sorted({i for b in batches for i in b[0]}) == [8, 9]


def test_the_seed_of_a_new_rank_is_derived_from_seed_step_and_rank():
    seeds = {relayout.derived_seed(s, step, r) for s in (None, 1) for step in (4, 5)
             for r in (2, 3)}
    assert len(seeds) == 8 and all(0 <= s < 2**63 for s in seeds)
    assert relayout.derived_seed(None, 4, 2) == relayout.derived_seed(0, 4, 2)


def test_the_global_batch_warning_names_what_keeps_it():
    saved = {"world_size": 4, "grad_accum_steps": 1, "batch_size": 8}
    assert relayout.batch_change(saved, 4, 1, 8) is None
    assert relayout.batch_change(saved, 2, 2, 8) is None  # kept by accumulation
    message = relayout.batch_change(saved, 2, 1, 8)
    assert "4 process(es) x 1 micro-batch(es) x 8 = 32" in message
    assert "2 process(es) x 1 micro-batch(es) x 8 = 16" in message
    assert "set grad_accum_steps=2" in message
    assert "set grad_accum_steps=4" in relayout.batch_change(saved, 1, 1, 8)
    assert "batch_size=4" in relayout.batch_change(saved, 8, 1, 8)


# ------------------------------------------------------------- sharded, in one process


def sharded_dir(tmp_path: Path, step: int) -> Path:
    return tmp_path / "checkpoints" / f"step-{step:09d}"


@pytest.mark.parametrize("async_checkpoint", [False, True])
def test_sharded_checkpoints_of_one_process_resume_bit_identically(
        tmp_path, uninterrupted, async_checkpoint):
    options = {"checkpoint_format": "sharded", "async_checkpoint": async_checkpoint}
    train(tmp_path, max_steps=15, **options)
    names = [os.path.basename(p) for _, p in list_checkpoints(str(tmp_path / "checkpoints"))]
    assert names == ["step-000000006", "step-000000012", "step-000000015"]  # keep_last=3
    trainer, model = train(tmp_path, **options)
    assert trainer.resumed_from.endswith("step-000000015")
    assert same_params(model, uninterrupted[0])


@pytest.mark.parametrize("damage", ["no-marker", "flipped-shard", "missing-shard",
                                    "missing-trainer", "bad-marker"])
def test_a_damaged_sharded_checkpoint_falls_back_with_a_warning(
        tmp_path, uninterrupted, damage):
    train(tmp_path, max_steps=18, checkpoint_format="sharded")
    newest = sharded_dir(tmp_path, 18)
    if damage == "no-marker":
        os.unlink(newest / "complete.json")
        expected = "is incomplete: it has no complete.json"
    elif damage == "flipped-shard":
        shard = newest / "__0_0.distcp"
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0x10
        shard.write_bytes(bytes(data))
        expected = r"is corrupt: __0_0\.distcp does not match the hash"
    elif damage == "missing-shard":
        os.unlink(newest / "__0_0.distcp")
        expected = r"is incomplete: __0_0\.distcp cannot be read"
    elif damage == "missing-trainer":
        os.unlink(newest / "trainer.pt")
        expected = r"is incomplete: trainer\.pt cannot be read"
    else:
        (newest / "complete.json").write_text("{not json")
        expected = "is corrupt: its complete.json cannot be read"
    assert sharded.verify(str(newest)) is not None
    with pytest.warns(UserWarning, match=rf"step-000000018 {expected}.*falling back"):
        trainer, model = train(tmp_path, checkpoint_format="sharded")
    assert trainer.resumed_from.endswith("step-000000012")
    assert (tmp_path / "checkpoints" / "step-000000018.superseded").is_dir()  # kept, aside
    assert same_params(model, uninterrupted[0])


def test_a_sharded_run_resumes_from_a_full_checkpoint_and_back(tmp_path, uninterrupted):
    train(tmp_path, max_steps=8, checkpoint_format="full")
    train(tmp_path, max_steps=16, checkpoint_format="sharded")
    names = [os.path.basename(p) for _, p in list_checkpoints(str(tmp_path / "checkpoints"))]
    assert names == ["step-000000008.pt", "step-000000012", "step-000000016"]
    trainer, model = train(tmp_path, checkpoint_format="full")
    assert trainer.resumed_from.endswith("step-000000016")
    assert same_params(model, uninterrupted[0])


def test_load_checkpoint_then_fit_continues_from_it(tmp_path, uninterrupted):
    train(tmp_path / "a", max_steps=12, checkpoint_format="sharded")
    torch.manual_seed(0)
    from conftest import TinyClassifier, shuffled_loader

    from lossless_trainer import Trainer

    trainer = Trainer(TinyClassifier(dropout=0.3), shuffled_loader(), max_steps=24,
                      log_dir=str(tmp_path / "b"), checkpoint_every=6, log_every=4, seed=1,
                      progress=False, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    trainer.load_checkpoint(sharded_dir(tmp_path / "a", 12))
    assert trainer.state.step == 12
    trainer.fit()
    assert same_params(trainer.model, uninterrupted[0])
    assert os.listdir(sharded_dir(tmp_path / "a", 12))  # the source is left as it was


def test_export_and_its_command_line_read_a_sharded_checkpoint(tmp_path):
    from lossless_trainer.export import main

    trainer, model = train(tmp_path, max_steps=6, checkpoint_format="sharded")
    assert main([str(sharded_dir(tmp_path, 6)), str(tmp_path / "w.pt")]) == 0
    weights = torch.load(tmp_path / "w.pt", weights_only=True)
    assert weights.keys() == model.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    (sharded_dir(tmp_path, 6) / "complete.json").unlink()
    assert main([str(sharded_dir(tmp_path, 6)), str(tmp_path / "x.pt")]) == 1
    assert not (tmp_path / "x.pt").exists()


def test_the_best_checkpoint_is_a_directory_when_sharded(tmp_path):
    from conftest import ValLossClassifier, make_batches

    from lossless_trainer import BestCheckpoint, Trainer

    trainer = Trainer(ValLossClassifier(), make_batches(4), eval_data=make_batches(2, seed=1),
                      eval_every=2, max_steps=4, log_dir=str(tmp_path), progress=False,
                      checkpoint_format="sharded",
                      callbacks=[BestCheckpoint(monitor="val_loss")])
    trainer.fit()
    best = tmp_path / "checkpoints" / "best"
    assert (best / "complete.json").exists() and sharded.verify(str(best)) is None


def test_a_wrong_checkpoint_format_is_refused():
    from conftest import TinyClassifier, make_batches

    from lossless_trainer import Trainer

    with pytest.raises(ValueError, match="checkpoint_format must be 'auto', 'full' or "
                                         "'sharded', got 'dcp'"):
        Trainer(TinyClassifier(), make_batches(2), checkpoint_format="dcp")


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_a_sharded_checkpoint_before_the_first_step_leaves_the_optimizer_unstepped(
        tmp_path, optimizer):
    from conftest import TinyClassifier, make_batches

    from lossless_trainer import Trainer

    def build():
        torch.manual_seed(0)
        factory = (lambda p: torch.optim.AdamW(p, lr=1e-2)) if optimizer == "adamw" \
            else (lambda p: torch.optim.SGD(p, lr=0.1))
        return Trainer(TinyClassifier(), make_batches(4), max_steps=3, log_dir=str(tmp_path),
                       progress=False, checkpoint_format="sharded", optimizer=factory)

    trainer = build()
    trainer.save_checkpoint(sharded_dir(tmp_path, 0))
    assert not trainer.optimizer.state  # saving did not step it
    resumed = build()
    resumed.load_checkpoint(sharded_dir(tmp_path, 0))
    assert not resumed.optimizer.state
    resumed.fit()
    fresh = build()
    fresh.log_dir = str(tmp_path / "other")
    fresh.checkpoint_dir = str(tmp_path / "other" / "checkpoints")
    fresh.fit()
    assert same_params(resumed.model, fresh.model)
