"""The Ray Train backend of cluster.train.driver.train_model: data-parallel training (Ray Train V2).

The driver checks what it can before any worker starts (batch split, dataset numbering, cluster size), then each
worker runs vae_core's epoch loop (run_epochs) on its own rows, which it holds in memory in id order and shuffles
with the (seed, epoch, rank) generator, so one worker trains exactly as one process does. The driver has already
read (and checksummed) the training rows, so when they fit the object store each worker's share goes there as one
object: no Ray Data read of the shards, and none of its processes, to wait for before the first batch. A larger
set, or --stream-epochs, goes through Ray Data (every worker's share read from storage; streamed: every epoch).
Several workers run inside DistributedDataParallel (gloo on CPU, NCCL on GPU), or, with --sync-every K, on their
own with the weights averaged every K steps (post-local SGD); one worker runs without a process group.

Ray Train's checkpoints (one per epoch) live under train-runs/<run-id>/ beside the run's own files
(cluster/train/runs.py); a lost worker makes Ray restart the group from the last one (FailureConfig), and rerunning
with the same run id resumes from it."""
from __future__ import annotations

import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator

import numpy as np
import torch
from torch.distributed.algorithms.model_averaging.utils import average_parameters

from cluster.data.datasets import rows_with_ids, shard_keys
from cluster.runtime.ray_join import CONNECT_TIMEOUT_S
from cluster.runtime.ray_private import footer_readers_for, ray_started_here, trainer_class
from cluster.runtime.ray_session import ray_runtime
from cluster.store.storage import Storage, open_storage
from cluster.train.epoch_samples import EpochSampleWriter
from cluster.train.in_process import resident
from cluster.train.runs import RUNS_DIR
from vae_core.config import TrainJobConfig, from_dict, to_dict
from vae_core.errors import VaegenError
from vae_core.models import VAE, build_model
from vae_core.train import (
    EVAL_BATCH,
    Batch,
    EarlyStopping,
    EpochHooks,
    EpochMetrics,
    FitResult,
    ImageSet,
    TrainingState,
    checkpoint_state,
    iterate_batches,
    make_optimizer,
    require_a_best_epoch,
    resume,
    run_epochs,
    unwrap,
)

STATE_FILE = "state.pt"
STEP_LINE_EVERY_S = 2.0        # rank 0's progress line within an epoch, at most this often
SHUFFLE_BUFFER = 4096          # rows per worker mixed by Ray Data's local shuffle (--stream-epochs)
OBJECT_STORE_SHARE = 0.5       # the most of the object store the training rows may take; more go through Ray Data


# -- driver ----------------------------------------------------------------------------------------------
def check_ray_job(job: TrainJobConfig, manifest: dict) -> None:
    """What can be refused before the run is claimed or any data is read."""
    per_worker_batch(job)
    check_rows_numbered(manifest, job)


def fit_on_ray(storage: Storage, job: TrainJobConfig, manifest: dict, model: VAE, train_set: ImageSet,
               val_set: ImageSet, train_ids: np.ndarray, *, address: str | None, progress: bool,
               connect_timeout: float = CONNECT_TIMEOUT_S) -> FitResult:
    """Train `model` (its weights are where every worker starts) on Ray Train, local Ray unless `address`,
    resuming the run's latest checkpoint; `model` is left at the best weights. `train_set`, `val_set`, `train_ids`:
    the split the driver already holds (runs.read_train_val), in id order."""
    with ray_runtime(address, num_cpus=local_cpus(job), connect_timeout=connect_timeout):
        check_cluster_fits(job)
        shares = None
        if not job.ray.stream_epochs:
            shares = object_store_shares(train_set, job.ray.workers)
        state = run_trainer(storage, job, manifest, train_ids, model.state_dict(), val_set, progress, shares)
    fitted = FitResult.of_checkpoint(state)
    require_a_best_epoch(fitted.best_epoch, fitted.history, job.train, len(val_set), len(train_set))
    model.load_state_dict(state["stopper"]["best_state"])
    return fitted


def per_worker_batch(job: TrainJobConfig) -> int:
    """The global batch (--batch-size) is split evenly, so losses compare across worker counts."""
    if job.train.batch_size % job.ray.workers:
        raise VaegenError(f"--batch-size={job.train.batch_size} must divide by --workers={job.ray.workers} "
                          "(it is the global batch, split across the workers)")
    return job.train.batch_size // job.ray.workers


