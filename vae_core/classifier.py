"""A small reference CNN: judges generated images (accuracy, TSTR) and gives the features for classifier-FID.

Two conv blocks (~1.1M multiply-adds per 28×28 image: it must train on a shared 2-core CPU in minutes) and a
128-wide feature layer; adaptive pooling makes it take any (C, H, W), so Fashion-MNIST
(1×28×28) and colour image folders (3×32×32) use the same network. Inputs are uint8 images; the scaling to
[0, 1] happens inside, so real and generated images go through one identical path."""
from __future__ import annotations

import json
from collections.abc import Callable

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor, nn

from .checkpoint import sha256_hex
from .errors import VaegenError
from .use_configs import ClassifierConfig

FEATURES = 128
CLASSIFIER_WEIGHTS = "classifier.safetensors"
CLASSIFIER_CONFIG = "classifier.json"


class ReferenceCNN(nn.Module):
    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.in_channels, self.num_classes = in_channels, num_classes
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),   # strided: 1/4 the cost
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),                            # (B, 64·4·4) for any H, W
            nn.Linear(64 * 16, FEATURES), nn.ReLU())                          # (B, FEATURES): FID features
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(FEATURES, num_classes))

    def features(self, images: Tensor) -> Tensor:
        return self.body(images.float() / 255.0)                              # uint8 (B, C, H, W) in

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))                               # (B, K) logits


def _check(images: Tensor, labels: Tensor | None = None) -> None:
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise VaegenError(f"classifier inputs must be uint8 (N, C, H, W); got {images.dtype} {tuple(images.shape)}")
    if labels is not None and labels.shape != (images.shape[0],):
        raise VaegenError(f"{images.shape[0]} images but labels of shape {tuple(labels.shape)}")


def train_classifier(images: Tensor, labels: Tensor, num_classes: int, cfg: ClassifierConfig,
                     on_batch: Callable[[int], object] | None = None) -> ReferenceCNN:
    """Adam with a cosine-decayed learning rate on shuffled mini-batches, seeded; returned in eval mode.
    `on_batch(n)` after each batch of n images (progress)."""
    _check(images, labels)
    if len(images) < 2:
        raise VaegenError("a classifier needs at least 2 training images")
    torch.manual_seed(cfg.seed)
    model = ReferenceCNN(images.shape[1], num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    steps = cfg.epochs * -(-len(images) // cfg.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    shuffle = torch.Generator().manual_seed(cfg.seed)
    model.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(len(images), generator=shuffle)
        for start in range(0, len(images), cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            if len(idx) < 2:                                                  # BatchNorm needs 2 rows
                continue
            loss = F.cross_entropy(model(images[idx]), labels[idx].long())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if on_batch is not None:
                on_batch(len(idx))
    return model.eval()


@torch.no_grad()
def predict(model: ReferenceCNN, images: Tensor, batch_size: int = 1000) -> Tensor:
    _check(images)
    model.eval()
    return torch.cat([model(images[i:i + batch_size]).argmax(1) for i in range(0, len(images), batch_size)])


def accuracy(model: ReferenceCNN, images: Tensor, labels: Tensor) -> float:
    _check(images, labels)
    return (predict(model, images) == labels.long()).float().mean().item()


@torch.no_grad()
def classifier_features(model: ReferenceCNN, images: Tensor, batch_size: int = 1000) -> Tensor:
    """(N, FEATURES) penultimate activations: the space classifier-FID is measured in."""
    _check(images)
    model.eval()
    return torch.cat([model.features(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


def classifier_files(model: ReferenceCNN, info: dict) -> dict[str, bytes]:
    """weights (safetensors) + classifier.json (shape, classes, the weights' sha256 and `info`)."""
    weights = save_tensors({k: v.detach().contiguous() for k, v in model.state_dict().items()})
    meta = {**info, "in_channels": model.in_channels, "num_classes": model.num_classes,
            "weights_sha256": sha256_hex(weights)}
    return {CLASSIFIER_WEIGHTS: weights, CLASSIFIER_CONFIG: json.dumps(meta, indent=2, sort_keys=True).encode()}


def load_classifier(files: dict[str, bytes]) -> tuple[ReferenceCNN, dict]:
    """Rebuild a stored classifier, refusing weights that fail their sha256 (no pickle anywhere)."""
    try:
        meta = json.loads(files[CLASSIFIER_CONFIG])
        model = ReferenceCNN(int(meta["in_channels"]), int(meta["num_classes"]))
    except (ValueError, KeyError, TypeError) as e:
        raise VaegenError(f"reference classifier config is unreadable: {e}") from None
    if sha256_hex(files[CLASSIFIER_WEIGHTS]) != meta.get("weights_sha256"):
        raise VaegenError("reference classifier weights fail their sha256 check (corrupt or tampered)")
    try:
        model.load_state_dict(load_tensors(files[CLASSIFIER_WEIGHTS]), strict=True)
    except (SafetensorError, RuntimeError) as e:
        raise VaegenError(f"reference classifier weights do not load: {str(e).splitlines()[0]}") from None
    return model.eval(), meta
