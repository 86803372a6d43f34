"""Peak memory of one training step: separated loss function against a model that owns its loss.

The separated style is ``loss_fn(net(inputs), targets)``: the network returns every
prediction the loss needs, so all of them exist at once when the loss function runs,
and no part of the loss can be fused with, or recomputed alongside, the layer that
produced its input. Here it is the library's own adapter, `WithLoss(net, loss_fn)`. The
no-separation style is a `Model` whose forward computes each loss term as soon as its
input exists, so the full-size prediction is freed (or, with
`torch.utils.checkpoint`, never kept) once its scalar loss is known. Both styles share
the same network modules, weights, batch and training step::

    losses = model(batch); total = left fold of losses.values(); total.backward()

Cases (each with its own honest reason for a difference):

* ``multiscale``: deep supervision for segmentation. A 4-stage conv backbone has a
  1x1-conv head at every stage whose logits are upsampled to full input resolution and
  scored with per-pixel cross-entropy against the full-resolution mask. Separated, the
  network returns the four ``[N, classes, H, W]`` predictions together.
* ``vocab``: a large output vocabulary (a language-model-like head). Separated, the
  network returns the ``[tokens, vocab]`` logits. Owned, the loss is computed from the
  hidden states, in chunks of rows.

Styles:

* ``separated``: ``WithLoss(net, loss_fn)``.
* ``owned``: the same computation written inside ``forward``, nothing else changed: each
  prediction is dropped as soon as its loss is computed. No extra compute.
* ``owned-ckpt``: each scale's head + upsample + loss (multiscale), or each chunk's
  projection + loss (vocab), runs under ``torch.utils.checkpoint``: only the scalar loss
  and the (already live) input features survive the forward pass, and the full-size
  tensors are recomputed one at a time in backward. Costs one extra head forward.

Method:

* Before measuring, all three styles are run in this process on the same weights and
  batch, and the script checks that they give the same total loss and the same
  gradients (``torch.allclose``); it exits with status 1 if not.
* Every measurement runs in a process of its own, so no allocator cache or heap
  fragmentation carries over from one style to the other. To pay the interpreter
  start-up and imports once rather than per measurement, these processes are forked from
  a server process that has imported torch and lossless_trainer and done nothing else
  (a new interpreter per measurement where `os.fork` is missing). The process builds the
  model and batch, runs one warm-up step (lazy initialisation of kernels and thread
  pools), then measures ``--steps`` steps (forward + backward), dropping the gradients
  and resetting the peak before each.
* CUDA: ``torch.cuda.reset_peak_memory_stats`` before the step, then
  ``torch.cuda.max_memory_allocated`` minus the memory allocated before it.
* CPU: ``tracemalloc`` cannot see PyTorch's C++ allocations, so the script measures the
  peak resident set size: it resets the kernel's high-water mark by writing ``5`` to
  ``/proc/self/clear_refs``, and reports ``VmHWM`` after the step minus ``VmRSS`` before
  it (from ``/proc/self/status``). If the reset is unavailable, the warm-up is skipped and
  ``ru_maxrss`` minus ``VmRSS`` before the step is used instead. The method is printed.
* On CPU, glibc's malloc caches freed memory in its heap and raises its mmap threshold
  dynamically, so RSS would follow its caching policy rather than the tensors alive
  (memory freed by the warm-up step is reused without showing in the peak). The
  measuring processes therefore run with ``MALLOC_MMAP_THRESHOLD_=65536``: every buffer
  of 64 KiB or more is its own mapping, returned to the system when freed, so the
  resident set follows the live tensors. ``--default-malloc`` turns this off. Fresh
  mappings are page-faulted in at every step, so step times here include that cost.
* With ``--processes N``, each style is measured in N processes, styles interleaved with
  alternating order. The table shows the median peak over all measured steps, its range,
  the median step time, the memory saved against the separated style, and the ratio of
  the separated style's median peak to each style's.

Usage::

    python benchmarks/memory.py                 # both cases, about 30 s on 2 CPU cores
    python benchmarks/memory.py --quick         # small sizes, a few seconds
    python benchmarks/memory.py --device cuda   # peak CUDA memory instead of RSS

The exit status is 0 unless the styles disagree on the loss or the gradients.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lossless_trainer import Model, WithLoss

STYLES = ("separated", "owned", "owned-ckpt")
STYLE_HELP = {
    "separated": "WithLoss(net, loss_fn): net returns every prediction",
    "owned": "loss computed in forward, prediction dropped at once",
    "owned-ckpt": "as owned, head + loss under torch.utils.checkpoint",
}
MB = 1e6


# --------------------------------------------------------------------------------------
# multiscale: deep supervision over several full-resolution predictions


class MultiScaleNet(nn.Module):
    """Predictions only: a strided conv backbone with a segmentation head per stage.

    Args:
        widths: Channels of each stage; each stage halves the resolution.
        classes: Number of segmentation classes.
    """

    def __init__(self, widths: Sequence[int], classes: int) -> None:
        super().__init__()
        stages: list[nn.Module] = []
        fan_in = 3
        for width in widths:
            stages.append(nn.Sequential(
                nn.Conv2d(fan_in, width, 3, stride=2, padding=1), nn.ReLU(),
                nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
            ))
            fan_in = width
        self.stages = nn.ModuleList(stages)
        self.heads = nn.ModuleList(nn.Conv2d(width, classes, 1) for width in widths)

    def features(self, images: torch.Tensor) -> Iterator[torch.Tensor]:
        """Each stage's feature map, produced lazily, coarser each time."""
        x = images
        for stage in self.stages:
            x = stage(x)
            yield x

    def predict_scale(self, index: int, feature: torch.Tensor,
                      size: Sequence[int]) -> torch.Tensor:
        """Class logits of one stage, upsampled to the full input resolution."""
        return F.interpolate(self.heads[index](feature), size=tuple(size), mode="bilinear",
                             align_corners=False)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """One ``[N, classes, H, W]`` prediction per stage."""
        size = images.shape[-2:]
        return [self.predict_scale(i, f, size) for i, f in enumerate(self.features(images))]


