"""A two-stage detector whose training and inference share weights but not logic.

A toy region-proposal detector (in the manner of Faster R-CNN) finds bright rectangles of
three kinds (filled, hollow, striped) in generated 32x32 noisy images. In training mode
the model matches anchors to the ground truth, *samples* a fixed number of them with the
RNG, computes the RPN losses on those only, samples proposals (its own top-scoring boxes
plus jittered ground truth), pools their features and computes the second-stage losses.
It returns four losses and never builds a final detection. In eval mode it decodes boxes,
applies NMS, runs the second stage and returns per-image boxes, scores and labels, with no
targets needed and no loss computed.

A separate loss function would need the anchors, the sampled indices, the matched ground
truth and the proposals handed back to it from `forward`. Here they stay local variables.

    python examples/detector.py            # full run, under a minute on a laptop CPU
    python examples/detector.py --fast     # a few seconds, what the test suite runs
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lossless_trainer import Model, Trainer, is_summary_step, summary_scope, write_summary

IMAGE_SIZE = 32
STRIDE = 4  # of the feature map the RPN scans
CLASS_NAMES = ("filled", "hollow", "striped")
BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)  # scale box deltas to a loss range like the logits'

Target = dict[str, torch.Tensor]


# ----------------------------------------------------------------------------- data


def draw_scene(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One noisy image with 1 to 3 non-overlapping rectangles.

    Returns:
        The image (H, W) float32, boxes (n, 4) as pixel ``x1, y1, x2, y2`` (x2, y2
        exclusive), and class indices (n,).
    """
    image = rng.normal(0.0, 0.25, (IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
    for _ in range(int(rng.integers(0, 4))):  # distractors: small blobs that are not objects
        size = int(rng.integers(2, 5))
        x, y = (int(v) for v in rng.integers(0, IMAGE_SIZE - size + 1, size=2))
        image[y:y + size, x:x + size] += rng.uniform(0.5, 1.0)
    wanted = int(rng.integers(1, 4))
    boxes: list[tuple[int, int, int, int]] = []
    labels: list[int] = []
    for _ in range(30):  # placement attempts; a crowded image keeps fewer objects
        if len(boxes) == wanted:
            break
        w, h = (int(v) for v in rng.integers(6, 15, size=2))
        x, y = int(rng.integers(0, IMAGE_SIZE - w + 1)), int(rng.integers(0, IMAGE_SIZE - h + 1))
        # Keep a one-pixel gap so every object has its own outline.
        if any(x < bx2 + 1 and bx1 < x + w + 1 and y < by2 + 1 and by1 < y + h + 1
               for bx1, by1, bx2, by2 in boxes):
            continue
        label = int(rng.integers(len(CLASS_NAMES)))
        patch = np.ones((h, w), dtype=np.float32)
        if label == 1:  # hollow: a one-pixel outline
            patch[1:-1, 1:-1] = 0.0
        elif label == 2:  # striped: every other row
            patch[1::2] = 0.0
        image[y:y + h, x:x + w] += patch * rng.uniform(0.5, 1.0)
        boxes.append((x, y, x + w, y + h))
        labels.append(label)
    return (image, np.array(boxes, dtype=np.float32).reshape(-1, 4),
            np.array(labels, dtype=np.int64))


class ShapesDataset(Dataset):
    """Generated scenes, made once up front. Item: (image (1, H, W), target dict)."""

    def __init__(self, size: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.items: list[tuple[torch.Tensor, Target]] = []
        for _ in range(size):
            image, boxes, labels = draw_scene(rng)
            self.items.append((torch.from_numpy(image)[None],
                               {"boxes": torch.from_numpy(boxes),
                                "labels": torch.from_numpy(labels)}))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        return self.items[index]


def collate(samples: list[tuple[torch.Tensor, Target]]) -> dict:
    """Images stack into one tensor; targets differ in length, so they stay a list."""
    return {"images": torch.stack([image for image, _ in samples]),
            "targets": [target for _, target in samples]}


# ----------------------------------------------------------------------------- boxes


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of every box in `a` (..., N, 4) with every box in `b` (..., M, 4): (..., N, M)."""
    top_left = torch.maximum(a[..., :, None, :2], b[..., None, :, :2])
    bottom_right = torch.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(-1)
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return inter / (area_a[..., :, None] + area_b[..., None, :] - inter).clamp(min=1e-6)


def encode(reference: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Deltas (dx, dy, dw, dh) that turn `reference` boxes into `boxes`."""
    rw, rh = reference[..., 2] - reference[..., 0], reference[..., 3] - reference[..., 1]
    rx, ry = reference[..., 0] + 0.5 * rw, reference[..., 1] + 0.5 * rh
    bw, bh = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    bx, by = boxes[..., 0] + 0.5 * bw, boxes[..., 1] + 0.5 * bh
    wx, wy, ww, wh = BOX_WEIGHTS
    return torch.stack([wx * (bx - rx) / rw, wy * (by - ry) / rh,
                        ww * torch.log(bw / rw), wh * torch.log(bh / rh)], dim=-1)


def decode(reference: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """Boxes from `reference` boxes and deltas, clipped to the image."""
    rw, rh = reference[..., 2] - reference[..., 0], reference[..., 3] - reference[..., 1]
    rx, ry = reference[..., 0] + 0.5 * rw, reference[..., 1] + 0.5 * rh
    wx, wy, ww, wh = BOX_WEIGHTS
    limit = math.log(IMAGE_SIZE)  # keeps exp() finite while the heads are untrained
    x = rx + deltas[..., 0] / wx * rw
    y = ry + deltas[..., 1] / wy * rh
    w = rw * torch.exp((deltas[..., 2] / ww).clamp(max=limit))
    h = rh * torch.exp((deltas[..., 3] / wh).clamp(max=limit))
    boxes = torch.stack([x - 0.5 * w, y - 0.5 * h, x + 0.5 * w, y + 0.5 * h], dim=-1)
    return boxes.clamp(0.0, float(IMAGE_SIZE))


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression. Returns kept indices, highest score first."""
    order = scores.argsort(descending=True)
    overlaps = (box_iou(boxes[order], boxes[order]) > iou_threshold).tolist()
    suppressed = [False] * len(order)
    keep = []
    for i, row in enumerate(overlaps):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed = [s or o for s, o in zip(suppressed, row)]
    return order[torch.tensor(keep, dtype=torch.long, device=order.device)]


def make_anchors(sizes: tuple[float, ...], ratios: tuple[float, ...]) -> torch.Tensor:
    """Anchor boxes (H * W * A, 4) centred on every feature-map cell, cell-major."""
    cells = IMAGE_SIZE // STRIDE
    shapes = torch.tensor([(s * math.sqrt(r), s / math.sqrt(r)) for s in sizes for r in ratios])
    centres = (torch.arange(cells, dtype=torch.float32) + 0.5) * STRIDE
    cy, cx = torch.meshgrid(centres, centres, indexing="ij")
    centre = torch.stack([cx, cy], dim=-1).reshape(-1, 1, 2)  # (H*W, 1, 2)
    half = shapes[None] / 2  # (1, A, 2)
    return torch.cat([centre - half, centre + half], dim=-1).reshape(-1, 4)


def roi_align(features: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear RoI pooling: features (B, C, H, W), boxes (B, R, 4) in image pixels.

    One bilinear sample at the centre of each of the ``size x size`` bins: RoIAlign with
    a sampling ratio of 1, which is plenty at this scale and keeps the backward cheap.

    Returns:
        (B, R, C, size, size)
    """
    batch, rois = boxes.shape[:2]
    steps = (torch.arange(size, device=boxes.device, dtype=boxes.dtype) + 0.5) / size
    x1, y1, x2, y2 = boxes.unbind(-1)  # (B, R) each
    xs = x1[..., None] + steps * (x2 - x1)[..., None]  # (B, R, size)
    ys = y1[..., None] + steps * (y2 - y1)[..., None]
    grid = torch.stack([xs[..., None, :].expand(-1, -1, size, -1),
                        ys[..., :, None].expand(-1, -1, -1, size)], dim=-1)
    grid = grid * (2.0 / IMAGE_SIZE) - 1.0  # grid_sample wants [-1, 1] across the image
    pooled = F.grid_sample(features, grid.reshape(batch, rois * size, size, 2),
                           align_corners=False)  # (B, C, R*size, size)
    return pooled.reshape(batch, -1, rois, size, size).transpose(1, 2)


def sample_balanced(labels: torch.Tensor, num: int, positive_fraction: float,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick at most `num` entries per row: positives (label 1) first, up to a fraction.

    Args:
        labels: (B, N) with 1 positive, 0 negative, -1 ignored.

    Returns:
        Boolean masks (B, N) of the sampled positives and negatives.
    """
    def random_rank(mask: torch.Tensor) -> torch.Tensor:
        keys = torch.where(mask, torch.rand(mask.shape, device=mask.device), -1.0)
        return keys.argsort(dim=1, descending=True).argsort(dim=1)

    positives = (labels == 1) & (random_rank(labels == 1) < int(num * positive_fraction))
    room = num - positives.sum(dim=1, keepdim=True)
    negatives = (labels == 0) & (random_rank(labels == 0) < room)
    return positives, negatives


def pad_targets(targets: list[Target], device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image targets to padded tensors: boxes (B, G, 4), labels (B, G), valid (B, G)."""
    most = max(1, max(len(t["labels"]) for t in targets))
    boxes = torch.zeros(len(targets), most, 4, device=device)
    labels = torch.zeros(len(targets), most, dtype=torch.long, device=device)
    valid = torch.zeros(len(targets), most, dtype=torch.bool, device=device)
    for i, target in enumerate(targets):
        n = len(target["labels"])
        boxes[i, :n], labels[i, :n], valid[i, :n] = target["boxes"], target["labels"], True
    return boxes, labels, valid


def take(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of `values` (B, N, ...) at `index` (B, K), per image: (B, K, ...)."""
    index = index.reshape(*index.shape, *([1] * (values.ndim - 2)))
    return torch.gather(values, 1, index.expand(-1, -1, *values.shape[2:]))


def match(boxes: torch.Tensor, gt_boxes: torch.Tensor, gt_valid: torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best ground truth of every box: IoU (B, N), its index (B, N), the full IoU (B, N, G)."""
    iou = box_iou(boxes, gt_boxes).masked_fill(~gt_valid[:, None, :], -1.0)
    best_iou, index = iou.max(dim=2)
    return best_iou, index, iou


def objectness_map(image: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """An image (1, H, 2W) for TensorBoard: the input, and the best objectness per cell."""
    cells = IMAGE_SIZE // STRIDE
    heat = logits.detach().sigmoid().reshape(1, 1, cells, cells, -1).amax(dim=-1)
    heat = F.interpolate(heat, scale_factor=STRIDE, mode="nearest")[0]
    low, high = image.min(), image.max()
    return torch.cat([(image - low) / (high - low + 1e-6), heat], dim=2)


# ----------------------------------------------------------------------------- model


class Detector(Model):
    """Training mode: four named losses. Eval mode: per-image boxes, scores and labels.

    The batch is ``{"images": (B, 1, H, W), "targets": [{"boxes", "labels"}, ...]}``;
    eval mode reads only ``"images"``.
    """

    def __init__(self, width: int = 64, pool: int = 6) -> None:
        super().__init__()
        # Two feature maps: the RPN scans the coarse one (stride 4, wide receptive field);
        # the second stage pools the fine one (stride 2), where hollow and striped differ.
        self.stem = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        )
        self.body = nn.Sequential(
            nn.Conv2d(32, width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
        )
        self.register_buffer("anchors", make_anchors((7.0, 11.0, 15.0), (0.5, 1.0, 2.0)),
                             persistent=False)
        num_anchors = 9
        self.rpn_conv = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU())
        self.rpn_logits = nn.Conv2d(width, num_anchors, 1)
        self.rpn_deltas = nn.Conv2d(width, 4 * num_anchors, 1)
        self.pool = pool
        self.roi_head = nn.Sequential(nn.Flatten(), nn.Linear(32 * pool * pool, 128),
                                      nn.ReLU(), nn.Linear(128, 128), nn.ReLU())
        self.roi_logits = nn.Linear(128, len(CLASS_NAMES) + 1)  # class 0 is background
        self.roi_deltas = nn.Linear(128, 4)
        # Sampling and inference settings: training and inference logic differ, so do these.
        self.rpn_batch, self.rpn_positive_fraction = 64, 0.5
        self.roi_batch, self.roi_positive_fraction = 16, 0.5
        self.train_proposals = 32
        self.test_pre_nms, self.test_proposals = 64, 16
        self.score_threshold, self.max_detections = 0.05, 10

    def forward(self, batch: dict) -> dict[str, torch.Tensor] | list[Target]:
        fine = self.stem(batch["images"])
        features = self.body(fine)
        hidden = self.rpn_conv(features)
        batch_size = features.shape[0]
        # (B, A*, ...) in the anchors' cell-major order
        logits = self.rpn_logits(hidden).permute(0, 2, 3, 1).reshape(batch_size, -1)
        deltas = self.rpn_deltas(hidden).permute(0, 2, 3, 1).reshape(batch_size, -1, 4)
        if not self.training:
            return self.detect(fine, logits, deltas)

        gt_boxes, gt_labels, gt_valid = pad_targets(batch["targets"], features.device)
        with summary_scope("rpn"):
            losses = self.rpn_losses(logits, deltas, gt_boxes, gt_valid)
            if is_summary_step():
                write_summary("objectness_map", objectness_map(batch["images"][0], logits[0]))
        proposals = self.propose(logits, deltas, gt_boxes, gt_valid)
        with summary_scope("roi_heads"):
            losses.update(self.roi_losses(fine, proposals, gt_boxes, gt_labels, gt_valid))
        return losses

    # -- training ----------------------------------------------------------------

    def rpn_losses(self, logits: torch.Tensor, deltas: torch.Tensor, gt_boxes: torch.Tensor,
                   gt_valid: torch.Tensor) -> dict[str, torch.Tensor]:
        """Objectness and box losses on a random, balanced sample of anchors."""
        anchors = self.anchors.expand(len(gt_boxes), -1, -1)
        best_iou, matched, iou = match(anchors, gt_boxes, gt_valid)
        labels = torch.full_like(matched, -1)
        labels[best_iou < 0.3] = 0
        labels[best_iou >= 0.5] = 1
        # Every object keeps its best anchor, so small or thin ones are not left unmatched.
        is_best = (iou == iou.max(dim=1, keepdim=True).values) & gt_valid[:, None, :]
        labels[is_best.any(dim=2)] = 1
        matched = torch.where(is_best.any(dim=2), is_best.float().argmax(dim=2), matched)

        positives, negatives = sample_balanced(labels, self.rpn_batch, self.rpn_positive_fraction)
        sampled = positives | negatives
        objectness = F.binary_cross_entropy_with_logits(logits[sampled], positives[sampled].float())
        targets = encode(anchors, take(gt_boxes, matched))
        box = F.smooth_l1_loss(deltas[positives], targets[positives], beta=1 / 9,
                               reduction="sum") / positives.sum().clamp(min=1)

        write_summary("num_positive_anchors", positives.sum(dim=1).float().mean())
        write_summary("num_negative_anchors", negatives.sum(dim=1).float().mean())
        write_summary("objectness_accuracy",
                      ((logits[sampled] > 0) == positives[sampled]).float().mean())
        if is_summary_step():  # histograms are costly: only build them when written
            write_summary("sampled_logits", logits[sampled].detach())
        return {"rpn_objectness": objectness, "rpn_box": box}

    @torch.no_grad()
    def propose(self, logits: torch.Tensor, deltas: torch.Tensor, gt_boxes: torch.Tensor,
                gt_valid: torch.Tensor) -> dict[str, torch.Tensor]:
        """Second-stage training boxes: the RPN's top boxes plus jittered ground truth.

        Early in training the RPN proposes little of use; the jittered ground truth gives
        the second stage foreground examples from the first step on.
        """
        boxes = decode(self.anchors, deltas)
        top = logits.topk(self.train_proposals, dim=1).indices
        rpn_boxes = take(boxes, top)
        jitter = 4
        size = (gt_boxes[..., 2:] - gt_boxes[..., :2]).repeat(1, 1, 2)  # (B, G, 4): w h w h
        noise = torch.randn(*gt_boxes.shape[:2], jitter, 4, device=gt_boxes.device) * 0.1
        jittered = (gt_boxes[:, :, None] + noise * size[:, :, None]).flatten(1, 2)
        candidates = torch.cat([rpn_boxes, jittered.clamp(0, IMAGE_SIZE), gt_boxes], dim=1)
        valid = torch.cat([torch.ones_like(top, dtype=torch.bool),
                           gt_valid.repeat_interleave(jitter, dim=1), gt_valid], dim=1)
        valid &= (candidates[..., 2:] - candidates[..., :2] >= 1.0).all(dim=-1)
        rpn_iou = match(rpn_boxes, gt_boxes, gt_valid)[0]
        with summary_scope("rpn"):
            write_summary("proposal_mean_iou", rpn_iou.mean())
            # Fraction of objects that one of the top proposals finds at IoU >= 0.5.
            covered = (box_iou(gt_boxes, rpn_boxes) >= 0.5).any(dim=2)
            write_summary("proposal_recall", covered[gt_valid].float().mean())
        return {"boxes": candidates, "valid": valid}

    def roi_losses(self, features: torch.Tensor, proposals: dict[str, torch.Tensor],
                   gt_boxes: torch.Tensor, gt_labels: torch.Tensor, gt_valid: torch.Tensor,
                   ) -> dict[str, torch.Tensor]:
        """Classification and box refinement on a balanced sample of proposals."""
        best_iou, matched, _ = match(proposals["boxes"], gt_boxes, gt_valid)
        labels = (best_iou >= 0.5).long().masked_fill(~proposals["valid"], -1)
        positives, negatives = sample_balanced(labels, self.roi_batch, self.roi_positive_fraction)
        # Only the sampled proposals are pooled; a fixed count per image (sampled ones
        # first, then masked-out padding) keeps the tensors rectangular.
        chosen = (positives | negatives).float().topk(self.roi_batch, dim=1).indices
        boxes, matched = take(proposals["boxes"], chosen), take(matched, chosen)
        positives, sampled = take(positives, chosen), take(positives | negatives, chosen)

        hidden = self.roi_head(roi_align(features, boxes, self.pool).flatten(0, 1))
        class_logits = self.roi_logits(hidden).reshape(*boxes.shape[:2], -1)
        box_deltas = self.roi_deltas(hidden).reshape(*boxes.shape[:2], 4)
        classes = torch.where(positives, take(gt_labels, matched) + 1, 0)  # 0: background
        classification = F.cross_entropy(class_logits[sampled], classes[sampled])
        targets = encode(boxes, take(gt_boxes, matched))
        box = F.smooth_l1_loss(box_deltas[positives], targets[positives], beta=1 / 9,
                               reduction="sum") / positives.sum().clamp(min=1)

        write_summary("num_foreground", positives.sum(dim=1).float().mean())
        write_summary("foreground_mean_iou", take(best_iou, chosen)[positives].mean())
        write_summary("classification_accuracy",
                      (class_logits[sampled].argmax(dim=1) == classes[sampled]).float().mean())
        return {"roi_classification": classification, "roi_box": box}

    # -- inference ---------------------------------------------------------------

    def detect(self, features: torch.Tensor, logits: torch.Tensor, deltas: torch.Tensor,
               ) -> list[Target]:
        """Boxes, scores and labels per image: proposals, NMS, second stage, NMS."""
        boxes = decode(self.anchors, deltas)
        scores = logits.sigmoid()
        results = []
        for i in range(len(features)):
            top = scores[i].topk(self.test_pre_nms).indices
            keep = nms(boxes[i, top], scores[i, top], 0.7)[:self.test_proposals]
            proposals = boxes[i, top[keep]]
            hidden = self.roi_head(roi_align(features[i:i + 1], proposals[None], self.pool)[0])
            probabilities = self.roi_logits(hidden).softmax(dim=1)
            score, label = probabilities[:, 1:].max(dim=1)  # best foreground class
            refined = decode(proposals, self.roi_deltas(hidden))
            confident = (score >= self.score_threshold).nonzero().squeeze(1)
            keep = confident[nms(refined[confident], score[confident], 0.4)][:self.max_detections]
            results.append({"boxes": refined[keep], "scores": score[keep], "labels": label[keep]})
        return results


# ----------------------------------------------------------------------------- metrics


def detection_metrics(predictions: list[Target], targets: list[Target],
                      score_threshold: float = 0.5, iou_threshold: float = 0.5
                      ) -> dict[str, float]:
    """Recall and precision at a score threshold, and mAP at an IoU threshold.

    A detection is a true positive when its class is right and it overlaps an object of
    that class, not yet claimed by a higher-scoring detection, by at least `iou_threshold`.

    Args:
        predictions: Per image, ``{"boxes", "scores", "labels"}`` as eval mode returns.
        targets: Per image, ``{"boxes", "labels"}``.
        score_threshold: Detections scoring lower do not count for recall and precision.
        iou_threshold: Overlap needed to match an object.

    Returns:
        ``recall``, ``precision`` and ``map50`` (mean over classes of the average
        precision, all-point interpolated).
    """
    per_class: list[list[tuple[float, bool]]] = [[] for _ in CLASS_NAMES]  # (score, hit)
    objects = [0] * len(CLASS_NAMES)
    for prediction, target in zip(predictions, targets):
        boxes, scores, labels = (prediction[k].cpu() for k in ("boxes", "scores", "labels"))
        for label in target["labels"].tolist():
            objects[label] += 1
        iou = box_iou(boxes, target["boxes"])
        taken = torch.zeros(len(target["labels"]), dtype=torch.bool)
        for j in scores.argsort(descending=True).tolist():
            overlap = iou[j].masked_fill(taken | (target["labels"] != labels[j]), -1.0)
            hit = overlap.numel() > 0 and float(overlap.max()) >= iou_threshold
            if hit:
                taken[int(overlap.argmax())] = True
            per_class[int(labels[j])].append((float(scores[j]), hit))
    # Matching runs in score order, so the hits above the threshold are the same as if
    # only those detections had been matched.
    kept = [hit for detections in per_class for score, hit in detections
            if score >= score_threshold]
    average_precisions = []
    for detections, count in zip(per_class, objects):
        if count == 0:
            continue
        detections.sort(key=lambda d: -d[0])
        hits = np.cumsum([hit for _, hit in detections], dtype=np.float64)
        precision = hits / np.arange(1, len(detections) + 1)
        # Precision made monotone in recall, then integrated over recall.
        precision = np.maximum.accumulate(precision[::-1])[::-1]
        recall_steps = np.diff(hits, prepend=0.0) / count
        average_precisions.append(float((recall_steps * precision).sum()))
    return {"recall": sum(kept) / max(sum(objects), 1),
            "precision": sum(kept) / max(len(kept), 1),
            "map50": float(np.mean(average_precisions)) if average_precisions else 0.0}


def main(fast: bool = False, log_dir: str | None = None, progress: bool = True
         ) -> dict[str, float]:
    """Train the detector, print where the logs are, and return held-out detection metrics."""
    train_set = ShapesDataset(1000 if fast else 4000, seed=0)
    test_set = ShapesDataset(200, seed=1)
    loader = DataLoader(train_set, batch_size=16, shuffle=True, collate_fn=collate)
    torch.manual_seed(0)  # the initial weights; Trainer(seed=...) seeds when fit starts
    model = Detector()
    steps = 200 if fast else 800
    trainer = Trainer(model, loader, max_steps=steps, log_every=25, seed=0, log_dir=log_dir,
                      progress=progress,
                      optimizer=lambda params: torch.optim.AdamW(params, lr=2e-3),
                      lr_scheduler=lambda opt: torch.optim.lr_scheduler.OneCycleLR(
                          opt, max_lr=2e-3, total_steps=steps, pct_start=0.1))
    trainer.fit()

    predictions: list[Target] = []
    for start in range(0, len(test_set), 50):
        chunk = collate([test_set[i] for i in range(start, min(start + 50, len(test_set)))])
        predictions += model.predict({"images": chunk["images"]})  # eval mode: no targets
    metrics = detection_metrics(predictions, [target for _, target in test_set])
    objects = sum(len(target["labels"]) for _, target in test_set)
    print(f"held-out detection on {len(test_set)} images, {objects} objects: "
          f"recall@IoU0.5: {metrics['recall']:.3f}  precision: {metrics['precision']:.3f} "
          f"(score >= 0.5)  mAP50: {metrics['map50']:.3f}")
    print(f"TensorBoard logs: {trainer.log_dir}")
    print(f"view them with:   tensorboard --logdir {trainer.log_dir}")
    return metrics


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="fewer steps, for tests")
    parser.add_argument("--log-dir", default=None, help="run directory (default: runs/<time>)")
    args = parser.parse_args()
    # The model is tiny: its ops are too small to share across cores, and on a busy
    # machine a second thread waiting for a core makes each op many times slower.
    torch.set_num_threads(1)
    main(fast=args.fast, log_dir=args.log_dir)
