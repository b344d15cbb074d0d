"""`vaegen train` and `vaegen sample`."""
from __future__ import annotations

import argparse
import sys

from cluster.runtime.console import terminal_stderr
from vae_core.errors import VaegenError
from vae_core.names import MODEL_SPEC_HELP, check_model_spec

from .args import add_progress_arg, add_storage_args, add_train_job_args, counted, storage_config, train_job_config
from .out_file import check_out, is_stdout, s3_out, write_out

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
    p.add_argument("--count", type=int, default=64, help="number of samples, 8 a row as torchvision's make_grid lays "
                   "them out (a conditional model without --label: one column per class) (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--label", type=int, default=None, help="class to sample (conditional models)")
    p.add_argument("--out", default="samples.png", help="PNG path, local or s3://bucket/key (--s3-endpoint applies); "
                   "'-' = stdout, a FIFO or device is written "
                   "through, a symbolic link writes its target (default: %(default)s)")
    add_storage_args(p)
    p.set_defaults(run=run_sample)


def run_train(args: argparse.Namespace) -> int:
    job = train_job_config(args)                    # a bad flag is refused before the slow import of torch
    from cluster.train.driver import train_model
    result = train_model(job, address=args.address, progress=args.progress, connect_timeout=args.connect_timeout)
    s = result.summary
    if result.already_trained:
        print(already_trained(result, given_id=bool(args.run_id)))
        return 0
    backend = f"{s['workers']} Ray Train workers" if "workers" in s else "one process"
    print(f"run {s['run_id']}: {backend}, {counted(s['epochs_run'], 'epoch')}")
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
    check_model_spec(args.model, "--model")
    if not 0 < args.count <= MAX_GRID_SAMPLES:
        raise VaegenError(f"--count={args.count} must be between 1 and {MAX_GRID_SAMPLES:,} "
                          "(`vaegen generate` writes more, as shards)")
    to_s3 = s3_out(args.out, storage_config(args))    # before torch and the model load: a typo costs nothing
    if to_s3 is None:
        check_out(args.out)
    import torch

    from cluster.store.registry import Registry
    from cluster.store.storage import open_storage
    from vae_core.artifacts import NROW, grid_png
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
    columns = cfg.num_classes if cfg.conditional and args.label is None else NROW
    png = grid_png(loaded.model.generate(z, labels), nrow=columns)
    if to_s3 is not None:
        to_s3[0].publish(to_s3[1], png)
    else:
        write_out(args.out, png)
    # With the PNG on stdout, the report goes to stderr so that the stream stays one image.
    print(f"wrote {counted(args.count, 'sample')} of {loaded.ref} to {'stdout' if is_stdout(args.out) else args.out}",
          file=terminal_stderr() if is_stdout(args.out) else sys.stdout)
    return 0
