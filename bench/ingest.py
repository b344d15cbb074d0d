"""Ingest throughput and memory, in one run. One JSON line per measurement.

1. Throughput, at each of `--images` (default 20k and 100k): a folder of PNGs (96×96 RGB, smooth shapes, 10 class
   folders) ingested with --size 64x64 on Ray Data (`ingest_source`, Ray started once before, a fresh root each
   time) against the bound: a plain PIL open + decode + RGB + resize loop in one process per core
   (multiprocessing.Pool, started and warmed before it is timed). The sides (the encoding loop, below, is the
   third) take turns, `--repeat` times, each repeat starting with the next side, so that none always runs first
   or last while the machine's speed drifts. A line per size reports each median, the ratio of medians and the
   median of the pairs' ratios (a pair, a repeat's bound and ingest, runs close together: it shares the machine's
   moment). A larger input weighs the ingest's fixed costs less (the plan, Ray Data's start, the last shard's
   finish), so the two sizes bracket a small input and a sustained one. Beside the wall
   times, the CPU each side used (/proc: the Pool's processes for the bound; this process and every other process
   under it, Ray's included, for the ingest): `cpu_ratio`, the bound's CPU over the ingest's, is what the ingest
   would reach with every core busy to the end, and the gap from it to `ratio` is cores left idle. A third side,
   the same loop that also encodes its images as the ingest's shards are encoded (each 256-image chunk stacked
   as (C, H, W) and put through `shard_bytes`, Parquet with zstd, then sha256), alternates with the two:
   `ratio_to_encoding_loop` is the ingest against a plain loop that does the same work, what the engine (Ray
   Data, the plan, one task per shard) costs beyond it.
2. Memory: folders of 64×64 RGB PNGs at each of `--rss-images` (default 10k and 100k), each ingested by a fresh
   process that reports its own peak RSS (VmHWM) and the largest peak RSS of its Ray workers (`ray::` processes
   under it, sampled while it runs): flat as the input grows, since no process holds the dataset.

    .venv/bin/python bench/ingest.py [--images 20000 100000] [--repeat 3] [--rss-images 10000 100000]
    quick check: .venv/bin/python bench/ingest.py --images 2000 --repeat 1 --rss-images 3000
    (`--images` or `--rss-images` with no sizes skips that part)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator

import numpy as np
from PIL import Image

from cluster.data.ingest import ingest_source
from cluster.data.readable import shard_bytes
from cluster.data.sources import IngestOptions
from vae_core.config import StorageConfig
from vae_core.data import RESIZE_FILTER

SIZE = (64, 64)
CHUNK = 256                        # images per piece of work a Pool process takes
LABEL_NAMES = tuple(f"c{k}" for k in range(10))
SIDES = ["bound", "encoding loop", "ingest"]


def make_image(args: tuple[str, int, int]) -> None:
    path, index, side = args
    rng = np.random.default_rng(index)
    yy, xx = np.mgrid[:side, :side]
    cy, cx, r = rng.integers(side // 4, 3 * side // 4, 2).tolist() + [int(rng.integers(side // 8, side // 3))]
    img = np.stack([xx * 255 // side, yy * 255 // side, np.full_like(xx, 60)], -1)
    img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(0, 256, 3)
    Image.fromarray(img.astype(np.uint8)).save(path)


def make_folder(folder: str, n: int, side: int) -> str:
    for k in range(10):
        os.makedirs(f"{folder}/c{k}", exist_ok=True)
    with multiprocessing.Pool(os.cpu_count()) as pool:
        pool.map(make_image, [(f"{folder}/c{i % 10}/{i:07d}.png", i, side) for i in range(n)], chunksize=512)
    return folder


def pil_decode_resize(path: str) -> int:
    with Image.open(path) as im:
        out = im.convert("RGB").resize(SIZE[::-1], RESIZE_FILTER)
        return np.asarray(out).shape[0]


def bound_s(pool, files: list[str]) -> float:
    start = time.perf_counter()
    pool.map(pil_decode_resize, files, chunksize=CHUNK)
    return time.perf_counter() - start


def decode_resize_encode(paths: list[str]) -> int:
    """The loop's work on a chunk, then the ingest's encoding of it: (C, H, W) rows, a shard's bytes, sha256."""
    images = np.empty((len(paths), 3, *SIZE), np.uint8)
    for i, path in enumerate(paths):
        with Image.open(path) as im:
            images[i] = np.asarray(im.convert("RGB").resize(SIZE[::-1], RESIZE_FILTER)).transpose(2, 0, 1)
    body = shard_bytes(images, np.zeros(len(paths), np.int64), 0, LABEL_NAMES)
    hashlib.sha256(body).hexdigest()
    return len(body)


