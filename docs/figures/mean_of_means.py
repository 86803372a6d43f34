"""Draw docs/images/mean_of_means.svg: the exact mean against the mean of means.

Trains examples/language_model.py twice from the same seed, with the same batches, under
gradient accumulation: once with its loss ``Mean(nll_sum, n_tokens)`` (the trainer divides
by the tokens of the whole step), once with each micro-batch's own mean
``nll_sum / n_tokens`` as a plain loss (the trainer then averages the micro-batch means).
Both runs log the exact per-token training loss with ``write_summary("exact_nll", Mean(...))``
and evaluate the exact held-out loss per character every 25 steps; the figure plots those,
and the mean of means the second run reports as its ``loss/nll``.

    python docs/figures/mean_of_means.py                    # about three minutes on a CPU
    python docs/figures/mean_of_means.py --seeds 0 1 2      # the gap for several seeds

Needs nothing beyond the example's dependencies: the SVG is written by hand.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

from lossless_trainer import Mean, write_summary

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("language_model",
                                              ROOT / "examples" / "language_model.py")
lm = importlib.util.module_from_spec(spec)
sys.modules["language_model"] = lm
spec.loader.exec_module(lm)


class ExactMean(lm.CharTransformer):
    """The example's model, also logging its loss as ``exact_nll``."""

    def forward(self, batch):
        out = super().forward(batch)
        if self.training:
            write_summary("exact_nll", Mean(out["nll"].total.detach(), out["nll"].count))
        return out


class MeanOfMeans(lm.CharTransformer):
    """The same model returning each micro-batch's own mean as a plain loss: what a
    trainer that only sees one number per micro-batch computes."""

    count_items = None  # its loss is not a Mean: the trainer has nothing to count

    def forward(self, batch):
        out = super().forward(batch)
        if not self.training:
            return out
        nll = out["nll"]
        write_summary("exact_nll", Mean(nll.total.detach(), nll.count))
        return {"nll": nll.total / nll.count}


