"""Packaging cost per sample, no GPU and no Ray: the CPU seconds one core spends turning decoded images into a
published shard, per format and image shape, with the decoder taken out. One JSON line per measurement.

Precomputed decoder outputs (a random-weights MLP's, as bench/generate.py uses: speed does not depend on the
weights) go through the path a DecoderWorker runs: ShardMaker.make with its decode step replaced by the
precomputed floats (so the uint8 conversion, the writer, both hashes, the shard's and its receipt's publish to a
local root are the real code). That total is measured whole; beside it each stage alone on the same rows:

    convert   floats in [0, 1] -> uint8 (the worker's uint8_pixels: vae_core.images.to_uint8's bytes)
    encode    the images' files: stored-deflate PNGs (Parquet), libdeflate PNGs, libjpeg-turbo JPEGs
    frame     the rest of the writer: Parquet table + zstd + footer check, or tar headers + JSON + member check
    hash      the pixels' sha256 and the shard's
    write     publish the shard and its receipt to a local root (temp file, fsync, link, folder fsync)

and the codec alone (libdeflate's zlib_compress per image, libjpeg-turbo's encode_jpeg per batch): a tar
format's bound per core. Times are process CPU time (time.process_time: every thread of this process), which a
shared machine distorts less than wall time; wall time is reported beside it. Each figure is the median of
--repeat runs, with the spread (min, max). Last, per format and shape, a worker's whole shard with the reference
MLP decoder against its bound (the decoder alone; for a tar, decoder + codec) in CPU time: bench/generate.py's
ratio per core.

    .venv/bin/python bench/package.py                 # the table in docs/BENCHMARKS.md
    .venv/bin/python bench/package.py --smoke         # a few seconds: CI runs it (tests/generate/test_packaging.py)
    .venv/bin/python bench/package.py --regression 572a1c6 --repeat 7    # Parquet's costs added since 572a1c6
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

from cluster.generate.plan import JobPlan
from cluster.generate.shards import ShardMaker
from cluster.generate.writers import DecodedBatch, ShardInfo, writer_for
from cluster.store.layout import OUTPUT_FORMAT_VERSION
from cluster.store.storage import Storage
from vae_core.config import ModelConfig, StorageConfig
from vae_core.data import FASHION_MNIST_DIR, read_idx
from vae_core.images import PNG_DEFLATE_LEVEL, jpeg_files, png_files, to_uint8
from vae_core.models import build_model
from vae_core.use_configs import GenerateConfig

try:                                   # the worker's conversion; a tree from before it had to_uint8 alone
    from cluster.generate.shards import uint8_pixels as CONVERT
except ImportError:
    CONVERT = to_uint8

FORMATS = ("parquet", "png", "jpeg")
SHAPES = ((1, 28, 28), (3, 32, 32))
TARGET_PARQUET_US = 2.0          # issue 28: >= 500k samples/s per core
TARGET_CODEC_RATIO = 0.8         # issue 28: a tar format at >= 0.8x its codec alone
IMAGES = {"kind": "random"}      # --images


def emit(record: dict) -> None:
    print(json.dumps({"bench": "package", **record}), flush=True)


def decoder_floats(shape: tuple[int, int, int], count: int, batch: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """What the decoder hands a worker: float batches in [0, 1] (a random-weights MLP's images, or with
    IMAGES "fashion" real Fashion-MNIST pixels, the look of a trained decoder's), and the latents."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(image_shape=shape)).eval()
    z = torch.randn(count, model.cfg.latent_dim, generator=torch.Generator().manual_seed(0))
    if IMAGES["kind"] == "fashion":
        pixels = read_idx(os.path.join(FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz"))
        pixels = np.resize(pixels, (count, *shape[1:]))[:, None].repeat(shape[0], axis=1)
        if pixels.shape[2:] != shape[1:]:
            raise SystemExit("--images fashion needs 28x28 shapes")
        floats = torch.from_numpy(pixels).float().div_(255)
        return [floats[i:i + batch].clone() for i in range(0, count, batch)], z
    with torch.no_grad():
        return [model.generate(z[i:i + batch]).clone() for i in range(0, count, batch)], z


class PrecomputedMaker(ShardMaker):
    """A ShardMaker whose decoder is taken out: decode() hands over precomputed floats (fresh copies, made
    before the clock starts, as a decoder's output is fresh memory), converted to uint8 as the real decode()
    converts them. Everything after decoding is ShardMaker's own code."""

    def __init__(self, plan: JobPlan, storage: Storage, decoded: tuple[list[torch.Tensor], torch.Tensor]) -> None:
        super().__init__(plan, storage, torch.nn.Identity())
        self.floats, self.latents = decoded
        self.fresh: list[torch.Tensor] = []

    def refill(self) -> None:
        self.fresh = [f.clone() for f in self.floats]

    def decode(self, task):
        out, start = [], task.first_id
        for f in self.fresh or [f.clone() for f in self.floats]:
            n = min(len(f), task.first_id + task.rows - start)
            if n <= 0:
                break
            out.append(DecodedBatch(np.arange(start, start + n, dtype=np.int64), None,
                                    self.latents[start - task.first_id:][:n].numpy(), CONVERT(f[:n])))
            start += n
        self.fresh = []
        return out


def job_plan(fmt: str, shape, shard_size: int, shards: int, decode_batch: int) -> JobPlan:
    spec = GenerateConfig(model="bench@v0001", count=shard_size * shards, shard_size=shard_size, format=fmt,
                          decode_batch=decode_batch)
    return JobPlan(job_id=f"bench-{fmt}-{'x'.join(map(str, shape))}", spec=spec, model_ref="bench@v0001",
                   weights_sha256="0" * 64, config_sha256="0" * 64, image_shape=tuple(shape), labels=(),
                   total_rows=shard_size * shards, num_shards=shards)


def timed(fn) -> tuple[float, float]:
    """(process CPU seconds, wall seconds) of fn()."""
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - cpu, time.perf_counter() - wall


def measure_total(fmt: str, shape, floats, shard_size: int, shards: int, decode_batch: int, root: str) -> dict:
    """The whole worker path for `shards` shards: convert, write, hash, publish (ShardMaker.make)."""
    plan = job_plan(fmt, shape, shard_size, shards, decode_batch)
    storage = Storage(StorageConfig(root=root))
    maker = PrecomputedMaker(plan, storage, floats)
    records, cpu, wall = [], 0.0, 0.0
    for index in range(shards):
        maker.refill()
        c, w = timed(functools.partial(lambda i: records.append(maker.make(i)), index))
        cpu, wall = cpu + c, wall + w
    return {"cpu": cpu, "wall": wall, "bytes_per_sample": sum(r["bytes"] for r in records) / (shard_size * shards)}


def encoder_of(fmt: str):
    if fmt == "parquet":
        from cluster.generate.writers import png_images
        return png_images
    return png_files if fmt == "png" else jpeg_files


def measure_stages(fmt: str, shape, floats, shard_size: int, shards: int, decode_batch: int, root: str) -> dict:
    """Each stage alone on the same shards (CPU seconds, wall seconds), as ShardMaker runs them."""
    plan = job_plan(fmt, shape, shard_size, shards, decode_batch)
    maker = PrecomputedMaker(plan, Storage(StorageConfig(root=root)), floats)
    stages = {k: [0.0, 0.0] for k in ("convert", "encode", "frame", "hash", "write")}
    for index in range(shards):
        stage_one_shard(maker, index, stages)
    stages["frame"] = [f - e for f, e in zip(stages["frame"], stages["encode"])]   # close() encodes too
    return stages


def stage_one_shard(maker: PrecomputedMaker, index: int, stages: dict) -> None:
    plan = maker.plan

    def add(stage, fn):
        out = []
        cpu, wall = timed(lambda: out.append(fn()))
        stages[stage][0] += cpu
        stages[stage][1] += wall
        return out[0]

    maker.refill()
    batches = add("convert", lambda: maker.decode(plan.task(index)))
    images = np.concatenate([b.images for b in batches])
    add("encode", lambda: encoder_of(plan.spec.format)(images))
    writer = writer_for(plan.spec)(ShardInfo(index, 1, plan.model_ref, plan.weights_sha256, plan.job_id, ()))
    data = add("frame", lambda: ([writer.write(b) for b in batches], writer.close())[1])
    add("hash", lambda: (hashlib.sha256(images.data).hexdigest(), hashlib.sha256(data).hexdigest()))
    receipt = json.dumps({"index": index, "sha256": "0" * 64}).encode()
    add("write", lambda: (maker.storage.publish(plan.shard_key(index), data, if_absent=True),
                          maker.storage.publish(plan.receipt_key(index), receipt)))


def parquet_frame(shape, floats, args, machine: dict) -> None:
    """Parquet's frame stage split, CPU µs per sample (median of --repeat, same rows): the Arrow table (with the
    PNG files: the encode stage), Parquet's encoding uncompressed, and zstd (the writer's write less that)."""
    import io

    import pyarrow.parquet as pq

    from cluster.generate.writers.parquet import parquet_write_options
    info = ShardInfo(0, 1, "bench@v0001", "0" * 64, "bench", ())
    images, latents = np.concatenate([CONVERT(f.clone()) for f in floats[0]]), floats[1].numpy()
    writer = writer_for(job_plan("parquet", shape, args.shard_size, 1, args.decode_batch).spec)(info)
    writer.write(DecodedBatch(np.arange(len(images), dtype=np.int64), None, latents[:len(images)], images))
    table = writer.table()

    def write(**override):
        return lambda: pq.write_table(table, io.BytesIO(), **{**parquet_write_options(table), **override})

    parts = {"table": writer.table, "parquet encode (uncompressed)": write(compression="none", compression_level=None), "zstd": write()}
    times: dict[str, list[float]] = {k: [] for k in parts}
    for _ in range(args.repeat):
        for k, fn in parts.items():
            times[k].append(timed(fn)[0])
    times["zstd"] = [z - u for z, u in zip(times["zstd"], times["parquet encode (uncompressed)"])]
    emit({"measure": "parquet frame breakdown", "format": "parquet", "shape": list(shape),
          "cpu_us_per_sample": {k: statistics.median(v) * 1e6 / len(images) for k, v in times.items()}, **machine})


def codec_alone(fmt: str, shape, floats) -> float | None:
    """CPU seconds of the codec alone over the images: libdeflate per image (PNG), encode_jpeg per batch
    (JPEG); None for Parquet (its PNGs are stored blocks: no codec)."""
    if fmt == "parquet":
        return None
    import deflate
    images = [to_uint8(f) for f in floats[0]]
    if fmt == "png":
        rows = []
        for batch in images:
            n, c, h, w = batch.shape
            r = np.zeros((n, h, 1 + w * c), np.uint8)
            r[:, :, 1:] = batch.transpose(0, 2, 3, 1).reshape(n, h, w * c)
            rows.extend(r)
        return timed(lambda: [deflate.zlib_compress(x.data, PNG_DEFLATE_LEVEL) for x in rows])[0]
    from torchvision.io import encode_jpeg
    jpeg_files(images[0][:1])                                   # loads the codec and silences its warning
    tensors = [list(torch.from_numpy(b)) for b in images]
    return timed(lambda: [encode_jpeg(t, quality=95) for t in tensors])[0]


def spread(values: list[float], scale: float) -> dict:
    return {"median": statistics.median(values) * scale, "min": min(values) * scale, "max": max(values) * scale}


def run(fmt: str, shape, args, machine: dict) -> dict:
    count = args.shard_size * args.shards
    floats = decoder_floats(shape, args.shard_size, args.decode_batch)
    us = 1e6 / count
    totals, stages, codec = [], {}, []
    with tempfile.TemporaryDirectory(dir=args.tmp) as root:              # warm-up: imports, codec start-up
        measure_total(fmt, shape, floats, min(args.shard_size, 256), 1, args.decode_batch, root)
    for rep in range(args.repeat):
        with tempfile.TemporaryDirectory(dir=args.tmp) as root:
            totals.append(measure_total(fmt, shape, floats, args.shard_size, args.shards, args.decode_batch, root))
        with tempfile.TemporaryDirectory(dir=args.tmp) as root:
            for k, (cpu, wall) in measure_stages(fmt, shape, floats, args.shard_size, args.shards,
                                                 args.decode_batch, root).items():
                stages.setdefault(k, []).append((cpu, wall))
        c = codec_alone(fmt, shape, floats)
        if c is not None:
            codec.append(c * args.shards)
    where = {"format": fmt, "shape": list(shape), "samples": count, **machine}
    for k, values in stages.items():
        emit({"measure": "stage", "stage": k, "cpu_us_per_sample": spread([v[0] for v in values], us),
              "wall_us_per_sample": spread([v[1] for v in values], us), **where})
    total_us = spread([t["cpu"] for t in totals], us)
    result = {"measure": "packaging per sample (ShardMaker.make, decoder taken out)",
              "cpu_us_per_sample": total_us, "wall_us_per_sample": spread([t["wall"] for t in totals], us),
              "samples_per_s_per_core": 1e6 / total_us["median"],
              "bytes_per_sample": statistics.median(t["bytes_per_sample"] for t in totals), **where}
    if codec:
        codec_us = spread(codec, us)
        emit({"measure": "codec alone", "codec": "libdeflate" if fmt == "png" else "libjpeg-turbo",
              "cpu_us_per_sample": codec_us, "samples_per_s_per_core": 1e6 / codec_us["median"], **where})
        result["ratio_to_codec"] = codec_us["median"] / total_us["median"]
        result["target_ratio_to_codec"] = TARGET_CODEC_RATIO
    else:
        result["target_cpu_us_per_sample"] = TARGET_PARQUET_US
        parquet_frame(shape, floats, args, machine)
    emit(result)
    return result


def worker_against_decoder(fmt: str, shape, args, machine: dict) -> None:
    """The per-core form of bench/generate.py's ratio, in CPU time so that a shared machine distorts it less:
    a DecoderWorker's whole shard (ShardMaker.make with the reference MLP decoder, random weights) against its
    bound on the same latents, interleaved: the decoder alone (sample_prior + sample_images per decode batch) for
    Parquet, decoder + the format's codec (to_uint8, then png_files or jpeg_files) for a tar format."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(image_shape=shape)).eval()
    plan = job_plan(fmt, shape, args.shard_size, args.shards, args.decode_batch)

    def decode_only():
        for index in range(args.shards):
            z = model.sample_prior(args.shard_size, None, torch.Generator().manual_seed(index))
            for start in range(0, args.shard_size, args.decode_batch):
                images = model.sample_images(z[start:start + args.decode_batch], None, torch.Generator())
                if fmt != "parquet":
                    encoder_of(fmt)(to_uint8(images))

    decoder, worker = [], []
    for _ in range(args.repeat + 1):                                   # the first round warms up
        with tempfile.TemporaryDirectory(dir=args.tmp) as root:
            maker = ShardMaker(plan, Storage(StorageConfig(root=root)), model)
            worker.append(timed(lambda: [maker.make(i) for i in range(args.shards)])[0])   # noqa: B023
        decoder.append(timed(decode_only)[0])
    us = 1e6 / (args.shard_size * args.shards)
    decode_us, worker_us = spread(decoder[1:], us), spread(worker[1:], us)
    emit({"measure": "worker against its bound (reference MLP, CPU time)", "format": fmt, "shape": list(shape),
          "bound": "decoder" if fmt == "parquet" else f"decoder + {fmt} codec", "bound_cpu_us_per_sample": decode_us,
          "worker_cpu_us_per_sample": worker_us, "ratio_to_bound": decode_us["median"] / worker_us["median"],
          "target_ratio": 0.8, **machine})


def publish_without_fsync(path: str, data: bytes) -> None:
    """572a1c6's local create-if-absent publish: temp file, link, no fsync of the file or its folder."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=f".{os.path.basename(path)}.tmp-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.link(tmp, path)
    os.unlink(tmp)


def regression(ref: str, args, machine: dict) -> None:
    """Parquet 1x28x28, the costs added since `ref` per sample, each pair interleaved in this one process on the
    same rows: `ref`'s writer (its cluster/writers.py, read with git: Netpbm images) against today's (stored
    PNGs), `ref`'s publish (no fsync) against today's, and `ref`'s uint8 conversion against the worker's."""
    import subprocess
    import types
    source = subprocess.run(["git", "show", f"{ref}:cluster/writers.py"], capture_output=True, text=True, check=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout
    old = sys.modules["writers_at_ref"] = types.ModuleType("writers_at_ref")      # dataclasses look it up
    exec(compile(source, f"{ref}:cluster/writers.py", "exec"), old.__dict__)  # noqa: S102 (this repository's own code)
    count = args.shard_size
    floats, z = decoder_floats((1, 28, 28), count, args.decode_batch)
    images, latents, ids = np.concatenate([to_uint8(f) for f in floats]), z.numpy(), np.arange(count)
    plan = job_plan("parquet", (1, 28, 28), count, 1, args.decode_batch)
    pairs: dict[str, list] = {}
    sizes: dict[str, float] = {}
    regression_pairs(old, plan, (ids, latents, images, floats), args.tmp, sizes)     # warm-up: first writes
    for _ in range(args.repeat):
        for cause, pair in regression_pairs(old, plan, (ids, latents, images, floats), args.tmp, sizes).items():
            pairs.setdefault(cause, []).append(pair)
    us = 1e6 / count
    for cause, values in pairs.items():
        emit({"measure": f"regression since {ref}", "cause": cause, "format": "parquet", "shape": [1, 28, 28],
              "cpu_us_per_sample": {"then": spread([v[0][0] for v in values], us),
                                    "now": spread([v[1][0] for v in values], us)},
              "wall_us_per_sample": {"then": spread([v[0][1] for v in values], us),
                                     "now": spread([v[1][1] for v in values], us)},
              **({"bytes_per_sample": sizes} if cause.startswith("writer") else {}), **machine})


def regression_pairs(old, plan: JobPlan, rows, tmp: str | None, sizes: dict) -> dict:
    """One repeat of each (then, now) pair of regression(): (CPU seconds, wall seconds) each."""
    ids, latents, images, floats = rows
    old_writer = old.ParquetShardWriter(old.ShardInfo(0, 1, plan.model_ref, "0" * 64, plan.job_id))
    old_writer.write(old.DecodedBatch(ids, None, latents, images))
    new_writer = writer_for(plan.spec)(ShardInfo(0, 1, plan.model_ref, "0" * 64, plan.job_id))
    new_writer.write(DecodedBatch(ids, None, latents, images))
    data: dict[str, bytes] = {}
    pairs = {"writer (Netpbm -> stored PNG)": [timed(lambda: data.setdefault("then", old_writer.close())),
                                               timed(lambda: data.setdefault("now", new_writer.close()))]}
    sizes.update({k: len(v) / len(ids) for k, v in data.items()})
    with tempfile.TemporaryDirectory(dir=tmp) as root:
        storage = Storage(StorageConfig(root=root))
        pairs["publish (no fsync -> fsync file and folder)"] = [
            timed(lambda: publish_without_fsync(os.path.join(root, "then", "shard"), data["then"])),
            timed(lambda: storage.publish("now/shard", data["now"], if_absent=True))]
    then, now = [f.clone() for f in floats], [f.clone() for f in floats]
    pairs["convert (to_uint8 -> uint8_pixels)"] = [timed(lambda: [to_uint8(f) for f in then]),
                                                   timed(lambda: [CONVERT(f) for f in now])]
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    parser.add_argument("--shapes", nargs="+", default=["x".join(map(str, s)) for s in SHAPES],
                        help="C x H x W (default: %(default)s)")
    parser.add_argument("--shard-size", type=int, default=10_000)
    parser.add_argument("--shards", type=int, default=3, help="shards per repeat (default: %(default)s)")
    parser.add_argument("--decode-batch", type=int, default=GenerateConfig(model="d", count=1).decode_batch)
    parser.add_argument("--repeat", type=int, default=5, help="median of N (default: %(default)s)")
    parser.add_argument("--tmp", default=None, help="folder for the local root (default: the system's temp)")
    parser.add_argument("--images", choices=("random", "fashion"), default="random",
                        help="decoder output: a random-weights MLP's (noisy: compresses badly; bench/generate.py's) "
                             "or real Fashion-MNIST pixels (a trained decoder's look; 28x28 only)")
    parser.add_argument("--smoke", action="store_true", help="a few seconds: small shards, one repeat")
    parser.add_argument("--regression", metavar="COMMIT", default=None,
                        help="instead: Parquet's costs added since COMMIT (572a1c6), each against today's, interleaved")
    args = parser.parse_args()
    if args.smoke:
        args.shard_size, args.shards, args.repeat, args.decode_batch = 512, 1, 1, 256
    torch.set_num_threads(1)                       # a worker decodes with one thread; so is a core's cost here
    IMAGES["kind"] = args.images
    machine = {"images": args.images, "cpus": os.cpu_count(), "machine": platform.machine(), "output_format_version": OUTPUT_FORMAT_VERSION,
               "repeat": args.repeat, "date": time.strftime("%Y-%m-%d")}
    if args.regression:
        return regression(args.regression, args, machine)
    for shape in (tuple(int(x) for x in s.split("x")) for s in args.shapes):
        for fmt in args.formats:
            run(fmt, shape, args, machine)
            worker_against_decoder(fmt, shape, args, machine)


if __name__ == "__main__":
    main()
