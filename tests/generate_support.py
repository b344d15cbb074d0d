"""Helpers shared by the generation tests: tiny published models, small jobs, readers for finished jobs and the\ncheck that a job is complete and byte-exact after a fault."""
from __future__ import annotations

import io
import json
import tarfile
import time

import pyarrow.parquet as pq
import torch

from cluster.generate.plan import plan_job
from cluster.generate.shards import ShardMaker
from cluster.store.layout import SUCCESS
from cluster.store.records import sha256_hex
from cluster.store.registry import Registry
from cluster.store.storage import Storage
from vae_core.checkpoint import checkpoint_files
from vae_core.config import ModelConfig
from vae_core.images import decode_png
from vae_core.models import build_model
from vae_core.use_configs import GenerateConfig

IMAGE_SHAPE = (1, 28, 28)


def publish_tiny_model(storage: Storage, name: str = "tiny", num_classes: int = 0, seed: int = 0) -> str:
    """A small random-init MLP VAE in the registry (its decoder still gives varied, valid images)."""
    torch.manual_seed(seed)
    model = build_model(ModelConfig(image_shape=IMAGE_SHAPE, hidden_dim=32, latent_dim=4, num_classes=num_classes))
    return str(Registry(storage).publish(name, checkpoint_files(model)))


def shard_objects(storage: Storage, manifest: dict) -> dict[str, bytes]:
    return {s["name"]: storage.read_bytes(f"{manifest['prefix']}/{s['name']}") for s in manifest["shards"]}


def read_rows(data: bytes, fmt: str) -> dict[str, list]:
    """id, label, latent, image (uint8 CHW) of every row of one shard, in file order."""
    if fmt == "parquet":
        table = pq.read_table(io.BytesIO(data))
        images = [decode_png(v["bytes"]) for v in table.column("image").to_pylist()]  
        labels = table.column("label").to_pylist() if "label" in table.column_names else [None] * len(table)
        return {"id": table.column("id").to_pylist(), "label": labels,
                "latent": table.column("latent").to_pylist(), "image": images}
    rows: dict[str, list] = {"id": [], "label": [], "latent": [], "image": []}
    samples: dict[str, dict[str, bytes]] = {}          # members grouped by key, as webdataset groups them
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    for files in samples.values():
        info = json.loads(files["json"])
        assert files.get("cls") == (None if info["label"] is None else str(info["label"]).encode())
        rows["id"].append(info["id"])
        rows["label"].append(info["label"])
        rows["latent"].append(info["latent"])
        rows["image"].append(decode_png(files["png"] if "png" in files else files["jpg"]))
    return rows


def all_rows(storage: Storage, manifest: dict) -> dict[str, list]:
    rows: dict[str, list] = {"id": [], "label": [], "latent": [], "image": []}
    for data in shard_objects(storage, manifest).values():
        for k, v in read_rows(data, manifest["format"]).items():
            rows[k] += v
    return rows


def spec(**overrides) -> GenerateConfig:
    return GenerateConfig(**{"model": "tiny", "count": 48, "shard_size": 8, "seed": 3, "decode_batch": 4,
                             **overrides})


def expected_shards(storage, job: GenerateConfig) -> dict[str, str]:
    """sha256 of each shard as one undisturbed worker builds it (one torch thread, as in the actors)."""
    plan = plan_job(job, storage)
    maker = ShardMaker(plan, storage, Registry(storage).load(job.model).model)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {r["name"]: r["sha256"] for r in (maker.build(i)[1] for i in range(plan.num_shards))}
    finally:
        torch.set_num_threads(threads)


def assert_complete_and_exact(storage, manifest, job):
    assert sorted(all_rows(storage, manifest)["id"]) == list(range(job.count))
    assert {k: sha256_hex(v) for k, v in shard_objects(storage, manifest).items()} == expected_shards(storage, job)
    assert storage.exists(f"{manifest['prefix']}/{SUCCESS}")


def wait_for(condition, timeout: float = 120.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def worker_in_stage(job_id: str, stage: str) -> int | None:
    """The pid of a DecoderWorker of this job now inside `stage`, asked through its status() method."""
    import ray
    for name in ray.util.list_named_actors():
        if job_id in name:
            try:
                status = ray.get(ray.get_actor(name).status.remote(), timeout=2)
            except Exception:                      # restarting or gone: ask the next one
                continue
            if status["stage"] == stage:
                return status["pid"]
    return None