def encoding_loop_s(pool, files: list[str]) -> float:
    start = time.perf_counter()
    pool.map(decode_resize_encode, [files[i:i + CHUNK] for i in range(0, len(files), CHUNK)], chunksize=1)
    return time.perf_counter() - start


def ingest_s(folder: str, root: str, size) -> float:
    start = time.perf_counter()
    ingest_source("image-folder", folder, StorageConfig(root=root), name="bench", progress=False,
                  options=IngestOptions(size=size))
    return time.perf_counter() - start


def throughput(args, tmp: str) -> Iterator[dict]:
    from cluster.runtime.ray_session import ray_runtime
    if not args.images:
        return
    with ray_runtime(num_cpus=os.cpu_count(), object_store_mb=256), multiprocessing.Pool(os.cpu_count()) as pool:
        ingest_s(make_folder(f"{tmp}/warm", 256, 96), f"{tmp}/warm-root", SIZE)   # warm: Ray Data's workers
        pool_pids = {p.pid for p in multiprocessing.active_children()}     # the Pool's: Ray's are not multiprocessing's
        for n in args.images:
            folder = make_folder(f"{tmp}/tp-{n}", n, 96)
            files = sorted(f"{folder}/{c}/{f}" for c in os.listdir(folder) for f in os.listdir(f"{folder}/{c}"))
            pool.map(pil_decode_resize, files[:512])               # warm: the pool's processes are up
            bounds, ingests, bound_cpu, ingest_cpu, encoding, encoding_cpu = [], [], [], [], [], []
            pool_sides = {"bound": (bound_s, bounds, bound_cpu),                 # side: (timed run, walls, CPUs)
                          "encoding loop": (encoding_loop_s, encoding, encoding_cpu)}
            for i in range(args.repeat):
                for side in SIDES[i % len(SIDES):] + SIDES[:i % len(SIDES)]:     # each side takes each place in turn
                    if side in pool_sides:
                        timed, walls, cpus = pool_sides[side]
                        before = cpu_s(pool_pids)
                        walls.append(timed(pool, files))
                        cpus.append(cpu_s(pool_pids) - before)
                    else:
                        before = ingest_cpu_parts(pool_pids)
                        root = f"{tmp}/root-{n}-{i}"
                        ingests.append(ingest_s(folder, root, SIZE))
                        after = ingest_cpu_parts(pool_pids)
                        ingest_cpu.append({part: after[part] - before.get(part, 0) for part in after})
                        shutil.rmtree(root)
            shutil.rmtree(folder)
            b, g = n / statistics.median(bounds), n / statistics.median(ingests)
            yield {"measure": "ingest_throughput", "images": n, "source": "96x96 PNG → --size 64x64",
                   "cores": os.cpu_count(), "bound_images_per_s": round(b), "ingest_images_per_s": round(g),
                   "ratio": round(g / b, 3),
                   "pair_ratio_median": round(statistics.median(
                       x / y for x, y in zip(bounds, ingests, strict=True)), 3),
                   "cpu_ratio": round(sum(bound_cpu) / sum(sum(c.values()) for c in ingest_cpu), 3),
                   "encoding_loop_images_per_s": round(n / statistics.median(encoding)),
                   "ratio_to_encoding_loop": round(statistics.median(encoding) / statistics.median(ingests), 3),
                   "encoding_loop_cpu_ratio": round(sum(encoding_cpu) / sum(sum(c.values()) for c in ingest_cpu), 3),
                   "bound_s": [round(x, 2) for x in bounds], "ingest_s": [round(x, 2) for x in ingests],
                   "encoding_loop_s": [round(x, 2) for x in encoding],
                   "bound_cpu_s": [round(x, 2) for x in bound_cpu],
                   "encoding_loop_cpu_s": [round(x, 2) for x in encoding_cpu],
                   "ingest_cpu_s": {part: [round(c[part], 2) for c in ingest_cpu] for part in ingest_cpu[0]}}