def check_rows_numbered(manifest: dict, job: TrainJobConfig) -> None:
    """A worker holds its rows in id order and Ray Data keeps rows by id, so that one worker trains exactly as one
    process does: the dataset must number its training rows 0..N-1 in shard order (as ingest does)."""
    shards = manifest["splits"]["train"]["shards"]
    if [s["first_id"] for s in shards] != list(np.cumsum([0] + [s["rows"] for s in shards[:-1]])):
        raise VaegenError(f"dataset {job.dataset!r} does not number its rows 0..N-1 in shard order; re-ingest it")


def worker_shares(train_set: ImageSet, workers: int) -> list[ImageSet]:
    """Rank r's rows: every `workers`-th row from r, in id order. Every worker gets the same count, so all take the
    same number of steps (DDP needs it); the fewer than `workers` rows left over sit the run out."""
    per_worker = len(train_set) // workers
    return [train_set.subset(torch.arange(rank, per_worker * workers, workers)) for rank in range(workers)]


def object_store_shares(train_set: ImageSet, workers: int) -> list | None:
    """Each worker's share of the training rows as one object in the object store (a worker reads its own
    share, also after a restart: the driver owns the objects for the whole run); None when the rows would take
    more than OBJECT_STORE_SHARE of the store, so that Ray Data reads them from storage instead."""
    import ray
    size = train_set.images.nbytes + (0 if train_set.labels is None else train_set.labels.nbytes)
    if size > OBJECT_STORE_SHARE * ray.cluster_resources().get("object_store_memory", 0):
        return None
    return [ray.put(share) for share in worker_shares(train_set, workers)]


def local_cpus(job: TrainJobConfig) -> int:
    """Logical CPUs for an embedded local Ray: the workers' share plus room for Ray Data's read tasks
    (workers holding every CPU would starve the data pipeline)."""
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
    paths = [storage.path(k) for k in shard_keys(storage, job.dataset, "train", manifest)]
    with footer_readers_for(len(paths)):
        images = ray.data.read_parquet(paths, filesystem=storage.fs, columns=["id", "label", "pixels"])
    return images.map_batches(rows_with_ids, batch_format="pyarrow", zero_copy_batch=True,
                              fn_kwargs={"image_shape": tuple(job.model.image_shape), "ids": train_ids})


def run_trainer(storage: Storage, job: TrainJobConfig, manifest: dict, train_ids: np.ndarray,
                initial_state: dict[str, torch.Tensor], val_set: ImageSet, progress: bool,
                shares: list | None = None) -> dict:
    """Run the TorchTrainer to the end (resuming the run's latest checkpoint); the final state it saved.
    The initial weights and the held-out images, which the driver holds anyway, reach every worker through the
    object store, as do the training rows when `shares` holds them (one object per rank); else Ray Data reads
    them."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig, TrainingFailedError

    datasets = {}
    if shares is None:
        import ray.data
        # Ray Data bars from inside workers garble the terminal; rank 0 prints one line per epoch instead.
        ray.data.DataContext.get_current().enable_progress_bars = False
        ray.data.DataContext.get_current().print_on_execution_start = False
        datasets = {"train": training_images(storage, job, manifest, train_ids)}
    use_gpu = job.ray.gpus_per_worker > 0
    resources = {"CPU": job.ray.cpus_per_worker, **({"GPU": job.ray.gpus_per_worker} if use_gpu else {})}
    trainer = trainer_class(local=ray_started_here())(
        train_loop_per_worker,
        train_loop_config={"job": to_dict(job), "progress": progress, "train_images": len(train_ids),
                           "initial_state": ray.put(initial_state), "val_set": ray.put(val_set),
                           "train_shares": shares},
        backend_config=process_group(job.ray.workers, use_gpu),
        scaling_config=ScalingConfig(num_workers=job.ray.workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=job.run_id, storage_path=storage.path(RUNS_DIR), storage_filesystem=storage.fs,
                             checkpoint_config=CheckpointConfig(num_to_keep=job.ray.checkpoints_to_keep),
                             failure_config=FailureConfig(max_failures=job.ray.max_failures),
                             logging_config=LoggingConfig(log_level="WARNING")),   # our epoch line is the progress
        datasets=datasets,
    )
    try:
        result = trainer.fit()
    except TrainingFailedError as e:
        cause = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise VaegenError(f"training run {job.run_id!r} failed ({cause[:300]}); rerun with "
                          f"--run-id {job.run_id} to resume from its last checkpoint") from None
    if result.checkpoint is None:
        raise VaegenError(f"training run {job.run_id!r} finished without a checkpoint")
    return load_state(result.checkpoint)


def process_group(workers: int, use_gpu: bool):
    """torch.distributed for several workers (NCCL on GPUs, else gloo); none for one, which has nobody to all-reduce
    with. Ray Train's TorchConfig is defined beside torch's process-group code, so the controller imports torch to
    read it (seconds on a small machine, before it starts any worker); the plain BackendConfig imports nothing."""
    from ray.train import BackendConfig
    if workers == 1:
        return BackendConfig()
    from ray.train.torch import TorchConfig
    return TorchConfig(backend="nccl" if use_gpu else "gloo")


# -- worker ----------------------------------------------------------------------------------------------
def worker_train_batches(job: TrainJobConfig, raw: dict, rank: int, device: torch.device):
    """This worker's batches of an epoch: from its share of the rows held in memory, or streamed by Ray Data."""
    import ray.train
    batch = per_worker_batch(job)
    if not job.ray.stream_epochs:
        rows = worker_rows(raw["train_shares"], rank, device)

        def train_batches(epoch: int, shuffle: torch.Generator) -> Iterator[Batch]:
            return iterate_batches(rows, batch, shuffle)
        return train_batches
    shard = ray.train.get_dataset_shard("train")

    def streamed(epoch: int, shuffle: torch.Generator) -> Iterator[Batch]:
        return streamed_batches(shard, batch, int(torch.randint(2**31, (1,), generator=shuffle)))
    return streamed