def deep_supervision_loss(predictions: list[torch.Tensor],
                          target: torch.Tensor) -> dict[str, torch.Tensor]:
    """The separated loss function: per-pixel cross-entropy at every scale, averaged."""
    scale = 1.0 / len(predictions)
    return {f"ce/scale{i}": F.cross_entropy(p, target) * scale
            for i, p in enumerate(predictions)}


class OwnedMultiScale(Model):
    """The same network and loss, with each scale's loss computed as its map appears.

    Args:
        net: The predictions-only network (shared, so weights are identical).
        checkpointed: Run each scale's head, upsampling and loss under
            `torch.utils.checkpoint`, so the full-resolution logits are never kept.
    """

    def __init__(self, net: MultiScaleNet, checkpointed: bool) -> None:
        super().__init__()
        self.net = net
        self.checkpointed = checkpointed

    def _scale_loss(self, index: int, feature: torch.Tensor,
                    target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.net.predict_scale(index, feature, target.shape[-2:]),
                               target)

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> Any:
        images, target = batch
        if not self.training:
            return self.net(images)
        scale = 1.0 / len(self.net.heads)
        losses = {}
        for i, feature in enumerate(self.net.features(images)):
            if self.checkpointed:
                loss = checkpoint(self._scale_loss, i, feature, target, use_reentrant=False)
            else:
                loss = self._scale_loss(i, feature, target)
            losses[f"ce/scale{i}"] = loss * scale
        return losses


# --------------------------------------------------------------------------------------
# vocab: cross-entropy over a large output vocabulary


class TokenNet(nn.Module):
    """Predictions only: embedding, a residual MLP, layer norm, and a vocabulary head.

    Args:
        vocab: Vocabulary size (input and output).
        dim: Hidden width.
    """

    def __init__(self, vocab: int, dim: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, T, dim]`` hidden states, before the vocabulary head."""
        x = self.embed(tokens)
        return self.norm(x + self.mlp(x))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, T, vocab]`` logits."""
        return self.lm_head(self.hidden(tokens))


def token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The separated loss function: mean cross-entropy over all tokens."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


