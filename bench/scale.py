"""The driver's cost as a function of the shard count: `vaegen generate` (run_generation, real Ray
DecoderWorkers, a local root) with a trivially cheap decoder (MLP 16-4-2 on 1x4x4 images) over many tiny
shards, so that what is measured is the driver's bookkeeping, not decoding. One JSON line per point:

- fresh job: wall and driver CPU (user+sys of the driver process, Ray's threads in it included) per shard,
  split into plan / verify / shards / commit phases; driver peak RSS and its growth over the job;
  _manifest.json size;
- resume of the finished job (every shard already there: listing + receipts + re-hash of every shard);
- listing alone (shards and receipts).

First, per-core (one torch thread) figures for the sizing model: decode and reconstruct samples/s and FLOPs per
sample of the MLP and conv VAEs at 1x28x28 and 3x32x32, and a worker's whole shard build (decode + Parquet or
PNG-tar + sha256) per core.

Each point runs in a fresh process (a clean peak RSS). `--plot` redraws docs/driver_cost.png (Pillow) from the
lines printed.

    .venv/bin/python bench/scale.py [--points 1000 10000 100000] [--max-shards N] [--plot docs/driver_cost.png]
    quick check: .venv/bin/python bench/scale.py --max-shards 2000
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import torch

from cluster.generate.driver import run_generation
from cluster.generate.settings import RunSettings
from cluster.store.layout import OUTPUTS, JobKeys
from cluster.store.registry import Registry
from cluster.store.storage import open_storage
from vae_core.checkpoint import checkpoint_files
from vae_core.config import ModelConfig, StorageConfig
from vae_core.models import build_model
from vae_core.use_configs import GenerateConfig

MODEL = ModelConfig(image_shape=(1, 4, 4), hidden_dim=4, latent_dim=2)     # decoding costs ~nothing
MODEL_NAME = "scale-tiny"


def emit(record: dict) -> None:
    print(json.dumps({"bench": "scale", **record}), flush=True)


def memory_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process. Not ru_maxrss: Linux carries that over fork + exec, so a
    child would report its parent's peak."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(f"{field}:")) / 1024


def driver_usage() -> tuple[float, float]:
    """(CPU seconds so far, peak RSS MiB) of this process."""
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime, memory_mib("VmHWM")


def timed_job(spec: GenerateConfig, storage_cfg: StorageConfig, workers: int) -> dict:
    cpu0, _ = driver_usage()
    start = time.perf_counter()
    manifest = run_generation(spec, storage_cfg, RunSettings(workers=workers, cpus_per_worker=0.5, progress=False))
    wall = time.perf_counter() - start
    cpu1, peak = driver_usage()
    run = manifest["run"]
    phases = {k: run.get(k) for k in ("plan_seconds", "verify_seconds", "shard_seconds", "commit_seconds")}
    return {"wall_s": wall, "driver_cpu_s": cpu1 - cpu0, "peak_rss_mib": peak, **phases,
            "shards_written": run["shards_written"], "already_complete": run.get("already_complete", False)}


def point(root: str, shards: int, rows_per_shard: int, workers: int) -> dict:
    """One point, in this (fresh) process: a fresh job of `shards` shards, then its resume, then a listing."""
    from cluster.runtime.ray_session import ray_runtime
    storage_cfg = StorageConfig(root=root)
    storage = open_storage(storage_cfg, for_writing=True)
    torch.manual_seed(0)
    Registry(storage).publish(MODEL_NAME, checkpoint_files(build_model(MODEL)))
    spec = GenerateConfig(model=MODEL_NAME, count=shards * rows_per_shard, shard_size=rows_per_shard,
                          decode_batch=rows_per_shard, seed=shards)
    load_before = os.getloadavg()[0]
    with ray_runtime(None, num_cpus=workers):              # Ray's start-up is not the driver's per-shard cost
        rss_before = memory_mib("VmRSS")
        fresh = timed_job(spec, storage_cfg, workers)
        resume = timed_job(spec, storage_cfg, workers)
    keys = JobKeys.of(open_storage(storage_cfg).list_dirs(OUTPUTS)[0])
    start = time.perf_counter()
    listed = len(storage.list(keys.data)) + len(storage.list(keys.receipts))
    list_s = time.perf_counter() - start
    manifest_bytes = os.path.getsize(storage.path(keys.manifest))
    return {"shards": shards, "rows_per_shard": rows_per_shard, "samples": shards * rows_per_shard,
            "workers": workers,
            "fresh": {**fresh, "driver_cpu_ms_per_shard": 1e3 * fresh["driver_cpu_s"] / shards,
                      "wall_ms_per_shard": 1e3 * fresh["wall_s"] / shards},
            "resume": {**resume, "wall_ms_per_shard": 1e3 * resume["wall_s"] / shards,
                       "driver_cpu_ms_per_shard": 1e3 * resume["driver_cpu_s"] / shards},
            "driver_rss_before_job_mib": rss_before, "driver_rss_growth_mib": resume["peak_rss_mib"] - rss_before,
            "driver_rss_growth_kib_per_shard": 1024 * (fresh["peak_rss_mib"] - rss_before) / shards,
            "manifest_bytes": manifest_bytes, "manifest_bytes_per_shard": manifest_bytes / shards,
            "list_s": list_s, "objects_listed": listed,
            "loadavg_1m": [load_before, os.getloadavg()[0]], "cpus": os.cpu_count(),
            "machine": platform.machine()}


def run_point_in_child(shards: int, rows_per_shard: int, workers: int, tmp_dir: str | None) -> dict:
    with tempfile.TemporaryDirectory(prefix="vaegen-scale-", dir=tmp_dir) as tmp:
        out = subprocess.run([sys.executable, __file__, "--child", tmp, "--points", str(shards),
                              "--rows-per-shard", str(rows_per_shard), "--workers", str(workers)],
                             check=True, capture_output=True, text=True)
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "root_dir": tmp_dir or tempfile.gettempdir()}


# -- per-core compute figures for the sizing model (docs/SCALING.md) ---------------------------------------
RATE_MODELS = {"mlp-1x28x28": ModelConfig(image_shape=(1, 28, 28)),                   # 784-400-20, the reference
               "conv-1x28x28": ModelConfig(arch="conv", image_shape=(1, 28, 28)),
               "mlp-3x32x32": ModelConfig(image_shape=(3, 32, 32)),                   # 3072-400-20
               "conv-3x32x32": ModelConfig(arch="conv", image_shape=(3, 32, 32))}
RATE_BATCH = 4096


def flops_per_sample(model, x: torch.Tensor, z: torch.Tensor) -> tuple[float, float]:
    """(decode, reconstruct = encode + decode) FLOPs per sample, counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode
    counts = []
    for call in (lambda: model.generate(z), lambda: model.reconstruct(x)):
        with FlopCounterMode(display=False) as counter:
            call()
        counts.append(counter.get_total_flops() / len(z))
    return counts[0], counts[1]


