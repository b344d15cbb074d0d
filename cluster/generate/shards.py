"""Building one shard of a job, and publishing it exactly once: what a DecoderWorker does, without Ray (tests
and benchmarks call it directly).

- Shard i depends only on (spec, i): latents from a generator seeded by (seed, i) and drawn from the model's
  prior (N(0, I), or the mixture fitted to it), a fixed decode batch, one torch thread (the worker sets it),
  deterministic writers. Any worker, retry or rerun writes the same bytes.
- The whole shard is built in memory and validated by its writer, then published as one object if absent (S3:
  one PUT with If-None-Match; locally temp + link), then its receipt (rows, ids, bytes, sha256, pixels sha256).
  If the shard was already there its sha256 must equal ours, else ours replaces it (a corrupt leftover).
- Overlap: make() may run in several threads of one worker at once (the DecoderWorker runs two). Decoding holds
  the maker's device lock, so one shard decodes at a time, and everything after it (uint8 rows hashed, the
  writer's encoding and compression, the publish) runs outside it: while shard i encodes and publishes, shard
  i+1 decodes. torch, zstd, zlib, hashlib and file/socket writes release the GIL, so the two really overlap.
  Each shard stays one all-or-nothing make() call: the protocol does not change, only when the device is busy.
- Hashing: each digest is one pass over its bytes: the pixels as they are encoded, the shard's bytes once when
  they are finished (kept for the "already there" comparison); a shard this worker built is not re-read."""
from __future__ import annotations

import hashlib
import io
import json
import threading
import time
from collections.abc import Callable

import numpy as np
import pyarrow.parquet as pq
import torch

from cluster.data.datasets import read_shard, table_arrays
from cluster.generate.plan import JobPlan, ShardTask
from cluster.generate.writers import DecodedBatch, ShardInfo, ShardWriter, writer_for
from cluster.store.records import sha256_hex
from cluster.store.storage import Storage
from vae_core.images import to_uint8
from vae_core.models import VAE


def uint8_pixels(images: torch.Tensor) -> np.ndarray:
    """The decoder's floats as uint8 pixels, exactly vae_core.images.to_uint8's: on a GPU there (one byte per pixel
    crosses to the host), on the CPU with NumPy in place on the decoder's own output, which it no longer needs,
    since torch's float-to-uint8 cast is the slowest pass of the conversion there. Same order of operations
    (scale, round half to even, clamp to [0, 255]) gives the same bytes as clamping first."""
    if images.device.type != "cpu":
        return to_uint8(images)
    values = images.detach().numpy()
    values *= np.float32(255)
    np.rint(values, out=values)
    np.clip(values, 0, 255, out=values)
    with np.errstate(invalid="ignore"):                 # NaN casts to 0, as torch's cast gives
        return values.astype(np.uint8)


def shard_seed(seed: int, index: int) -> int:
    """A per-shard generator seed from (job seed, shard index) alone: never from the worker."""
    return int.from_bytes(hashlib.sha256(f"vaegen:{seed}:{index}".encode()).digest()[:8], "big") >> 1


