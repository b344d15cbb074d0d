"""`vaegen train --workers N`: data-parallel training on Ray Train (V2 TorchTrainer).

The driver checks everything it can before any worker starts (storage, dataset, shapes, cluster size), streams
the ingested Parquet shards to the workers with Ray Data, and at the end publishes the best weights as the next
model version, in the same layout as the single-process trainer. Each worker runs vae_core's own epoch and
evaluation steps inside DistributedDataParallel (gloo on CPU, NCCL on GPU), or, with --sync-every K, on its own
with the workers' weights averaged every K steps (post-local SGD).

A run lives under train-runs/<run-id>/ on the storage root: Ray Train's checkpoints (one per epoch: model,
optimizer, early-stopping state, history) and vaegen's own two files, _job.json (the settings the run started
with) and _published.json (the model version it became). Rerunning with the same run id resumes from the
latest checkpoint; a lost worker makes Ray restart the group from there (FailureConfig). The publish names the
run, so a driver that stopped after publishing but before writing _published.json gets the same version back
on its rerun (Registry.publish's run reservation), not a second one."""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import pyarrow as pa
import torch
from torch.distributed.algorithms.model_averaging.utils import average_parameters

from vae_core.config import TrainJobConfig, from_dict, to_dict
from vae_core.errors import VaegenError
from vae_core.models import build_model
from vae_core.train import (Batch, EarlyStopping, EpochMetrics, ImageSet, epoch_metrics, evaluate,
                            iterate_batches, make_optimizer, mean_image, split_indices, start_epoch,
                            start_output, train_epoch, unwrap)

from .datasets import bind_model_to_dataset, read_manifest, shard_keys, table_arrays
from .local_train import TrainResult, publish_trained_model, read_train_val
from .registry import ModelRef, Registry
from .runtime import ray_runtime
from .storage import Storage, open_storage

RUNS_DIR = "train-runs"
JOB_FILE = "_job.json"
PUBLISHED_FILE = "_published.json"
STATE_FILE = "state.pt"
SHUFFLE_BUFFER = 4096          # rows per worker mixed by Ray Data's local shuffle


# -- driver ----------------------------------------------------------------------------------------------
def train_on_ray(job: TrainJobConfig, *, address: str | None = None, progress: bool = True) -> TrainResult:
    """Train `job` data-parallel on Ray Train (local Ray unless `address`) and publish a model version.
    job.ray.run_id names the run; the same id resumes it, and a finished run returns its published version."""
    started = time.time()
    if not job.ray.run_id:
        job = replace(job, ray=replace(job.ray, run_id=f"{job.name[:100]}-{time.strftime('%Y%m%d-%H%M%S')}-"
                                                       f"{uuid.uuid4().hex[:6]}"))
    storage = open_storage(job.storage, for_writing=True)
    manifest = read_manifest(storage, job.dataset)
    job = replace(job, model=bind_model_to_dataset(job.model, manifest, job.conditional))
    per_worker_batch(job)
    run = f"{RUNS_DIR}/{job.ray.run_id}"
    claim_run(storage, run, job)
    if storage.exists(f"{run}/{PUBLISHED_FILE}"):
        return published_result(storage, run)
    registry = Registry(storage)
    version = registry.published_by(job.name, job.ray.run_id)
    if version is not None and registry.is_complete(job.name, version):     # published, then stopped
        result = result_of_version(registry, ModelRef(job.name, version))
        record_published(storage, run, result)
        return result
    train_ids, val_ids = train_val_ids(manifest, job)
    # Read (and checksum) once before any worker starts: the mean image starts the decoder, and after training
    # the same images fit the prior and draw the reconstruction grid.
    train_set, val_set = read_train_val(storage, job, manifest)

    with ray_runtime(address, num_cpus=local_cpus(job)):
        check_cluster_fits(job)
        state = fit_on_ray(storage, job, manifest, train_ids, val_set, mean_image(train_set), progress)

    model = build_model(job.model)
    model.load_state_dict(state["stopper"]["best_state"])
    history = [EpochMetrics(**m) for m in state["history"]]
    first_batch = [s["first_batch_at"] for s in state["starts"] if s["first_batch_at"] >= started]
    summary = {"best_epoch": state["stopper"]["best_epoch"], "best_val_loss": state["stopper"]["best_loss"],
               "epochs_run": len(history), "stopped_early": state["stopped_early"],
               "train_images": len(train_ids), "val_images": len(val_ids), "seconds": time.time() - started,
               "workers": job.ray.workers, "run_id": job.ray.run_id,
               "resumed_at_epochs": [s["epoch"] for s in state["starts"]],
               "seconds_to_first_batch": first_batch[0] - started if first_batch else None}
    result = publish_trained_model(storage, job, manifest, model, history, summary, train_set, val_set,
                                   run_id=job.ray.run_id)
    record_published(storage, run, result)
    return result


