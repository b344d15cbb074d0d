"""Training throughput on one device beside two reference loops, for the classic MLP (784-400-20, Bernoulli, Adam
1e-3, batch 128) on Fashion-MNIST, and the conv model at fp32 and bf16:

  classic   pytorch/examples vae/main.py's loop: torchvision's FashionMNIST Dataset + ToTensor, DataLoader(batch
            128, shuffled; one worker and pinned memory on CUDA, as the example does)
  resident  the same model and loop body with every image on the device: a random permutation per epoch, batch 128
  vaegen    vaegen's single-process trainer (cluster.train.driver.train_model, no Ray) on the same images and model
  conv      the same trainer, fmnist-best's conv architecture, --precision fp32 and bf16

img/s counts training steps only (no evaluation), over the epochs after the first (the first pays start-up);
each row gives its ratio to `resident`. Imported by bench/gpu.py (training_rows); also runs alone:

    .venv/bin/python bench/gpu_train.py [--smoke] [--device cuda] [--data /usr/share/datasets/fashion-mnist]
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import datasets, transforms
from train_mlp import PlainVAE as ClassicVAE  # bench/ is on sys.path: the example's model, as published
from train_mlp import plain_loss as classic_loss

from cluster.data.datasets import ingest
from cluster.store.storage import open_storage
from cluster.train.driver import train_model
from cluster.train.in_process import training_device
from vae_core.config import ModelConfig, StorageConfig, TrainConfig, TrainJobConfig
from vae_core.data import FASHION_MNIST_DIR, ArrayDataset, ArraySplit, read_fashion_mnist
from vae_core.presets import fmnist_best

BATCH = 128
BUNDLED_DATA = Path(__file__).resolve().parent.parent / ".gpu" / "fmnist"    # ../shared/gpu/make-bundle's subset
FULL = {"images": 60_000, "epochs": 3}
SMOKE = {"images": 256, "epochs": 2}


def classic_step(model, optimizer, x) -> float:
    """The example's loop body, loss.item() included (it sums the epoch's loss)."""
    optimizer.zero_grad()
    recon, mu, logvar = model(x)
    loss = classic_loss(recon, x, mu, logvar)
    loss.backward()
    optimizer.step()
    return loss.item()


def steady_rate(epoch_images: list[int], epoch_seconds: list[float]) -> float:
    """img/s over the epochs after the first (all of them when there is one)."""
    images, seconds = (epoch_images[1:], epoch_seconds[1:]) if len(epoch_images) > 1 else (epoch_images, epoch_seconds)
    return sum(images) / max(sum(seconds), 1e-9)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- (a) the classic example's input pipeline ----------------------------------------------------------------
def classic_dataset(data_dir: Path, scratch: Path, images: int) -> Dataset:
    """torchvision's FashionMNIST over the local IDX files, decompressed into `scratch`: never downloaded."""
    raw = scratch / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        with gzip.open(data_dir / f"{name}.gz") as src:
            (raw / name).write_bytes(src.read())
    full = datasets.FashionMNIST(str(scratch), train=True, download=False, transform=transforms.ToTensor())
    return Subset(full, range(min(images, len(full))))


def timed_epochs(device: torch.device, epochs: int, run_epoch) -> float:
    """The steady images/s of `epochs` calls of run_epoch() (which returns the images it trained on), the
    device synchronised before and after each, for the classic model made afresh with seed 0."""
    torch.manual_seed(0)
    model = ClassicVAE().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    counts, seconds = [], []
    for _ in range(epochs):
        model.train()
        sync(device)
        start = time.perf_counter()
        counts.append(run_epoch(model, optimizer))
        sync(device)
        seconds.append(time.perf_counter() - start)
    return steady_rate(counts, seconds)


def classic_loop(device: torch.device, dataset: Dataset, epochs: int) -> dict:
    kwargs = {"num_workers": 1, "pin_memory": True} if device.type == "cuda" else {}
    loader = DataLoader(dataset, batch_size=BATCH, shuffle=True, **kwargs)

    def epoch(model, optimizer) -> int:
        seen = 0
        for x, _ in loader:
            classic_step(model, optimizer, x.to(device))
            seen += x.shape[0]
        return seen
    return {"images_per_s": timed_epochs(device, epochs, epoch), "epochs": epochs, "images": len(dataset)}


# -- (b) the same loop with the data resident on the device ------------------------------------------------------
def resident_loop(device: torch.device, images: np.ndarray, epochs: int) -> dict:
    x_all = torch.from_numpy(images).to(device).float().div_(255).view(len(images), 784)

    def epoch(model, optimizer) -> int:
        order = torch.randperm(len(x_all), device=device)
        for s in range(0, len(x_all), BATCH):
            classic_step(model, optimizer, x_all[order[s:s + BATCH]])
        return len(x_all)
    return {"images_per_s": timed_epochs(device, epochs, epoch), "epochs": epochs, "images": len(x_all)}