def run(model_class: type, seed: int, log_dir: str, steps: int | None) -> dict[str, list]:
    held_out = lm.main(log_dir=log_dir, progress=False, eval_every=25, seed=seed,
                       model_class=model_class, steps=steps)
    with open(os.path.join(log_dir, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]

    def series(tag: str) -> list[tuple[int, float]]:
        return [(row["step"], row[tag]) for row in rows if tag in row]

    return {"held_out": series("eval/nll_per_char"), "train_exact": series("exact_nll"),
            "train_logged": series("loss/nll"), "final": held_out}


# ----------------------------------------------------------------------------- SVG

WIDTH, HEIGHT = 900, 370
BLUE, ORANGE, GREY = "#1f5fbf", "#d9731a", "#555555"


def smooth(points: list[tuple[int, float]], window: int = 5) -> list[tuple[int, float]]:
    """Moving average over `window` flushes, for the noisy training curves."""
    out = []
    for i, (step, _) in enumerate(points):
        chunk = [v for _, v in points[max(0, i - window + 1):i + 1]]
        out.append((step, sum(chunk) / len(chunk)))
    return out


def panel(x0: float, y0: float, w: float, h: float, title: str, lines: list[dict],
          x_max: float, y_range: tuple[float, float], y_step: float) -> list[str]:
    """One line chart: axes, grid, ticks, lines and a legend, as SVG elements."""
    y_low, y_high = y_range

    def px(step: float) -> float:
        return x0 + step / x_max * w

    def py(value: float) -> float:
        return y0 + h - (value - y_low) / (y_high - y_low) * h

    parts = [f'<text x="{x0 + w / 2}" y="{y0 - 12}" text-anchor="middle" '
             f'font-size="15" font-weight="bold">{title}</text>']
    ticks = round((y_high - y_low) / y_step)
    for i in range(ticks + 1):
        value = y_low + i * y_step
        parts.append(f'<line x1="{x0}" y1="{py(value):.1f}" x2="{x0 + w}" y2="{py(value):.1f}" '
                     'stroke="#e4e4e4"/>')
        parts.append(f'<text x="{x0 - 6}" y="{py(value) + 4:.1f}" text-anchor="end" '
                     f'font-size="12">{value:.1f}</text>')
    x_tick = 100 if x_max <= 1000 else 200
    for step in range(0, int(x_max) + 1, x_tick):
        parts.append(f'<line x1="{px(step):.1f}" y1="{y0 + h}" x2="{px(step):.1f}" '
                     f'y2="{y0 + h + 5}" stroke="{GREY}"/>')
        parts.append(f'<text x="{px(step):.1f}" y="{y0 + h + 19}" text-anchor="middle" '
                     f'font-size="12">{step}</text>')
    parts.append(f'<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="none" '
                 f'stroke="{GREY}"/>')
    parts.append(f'<text x="{x0 + w / 2}" y="{y0 + h + 38}" text-anchor="middle" '
                 'font-size="13">optimizer step</text>')
    parts.append(f'<text x="{x0 - 42}" y="{y0 + h / 2}" text-anchor="middle" font-size="13" '
                 f'transform="rotate(-90 {x0 - 42} {y0 + h / 2})">nats per character</text>')
    for line in lines:
        points = " ".join(f"{px(s):.1f},{py(v):.1f}" for s, v in line["points"]
                          if y_low <= v <= y_high)  # the first flushes start above
        dash = ' stroke-dasharray="6 4"' if line.get("dashed") else ""
        parts.append(f'<polyline points="{points}" fill="none" stroke="{line["color"]}" '
                     f'stroke-width="{line.get("width", 2)}"{dash}/>')
    parts.append(f'<rect x="{x0 + w - 262}" y="{y0 + 6}" width="256" '
                 f'height="{20 * len(lines) + 4}" fill="white" fill-opacity="0.85"/>')
    for i, line in enumerate(lines):  # the legend, top right
        ly = y0 + 18 + 20 * i
        dash = ' stroke-dasharray="6 4"' if line.get("dashed") else ""
        parts.append(f'<line x1="{x0 + w - 255}" y1="{ly}" x2="{x0 + w - 225}" y2="{ly}" '
                     f'stroke="{line["color"]}" stroke-width="{line.get("width", 2)}"{dash}/>')
        parts.append(f'<text x="{x0 + w - 219}" y="{ly + 4}" font-size="12">'
                     f'{line["label"]}</text>')
    return parts


def draw(exact: dict, mom: dict, path: str) -> None:
    steps = max(s for s, _ in exact["held_out"])
    held_out = [
        {"points": exact["held_out"], "color": BLUE, "label": "exact mean (Mean)"},
        {"points": mom["held_out"], "color": ORANGE, "label": "mean of means"},
    ]
    training = [
        {"points": smooth(exact["train_exact"]), "color": BLUE, "label": "exact mean (Mean)"},
        {"points": smooth(mom["train_exact"]), "color": ORANGE,
         "label": "mean of means: true, per token"},
        {"points": smooth(mom["train_logged"]), "color": ORANGE, "dashed": True,
         "label": "mean of means: as it logs it"},
    ]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
             f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="Helvetica, Arial, sans-serif">',
             f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>']
    parts += panel(80, 45, 330, 270, "Held-out loss per character", held_out,
                   steps, (1.8, 3.4), 0.2)
    parts += panel(530, 45, 330, 270, "Training loss (moving average, 50 steps)", training,
                   steps, (1.8, 3.4), 0.2)
    parts.append("</svg>")
    Path(path).write_text("\n".join(parts) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "images" / "mean_of_means.svg"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="the figure shows the first; the others only print the gap")
    parser.add_argument("--steps", type=int, default=None, help="default: the example's")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the example does: tiny ops, no gain from a second thread
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for name, model_class in (("exact", ExactMean), ("mean_of_means", MeanOfMeans)):
                results[seed, name] = run(model_class, seed, os.path.join(tmp, f"{name}{seed}"),
                                          args.steps)
    for seed in args.seeds:
        exact, mom = results[seed, "exact"], results[seed, "mean_of_means"]
        # The step at which the exact run first reached the final loss of the other.
        reached = next(s for s, v in exact["held_out"] if v <= mom["final"])
        print(f"seed {seed}: held-out nll per char, exact {exact['final']:.3f}, "
              f"mean of means {mom['final']:.3f} (gap {mom['final'] - exact['final']:.3f}); "
              f"the exact run was there at step {reached}; final training loss per token "
              f"(last flush): exact {exact['train_exact'][-1][1]:.3f}, mean of means "
              f"{mom['train_exact'][-1][1]:.3f}, which reported {mom['train_logged'][-1][1]:.3f}")
    first = args.seeds[0]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    draw(results[first, "exact"], results[first, "mean_of_means"], args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
