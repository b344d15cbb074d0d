"""Ray Train (1 and 2 workers) vs vaegen's single-process trainer: same model, data, epochs, global batch.

Prints one JSON line per trainer: images/s inside the training loop (epoch 1, which streams from storage,
and the later epochs), images/s end to end (start of the call to the published version), and for Ray the
seconds from the start of the call (ray.init included) to the first training batch. The single process runs
with torch's default threads and with one thread (multi-threaded torch collapses on a loaded machine);
`ratio_vs_single` compares Ray's later-epoch images/s with the faster of the two, measured in the same run.

    PYTHONPATH=. python bench/train_ray.py --images 60000 --epochs 4      # the full figures
    PYTHONPATH=. python bench/train_ray.py --images 4000 --epochs 2       # a quick check that it runs
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cluster.datasets import ingest                                        # noqa: E402
from cluster.local_train import TrainResult, train_single_process        # noqa: E402
from cluster.storage import open_storage                                  # noqa: E402
from cluster.train import train_on_ray                                    # noqa: E402
from vae_core.config import RayTrainConfig, StorageConfig, TrainConfig, TrainJobConfig  # noqa: E402
from vae_core.data import ArrayDataset, ArraySplit, read_fashion_mnist   # noqa: E402


def figures(result: TrainResult, seconds: float) -> dict:
    rates = [m.images_per_s for m in result.history]
    images = result.summary["train_images"] * len(result.history)
    return {"epochs": len(result.history), "train_images": result.summary["train_images"],
            "img_per_s_epoch1": round(rates[0]),
            "img_per_s_later_epochs": round(statistics.median(rates[1:])) if len(rates) > 1 else None,
            "img_per_s_end_to_end": round(images / seconds), "seconds": round(seconds, 1),
            "val_loss": round(result.summary["best_val_loss"], 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=60_000, help="training images (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=128, help="global batch (default: %(default)s)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = p.parse_args()

    fashion = read_fashion_mnist()
    train = fashion.splits["train"]
    with tempfile.TemporaryDirectory(prefix="vaegen-bench-") as root:
        storage_cfg = StorageConfig(root=root)
        dataset = ArrayDataset({"train": ArraySplit(train.images[:args.images], train.labels[:args.images])},
                               fashion.label_names, fashion.source)
        ingest(open_storage(storage_cfg, for_writing=True), "fashion-mnist", dataset, progress=False)
        job = TrainJobConfig(storage=storage_cfg, dataset="fashion-mnist", name="bench",
                             train=TrainConfig(epochs=args.epochs, batch_size=args.batch_size,
                                               patience=args.epochs))
        common = {"bench": "train_ray", "model": "mlp 784-400-20", "batch_global": args.batch_size,
                  "cpus": os.cpu_count()}

        base = 0
        for threads in (0, 1):
            torch.set_num_threads(threads or os.cpu_count())
            started = time.perf_counter()
            single = figures(train_single_process(replace(job, train=replace(job.train, threads=threads)),
                                                  progress=False), time.perf_counter() - started)
            print(json.dumps({**common, "trainer": "single-process", "workers": 1,
                              "torch_threads": torch.get_num_threads(), **single}), flush=True)
            base = max(base, single["img_per_s_later_epochs"] or single["img_per_s_epoch1"])
        for workers in args.workers:
            ray_job = replace(job, ray=RayTrainConfig(workers=workers, max_failures=0))
            started = time.perf_counter()
            result = train_on_ray(ray_job, progress=False)
            ray_figures = figures(result, time.perf_counter() - started)
            later = ray_figures["img_per_s_later_epochs"] or ray_figures["img_per_s_epoch1"]
            print(json.dumps({**common, "trainer": "ray-train", "workers": workers, "torch_threads": 1,
                              **ray_figures,
                              "seconds_to_first_batch": round(result.summary["seconds_to_first_batch"], 1),
                              "ratio_vs_single": round(later / base, 2)}), flush=True)


if __name__ == "__main__":
    main()
