"""One GPU node at its bound: what the decoder alone can do, what each output format reaches through `vaegen
generate` (steady state and start-up apart), the ratio of the two, and training beside two reference loops.
One JSON line per measurement ({"bench": "gpu", "what": ...}):

    what=environment     device, its name and memory, torch, CPUs
    what=decoder_bound   per model (mlp = the reference 784-400-20, conv = --preset fmnist-best's decoder): z →
                         decoder → uint8 → host copy, batch 4096, one process, warm: the ceiling of generation
    what=generate        per format and model: run_generation with --workers auto (the whole node) to a local
                         root; steady_samples_per_s (after every worker's first shard), startup_s (Ray up and
                         every worker holding its model), ratio_to_bound = steady / the model's decoder bound
    what=training        rows from bench/gpu_train.py's training_rows(device, smoke), when that file is there

The device is cuda when torch sees one, else the CPU. --smoke runs every row at tiny sizes (CI runs it, so the
script cannot rot); its figures say nothing about speed.

    .venv/bin/python bench/gpu.py [--count 4000000] [--image-count 400000] [--workers auto] [--root DIR]
    .venv/bin/python bench/gpu.py --smoke

On a GPU machine without Ray or a package index: bench/gpu_bundle.sh here (../shared/gpu's bundle plus vaegen's own
wheels), then, there, `. .gpu/on-device.sh && python3 bench/gpu.py` (run's carry: [".gpu"]).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))        # gpu_train.py, generate.py beside this
from generate import MODELS  # noqa: E402  (bench/generate.py's models)

from cluster.generate.driver import run_generation  # noqa: E402
from cluster.generate.writers import WRITERS  # noqa: E402
from cluster.runtime.ray_session import ray_runtime  # noqa: E402
from cluster.store.registry import Registry  # noqa: E402
from cluster.store.storage import open_storage  # noqa: E402
from vae_core.checkpoint import checkpoint_files  # noqa: E402
from vae_core.config import StorageConfig  # noqa: E402
from vae_core.images import to_uint8  # noqa: E402
from vae_core.models import build_model  # noqa: E402
from vae_core.use_configs import GenerateConfig

BOUND_BATCH = 4096
# (format, model) pairs measured: Parquet for both models; image files for the conv model, the kind one
# generates pictures from. A format another module adds to WRITERS is measured without a change here.
IMAGE_FORMAT_MODEL = "conv"


def emit(what: str, **record) -> None:
    print(json.dumps({"bench": "gpu", "what": what, **record}), flush=True)


def pick_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def decoder_bound(arch: str, device: str, count: int, batch: int) -> float:
    """Samples/s of z → decoder → uint8 → host, warm, in this process (no Ray, no storage, no encoding)."""
    model = build_model(MODELS[arch]).to(device).eval()
    z = torch.randn(count, MODELS[arch].latent_dim, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.inference_mode():
        to_uint8(model.generate(z[:batch]))                           # warm-up: kernels chosen, memory pooled
        sync(device)
        start = time.perf_counter()
        for i in range(0, count, batch):
            to_uint8(model.generate(z[i:i + batch]))                  # .cpu() inside: the host copy is timed
        sync(device)
    return count / (time.perf_counter() - start)


def environment(device: str) -> dict:
    info = {"device": device, "torch": torch.__version__, "cpus": os.cpu_count(), "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d", time.gmtime())}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    gpus=torch.cuda.device_count())
    return info


def generation_rows(root: str, device: str, bounds: dict[str, float], args) -> None:
    storage_cfg = StorageConfig(root=root)
    registry = Registry(open_storage(storage_cfg, for_writing=True))
    for arch in MODELS:
        torch.manual_seed(0)
        registry.publish(f"bench-{arch}", checkpoint_files(build_model(MODELS[arch])))
    started = time.perf_counter()
    with ray_runtime(num_cpus=os.cpu_count(), dashboard=False):
        ray_seconds = time.perf_counter() - started
        for fmt in WRITERS:
            for arch in MODELS if fmt == "parquet" else (IMAGE_FORMAT_MODEL,):
                count = args.count if fmt == "parquet" else args.image_count
                job = GenerateConfig(model=f"bench-{arch}", count=count, shard_size=args.shard_size, format=fmt,
                                     decode_batch=args.decode_batch, seed=int(time.time()))   # a fresh job each run
                t0 = time.perf_counter()
                manifest = run_generation(job, storage_cfg, workers=args.workers, progress=False)
                run = manifest["run"]
                steady = run["steady_samples_per_s"]
                emit("generate", format=fmt, model=arch, device=device, count=count, shard_size=args.shard_size,
                     workers=run["workers"], shards=len(manifest["shards"]),
                     steady_samples_per_s=steady, samples_per_s=run["samples_per_s"],
                     startup_s=run["startup_seconds"], ray_start_s=ray_seconds, total_s=time.perf_counter() - t0,
                     bytes_per_sample=manifest["totals"]["bytes"] / count if "totals" in manifest else None,
                     bound_samples_per_s=bounds[arch],
                     ratio_to_bound=steady / bounds[arch] if steady else None)
                ray_seconds = 0.0                                      # paid once, by the first job


def training(device: str, smoke: bool) -> None:
    try:
        from gpu_train import training_rows  # bench/gpu_train.py, written separately
    except ImportError as e:
        emit("training", device=device, skipped=f"bench/gpu_train.py not importable: {e}")
        return
    for row in training_rows(device, smoke):
        emit("training", **{"device": device, **row})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes on any device, for CI")
    p.add_argument("--count", type=int, default=4_000_000, help="samples per Parquet job")
    p.add_argument("--image-count", type=int, default=400_000, help="samples per image-file job (png, jpeg)")
    p.add_argument("--shard-size", type=int, default=50_000)
    p.add_argument("--decode-batch", type=int, default=BOUND_BATCH)
    p.add_argument("--bound-count", type=int, default=BOUND_BATCH * 64, help="samples per decoder-bound run")
    p.add_argument("--workers", default="auto", help="DecoderWorkers per job (default auto: the whole node)")
    p.add_argument("--root", default=None, help="local root for the jobs (default: a temporary folder)")
    p.add_argument("--no-training", action="store_true")
    args = p.parse_args()
    if args.smoke:
        args.count, args.image_count, args.shard_size, args.decode_batch = 512, 256, 64, 64
        args.bound_count, args.workers = 1024, 1                        # one actor start per job: CI's time
    logging.getLogger("ray").setLevel(logging.WARNING)
    device = pick_device()
    emit("environment", smoke=args.smoke, **environment(device))
    bound_batch = args.decode_batch if args.smoke else BOUND_BATCH
    bounds = {}
    for arch in MODELS:
        bounds[arch] = decoder_bound(arch, device, args.bound_count, bound_batch)
        emit("decoder_bound", model=arch, device=device, batch=bound_batch, count=args.bound_count,
             samples_per_s=bounds[arch])
    with tempfile.TemporaryDirectory(prefix="vaegen-gpu-bench-") as tmp:
        generation_rows(args.root or tmp, device, bounds, args)
    if not args.no_training:
        training(device, args.smoke)


if __name__ == "__main__":
    main()