def best_rate(call, count: int, seconds: float = 1.5) -> float:
    """Best samples/s of `call()` (which handles `count` samples) over repeats filling ~`seconds`."""
    best, spent = 0.0, 0.0
    while spent < seconds:
        start = time.perf_counter()
        call()
        took = time.perf_counter() - start
        best, spent = max(best, count / took), spent + took
    return best


def shard_build_rate(cfg: ModelConfig, fmt: str, rows: int) -> tuple[float, float]:
    """(samples/s, bytes per sample) of ShardMaker.build (decode, to uint8, write the shard's bytes, hash): a
    worker's whole job on one core except the PUT. Random-init weights: a trained model's images compress
    differently."""
    from cluster.generate.plan import JobPlan
    from cluster.generate.shards import ShardMaker
    spec = GenerateConfig(model="rates", count=rows, shard_size=rows, format=fmt)
    plan = JobPlan(job_id="rates", spec=spec, model_ref="rates@v0001", weights_sha256="-", config_sha256="-",
                   image_shape=tuple(cfg.image_shape), labels=(), total_rows=rows, num_shards=1)
    from cluster.store.storage import open_storage     # build() never writes: any local root serves
    maker = ShardMaker(plan, storage=open_storage(StorageConfig(root=tempfile.gettempdir())), model=build_model(cfg))
    return best_rate(lambda: maker.build(0), rows, seconds=2.0), maker.build(0)[1]["bytes"] / rows


def model_rates() -> list[dict]:
    """Per-core (one torch thread) decode and reconstruct rates, FLOPs per sample, and whole-shard build rates."""
    torch.set_num_threads(1)
    results = []
    for name, cfg in RATE_MODELS.items():
        model = build_model(cfg).eval()
        z = torch.randn(RATE_BATCH, cfg.latent_dim)
        x = torch.rand(RATE_BATCH, *cfg.image_shape)
        decode_flops, recon_flops = flops_per_sample(model, x[:64], z[:64])
        decode = best_rate(lambda: model.generate(z), RATE_BATCH)
        recon = best_rate(lambda: model.reconstruct(x), RATE_BATCH)
        record = {"measure": "per-core compute", "model": name, "threads": 1, "batch": RATE_BATCH,
                  "decode_samples_per_s": decode, "reconstruct_samples_per_s": recon,
                  "decode_mflop_per_sample": decode_flops / 1e6, "reconstruct_mflop_per_sample": recon_flops / 1e6,
                  "decode_gflop_per_s": decode * decode_flops / 1e9, "loadavg_1m": os.getloadavg()[0]}
        if name.startswith("mlp"):
            for fmt in ("parquet", "png"):
                rate, size = shard_build_rate(cfg, fmt, 8192)
                record.update({f"shard_build_{fmt}_samples_per_s": rate, f"{fmt}_bytes_per_sample": size})
        results.append(record)
    return results


