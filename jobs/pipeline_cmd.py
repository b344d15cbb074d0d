"""`vaegen pipeline`: the main job, end to end, on the embedded default (local storage, real Fashion-MNIST)."""
from __future__ import annotations

import argparse

from .args import add_progress_arg, add_storage_args, add_train_args, storage_config, train_job_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pipeline", help="ingest Fashion-MNIST, train, publish a model version (the main job)",
                       description="The main job: ingest Fashion-MNIST (once), train a VAE, publish a model "
                                   "version with sample/reconstruction grids and loss curves.")
    add_train_args(p)
    add_storage_args(p)
    add_progress_arg(p)
    p.add_argument("--source", default=None, help="Fashion-MNIST IDX folder (default: the Debian package's)")
    p.set_defaults(run=run_pipeline)


def run_pipeline(args: argparse.Namespace) -> int:
    from cluster.datasets import read_manifest
    from cluster.ingest import ingest_source
    from cluster.local_train import train_single_process
    from cluster.storage import open_storage
    from vae_core.errors import VaegenError

    job = train_job_config(args)
    storage = open_storage(storage_config(args), for_writing=True)
    try:
        read_manifest(storage, job.dataset)
        print(f"[1/2] dataset {job.dataset} already in {storage.uri}")
    except VaegenError:
        print(f"[1/2] ingesting Fashion-MNIST into {storage.uri}")
        ingest_source("fashion-mnist", args.source, job.storage, name=job.dataset, progress=args.progress)
    print(f"[2/2] training {job.name} ({job.model.arch}, {job.train.epochs} epochs)")
    result = train_single_process(job, progress=args.progress)
    version_uri = storage.uri_of(f"models/{result.ref.name}/{result.ref.version}")
    s = result.summary
    print(f"\nmodel {result.ref} → {version_uri}")
    print(f"  test loss {s.get('test_loss', float('nan')):.2f} nats/image "
          f"(recon {s.get('test_recon', float('nan')):.2f}, KL {s.get('test_kl', float('nan')):.2f}); "
          f"best epoch {s['best_epoch'] + 1} of {s['epochs_run']}; {s['seconds']:.0f} s")
    print(f"  look at: samples.png, recon.png, curves.png in {version_uri}")
    return 0
