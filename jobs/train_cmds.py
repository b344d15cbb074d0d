"""`vaegen train` and `vaegen sample`."""
from __future__ import annotations

import argparse
import contextlib
import os
import stat
import uuid

from vae_core.errors import VaegenError
from vae_core.names import MODEL_SPEC_HELP, check_model_spec

from .args import add_progress_arg, add_storage_args, add_train_job_args, storage_config, train_job_config

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
    p.add_argument("--out", default="samples.png", help="local PNG path (default: %(default)s)")
    add_storage_args(p)
    p.set_defaults(run=run_sample)


def run_train(args: argparse.Namespace) -> int:
    from cluster.train.driver import train_model
    result = train_model(train_job_config(args), address=args.address, progress=args.progress)
    s = result.summary
    backend = f"{s['workers']} Ray Train workers" if "workers" in s else "one process"
    print(f"run {s['run_id']}: {backend}, {s['epochs_run']} epochs")
    test = f", test loss {s['test_loss']:.2f}" if "test_loss" in s else ""
    print(f"published {result.ref}: best epoch {s['best_epoch'] + 1}, val loss {s['best_val_loss']:.2f}{test} "
          f"nats/image")
    return 0


def run_sample(args: argparse.Namespace) -> int:
    import torch

    from cluster.store.registry import Registry
    from cluster.store.storage import open_storage
    from vae_core.images import image_grid, png_bytes, to_uint8

    check_model_spec(args.model, "--model")
    if not 0 < args.count <= MAX_GRID_SAMPLES:
        raise VaegenError(f"--count={args.count} must be between 1 and {MAX_GRID_SAMPLES:,} "
                          "(`vaegen generate` writes more, as shards)")
    check_out_path(args.out)                      # before the model loads: a typo costs nothing
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
    try:
        replace_file(args.out, png)
    except OSError as e:
        raise VaegenError(f"cannot write --out={args.out}: {e.strerror or e}") from None
    print(f"wrote {args.count} samples of {loaded.ref} to {args.out}")
    return 0


def check_out_path(path: str) -> None:
    """A local file path whose folder exists and is writable, or a one-line VaegenError naming --out."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise VaegenError(f"--out={path} is a directory: give a file path, e.g. {os.path.join(path, 'samples.png')}")
    if not os.path.isdir(folder):
        raise VaegenError(f"--out={path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise VaegenError(f"--out={path}: folder {folder} is not writable")


def replace_file(path: str, data: bytes) -> None:
    """Write `data` to `path` as one rename: a temp file beside it, fsynced, then os.replace. A failure leaves
    an existing file as it was and creates no empty or partial one. A new file gets the mode open() would
    give (0666 less the umask); a replaced file keeps its mode."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mode = None
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:12]}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):            # the rename itself survives a power loss once its folder is synced
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