class OwnedTokens(Model):
    """The same network and loss, computed from the hidden states inside forward.

    Args:
        net: The predictions-only network (shared, so weights are identical).
        chunk: With a chunk size, the loss is a sum over chunks of this many rows, each
            under `torch.utils.checkpoint`, so at most one chunk of logits exists at a
            time. Without one, the full logits are computed and dropped after the loss.
    """

    def __init__(self, net: TokenNet, chunk: int | None) -> None:
        super().__init__()
        self.net = net
        self.chunk = chunk

    def _chunk_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.net.lm_head(hidden), targets, reduction="sum")

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> Any:
        tokens, targets = batch
        if not self.training:
            return self.net(tokens)
        hidden = self.net.hidden(tokens).flatten(0, 1)
        targets = targets.flatten()
        if self.chunk is None:
            return {"ce": F.cross_entropy(self.net.lm_head(hidden), targets)}
        total = None
        for h, t in zip(hidden.split(self.chunk), targets.split(self.chunk)):
            part = checkpoint(self._chunk_loss, h, t, use_reentrant=False)
            total = part if total is None else total + part
        return {"ce": total / targets.numel()}


# --------------------------------------------------------------------------------------
# cases


Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Case:
    """One benchmark model: how to build its network, batch and three styles.

    Args:
        name: Command-line name.
        summary: One line describing it, with the sizes that matter.
        build: ``build(style, device, seed) -> (model, batch)``.
    """

    name: str
    summary: str
    build: Callable[[str, torch.device, int], tuple[nn.Module, Batch]]


def multiscale_case(batch: int, size: int, classes: int, widths: Sequence[int]) -> Case:
    """Deep supervision: one full-resolution prediction per backbone stage."""

    def build(style: str, device: torch.device, seed: int) -> tuple[nn.Module, Batch]:
        torch.manual_seed(seed)
        net = MultiScaleNet(widths, classes)
        if style == "separated":
            model: nn.Module = WithLoss(net, deep_supervision_loss)
        else:
            model = OwnedMultiScale(net, checkpointed=style == "owned-ckpt")
        generator = torch.Generator().manual_seed(seed + 1)
        images = torch.randn(batch, 3, size, size, generator=generator)
        target = torch.randint(0, classes, (batch, size, size), generator=generator)
        return model.to(device).train(), (images.to(device), target.to(device))

    prediction = batch * classes * size * size * 4 / MB
    return Case("multiscale",
                f"deep supervision: {len(widths)} scales, batch {batch}, {size}x{size} images, "
                f"{classes} classes, widths {tuple(widths)}; each full-resolution "
                f"prediction {prediction:.1f} MB", build)


def vocab_case(batch: int, seq: int, vocab: int, dim: int, chunk: int) -> Case:
    """Large-vocabulary cross-entropy: ``[tokens, vocab]`` logits."""

    def build(style: str, device: torch.device, seed: int) -> tuple[nn.Module, Batch]:
        torch.manual_seed(seed)
        net = TokenNet(vocab, dim)
        if style == "separated":
            model: nn.Module = WithLoss(net, token_loss)
        else:
            model = OwnedTokens(net, chunk=chunk if style == "owned-ckpt" else None)
        generator = torch.Generator().manual_seed(seed + 1)
        tokens = torch.randint(0, vocab, (batch, seq + 1), generator=generator)
        return model.to(device).train(), (tokens[:, :-1].to(device), tokens[:, 1:].to(device))

    logits = batch * seq * vocab * 4 / MB
    return Case("vocab",
                f"large vocabulary: {batch}x{seq} tokens, vocab {vocab}, hidden {dim}, "
                f"chunks of {chunk} rows; full logits {logits:.1f} MB", build)


CASES: dict[str, dict[str, Case]] = {
    "full": {
        "multiscale": multiscale_case(batch=2, size=256, classes=32, widths=(32, 64, 128, 256)),
        "vocab": vocab_case(batch=2, seq=512, vocab=16384, dim=128, chunk=128),
    },
    "quick": {
        "multiscale": multiscale_case(batch=2, size=128, classes=16, widths=(8, 16, 32, 64)),
        "vocab": vocab_case(batch=2, seq=256, vocab=4096, dim=64, chunk=128),
    },
}


def get_case(name: str, quick: bool) -> Case:
    """The case called `name`, at quick or full size."""
    return CASES["quick" if quick else "full"][name]


# --------------------------------------------------------------------------------------
# the step, and the equivalence check


