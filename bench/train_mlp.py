"""The MLP reference design at the classic configuration (784-400-20, Bernoulli, Adam 1e-3, batch 128,
10 epochs on Fashion-MNIST): vaegen's trainer vs a plain PyTorch loop of the same model fed by the standard
`DataLoader(ToTensor)` pipeline, in one run. Prints one JSON line per trainer and one with the ratio.

    .venv/bin/python bench/train_mlp.py [--epochs 10] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from cluster.data.ingest import ingest_source
from cluster.train.driver import train_model
from vae_core.config import ModelConfig, StorageConfig, TrainConfig, TrainJobConfig
from vae_core.data import read_fashion_mnist


class PlainVAE(nn.Module):
    """pytorch/examples vae/main.py, as published."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc21, self.fc22 = nn.Linear(784, 400), nn.Linear(400, 20), nn.Linear(400, 20)
        self.fc3, self.fc4 = nn.Linear(20, 400), nn.Linear(400, 784)

    def forward(self, x):
        h = F.relu(self.fc1(x.view(-1, 784)))
        mu, logvar = self.fc21(h), self.fc22(h)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return torch.sigmoid(self.fc4(F.relu(self.fc3(z)))), mu, logvar


def plain_loss(recon, x, mu, logvar):
    bce = F.binary_cross_entropy(recon, x.view(-1, 784), reduction="sum")
    return bce - 0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())


class ArrayImages(Dataset):
    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels, self.to_tensor = images[:, 0], labels, transforms.ToTensor()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.to_tensor(self.images[i]), int(self.labels[i])     # (1, 28, 28) float in [0, 1]


def plain_loop(epochs: int) -> dict:
    data = read_fashion_mnist()
    train = DataLoader(ArrayImages(data.splits["train"].images, data.splits["train"].labels), batch_size=128,
                       shuffle=True)
    test = DataLoader(ArrayImages(data.splits["test"].images, data.splits["test"].labels), batch_size=128)
    torch.manual_seed(0)
    model = PlainVAE()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    seen, train_seconds = 0, 0.0
    for _ in range(epochs):
        model.train()
        start = time.perf_counter()
        for x, _ in train:
            opt.zero_grad()
            recon, mu, logvar = model(x)
            loss = plain_loss(recon, x, mu, logvar)
            loss.backward()
            opt.step()
            seen += x.shape[0]
        train_seconds += time.perf_counter() - start
    model.eval()
    total = 0.0
    with torch.no_grad():
        for x, _ in test:
            recon, mu, logvar = model(x)
            total += plain_loss(recon, x, mu, logvar).item()
    return {"trainer": "plain DataLoader(ToTensor) loop", "train_images": len(train.dataset),
            "test_loss": total / len(test.dataset), "images_per_s": seen / train_seconds,
            "train_seconds": train_seconds}


def vaegen_trainer(epochs: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        storage = StorageConfig(root=tmp)
        ingest_source("fashion-mnist", None, storage, progress=False)
        job = TrainJobConfig(model=ModelConfig(), train=TrainConfig(epochs=epochs, patience=epochs),
                             storage=storage, name="bench-mlp")
        start = time.perf_counter()
        result = train_model(job, progress=False)                    # job.ray is None: one process
        wall = time.perf_counter() - start
    history = result.history
    train_seconds = sum(m.seconds for m in history)
    return {"trainer": "vaegen (vae_core.fit)", "train_images": result.summary["train_images"],
            "test_loss": result.summary["test_loss"], "best_epoch": result.summary["best_epoch"] + 1,
            "images_per_s": sum(m.images_per_s * m.seconds for m in history) / train_seconds,
            "train_seconds": train_seconds, "wall_seconds_incl_io_eval_publish": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    machine = {"cpus": os.cpu_count(), "threads": args.threads, "machine": platform.machine(),
               "torch": torch.__version__}
    ours = vaegen_trainer(args.epochs)
    print(json.dumps({"bench": "train_mlp", "epochs": args.epochs, **ours, **machine}), flush=True)
    plain = plain_loop(args.epochs)
    print(json.dumps({"bench": "train_mlp", "epochs": args.epochs, **plain, **machine}), flush=True)
    print(json.dumps({"bench": "train_mlp", "epochs": args.epochs,
                      "speedup_vs_plain": ours["images_per_s"] / plain["images_per_s"],
                      "vaegen_test_loss": ours["test_loss"], "target_test_loss": 244.0,
                      "target_speedup": 1.5, **machine}), flush=True)


if __name__ == "__main__":
    main()
