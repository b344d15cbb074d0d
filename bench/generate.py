"""Generation throughput, in one run: the decoder alone in one process (the compute bound), decode + PNG
and decode + JPEG encoding in one process (the PNG and JPEG bounds), and `vaegen generate` (run_generation: Ray
DecoderWorkers) to a local root and to a moto S3 root over HTTP, for Parquet, PNG and JPEG; then the driver's
peak RSS for a large Parquet job (in a fresh process, at count/10 and count, to show it stays flat). One JSON
line per measurement.

The Parquet target is against the decoder in one process with one torch thread per worker (the compute
bound). Workers decode with one thread each (a shard's floats must not depend on the thread count), so the
same decoder in one single-threaded process per worker is shown beside it: where the two differ, the gap is
parallelism (threads vs processes), not the pipeline's own work. The ratios stay against the one-process bound.

--model mlp (default) measures the reference MLP 784-400-20, whose decoder is so cheap (≈3 µs a sample) that
a shard's encoding, hashing and publishing cost as much as its decoding: its ratio is the pipeline's overhead at
its most visible. --model conv measures the --preset fmnist-best decoder, the kind of model one generates from.

    .venv/bin/python bench/generate.py [--count 500000] [--rss-count 1000000] [--workers 2]
    .venv/bin/python bench/generate.py --model conv --count 100000 --rss-count 100000
    quick check: .venv/bin/python bench/generate.py --count 20000 --rss-count 50000 --repeat 1
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch
from scale import memory_mib  # bench/scale.py, beside this script (its directory is on sys.path)

from cluster.generate.driver import run_generation
from cluster.generate.settings import RunSettings
from cluster.store.registry import Registry
from cluster.store.storage import open_storage
from vae_core.checkpoint import checkpoint_files
from vae_core.config import ModelConfig, StorageConfig
from vae_core.images import jpeg_encoder, jpeg_files, png_encoder, png_files, to_uint8
from vae_core.models import build_model
from vae_core.use_configs import GenerateConfig

MODELS = {   # random weights: speed does not depend on them
    "mlp": ModelConfig(image_shape=(1, 28, 28)),                                   # 784-400-20, the reference
    "conv": ModelConfig(image_shape=(1, 28, 28), arch="conv", conv_channels=(32, 64), hidden_dim=512,
                        latent_dim=32)}                                             # --preset fmnist-best's
SHARD_SIZE = 10_000
FORMATS = ("parquet", "png", "jpeg")


def emit(record: dict) -> None:
    print(json.dumps({"bench": "generate", **record}), flush=True)


def publish_model(storage_cfg: StorageConfig, arch: str) -> None:
    torch.manual_seed(0)
    Registry(open_storage(storage_cfg, for_writing=True)).publish(f"bench-{arch}",
                                                                  checkpoint_files(build_model(MODELS[arch])))


ENCODERS = {"png": png_files, "jpeg": jpeg_files}       # what the tar formats' writers call, a batch at a time


def decode_span(count: int, threads: int, encode: str | None, batch: int, arch: str) -> tuple[float, float]:
    """(start, end) on the system-wide monotonic clock of z → decoder → uint8 (→ PNG or JPEG bytes, `encode`) for
    `count` images in this process: no Ray, no storage."""
    torch.set_num_threads(threads)
    model = build_model(MODELS[arch]).eval()
    z = torch.randn(count, MODELS[arch].latent_dim, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    for i in range(0, count, batch):
        images = to_uint8(model.generate(z[i:i + batch]))
        if encode:
            ENCODERS[encode](images)
    return start, time.perf_counter()


def decode_rate(count: int, threads: int, encode: str | None, batch: int, arch: str) -> float:
    start, end = decode_span(count, threads, encode, batch, arch)
    return count / (end - start)


def parallel_rate(count: int, processes: int, encode: str | None, batch: int, arch: str) -> float:
    """decode (+ PNG or JPEG) in `processes` single-threaded processes at once, like the workers (with an encoder:
    that format's bound; without: the decoder bound as the workers can reach it, beside the one-process bound)."""
    from concurrent.futures import ProcessPoolExecutor
    per = count // processes
    with ProcessPoolExecutor(processes) as pool:
        spans = list(pool.map(decode_span, [per] * processes, [1] * processes, [encode] * processes,
                              [batch] * processes, [arch] * processes))
    return per * processes / (max(e for _, e in spans) - min(s for s, _ in spans))


def generate_rate(storage_cfg: StorageConfig, fmt: str, count: int, workers: int, seed: int, arch: str) -> dict:
    spec = GenerateConfig(model=f"bench-{arch}", count=count, shard_size=SHARD_SIZE, format=fmt, seed=seed)
    start = time.perf_counter()
    manifest = run_generation(spec, storage_cfg, RunSettings(workers=workers, cpus_per_worker=1.0, progress=False))
    wall = time.perf_counter() - start
    run = manifest["run"]
    return {"samples_per_s": run["samples_per_s"], "wall_samples_per_s": count / wall,
            "shard_seconds": run["shard_seconds"], "wall_seconds": wall, "bytes": manifest["totals"]["bytes"]}


def peak_rss_child(root: str, count: int, workers: int, arch: str) -> dict:
    """Run one Parquet job in a fresh driver process and report that driver's peak RSS."""
    out = subprocess.run([sys.executable, __file__, "--rss-child", root, "--count", str(count),
                          "--workers", str(workers), "--model", arch], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def rss_child(root: str, count: int, workers: int, arch: str) -> None:
    from cluster.runtime.ray_session import ray_runtime
    storage_cfg = StorageConfig(root=root)
    publish_model(storage_cfg, arch)
    with ray_runtime(None, num_cpus=workers):
        before = memory_mib("VmHWM")
        result = generate_rate(storage_cfg, "parquet", count, workers, seed=count, arch=arch)
    peak = memory_mib("VmHWM")
    print(json.dumps({"count": count, "driver_peak_rss_mib": peak, "driver_rss_before_job_mib": before, **result}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=500_000)
    parser.add_argument("--rss-count", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--decode-batch", type=int, default=GenerateConfig(model="defaults", count=1).decode_batch)
    parser.add_argument("--model", choices=MODELS, default="mlp",
                        help="decoder to measure: the reference MLP (cheapest: I/O dominates) or the conv VAE "
                             "(default: %(default)s)")
    parser.add_argument("--skip-s3", action="store_true")
    parser.add_argument("--repeat", type=int, default=2, help="best of N for every figure (default: %(default)s)")
    parser.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        return rss_child(args.rss_child, args.count, args.workers, args.model)

    machine = {"cpus": os.cpu_count(), "workers": args.workers, "machine": platform.machine(),
               "torch": torch.__version__, "repeat": args.repeat, "model": args.model}
    from cluster.runtime.ray_session import ray_runtime
    if not args.skip_s3:
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            os.environ.setdefault(key, "bench")    # moto takes any; set before Ray starts: its workers inherit it
    bounds: dict[str, float] = {}
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp, ray_runtime(None, num_cpus=args.workers):
        roots = {"local": StorageConfig(root=tmp)}
        server = None
        if not args.skip_s3:
            roots["s3"], server = start_moto()
        try:
            for cfg in roots.values():
                publish_model(cfg, args.model)
            # Bounds and jobs take turns, and each figure is the best of --repeat: a shared machine's load
            # then hits all of them alike, and a ratio compares like with like.
            for rep in range(args.repeat):
                for name, rate in (
                        ("compute", decode_rate(args.count, args.workers, None, batch=args.decode_batch, arch=args.model)),
                        ("png_one_process", decode_rate(min(args.count, 50_000), 1, "png", batch=args.decode_batch,
                                                        arch=args.model)),
                        ("jpeg_one_process", decode_rate(min(args.count, 50_000), 1, "jpeg", batch=args.decode_batch,
                                                         arch=args.model)),
                        ("compute_per_worker", parallel_rate(args.count, args.workers, None, args.decode_batch, args.model)),
                        ("png", parallel_rate(min(args.count, 100_000), args.workers, "png", args.decode_batch, args.model)),
                        ("jpeg", parallel_rate(min(args.count, 100_000), args.workers, "jpeg", args.decode_batch,
                                               args.model))):
                    bounds[name] = max(bounds.get(name, 0.0), rate)
                for where, cfg in roots.items():
                    for fmt in FORMATS:
                        r = generate_rate(cfg, fmt, args.count, args.workers, seed=rep + 1, arch=args.model)
                        key = f"{where}-{fmt}"
                        if key not in results or r["samples_per_s"] > results[key]["samples_per_s"]:
                            results[key] = r
        finally:
            if server:
                server.stop()
        emit({"measure": "decoder alone, one process", "threads": args.workers, "samples_per_s": bounds["compute"],
              **machine})
        emit({"measure": "decoder alone, one single-threaded process per worker", "processes": args.workers,
              "samples_per_s": bounds["compute_per_worker"], **machine})
        emit({"measure": "decode + PNG encode, one process", "threads": 1, "samples_per_s": bounds["png_one_process"],
              **machine})
        emit({"measure": "decode + PNG encode, one process per worker (the PNG bound)", "processes": args.workers,
              "samples_per_s": bounds["png"], "encoder": png_encoder(), **machine})
        emit({"measure": "decode + JPEG encode, one process", "threads": 1, "samples_per_s": bounds["jpeg_one_process"],
              **machine})
        emit({"measure": "decode + JPEG encode, one process per worker (the JPEG bound)", "processes": args.workers,
              "samples_per_s": bounds["jpeg"], "encoder": jpeg_encoder(), **machine})
        for key, r in results.items():
            where, fmt = key.split("-")
            bound = bound_of(bounds, fmt)
            emit({"measure": f"vaegen generate to {where} {fmt}", "count": args.count, **r,
                  "ratio_to_bound": r["samples_per_s"] / bound, **machine})
        small = peak_rss_child(os.path.join(tmp, "rss"), max(args.rss_count // 10, SHARD_SIZE), args.workers,
                               args.model)
        big = peak_rss_child(os.path.join(tmp, "rss"), args.rss_count, args.workers, args.model)
    emit({"measure": "driver peak RSS, parquet to local", "counts": [small["count"], big["count"]],
          "driver_peak_rss_mib": [small["driver_peak_rss_mib"], big["driver_peak_rss_mib"]],
          "growth_mib": big["driver_peak_rss_mib"] - small["driver_peak_rss_mib"],
          "driver_rss_before_job_mib": [small["driver_rss_before_job_mib"], big["driver_rss_before_job_mib"]],
          "samples_per_s_at_big": big["samples_per_s"], **machine})
    emit({"measure": "summary", "compute_bound_samples_per_s": bounds["compute"],
          "compute_per_worker_samples_per_s": bounds["compute_per_worker"],
          "png_bound_samples_per_s": bounds["png"], "jpeg_bound_samples_per_s": bounds["jpeg"],
          **{f"{k}_ratio": v["samples_per_s"] / bound_of(bounds, k.split("-")[1]) for k, v in results.items()},
          "targets": {"parquet_ratio": 0.8, "png_ratio": 0.8, "jpeg_ratio": 0.8}, **machine})


def bound_of(bounds: dict[str, float], fmt: str) -> float:
    """A format's bound: the decoder's for Parquet, decode + that format's encoder per worker for a tar format."""
    return bounds["compute"] if fmt == "parquet" else bounds[fmt]


def start_moto():
    """A moto S3 server on 127.0.0.1 (a real S3 API over HTTP) with one bucket; stopped by the caller."""
    import socket

    import boto3
    from moto.server import ThreadedMotoServer
    logging.getLogger("werkzeug").setLevel(logging.ERROR)      # one log line per request otherwise
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="bench")
    return StorageConfig(root="s3://bench/generate", s3_endpoint=endpoint), server


if __name__ == "__main__":
    main()