def ingest_cpu_parts(exclude: set[int]) -> dict[str, float]:
    """CPU seconds so far of this process (the driver), of its Ray workers (`ray::`, the tasks among them) and of
    every other process under it (Ray's daemons), `exclude` left out."""
    me = os.getpid()
    workers = set(ray_workers_under(me)) - exclude
    rest = set(descendants(me)) - workers - exclude
    return {"driver": cpu_s([me]), "ray_workers": cpu_s(workers), "ray_daemons": cpu_s(rest)}


def cpu_s(pids) -> float:
    """CPU seconds (user + system) the live processes among `pids` have used, each its own threads' only."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return total / os.sysconf("SC_CLK_TCK")


def status_kib(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(f"{field}:"))
    except (OSError, StopIteration):
        return 0


def descendants(pid: int) -> list[int]:
    """Every process descending from `pid`."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    found = []
    for p in parents:
        q = p
        while q in parents and q != pid and q > 1:
            q = parents[q]
        if q == pid and p != pid:
            found.append(p)
    return found


def ray_workers_under(pid: int) -> list[int]:
    """Every `ray::` process descending from `pid` (this driver's own Ray, not another user's)."""
    found = []
    for p in descendants(pid):
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                if f.read().startswith(b"ray::"):
                    found.append(p)
        except OSError:
            pass
    return found


def rss_child(folder: str, root: str) -> None:
    """Run in a fresh process: ingest `folder` on a local Ray of its own; print its peaks."""
    from cluster.runtime.ray_session import ray_runtime
    peaks, stop = {}, threading.Event()

    def sample():
        while not stop.is_set():
            for p in ray_workers_under(os.getpid()):
                peaks[p] = max(peaks.get(p, 0), status_kib(p, "VmHWM"))
            stop.wait(0.5)

    with ray_runtime(num_cpus=os.cpu_count(), object_store_mb=256):
        watcher = threading.Thread(target=sample, daemon=True)
        watcher.start()
        start = time.perf_counter()
        manifest = ingest_source("image-folder", folder, StorageConfig(root=root), name="bench", progress=False)
        wall = time.perf_counter() - start
        stop.set()
        watcher.join()
    print(json.dumps({"rows": manifest["splits"]["train"]["rows"], "wall_s": round(wall, 1),
                      "driver_peak_rss_mib": round(status_kib(os.getpid(), "VmHWM") / 1024),
                      "worker_peak_rss_mib": round(max(peaks.values(), default=0) / 1024),
                      "workers_seen": len(peaks)}))


def memory(args, tmp: str) -> list[dict]:
    lines = []
    for n in args.rss_images:
        folder = make_folder(f"{tmp}/rss-{n}", n, 64)
        out = subprocess.run([sys.executable, __file__, "--rss-child", folder, f"{tmp}/rss-root-{n}"],
                             check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        lines.append({"measure": "ingest_peak_rss", "images": n, "source": "64x64 PNG", **json.loads(out)})
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, nargs="*", default=[20_000, 100_000])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--rss-images", type=int, nargs="*", default=[10_000, 100_000])
    p.add_argument("--rss-child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rss_child:
        rss_child(*args.rss_child)
        return
    machine = {"machine": platform.node(), "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}
    with tempfile.TemporaryDirectory(prefix="vaegen-bench-ingest-") as tmp:
        for line in throughput(args, tmp):
            print(json.dumps({**line, **machine}), flush=True)
        for line in memory(args, tmp):
            print(json.dumps({**line, **machine}), flush=True)


if __name__ == "__main__":
    main()
