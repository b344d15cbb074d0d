"""What `--stream-epochs` costs on a small dataset: the same 2-worker Ray Train run with the training rows held in
the object store, streamed by Ray Data with vaegen's footer-reader sizing (one actor per ten shard files), and
streamed with Ray Data's own default (32 footer-reading actors started for every epoch's read). One JSON line per
setting: each run's seconds from train_model's call to the published version, a fresh driver process (and local
Ray) per run, the settings alternating; the medians' ratios against the in-memory run.

    .venv/bin/python bench/stream_epochs.py [--images 2000] [--shard-rows 500] [--epochs 2] [--repeat 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SETTINGS = {"in-memory": {}, "streamed": {},
            "streamed, Ray Data's 32 footer readers": {"RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "32"}}


def prepare(root: str, images: int, shard_rows: int) -> None:
    from cluster.data.datasets import ingest
    from cluster.store.storage import open_storage
    from vae_core.config import StorageConfig
    from vae_core.data import ArrayDataset, ArraySplit, read_fashion_mnist
    fm = read_fashion_mnist()
    train, test = fm.splits["train"], fm.splits["test"]
    data = ArrayDataset({"train": ArraySplit(train.images[:images], train.labels[:images]),
                         "test": ArraySplit(test.images[:500], test.labels[:500])}, fm.label_names, "bench")
    ingest(open_storage(StorageConfig(root=root), for_writing=True), "fm", data, shard_rows=shard_rows,
           progress=False)


def run_once(root: str, stream: bool, epochs: int) -> float:
    """One training run in this process; its seconds."""
    from cluster.train.driver import train_model
    from vae_core.config import ModelConfig, RayTrainConfig, StorageConfig, TrainConfig, TrainJobConfig
    job = TrainJobConfig(storage=StorageConfig(root=root), dataset="fm", name="m",
                         model=ModelConfig(hidden_dim=128, latent_dim=8),
                         train=TrainConfig(epochs=epochs, batch_size=64, patience=epochs),
                         run_id=f"run-{time.time_ns()}", ray=RayTrainConfig(workers=2, stream_epochs=stream))
    start = time.perf_counter()
    train_model(job, progress=False)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--shard-rows", type=int, default=500)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--child", nargs=2, metavar=("ROOT", "STREAM"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps({"seconds": run_once(args.child[0], args.child[1] == "1", args.epochs)}))
        return
    with tempfile.TemporaryDirectory() as tmp:
        prepare(tmp, args.images, args.shard_rows)
        seconds = {name: [] for name in SETTINGS}
        for _ in range(args.repeat):
            for name, env in SETTINGS.items():
                out = subprocess.run([sys.executable, __file__, "--epochs", str(args.epochs), "--child", tmp,
                                      "0" if name == "in-memory" else "1"], env={**os.environ, **env},
                                     capture_output=True, text=True, check=True)
                seconds[name].append(json.loads(out.stdout.strip().splitlines()[-1])["seconds"])
    base = statistics.median(seconds["in-memory"])
    for name, runs in seconds.items():
        print(json.dumps({"bench": "stream_epochs", "setting": name, "images": args.images,
                          "shards": -(-args.images // args.shard_rows), "epochs": args.epochs, "workers": 2,
                          "cores": os.cpu_count(), "seconds": [round(s, 1) for s in runs],
                          "median_s": round(statistics.median(runs), 1),
                          "vs_in_memory": round(statistics.median(runs) / base, 2)}), flush=True)


if __name__ == "__main__":
    main()