# -- (c), (d) vaegen's single-process trainer --------------------------------------------------------------------
def vaegen_run(root: str, model: ModelConfig, train: TrainConfig) -> dict:
    job = TrainJobConfig(model=model, train=train, dataset="bench", storage=StorageConfig(root=root),
                         name=f"bench-{model.arch}-{train.precision}")
    result = train_model(job, progress=False)
    history = result.history
    return {"images_per_s": steady_rate([round(m.images_per_s * m.seconds) for m in history],
                                        [m.seconds for m in history]),
            "epochs": len(history), "images": result.summary["train_images"],
            "val_loss": history[-1].val_loss, "test_loss": result.summary["test_loss"]}


def ingest_subset(root: str, data: ArrayDataset, images: int) -> None:
    train, test = data.splits["train"], data.splits["test"]
    n_test = max(256, images // 6)
    subset = ArrayDataset({"train": ArraySplit(train.images[:images], train.labels[:images]),
                           "test": ArraySplit(test.images[:n_test], test.labels[:n_test])}, data.label_names,
                          data.source)
    ingest(open_storage(StorageConfig(root=root), for_writing=True), "bench", subset, progress=False)


def default_data_dir() -> Path:
    """The system's Fashion-MNIST, else the subset a GPU bundle carries (a GPU machine has no system copy)."""
    return Path(FASHION_MNIST_DIR) if Path(FASHION_MNIST_DIR).is_dir() or not BUNDLED_DATA.is_dir() else BUNDLED_DATA


def training_rows(device: str, smoke: bool, *, data_dir: str | os.PathLike | None = None,
                  images: int | None = None, epochs: int | None = None) -> list[dict]:
    """One dict per trainer: name, device, images_per_s, ratio_to_resident (and what each row trained).
    smoke: tiny sizes, seconds on a CPU. vaegen's trainer picks its own device (the GPU when there is one), so
    its rows name the device it used."""
    sizes = dict(SMOKE if smoke else FULL)
    sizes.update({k: v for k, v in (("images", images), ("epochs", epochs)) if v})
    target = torch.device(device)
    data_dir = Path(data_dir or default_data_dir())
    data = read_fashion_mnist(data_dir)
    n = min(sizes["images"], len(data.splits["train"].images))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        dataset = classic_dataset(data_dir, Path(tmp) / "torchvision", n)
        rows.append({"name": "classic DataLoader(ToTensor) loop", "device": str(target),
                     **classic_loop(target, dataset, sizes["epochs"])})
        rows.append({"name": "plain data-resident loop", "device": str(target),
                     **resident_loop(target, data.splits["train"].images[:n], sizes["epochs"])})
        root = str(Path(tmp) / "root")
        ingest_subset(root, data, n)
        mine = str(training_device())
        common = {"epochs": sizes["epochs"], "patience": sizes["epochs"], "val_fraction": 0.1}
        rows.append({"name": "vaegen single-process, MLP 784-400-20", "device": mine,
                     **vaegen_run(root, ModelConfig(), TrainConfig(batch_size=BATCH, **common))})
        best = fmnist_best()
        conv = replace(best.model, prior_components=0)      # the prior is fitted after training: not timed here
        for precision in ("fp32", "bf16"):
            rows.append({"name": f"vaegen single-process, fmnist-best conv, {precision}", "device": mine,
                         **vaegen_run(root, conv, replace(best.train, precision=precision, **common))})
    resident = rows[1]["images_per_s"]
    return [{**row, "ratio_to_resident": row["images_per_s"] / resident} for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (seconds on a CPU)")
    parser.add_argument("--device", default=str(training_device()), help="where the reference loops run")
    parser.add_argument("--data", default=str(default_data_dir()), help="folder of the Fashion-MNIST IDX files")
    parser.add_argument("--images", type=int, default=0, help="training images (0: the mode's default)")
    parser.add_argument("--epochs", type=int, default=0, help="epochs (0: the mode's default)")
    args = parser.parse_args()
    machine = {"torch": torch.__version__, "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
               **({"gpu": torch.cuda.get_device_name()} if torch.cuda.is_available() else {})}
    for row in training_rows(args.device, args.smoke, data_dir=args.data, images=args.images or None,
                             epochs=args.epochs or None):
        print(json.dumps({"bench": "gpu_train", **row, **machine}), flush=True)


if __name__ == "__main__":
    main()