def train_step(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The trainer's step without the optimizer: sum the losses and backpropagate.

    Returns:
        The detached total loss.
    """
    losses = iter(model(batch).values())
    total = next(losses)
    for extra in losses:
        total = total + extra
    total.backward()
    return total.detach()


@dataclass
class Check:
    """How far each style's loss and gradients are from the separated style's."""

    losses: dict[str, float]
    max_grad_diff: dict[str, float]
    ok: bool


def check_equivalence(case: Case, device: torch.device, seed: int = 0,
                      rtol: float = 1e-4, atol: float = 1e-6) -> Check:
    """Run every style on the same weights and batch; compare loss and gradients.

    Args:
        case: The case to check.
        device: Where to run.
        seed: Seed for weights and batch (identical for every style).
        rtol: Relative tolerance of `torch.allclose`.
        atol: Absolute tolerance of `torch.allclose`.

    Returns:
        The losses, the largest absolute gradient difference per style, and whether
        every style matched the separated one within tolerance.
    """
    reference: tuple[torch.Tensor, list[torch.Tensor]] | None = None
    losses, diffs, ok = {}, {}, True
    for style in STYLES:
        model, batch = case.build(style, device, seed)
        loss = train_step(model, batch)
        grads = [p.grad.detach().clone() for p in model.parameters()]
        if any(g is None for g in grads):
            raise RuntimeError(f"{case.name}/{style}: a parameter received no gradient")
        losses[style] = loss.item()
        if reference is None:
            reference = (loss, grads)
            diffs[style] = 0.0
            continue
        ref_loss, ref_grads = reference
        diffs[style] = max((g - r).abs().max().item() for g, r in zip(grads, ref_grads))
        ok &= bool(torch.allclose(loss, ref_loss, rtol=rtol, atol=atol))
        ok &= all(torch.allclose(g, r, rtol=rtol, atol=atol) for g, r in zip(grads, ref_grads))
        del model, batch, grads
    return Check(losses, diffs, ok)


# --------------------------------------------------------------------------------------
# measurement (each in a process of its own)


def _status_bytes(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field}")
    return int(match.group(1)) * 1024


def reset_peak_rss() -> None:
    """Reset the kernel's resident-set high-water mark (VmHWM) to the current RSS."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")


def peak_reset_works() -> bool:
    """Whether `reset_peak_rss` is available and takes effect in this process."""
    try:
        # 64 MiB is above glibc's largest dynamic mmap threshold (32 MiB), so it is
        # returned to the system when freed, leaving VmHWM above VmRSS.
        probe = torch.ones(64 * 2**20 // 4)
        del probe
        before = _status_bytes("VmHWM")
        reset_peak_rss()
        return _status_bytes("VmHWM") < before
    except (OSError, RuntimeError):
        return False


def measure(case: Case, style: str, device: torch.device, seed: int,
            steps: int) -> list[dict[str, Any]]:
    """Peak memory of `steps` training steps of `style`, each above the memory held before it.

    Returns:
        One ``{"peak": bytes, "baseline": bytes, "seconds": step time, "method": text}`` per
        measured step.
    """
    model, batch = case.build(style, device, seed)
    if device.type == "cuda":
        train_step(model, batch)  # warm-up: cuBLAS/cuDNN workspaces, kernel selection
        reports = []
        for _ in range(steps):
            model.zero_grad(set_to_none=True)
            gc.collect()
            torch.cuda.synchronize(device)
            baseline = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            train_step(model, batch)
            torch.cuda.synchronize(device)
            seconds = time.perf_counter() - start
            peak = torch.cuda.max_memory_allocated(device) - baseline
            reports.append({"peak": peak, "baseline": baseline, "seconds": seconds,
                            "method": "CUDA torch.cuda.max_memory_allocated minus "
                                      "memory allocated before the step"})
        return reports
    if not sys.platform.startswith("linux"):
        raise SystemExit("CPU peak memory is read from /proc/self/status: Linux only. "
                         "Use --device cuda elsewhere.")
    resettable = peak_reset_works()
    if resettable:  # without a reset, the warm-up's peak would hide the step's
        train_step(model, batch)
    else:
        steps = 1  # ru_maxrss covers the whole process: only its first step can be seen
    reports = []
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        gc.collect()
        baseline = _status_bytes("VmRSS")
        if resettable:
            reset_peak_rss()
        start = time.perf_counter()
        train_step(model, batch)
        seconds = time.perf_counter() - start
        if resettable:
            peak = _status_bytes("VmHWM") - baseline
            method = ("CPU peak RSS: VmHWM (reset via /proc/self/clear_refs) minus VmRSS "
                      "before the step")
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
            method = "CPU peak RSS: ru_maxrss minus VmRSS before the step (no warm-up step)"
        reports.append({"peak": peak, "baseline": baseline, "seconds": seconds,
                        "method": method})
    return reports


def worker_command(args: argparse.Namespace, mode: list[str]) -> list[str]:
    """Command line of a measuring process, with the options that shape the case."""
    command = [sys.executable, os.path.abspath(__file__), *mode, "--device", args.device,
               "--threads", str(args.threads), "--seed", str(args.seed)]
    return [*command, "--quick"] if args.quick else command


def serve(args: argparse.Namespace) -> None:
    """Measure on request, each request in a child forked from this pristine process.

    Reads one JSON request ``{"case", "style", "steps"}`` per line from stdin and answers
    with one JSON line: ``{"reports": [...]}`` or ``{"error": traceback}``. This process
    only imports; it never runs a step, so every child starts from the same allocator
    state with nothing left over from another measurement, and the interpreter start-up
    and imports (several seconds, most of a small measurement) are paid once. It makes
    no torch call either: forking after CUDA or the OpenMP thread pool has started would
    leave the child unable to use them.
    """
    for line in sys.stdin:
        request = json.loads(line)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: measure, answer through the pipe, exit without cleanup
            os.close(read_end)
            try:
                torch.set_num_threads(args.threads)
                device = torch.empty(0, device=args.device).device
                case = get_case(request["case"], args.quick)
                answer = {"reports": measure(case, request["style"], device, args.seed,
                                             request["steps"])}
            except BaseException:  # reported to the parent, which raises it
                answer = {"error": traceback.format_exc()}
            with os.fdopen(write_end, "w", encoding="utf-8") as pipe:
                pipe.write(json.dumps(answer))
            os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end, encoding="utf-8") as pipe:
            answer_text = pipe.read()
        os.waitpid(pid, 0)
        print(answer_text or json.dumps({"error": "the measuring child died"}), flush=True)


class Workers:
    """Runs each measurement in a fresh process: forked from a server if possible.

    Use as a context manager. Where `os.fork` exists, one server process (`serve`) is
    started and each measurement is a child forked from it; elsewhere each measurement
    is a new interpreter. Either way the process that measures has run nothing before.

    Args:
        args: The parsed command line (case sizes, device, threads, seed, malloc mode).
    """

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.env = dict(os.environ)
        if not args.default_malloc:
            self.env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # read by glibc at process start
        self.server: subprocess.Popen[str] | None = None

    def __enter__(self) -> Workers:
        if hasattr(os, "fork"):
            self.server = subprocess.Popen(
                worker_command(self.args, ["--serve"]), stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, text=True, env=self.env)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.server is not None:
            self.server.stdin.close()
            self.server.wait()

    def measure(self, case: str, style: str, steps: int) -> list[dict[str, Any]]:
        """`steps` measured steps of one style, in a process of their own."""
        if self.server is None:
            command = worker_command(self.args, ["--worker", case, style, "--steps",
                                                 str(steps)])
            result = subprocess.run(command, capture_output=True, text=True, env=self.env,
                                    check=False)
            if result.returncode != 0:
                raise RuntimeError(f"measuring {case}/{style} failed:\n{result.stderr}")
            return json.loads(result.stdout.strip().splitlines()[-1])
        self.server.stdin.write(json.dumps({"case": case, "style": style, "steps": steps})
                                + "\n")
        self.server.stdin.flush()
        answer = json.loads(self.server.stdout.readline() or '{"error": "server exited"}')
        if "error" in answer:
            raise RuntimeError(f"measuring {case}/{style} failed:\n{answer['error']}")
        return answer["reports"]


# --------------------------------------------------------------------------------------
# report


def print_table(case: Case, runs: dict[str, list[dict[str, Any]]]) -> None:
    """One row per style: median peak, range, step time, saving and ratio against separated."""
    peaks = {style: statistics.median(r["peak"] for r in runs[style]) for style in STYLES}
    header = (f"{'style':<11} {'peak MB':>8} {'range MB':>13} {'step s':>7} "
              f"{'saved MB':>8} {'separated/style':>15}  how")
    print(header)
    print("-" * (len(header) + 50))
    for style in STYLES:
        values = [r["peak"] / MB for r in runs[style]]
        seconds = statistics.median(r["seconds"] for r in runs[style])
        span = f"{min(values):.1f}-{max(values):.1f}"
        print(f"{style:<11} {peaks[style] / MB:>8.1f} {span:>13} {seconds:>7.3f} "
              f"{(peaks['separated'] - peaks[style]) / MB:>8.1f} "
              f"{peaks['separated'] / peaks[style]:>15.2f}  {STYLE_HELP[style]}")
    for style in STYLES[1:]:
        print(f"ratio separated/{style} ({case.name}): "
              f"{peaks['separated'] / peaks[style]:.2f}")


def machine_line(device: torch.device, malloc: str) -> str:
    """Platform, CPU count, versions, threads and allocator mode."""
    return (f"machine: {platform.platform()} | {os.cpu_count()} CPUs | "
            f"python {platform.python_version()} | torch {torch.__version__} | "
            f"threads {torch.get_num_threads()} | device {device} | malloc {malloc}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat")
    parser.add_argument("--cases", nargs="+", default=list(CASES["full"]),
                        choices=list(CASES["full"]), help="cases to run (default: all)")
    parser.add_argument("--processes", type=int, default=1,
                        help="fresh processes per style, interleaved (default: 1)")
    parser.add_argument("--steps", type=int, default=None,
                        help="measured steps per process (default: 3, quick: 2)")
    parser.add_argument("--device", default="cpu", help="device to run on (default: cpu)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default: 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--default-malloc", action="store_true",
                        help="keep glibc's dynamic mmap threshold (see the module docs)")
    parser.add_argument("--worker", nargs=2, metavar=("CASE", "STYLE"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve:  # before any torch call: see `serve`
        serve(args)
        return 0
    torch.set_num_threads(args.threads)
    device = torch.empty(0, device=args.device).device
    if args.worker:
        case_name, style = args.worker
        case = get_case(case_name, args.quick)
        print(json.dumps(measure(case, style, device, args.seed, args.steps or 1)))
        return 0

    steps = args.steps or (2 if args.quick else 3)
    malloc = ("n/a" if device.type == "cuda" else
              "glibc default" if args.default_malloc else "MALLOC_MMAP_THRESHOLD_=65536")
    print(machine_line(device, malloc), flush=True)
    status = 0
    with Workers(args) as workers:
        status = run_cases(args, device, workers, steps)
    return status


def run_cases(args: argparse.Namespace, device: torch.device, workers: Workers,
              steps: int) -> int:
    """Check and measure every requested case; print a table for each.

    Returns:
        0, or 1 if some case's styles disagree on the loss or the gradients.
    """
    status = 0
    for name in args.cases:
        case = get_case(name, args.quick)
        started = time.perf_counter()
        print(f"\n{case.name}: {case.summary}")
        check = check_equivalence(case, device, args.seed)
        losses = ", ".join(f"{s} {v:.6f}" for s, v in check.losses.items())
        diffs = ", ".join(f"{s} {check.max_grad_diff[s]:.1e}" for s in STYLES[1:])
        print(f"check: loss {losses}; max |grad - separated grad|: {diffs} -> "
              + ("MATCH" if check.ok else "MISMATCH"))
        if not check.ok:
            status = 1
        runs: dict[str, list[dict[str, Any]]] = {style: [] for style in STYLES}
        order = [style for i in range(args.processes)
                 for style in (STYLES if i % 2 == 0 else STYLES[::-1])]
        for style in order:
            runs[style].extend(workers.measure(name, style, steps))
        print(f"method: {runs['separated'][0]['method']}; median of {len(runs['separated'])} "
              f"steps ({args.processes} new process(es) per style, {steps} steps each); "
              "memory held before the step (runtime, model, batch: "
              f"{statistics.median(r['baseline'] for r in runs['separated']) / MB:.0f} MB) "
              "not included")
        print_table(case, runs)
        print(f"  ({time.perf_counter() - started:.1f}s)", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