def record_published(storage: Storage, run: str, result: TrainResult) -> None:
    """_published.json: the version the run became (a rerun returns it without starting Ray)."""
    storage.publish(f"{run}/{PUBLISHED_FILE}", json.dumps(
        {"name": result.ref.name, "version": result.ref.version, "summary": result.summary,
         "history": [m.to_dict() for m in result.history]}).encode())


def result_of_version(registry: Registry, ref: ModelRef) -> TrainResult:
    """A published version's TrainResult, from its metrics.json (the summary plus the history)."""
    metrics = registry.metrics(ref)
    summary = {k: v for k, v in metrics.items() if k != "history"}
    return TrainResult(ref, [EpochMetrics(**m) for m in metrics.get("history", [])], summary)


def per_worker_batch(job: TrainJobConfig) -> int:
    """The global batch (--batch-size) is split evenly, so losses compare across worker counts."""
    if job.train.batch_size % job.ray.workers:
        raise VaegenError(f"--batch-size={job.train.batch_size} must divide by --workers={job.ray.workers} "
                          "(it is the global batch, split across the workers)")
    return job.train.batch_size // job.ray.workers


def published_result(storage: Storage, run: str) -> TrainResult:
    done = json.loads(storage.read_bytes(f"{run}/{PUBLISHED_FILE}"))
    history = [EpochMetrics(**m) for m in done["history"]]
    return TrainResult(ModelRef(done["name"], done["version"]), history, done["summary"])


def claim_run(storage: Storage, run: str, job: TrainJobConfig) -> None:
    """Record the run's settings; a rerun with the same id must ask for the same training."""
    body = json.dumps(to_dict(replace(job, ray=replace(job.ray, max_failures=0, checkpoints_to_keep=1))),
                      sort_keys=True)
    if storage.publish(f"{run}/{JOB_FILE}", body.encode(), if_absent=True):
        return
    mine = json.loads(body)                                # tuples as lists, as they come back from JSON
    theirs = json.loads(storage.read_bytes(f"{run}/{JOB_FILE}"))
    diffs = [k for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]
    if diffs:
        raise VaegenError(f"run {job.ray.run_id!r} was started with other settings ({', '.join(diffs)} differ): "
                          "its checkpoints are incompatible; use a new --run-id")


def train_val_ids(manifest: dict, job: TrainJobConfig) -> tuple[np.ndarray, np.ndarray]:
    """Row ids of the training and held-out images: the same seeded split the single-process trainer
    makes (ingest numbers a split's rows 0..N-1 in shard order, so a row's id is its position)."""
    shards = manifest["splits"]["train"]["shards"]
    if [s["first_id"] for s in shards] != list(np.cumsum([0] + [s["rows"] for s in shards[:-1]])):
        raise VaegenError(f"dataset {job.dataset!r} does not number its rows 0..N-1 in shard order; re-ingest it")
    rows = manifest["splits"]["train"]["rows"]
    n = min(rows, job.train.max_images) if job.train.max_images else rows
    train_idx, val_idx = split_indices(n, job.train.val_fraction, job.train.seed)
    return np.sort(train_idx.numpy()), np.sort(val_idx.numpy())