def train_loop_per_worker(raw: dict) -> None:
    """One Ray Train worker: re-type the config, restore the latest checkpoint, run vae_core's epoch loop."""
    import ray.train.torch  # binds ray and ray.train too

    job = from_dict(TrainJobConfig, raw["job"])
    # Ray Train logs each report (with all its metrics) at INFO through a logger that reaches the workers' root
    # logger, which it sets to INFO whatever RunConfig's LoggingConfig says: two lines an epoch on the console.
    logging.getLogger().setLevel(logging.WARNING)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(job.train.threads or max(1, int(job.ray.cpus_per_worker)))
    device = ray.train.torch.get_device()

    model = build_model(job.model)
    model.load_state_dict(ray.get(raw["initial_state"]))      # the driver's: the same on every worker
    epoch_samples = (EpochSampleWriter(open_storage(job.storage, for_writing=True), f"{RUNS_DIR}/{job.run_id}", model)
                     if rank == 0 else None)
    # To the device, DDP when world size > 1 (unless the workers average weights instead of gradients). Our
    # buffers (a fixed σ, the prior: fitted only after training) never change while training, so DDP need not
    # broadcast them before every forward (a gloo round trip).
    local_steps = job.ray.sync_every > 1 and world > 1
    model = ray.train.torch.prepare_model(model, parallel_strategy=None if local_steps else "ddp",
                                          parallel_strategy_kwargs={"forward_sync_buffers": False})
    optimizer = make_optimizer(model, job.train)
    if local_steps:
        optimizer = averaging_weights(optimizer, job.ray.sync_every)
    checkpoint = ray.train.get_checkpoint()
    state = (resume(load_state(checkpoint), model, optimizer, job.train) if checkpoint
             else TrainingState(EarlyStopping(job.train.patience)))

    held_out = ray.get(raw["val_set"])                    # every worker evaluates the same images
    val_set = resident(held_out, device)
    train_batches = worker_train_batches(job, raw, rank, device)

    def combine_train(means: dict) -> dict:
        means = all_reduce_means(means, device)
        if means["n"] < raw["train_images"] - world:        # an even split drops < 1 row each
            raise RuntimeError(f"an epoch saw {means['n']} of {raw['train_images']} training images")
        return means

    def after_train() -> None:
        if local_steps:                     # every worker evaluates, and rank 0 checkpoints, the same weights
            average_parameters(model.parameters(), None)

    def record(metrics: EpochMetrics, state: TrainingState) -> None:
        if raw["progress"] and rank == 0:
            # Written, not print()ed: Ray Train patches print() on workers to go to stdout *and* the root
            # logger's console, so a printed line reached the terminal twice.
            sys.stdout.write(f"epoch {metrics.epoch + 1}/{job.train.epochs}: loss {metrics.loss:.2f} val "
                             f"{metrics.val_loss:.2f} kl {metrics.kl:.2f} {metrics.images_per_s:,.0f} img/s\n")
            sys.stdout.flush()
        if epoch_samples:
            epoch_samples(unwrap(model), metrics.epoch)
        report_epoch(metrics, checkpoint_state(model, optimizer, state) if rank == 0 else None)

    hooks = EpochHooks(train_batches=train_batches, val_batches=lambda: iterate_batches(val_set, EVAL_BATCH),
                       rank=rank, device=device, combine_train=combine_train,
                       combine_val=lambda means: broadcast_from_rank_zero(means, device), after_train=after_train,
                       on_batch=StepLines.of_rank(rank, world, job.train.epochs, raw))
    run_epochs(model, optimizer, job.train, hooks, state, record)