class ShardMaker:
    """Decodes, encodes, validates and publishes shards of one job with one loaded model."""

    def __init__(self, plan: JobPlan, storage: Storage, model: VAE, *, writer_cls: type[ShardWriter] | None = None,
                 device: str = "cpu", pause: Callable[[str], None] | None = None) -> None:
        self.plan, self.storage, self.device = plan, storage, device
        self.model = model.to(device).eval()
        self.writer_cls = writer_cls or writer_for(plan.spec)
        self.pause = pause                            # the drill hook (drill.py); None in a real run
        self.device_lock = threading.Lock()          # one shard decodes at a time; encoding overlaps it
        self.stages: dict[int, str] = {}             # shard -> stage, for the shards in flight, oldest first
        if storage.is_s3:
            storage.s3_client                         # made once here: boto3 makes clients unsafely in threads

    @property
    def stage(self) -> str:
        """The stage of the oldest shard in flight ("idle": none); read by DecoderWorker.status()."""
        return next(iter(list(self.stages.values())), "idle")

    @property
    def shard(self) -> int:
        return next(iter(list(self.stages)), -1)

    def enter(self, index: int, stage: str) -> None:
        self.stages[index] = stage
        if self.pause is not None:
            self.pause(stage)

    def batches(self, task: ShardTask):
        """A shard's decoded rows, in id order, in batches of the spec's fixed decode_batch."""
        size = self.plan.spec.decode_batch
        if task.input is None:
            ids = np.arange(task.first_id, task.first_id + task.rows, dtype=np.int64)
            gen = torch.Generator().manual_seed(shard_seed(self.plan.spec.seed, task.index))
            labels = np.asarray(self.plan.labels, np.int64)[ids % len(self.plan.labels)] if self.plan.labels else None
            y_all = None if labels is None else torch.from_numpy(labels)
            z = self.model.sample_prior(task.rows, y_all, gen)                         # (rows, Z), one draw
            for start in range(0, task.rows, size):
                self.enter(task.index, "decode")
                part = slice(start, start + size)
                y = None if labels is None else labels[part]
                z_part, y_part = z[part].to(self.device), None if y_all is None else y_all[part]
                images = (self.model.generate(z_part, y_part) if self.plan.spec.pixels == "mean"
                          else self.model.sample_images(z_part, y_part, gen))
                yield DecodedBatch(ids[part], y, z[part].numpy(), uint8_pixels(images))
        else:
            ids, labels, pixels = self.read_input(task)
            for start in range(0, len(ids), size):
                self.enter(task.index, "decode")
                part = slice(start, start + size)
                x = torch.from_numpy(pixels[part]).float().div_(255.0).to(self.device)     # (B, C, H, W)
                y = torch.from_numpy(labels[part]) if self.model.cfg.conditional else None
                recon, mu = self.model.reconstruct(x, y)
                yield DecodedBatch(ids[part], labels[part], mu.cpu().numpy(), uint8_pixels(recon))

    def decode(self, task: ShardTask) -> list[DecodedBatch]:
        """The whole shard decoded, holding the device lock: the only part of a shard that uses the device."""
        with self.device_lock:
            return list(self.batches(task))

    def read_input(self, task: ShardTask) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        spec = self.plan.spec
        body = read_shard(self.storage, spec.dataset, spec.split, task.input)      # sha256-checked
        return table_arrays(pq.read_table(io.BytesIO(body)), self.plan.image_shape)

    def build(self, index: int) -> tuple[bytes, dict]:
        """The finished shard's bytes and its record (what the receipt and the manifest keep)."""
        plan, task = self.plan, self.plan.task(index)
        self.stages[index] = "queued"
        info = ShardInfo(index, None if task.input else shard_seed(plan.spec.seed, index), plan.model_ref,
                         plan.weights_sha256, plan.job_id, plan.label_names)
        decoded = self.decode(task)                     # the device is free again from here on
        writer, pixels, rows, last_id = self.writer_cls(info), hashlib.sha256(), 0, None
        while decoded:
            batch = decoded.pop(0)                      # handed on: the writer holds what it keeps
            self.enter(index, "encode")
            # The pixels' digest is the one check of a shard's samples that does not depend on its format: a
            # reader (or a test) decodes any lossless shard and compares, so two formats or two runs of one
            # spec are shown to hold the same images. Taken here, once, on the uint8 rows the writer receives.
            pixels.update(np.ascontiguousarray(batch.images).data)
            writer.write(batch)
            rows, last_id = rows + len(batch), int(batch.ids[-1])
        data = writer.close()
        if rows != task.rows:
            raise RuntimeError(f"shard {index}: built {rows} rows, planned {task.rows}")
        # The shard's digest is what exactly-once rests on: the receipt names it, the commit checks every
        # shard's object against it, and an existing object with another digest is replaced. One pass, here,
        # over the bytes about to be published; never a read-back of a shard this worker built.
        record = {"index": index, "name": plan.shard_name(index), "rows": rows,
                  "first_id": task.first_id, "last_id": last_id, "bytes": len(data), "sha256": sha256_hex(data),
                  "pixels_sha256": pixels.hexdigest()}
        return data, record

    def make(self, index: int) -> dict:
        """Build shard `index` and publish it exactly once; returns its record (+ `published`, `seconds`).
        Safe to call from several threads at once (see the module's note on overlap)."""
        started = time.perf_counter()
        try:
            data, record = self.build(index)
            self.enter(index, "publish")
            key = self.plan.shard_key(index)
            # Publish fsyncs the file and its folder (Storage.publish): a shard whose receipt exists must
            # survive a power loss whole, or a committed job could name a shard that is gone or torn. The
            # receipt is published after the shard, so a receipt never names a shard not yet durable.
            published = self.storage.publish(key, data, if_absent=True)
            if not published and sha256_hex(self.storage.read_bytes(key)) != record["sha256"]:
                self.storage.publish(key, data)            # a corrupt leftover: our bytes are the right ones
                published = True
            self.storage.publish(self.plan.receipt_key(index), json.dumps(record, sort_keys=True).encode())
        finally:
            self.stages.pop(index, None)
        return {**record, "published": published, "seconds": time.perf_counter() - started}
