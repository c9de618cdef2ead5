"""Evaluation: single-crop top-1/top-5, and VGG's dense and multi-scale testing.

Dense evaluation (VGG paper, sec. 3.2): the fully connected layers become
convolutions (the first a 7x7 conv, the other two 1x1), the network runs on the
whole test image rescaled to shorter side Q, and the class score map is
averaged spatially; the posteriors of the image and its horizontal flip are
averaged. Multi-scale: the posteriors at several Q are averaged.
"""
import contextlib
import math
from typing import Dict, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .metrics import topk_correct


def _all_reduce(t: Tensor) -> Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def _to_device(x: Tensor, device, channels_last: bool) -> Tensor:
    x = x.to(device, non_blocking=True)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


@torch.no_grad()
def evaluate(model: nn.Module, loader, device, *, autocast=contextlib.nullcontext,
             channels_last: bool = False
             ) -> Dict[str, float]:
    """Loss and top-1/top-5 error (%) over ``loader`` (summed over processes)."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, correct1, correct5, n
    try:
        for x, y in loader:
            x, y = _to_device(x, device, channels_last), y.to(device, non_blocking=True)
            with autocast():
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y, reduction="sum")
            c1, c5 = topk_correct(logits, y)
            sums += torch.stack([loss.double(), c1.double(), c5.double(),
                                 torch.tensor(y.shape[0], device=device, dtype=torch.float64)])
    finally:
        model.train(was_training)
    loss, c1, c5, n = _all_reduce(sums).tolist()
    n = max(n, 1.0)
    return {"loss": loss / n, "top1_err": 100.0 * (1 - c1 / n), "top5_err": 100.0 * (1 - c5 / n),
            "n": int(n)}


def _fc_layers(model: nn.Module):
    classifier = getattr(model, "classifier", None)
    features = getattr(model, "features", None)
    if classifier is None or features is None:
        raise ValueError("dense evaluation needs a VGG (torchvision layout: features, classifier)")
    fcs = [m for m in classifier.modules() if isinstance(m, nn.Linear)]
    if len(fcs) != 3:
        raise ValueError("dense evaluation expects 3 Linear layers in model.classifier, found "
                         f"{len(fcs)}")
    return features, fcs


def dense_scores(model: nn.Module, x: Tensor) -> Tensor:
    """Class scores of VGG run fully convolutionally on ``x`` of any size >= the
    training crop, averaged over the score map: (N, num_classes).

    Uses the model's own dense path where it has one (``model.forward_dense``
    of resfast.models' VGG)."""
    own = getattr(model, "forward_dense", None)
    if callable(own):
        return own(x)
    features, (fc1, fc2, fc3) = _fc_layers(model)
    f = features(x)
    c = f.shape[1]
    k = int(round(math.sqrt(fc1.in_features / c)))
    if k * k * c != fc1.in_features:
        raise ValueError(f"first FC layer takes {fc1.in_features} inputs, not a k x k x {c} "
                         "feature map")
    if f.shape[-1] < k or f.shape[-2] < k:
        f = F.adaptive_avg_pool2d(f, (max(k, f.shape[-2]), max(k, f.shape[-1])))
    h = F.relu(F.conv2d(f, fc1.weight.view(fc1.out_features, c, k, k), fc1.bias))
    h = F.relu(F.conv2d(h, fc2.weight[:, :, None, None], fc2.bias))
    s = F.conv2d(h, fc3.weight[:, :, None, None], fc3.bias)
    return s.mean(dim=(2, 3))


@torch.no_grad()
def evaluate_dense(model: nn.Module, datasets: Sequence, device, *, autocast=contextlib.nullcontext,
                   channels_last: bool = False, flip: bool = True, rank: int = 0, world: int = 1
                   ) -> Dict[str, float]:
    """Dense (one dataset) or multi-scale (one dataset per scale Q, same images in
    the same order) evaluation: posteriors averaged over scales and flips.
    Images are run one at a time (their sizes differ)."""
    was_training = model.training
    model.eval()
    fn = lambda x: dense_scores(model, x)  # noqa: E731
    n_images = len(datasets[0])
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    try:
        for i in range(rank, n_images, world):
            probs, y = 0.0, None
            for ds in datasets:
                x, y = ds[i]
                x = _to_device(x.unsqueeze(0), device, channels_last)
                views = [x, x.flip(-1)] if flip else [x]
                for v in views:
                    with autocast():
                        s = fn(v)
                    probs = probs + F.softmax(s.float(), dim=1)
            y = torch.as_tensor([y], device=device)
            c1, c5 = topk_correct(probs, y)
            sums += torch.stack([c1.double(), c5.double(),
                                 torch.ones((), device=device, dtype=torch.float64)])
    finally:
        model.train(was_training)
    c1, c5, n = _all_reduce(sums).tolist()
    n = max(n, 1.0)
    return {"top1_err": 100.0 * (1 - c1 / n), "top5_err": 100.0 * (1 - c5 / n), "n": int(n)}


def default_test_scales(train_scale) -> Sequence[int]:
    """The VGG paper's multi-scale test scales: {S-32, S, S+32} for a fixed S,
    {S_min, (S_min+S_max)/2, S_max} for scale jittering."""
    lo, hi = train_scale
    if lo == hi:
        return (lo - 32, lo, lo + 32)
    return (lo, (lo + hi) // 2, hi)