def local_cpus(job: TrainJobConfig) -> int:
    """Logical CPUs for an embedded local Ray: the workers' share plus room for Ray Data's read tasks
    (on a 2-core machine, workers holding every CPU would starve the data pipeline)."""
    return max(os.cpu_count() or 1, math.ceil(job.ray.workers * job.ray.cpus_per_worker) + 2)


def check_cluster_fits(job: TrainJobConfig) -> None:
    """Fail now with a message rather than wait forever for resources the cluster does not have."""
    import ray
    have = ray.cluster_resources()
    for resource, per_worker, flag in (("GPU", job.ray.gpus_per_worker, "--gpus-per-worker"),
                                       ("CPU", job.ray.cpus_per_worker, "--cpus-per-worker")):
        need = job.ray.workers * per_worker
        if need > have.get(resource, 0):
            raise VaegenError(f"--workers={job.ray.workers} × {flag}={per_worker:g} asks for {need:g} {resource}s "
                              f"but the Ray cluster has {have.get(resource, 0):g}")


def training_images(storage: Storage, job: TrainJobConfig, manifest: dict, train_ids: np.ndarray):
    """Ray Data over the manifest's shards: the training rows (by row id), decoded to uint8 images."""
    import ray.data
    return ray.data.read_parquet(
        [storage.path(k) for k in shard_keys(storage, job.dataset, "train", manifest)], filesystem=storage.fs,
        columns=["id", "label", "pixels"],
    ).map_batches(select_rows, batch_format="pyarrow", zero_copy_batch=True,
                  fn_kwargs={"image_shape": tuple(job.model.image_shape), "ids": train_ids})


def select_rows(table: pa.Table, image_shape: tuple[int, int, int], ids: np.ndarray) -> dict[str, np.ndarray]:
    row_ids, labels, images = table_arrays(table, image_shape)
    keep = np.isin(row_ids, ids, assume_unique=True)
    return {"id": row_ids[keep], "label": labels[keep], "image": images[keep]}


def fit_on_ray(storage: Storage, job: TrainJobConfig, manifest: dict, train_ids: np.ndarray, val_set: ImageSet,
               start_image: torch.Tensor, progress: bool) -> dict:
    """Run the TorchTrainer to the end (resuming the run's latest checkpoint); the final state it saved.
    The held-out images, which the driver has read anyway, reach every worker through the object store:
    streaming them with Ray Data meant each worker reading every shard to keep a tenth of the rows (16 of the
    43 s to the first batch on 2 cores)."""
    import ray
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train import TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer

    # Ray Data bars from inside workers garble the terminal; rank 0 prints one line per epoch instead.
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray.data.DataContext.get_current().print_on_execution_start = False
    use_gpu = job.ray.gpus_per_worker > 0
    resources = {"CPU": job.ray.cpus_per_worker, **({"GPU": job.ray.gpus_per_worker} if use_gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": to_dict(job), "progress": progress, "train_images": len(train_ids),
                           "mean_image": start_image.tolist(), "val_set": ray.put(val_set)},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=job.ray.workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=job.ray.run_id, storage_path=storage.path(RUNS_DIR), storage_filesystem=storage.fs,
                             checkpoint_config=CheckpointConfig(num_to_keep=job.ray.checkpoints_to_keep),
                             failure_config=FailureConfig(max_failures=job.ray.max_failures),
                             logging_config=LoggingConfig(log_level="WARNING")),   # our epoch line is the progress
        datasets={"train": training_images(storage, job, manifest, train_ids)},
    )
    try:
        result = trainer.fit()
    except TrainingFailedError as e:
        cause = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise VaegenError(f"training run {job.ray.run_id!r} failed ({cause[:300]}); rerun with "
                          f"--run-id {job.ray.run_id} to resume from its last checkpoint") from None
    if result.checkpoint is None:
        raise VaegenError(f"training run {job.ray.run_id!r} finished without a checkpoint")
    return load_state(result.checkpoint)


