"""Flags shared by several verbs, and their translation into the config dataclasses."""
from __future__ import annotations

import argparse

from vae_core.config import ModelConfig, StorageConfig, TrainConfig, TrainJobConfig


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
