"""Flags shared by several verbs, and their translation into the config dataclasses."""
from __future__ import annotations

import argparse

from vae_core.config import ModelConfig, StorageConfig, TrainConfig, TrainJobConfig
from vae_core.presets import PRESETS, with_preset


class Given(argparse.Action):
    """Stores the value and records that the user typed the flag, so a --preset fills only the others."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)
        setattr(namespace, "given", given_flags(namespace) | {self.dest})


class GivenTrue(Given):
    def __init__(self, option_strings, dest, default=False, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, const=True, default=default, **kwargs)


def given_flags(args: argparse.Namespace) -> set[str]:
    return set(getattr(args, "given", set()))


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
    for name, action in ((None, Given), ("store", Given), ("store_true", GivenTrue)):
        p.register("action", name, action)          # flags added from here on record that they were typed
    p.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="a named recipe that sets the defaults below (flags you type still win): "
                        + "; ".join(f"{k}: {v.description}" for k, v in PRESETS.items()))
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
    g.add_argument("--lr-schedule", choices=["constant", "cosine"], default=t.lr_schedule,
                   help="learning rate per epoch (default: %(default)s)")
    g.add_argument("--kl-warmup-epochs", type=int, default=t.kl_warmup_epochs,
                   help="ramp the KL weight up over the first N epochs (default: %(default)s)")


def train_job_config(args: argparse.Namespace) -> TrainJobConfig:
    model = dict(arch=args.arch, latent_dim=args.latent_dim, hidden_dim=args.hidden_dim,
                 likelihood=args.likelihood, sigma=args.sigma)
    train = dict(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, beta=args.beta,
                 patience=args.patience, val_fraction=args.val_fraction, binarize=args.binarize,
                 max_images=args.max_images, seed=args.seed, threads=args.threads,
                 lr_schedule=args.lr_schedule, kl_warmup_epochs=args.kl_warmup_epochs)
    conditional = args.conditional
    if args.preset:
        model, train, preset_conditional = with_preset(args.preset, model, train, given_flags(args))
        conditional = conditional if preset_conditional is None else preset_conditional
    name = args.name or args.preset or f"{args.dataset}-{args.arch}{'-cond' if conditional else ''}"
    return TrainJobConfig(model=ModelConfig(**model), train=TrainConfig(**train), storage=storage_config(args),
                          dataset=args.dataset, name=name, conditional=conditional)