# -- worker ----------------------------------------------------------------------------------------------
def train_loop_per_worker(raw: dict) -> None:
    """One Ray Train worker: re-type the config, restore the latest checkpoint, run vae_core's epochs."""
    import ray
    import ray.train
    import ray.train.torch

    job = from_dict(TrainJobConfig, raw["job"])
    # Ray Train logs each report (with all its metrics) at INFO through a logger that reaches the workers' root
    # logger, which it sets to INFO whatever RunConfig's LoggingConfig says: two lines an epoch on the console.
    logging.getLogger().setLevel(logging.WARNING)
    context = ray.train.get_context()
    rank = context.get_world_rank()
    torch.set_num_threads(job.train.threads or max(1, int(job.ray.cpus_per_worker)))
    device = ray.train.torch.get_device()

    torch.manual_seed(job.train.seed)                      # same initial weights on every worker
    model = build_model(job.model)
    start_output(model, torch.tensor(raw["mean_image"]), job.train)
    stopper = EarlyStopping(job.train.patience)
    checkpoint = ray.train.get_checkpoint()
    state = load_state(checkpoint) if checkpoint else None
    if state:
        model.load_state_dict(state["model"])
        stopper.load_state_dict(state["stopper"])
    # To the device, DDP when world size > 1 (unless the workers average weights instead of gradients). Our
    # buffers (a fixed σ, the prior: fitted only after training) never change while training, so DDP need not
    # broadcast them before every forward (a gloo round trip).
    local_steps = job.ray.sync_every > 1 and context.get_world_size() > 1
    model = ray.train.torch.prepare_model(model, parallel_strategy=None if local_steps else "ddp",
                                          parallel_strategy_kwargs={"forward_sync_buffers": False})
    optimizer = make_optimizer(model, job.train)
    if local_steps:
        optimizer = averaging_weights(optimizer, job.ray.sync_every)
    if state:
        optimizer.load_state_dict(state["optimizer"])
    history = state["history"] if state else []
    starts = (state["starts"] if state else []) + [{"epoch": len(history), "first_batch_at": 0.0}]
    stopped_early = bool(state and state["stopped_early"])

    held_out = ray.get(raw["val_set"])                    # every worker evaluates the same images
    val_set = ImageSet(held_out.images.to(device), None if held_out.labels is None else held_out.labels.to(device))
    train_shard = ray.train.get_dataset_shard("train")
    batch = per_worker_batch(job)
    cached: ImageSet | None = None           # this worker's shard, once streamed (equal rows on every worker)
    seen: list[Batch] = []
    for epoch in range(len(history), 0 if stopped_early else job.train.epochs):
        # Noise and shuffling derive from (seed, epoch, rank), not from a state carried across epochs, so the
        # epoch number in the checkpoint is all the RNG state a resumed run needs.
        epoch_seed = job.train.seed * 1_000_003 + epoch * 1009 + rank
        generator = torch.Generator(device=device).manual_seed(epoch_seed)      # noise, on the device
        begin = time.perf_counter()
        if cached is None:
            batches = timed_first(torch_batches(train_shard, batch, epoch_seed), starts[-1])
            if job.ray.cache_shards:
                batches = recorded(batches, seen)
        else:
            batches = iterate_batches(cached, batch, torch.Generator().manual_seed(epoch_seed))
        beta = start_epoch(optimizer, epoch, job.train)          # lr schedule and KL warm-up, as in vae_core.fit
        train_means = all_reduce_means(train_epoch(model, optimizer, batches, job.train, generator, beta=beta),
                                       device)
        if local_steps:                     # every worker evaluates, and rank 0 checkpoints, the same weights
            average_parameters(model.parameters(), None)
        if train_means["n"] < raw["train_images"] - context.get_world_size():   # an even split drops < 1 row each
            raise RuntimeError(f"epoch {epoch} saw {train_means['n']} of {raw['train_images']} training images")
        seconds = time.perf_counter() - begin
        if seen and cached is None:
            cached = ImageSet(torch.cat([b[0] for b in seen]), torch.cat([b[1] for b in seen]))
            seen.clear()
        val_means = broadcast_from_rank_zero(evaluate(model, iterate_batches(val_set, 1024), job.train), device)
        metrics = epoch_metrics(epoch, train_means, val_means, seconds)
        history.append(metrics.to_dict())
        stopped_early = stopper.step(epoch, metrics.val_loss, unwrap(model))
        if raw["progress"] and rank == 0:
            # Written, not print()ed: Ray Train patches print() on workers to go to stdout *and* the root
            # logger's console, so a printed line reached the terminal twice.
            sys.stdout.write(f"epoch {epoch + 1}/{job.train.epochs}: loss {metrics.loss:.2f} val "
                             f"{metrics.val_loss:.2f} kl {metrics.kl:.2f} {metrics.images_per_s:,.0f} img/s\n")
            sys.stdout.flush()
        state = {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                 "stopper": stopper.state_dict(), "history": history, "starts": starts,
                 "stopped_early": stopped_early}
        report_epoch(metrics, state if rank == 0 else None)
        if stopped_early:
            break