# -- the plot (Pillow: matplotlib is not a dependency) ------------------------------------------------------
def draw_plot(points: list[dict], path: str) -> None:
    """Log-log: per-shard driver CPU and wall (fresh job), resume wall, peak-RSS growth, vs shard count."""
    from PIL import Image, ImageDraw
    series = {"fresh: driver CPU ms/shard": ([p["fresh"]["driver_cpu_ms_per_shard"] for p in points], (200, 30, 30)),
              "fresh: wall ms/shard": ([p["fresh"]["wall_ms_per_shard"] for p in points], (240, 140, 20)),
              "resume: wall ms/shard": ([p["resume"]["wall_ms_per_shard"] for p in points], (30, 90, 200)),
              "manifest bytes/shard / 100": ([p["manifest_bytes_per_shard"] / 100 for p in points], (120, 120, 120)),
              "driver RSS growth KiB/shard": ([max(p["driver_rss_growth_kib_per_shard"], 1e-3) for p in points],
                                              (30, 150, 60))}
    xs = [p["shards"] for p in points]
    ys = [v for values, _ in series.values() for v in values]
    w, h, left, right, top, bottom = 900, 560, 80, 290, 40, 60
    x0, x1 = math.floor(math.log10(min(xs))), math.ceil(math.log10(max(xs)))
    y0, y1 = math.floor(math.log10(min(ys))), math.ceil(math.log10(max(ys)))
    x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1)

    def at(x: float, y: float) -> tuple[float, float]:
        fx = (math.log10(x) - x0) / (x1 - x0)
        fy = (math.log10(y) - y0) / (y1 - y0)
        return left + fx * (w - left - right), h - bottom - fy * (h - top - bottom)

    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    for e in range(x0, x1 + 1):
        px, _ = at(10 ** e, 10 ** y0)
        d.line([(px, top), (px, h - bottom)], fill=(225, 225, 225))
        d.text((px - 12, h - bottom + 8), f"1e{e}", fill="black")
    for e in range(y0, y1 + 1):
        _, py = at(10 ** x0, 10 ** e)
        d.line([(left, py), (w - right, py)], fill=(225, 225, 225))
        d.text((left - 40, py - 6), f"1e{e}", fill="black")
    d.rectangle([left, top, w - right, h - bottom], outline="black")
    d.text((left, 12), "vaegen driver cost vs shard count (bench/scale.py; flat lines = linear total cost)",
           fill="black")
    d.text(((left + w - right) / 2 - 40, h - 28), "shards per job", fill="black")
    for k, (name, (values, colour)) in enumerate(series.items()):
        pts = [at(x, y) for x, y in zip(xs, values)]
        d.line(pts, fill=colour, width=3)
        for px, py in pts:
            d.ellipse([px - 4, py - 4, px + 4, py + 4], fill=colour)
        ly = top + 10 + 22 * k
        d.line([(w - right + 12, ly + 6), (w - right + 40, ly + 6)], fill=colour, width=3)
        d.text((w - right + 46, ly), name, fill="black")
    img.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, nargs="+", default=[1_000, 10_000, 100_000],
                        help="shard counts (default: %(default)s)")
    parser.add_argument("--max-shards", type=int, default=None, help="drop points above this (quick checks)")
    parser.add_argument("--rows-per-shard", type=int, default=1, help="(default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="DecoderWorker actors (default: %(default)s)")
    parser.add_argument("--plot", default=None, help="write the log-log plot PNG here")
    parser.add_argument("--tmp-dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
                        help="where the local storage roots go (default: %(default)s: a tmpfs, so that a slow "
                             "disk's creating and deleting of 200k small files is not counted as driver cost)")
    parser.add_argument("--skip-rates", action="store_true", help="skip the per-core decoder/encoder figures")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(point(args.child, args.points[0], args.rows_per_shard, args.workers)))
        return
    if not args.skip_rates:
        for record in model_rates():
            emit(record)
    points = [n for n in sorted(args.points) if args.max_shards is None or n <= args.max_shards]
    results = []
    for shards in points:
        result = run_point_in_child(shards, args.rows_per_shard, args.workers, args.tmp_dir)
        results.append(result)
        emit(result)
    if len(results) >= 2:
        lo, hi = results[0], results[-1]
        emit({"measure": "summary", "shards": [lo["shards"], hi["shards"]],
              "driver_cpu_ms_per_shard": [lo["fresh"]["driver_cpu_ms_per_shard"], hi["fresh"]["driver_cpu_ms_per_shard"]],
              "per_shard_cost_ratio_top_to_bottom": hi["fresh"]["driver_cpu_ms_per_shard"]
              / lo["fresh"]["driver_cpu_ms_per_shard"],
              "resume_ms_per_shard": [lo["resume"]["wall_ms_per_shard"], hi["resume"]["wall_ms_per_shard"]],
              "driver_peak_rss_mib_at_top": hi["resume"]["peak_rss_mib"],
              "driver_rss_growth_mib_at_top": hi["driver_rss_growth_mib"],
              "manifest_bytes_at_top": hi["manifest_bytes"]})
    if args.plot and len(results) >= 2:
        draw_plot(results, args.plot)


if __name__ == "__main__":
    main()
