"""`vaegen train` and `vaegen sample`."""
from __future__ import annotations

import argparse
import sys

from cluster.runtime.console import terminal_stderr
from vae_core.errors import VaegenError
from vae_core.names import MODEL_SPEC_HELP, check_model_spec

from .args import add_progress_arg, add_storage_args, add_train_job_args, storage_config, train_job_config
from .out_file import check_out, is_stdout, write_out

MAX_GRID_SAMPLES = 10_000          # one PNG grid; more is a job for `vaegen generate`


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a VAE on an ingested dataset and publish a model version",
                       description="Train a VAE and publish it as models/<name>/v000N/ on the storage root.")
    add_train_job_args(p)
    add_progress_arg(p)
    p.set_defaults(run=run_train)

    p = sub.add_parser("sample", help="write a PNG grid of samples from a model version",
                       description="Decode latents drawn from the prior into a PNG grid.")
    p.add_argument("--model", required=True, help=MODEL_SPEC_HELP)
    p.add_argument("--count", type=int, default=64, help="number of samples (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--label", type=int, default=None, help="class to sample (conditional models)")
    p.add_argument("--out", default="samples.png", help="local PNG path; '-' = stdout, a FIFO or device is written "
                   "through, a symbolic link writes its target (default: %(default)s)")
    add_storage_args(p)
    p.set_defaults(run=run_sample)


def run_train(args: argparse.Namespace) -> int:
    from cluster.train.driver import train_model
    result = train_model(train_job_config(args), address=args.address, progress=args.progress)
    s = result.summary
    if result.already_trained:
        print(already_trained(result, given_id=bool(args.run_id)))
        return 0
    backend = f"{s['workers']} Ray Train workers" if "workers" in s else "one process"
    print(f"run {s['run_id']}: {backend}, {s['epochs_run']} epochs")
    test = f", test loss {s['test_loss']:.2f}" if "test_loss" in s else ""
    print(f"published {result.ref}: best epoch {s['best_epoch'] + 1}, val loss {s['best_val_loss']:.2f}{test} "
          f"nats/image")
    return 0


def already_trained(result, *, given_id: bool) -> str:
    """The line for a run that had published before: which version, and how to train another."""
    s = result.summary
    test = f", test loss {s['test_loss']:.2f} nats/image" if "test_loss" in s else ""
    if given_id:
        return f"run {s['run_id']} finished before: model {result.ref}{test}; a new --run-id trains again"
    return (f"model {result.ref} already trained by this exact command: run {s['run_id']} (the same settings, seed "
            f"and dataset generation){test}; another --seed or --run-id trains again")


def run_sample(args: argparse.Namespace) -> int:
    import torch

    from cluster.store.registry import Registry
    from cluster.store.storage import open_storage
    from vae_core.images import image_grid, png_bytes, to_uint8

    check_model_spec(args.model, "--model")
    if not 0 < args.count <= MAX_GRID_SAMPLES:
        raise VaegenError(f"--count={args.count} must be between 1 and {MAX_GRID_SAMPLES:,} "
                          "(`vaegen generate` writes more, as shards)")
    check_out(args.out)                           # before the model loads: a typo costs nothing
    loaded = Registry(open_storage(storage_config(args))).load(args.model)
    cfg = loaded.model.cfg
    labels = None
    if cfg.conditional:
        if args.label is not None and not 0 <= args.label < cfg.num_classes:
            raise VaegenError(f"--label={args.label} is outside the model's {cfg.num_classes} classes")
        labels = (torch.full((args.count,), args.label) if args.label is not None
                  else torch.arange(args.count) % cfg.num_classes)
    elif args.label is not None:
        raise VaegenError(f"{loaded.ref} is not conditional: drop --label")
    z = loaded.model.sample_prior(args.count, labels, torch.Generator().manual_seed(args.seed))
    png = png_bytes(image_grid(to_uint8(loaded.model.generate(z, labels))))
    write_out(args.out, png)
    # With the PNG on stdout, the report goes to stderr so that the stream stays one image.
    print(f"wrote {args.count} samples of {loaded.ref} to {'stdout' if is_stdout(args.out) else args.out}",
          file=terminal_stderr() if is_stdout(args.out) else sys.stdout)
    return 0
