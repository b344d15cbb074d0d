"""Flags shared by several verbs, and their translation into the config dataclasses."""
from __future__ import annotations

import argparse

from vae_core.config import ModelConfig, RayTrainConfig, StorageConfig, TrainConfig, TrainJobConfig
from vae_core.errors import VaegenError


def add_storage_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("storage")
    g.add_argument("--root", default=StorageConfig.root,
                   help="storage root: a local folder, file://path or s3://bucket/prefix (default: %(default)s)")
    g.add_argument("--s3-endpoint", default=None,
                   help="S3 endpoint URL, e.g. http://127.0.0.1:9000 (default: $AWS_ENDPOINT_URL, else AWS)")


def storage_config(args: argparse.Namespace) -> StorageConfig:
    return StorageConfig(root=args.root, s3_endpoint=args.s3_endpoint)


def add_progress_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")


def add_train_args(p: argparse.ArgumentParser) -> None:
    m, t = ModelConfig(), TrainConfig()
    g = p.add_argument_group("model")
    g.add_argument("--model", dest="arch", choices=["mlp", "conv"], default=m.arch,
                   help="architecture: mlp (the reference 784-400-20 design) or conv (default: %(default)s)")
    g.add_argument("--latent-dim", type=int, default=m.latent_dim, help="latent size Z (default: %(default)s)")
    g.add_argument("--hidden-dim", type=int, default=m.hidden_dim, help="hidden layer width (default: %(default)s)")
    g.add_argument("--conditional", action="store_true", help="condition encoder and decoder on the labels")
    g.add_argument("--likelihood", choices=["bernoulli", "gaussian"], default=m.likelihood,
                   help="reconstruction term (default: %(default)s)")
    g.add_argument("--sigma", type=float, default=m.sigma, help="gaussian σ; 0 = learned (default: %(default)s)")
    g = p.add_argument_group("training")
    g.add_argument("--dataset", default=TrainJobConfig.dataset, help="dataset name under datasets/ (default: %(default)s)")
    g.add_argument("--name", default=None, help="model name in the registry (default: <dataset>-<model>)")
    g.add_argument("--epochs", type=int, default=t.epochs, help="(default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=t.batch_size, help="(default: %(default)s)")
    g.add_argument("--lr", type=float, default=t.lr, help="Adam learning rate (default: %(default)s)")
    g.add_argument("--beta", type=float, default=t.beta, help="weight on the KL term (default: %(default)s)")
    g.add_argument("--patience", type=int, default=t.patience, help="early-stopping patience (default: %(default)s)")
    g.add_argument("--val-fraction", type=float, default=t.val_fraction, help="(default: %(default)s)")
    g.add_argument("--binarize", action="store_true", help="dynamic binarisation of the pixels per batch")
    g.add_argument("--max-images", type=int, default=0, help="train on the first N images only (0 = all)")
    g.add_argument("--seed", type=int, default=t.seed, help="(default: %(default)s)")
    g.add_argument("--threads", type=int, default=t.threads, help="torch threads; 0 = torch's default")


def train_job_config(args: argparse.Namespace) -> TrainJobConfig:
    model = ModelConfig(arch=args.arch, latent_dim=args.latent_dim, hidden_dim=args.hidden_dim,
                        likelihood=args.likelihood, sigma=args.sigma)
    train = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, beta=args.beta,
                        patience=args.patience, val_fraction=args.val_fraction, binarize=args.binarize,
                        max_images=args.max_images, seed=args.seed, threads=args.threads)
    name = args.name or f"{args.dataset}-{args.arch}{'-cond' if args.conditional else ''}"
    return TrainJobConfig(model=model, train=train, storage=storage_config(args), dataset=args.dataset,
                          name=name, conditional=args.conditional)


def add_ray_train_args(p: argparse.ArgumentParser, default_workers: int | None = None) -> None:
    r = RayTrainConfig()
    g = p.add_argument_group("Ray Train (data-parallel)")
    g.add_argument("--workers", type=int, default=default_workers, metavar="N",
                   help="train data-parallel on Ray Train with N workers; --batch-size is the global batch "
                        + ("(default: %(default)s)" if default_workers else "(default: one process, no Ray)"))
    g.add_argument("--gpus-per-worker", type=float, default=r.gpus_per_worker, metavar="G",
                   help="GPUs per worker; 0 = CPU workers with gloo, > 0 = NCCL (default: %(default)s)")
    g.add_argument("--cpus-per-worker", type=float, default=r.cpus_per_worker, metavar="C",
                   help="(default: %(default)s)")
    g.add_argument("--address", default=None, metavar="ADDR",
                   help="join this Ray cluster (e.g. ray://head:10001 or auto); default: start a local Ray")
    g.add_argument("--run-id", default=r.run_id, metavar="ID",
                   help="checkpoints go to train-runs/<run-id>/; rerunning the same id resumes (default: a new id)")
    g.add_argument("--max-failures", type=int, default=r.max_failures, metavar="K",
                   help="worker-group restarts from the last checkpoint before giving up (default: %(default)s)")
    g.add_argument("--keep-checkpoints", type=int, default=r.checkpoints_to_keep, metavar="K",
                   help="checkpoints kept per run (default: %(default)s)")
    g.add_argument("--stream-epochs", action="store_true",
                   help="stream every epoch from storage instead of keeping each worker's shard in memory")


def ray_train_config(args: argparse.Namespace) -> RayTrainConfig | None:
    """The Ray Train settings, or None when --workers is not given (train in one process)."""
    if args.workers is None:
        ray_only = {"--address": args.address, "--run-id": args.run_id, "--gpus-per-worker": args.gpus_per_worker}
        given = [flag for flag, value in ray_only.items() if value]
        if given:
            raise VaegenError(f"{', '.join(given)} {'apply' if len(given) > 1 else 'applies'} only to Ray Train: "
                              "add --workers N")
        return None
    return RayTrainConfig(workers=args.workers, gpus_per_worker=args.gpus_per_worker,
                          cpus_per_worker=args.cpus_per_worker, run_id=args.run_id,
                          max_failures=args.max_failures, checkpoints_to_keep=args.keep_checkpoints,
                          cache_shards=not args.stream_epochs)