def averaging_weights(optimizer: torch.optim.Optimizer, sync_every: int) -> torch.optim.Optimizer:
    """Post-local SGD (Lin et al. 2018, torch's own implementation): each worker takes Adam steps on its own
    batches and the workers' weights are averaged every `sync_every` steps. On CPU workers a gradient all-reduce
    costs as much as a small batch's compute; this pays it K times less often. Each worker keeps its own Adam
    moments; rank 0's are checkpointed."""
    from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
    from torch.distributed.optim import PostLocalSGDOptimizer
    return PostLocalSGDOptimizer(optimizer, PeriodicModelAverager(period=sync_every, warmup_steps=0))


def torch_batches(shard, batch_size: int, seed: int) -> Iterator[Batch]:
    for b in shard.iter_torch_batches(batch_size=batch_size, local_shuffle_buffer_size=SHUFFLE_BUFFER,
                                      local_shuffle_seed=seed):
        yield b["image"], b["label"]


def recorded(batches: Iterator[Batch], seen: list[Batch]) -> Iterator[Batch]:
    for b in batches:
        seen.append(b)
        yield b


def timed_first(batches: Iterator[Batch], start: dict) -> Iterator[Batch]:
    """Note when this worker start's first batch arrives (the start-up cost a user waits through)."""
    for b in batches:
        if not start["first_batch_at"]:
            start["first_batch_at"] = time.time()
        yield b


def all_reduce_means(means: dict[str, float], device: torch.device) -> dict[str, float]:
    """Per-image means over every worker's images (each worker saw its own shard)."""
    import torch.distributed as dist
    n = means["n"]
    sums = torch.tensor([means["loss"] * n, means["recon"] * n, means["kl"] * n, n], dtype=torch.float64,
                        device=device)
    if dist.is_initialized():
        dist.all_reduce(sums)
    total = max(sums[3].item(), 1.0)
    return {"loss": sums[0].item() / total, "recon": sums[1].item() / total, "kl": sums[2].item() / total,
            "n": int(sums[3].item())}


def broadcast_from_rank_zero(means: dict[str, float], device: torch.device) -> dict[str, float]:
    """Rank 0's validation figures on every worker, so all of them take the same early-stopping decision."""
    import torch.distributed as dist
    values = torch.tensor([means["loss"], means["recon"], means["kl"], means["n"]], dtype=torch.float64,
                          device=device)
    if dist.is_initialized():
        dist.broadcast(values, src=0)
    return {"loss": values[0].item(), "recon": values[1].item(), "kl": values[2].item(), "n": int(values[3].item())}


def report_epoch(metrics: EpochMetrics, state: dict | None) -> None:
    """Every worker reports; rank 0 alone attaches the checkpoint (the model is the same on all)."""
    import ray.train
    if state is None:
        ray.train.report(metrics.to_dict())
        return
    with tempfile.TemporaryDirectory() as folder:
        torch.save(state, os.path.join(folder, STATE_FILE))
        ray.train.report(metrics.to_dict(), checkpoint=ray.train.Checkpoint.from_directory(folder))


def load_state(checkpoint) -> dict:
    with checkpoint.as_directory() as folder:
        return torch.load(os.path.join(folder, STATE_FILE), map_location="cpu", weights_only=True)