class StepLines:
    """Rank 0's progress within an epoch, as a line every STEP_LINE_EVERY_S: a worker's output reaches the driver
    line by line (log_to_driver), so no bar; the console shows lines shaped as the epoch line (WORKER_LINE)."""

    def __init__(self, epochs: int, share: int, world: int) -> None:
        self.epochs, self.share, self.world = epochs, max(1, share), world
        self.epoch, self.done, self.started, self.shown = -1, 0, 0.0, 0.0

    @classmethod
    def of_rank(cls, rank: int, world: int, epochs: int, raw: dict) -> "StepLines | None":
        """Rank 0's, when progress is shown; None for the other ranks."""
        return cls(epochs, -(-raw["train_images"] // world), world) if raw["progress"] and rank == 0 else None

    def __call__(self, epoch: int, n: int) -> None:
        now = time.perf_counter()
        if epoch != self.epoch:
            self.epoch, self.done, self.started, self.shown = epoch, 0, now, now
        self.done += n
        if now - self.shown < STEP_LINE_EVERY_S or self.done >= self.share:
            return
        self.shown = now
        rate = self.done / max(now - self.started, 1e-9)
        sys.stdout.write(f"epoch {epoch + 1}/{self.epochs}: {100 * self.done // self.share}% of its steps, "
                         f"{rate * self.world:,.0f} img/s, {(self.share - self.done) / rate:.0f} s left\n")
        sys.stdout.flush()


def averaging_weights(optimizer: torch.optim.Optimizer, sync_every: int) -> torch.optim.Optimizer:
    """Post-local SGD (Lin et al. 2018, torch's own implementation): each worker takes Adam steps on its own
    batches and the workers' weights are averaged every `sync_every` steps. On CPU workers a gradient all-reduce
    costs as much as a small batch's compute; this pays it K times less often. Each worker keeps its own Adam
    moments; rank 0's are checkpointed."""
    from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
    from torch.distributed.optim import PostLocalSGDOptimizer
    return PostLocalSGDOptimizer(optimizer, PeriodicModelAverager(period=sync_every, warmup_steps=0))


def worker_rows(shares: list | None, rank: int, device: torch.device) -> ImageSet:
    """This worker's training rows in memory, in id order, moved to the device once when they fit there: its share
    from the object store, else read by Ray Data."""
    import ray
    import ray.train
    if shares is not None:
        return resident(ray.get(shares[rank]), device)
    return resident(rows_in_memory(ray.train.get_dataset_shard("train")), device)


def rows_in_memory(shard) -> ImageSet:
    """This worker's training rows, in id order (one worker holds what the single-process trainer holds)."""
    ids, labels, images = [], [], []
    for b in shard.iter_batches(batch_size=4096, batch_format="numpy"):
        ids.append(b["id"])
        labels.append(b["label"])
        images.append(b["image"])
    if not ids:
        raise RuntimeError("this worker received no training rows")
    order = np.argsort(np.concatenate(ids), kind="stable")
    return ImageSet(torch.from_numpy(np.concatenate(images)[order]), torch.from_numpy(np.concatenate(labels)[order]))


def streamed_batches(shard, batch_size: int, seed: int) -> Iterator[Batch]:
    for b in shard.iter_torch_batches(batch_size=batch_size, local_shuffle_buffer_size=SHUFFLE_BUFFER,
                                      local_shuffle_seed=seed):
        yield b["image"], b["label"]


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
