"""How a generation job runs, as opposed to what it makes (GenerateConfig): never part of the job id, so the
same job can be resumed with other settings.

--workers auto (the default) sizes the DecoderWorkers from the cluster's nodes once Ray is up (size_placement):
- GPU nodes: the whole node. k workers per GPU, k the smallest over the GPU nodes of what their CPUs feed
  (one worker per usable CPU, shared over the node's GPUs) and what one GPU's memory holds (a worker's GPU
  footprint: its CUDA context, the weights, a decode batch's activations); each asks for 1/k GPU (rounded down
  to Ray's 4 decimals, so Ray itself never packs more than k on one GPU). A GPU whose memory is unknown takes
  at most UNKNOWN_MEMORY_WORKERS_PER_GPU. Every GPU gets workers.
- CPU-only clusters: DEFAULT_CPU_WORKERS workers × DEFAULT_CPUS_PER_WORKER CPU, decoding on the CPU.
A flag given explicitly is kept as given; only the unset ones are sized around it."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from vae_core.config import MAX_PER_WORKER, MAX_WORKERS, check_finite, flag
from vae_core.errors import VaegenError

AUTO = "auto"
DEFAULT_CPU_WORKERS = 2
DEFAULT_CPUS_PER_WORKER = 0.5          # CPU-only clusters: the settings vaegen always had
GPU_CPUS_PER_WORKER = 1.0              # a GPU worker encodes and publishes on the CPU while the GPU decodes
RESERVED_CPUS_PER_NODE = 1.0           # left to the raylet, the object store and a driver on the node
UNKNOWN_MEMORY_WORKERS_PER_GPU = 8     # when nothing says how much memory a GPU has
MAX_WORKERS_PER_GPU = 64               # 1/k stays exact at Ray's 4 decimals below this
GPU_MEMORY_USABLE = 0.85               # of a GPU's memory, for the workers' footprints
# A node may declare its GPUs' memory, summed over them, as this custom resource (MiB), e.g.
# `ray start --num-gpus 2 --resources '{"vaegen_gpu_memory_mib": 286720}'`; else the driver's own GPU is taken
# as the size of every GPU, when the driver has one.
GPU_MEMORY_RESOURCE = "vaegen_gpu_memory_mib"
CUDA_CONTEXT_BYTES = 600 * 2**20       # per worker process, whatever the model
ACTIVATION_BYTES_PER_OUTPUT_FLOAT = 64  # decoder activations per output value (float32, generous for conv stacks)
RAY_RESOURCE_STEP = 1e-4               # Ray keeps fractional resources to 4 decimals


@dataclass(frozen=True, kw_only=True)
class RunSettings:
    workers: str | int = flag("--workers", "DecoderWorker actors (at most one per shard left to build); auto: "
                              "sized from the cluster (GPU nodes: the whole node)", default=AUTO, metavar="N|auto")
    cpus_per_worker: float | None = flag("--cpus-per-worker", "CPUs each DecoderWorker asks Ray for", default=None,
                                         unset=f"auto: {GPU_CPUS_PER_WORKER:g} on GPU nodes, "
                                               f"{DEFAULT_CPUS_PER_WORKER:g} without GPUs")
    gpus_per_worker: float | None = flag("--gpus-per-worker", "GPUs each DecoderWorker asks Ray for; > 0 decodes on "
                                         "CUDA", default=None, unset="auto: the cluster's GPUs shared by the workers, "
                                                                     "0 without GPUs")
    # Shared by every verb that runs on Ray (training declares no address of its own).
    address: str | None = flag("--address", "the Ray cluster to join, e.g. ray://head:10001 or auto", default=None,
                               metavar="ADDR", unset="$RAY_ADDRESS, else start a local Ray")
    max_restarts: int = flag("--max-restarts", "restarts of each DecoderWorker that dies; each restart retries the "
                             "shard it was on", default=3)
    # Shared by every verb that shows progress.
    progress: bool = flag("--no-progress", "hide progress bars", default=True)

    def __post_init__(self) -> None:
        workers = self.workers
        if isinstance(workers, str) and workers != AUTO:
            try:
                workers = int(workers)
            except ValueError:
                raise VaegenError(f"--workers={self.workers!r} must be a number or {AUTO}") from None
            object.__setattr__(self, "workers", workers)
        if workers != AUTO and not 1 <= workers <= MAX_WORKERS:
            raise VaegenError(f"--workers={workers} must be between 1 and {MAX_WORKERS}")
        check_finite(self)
        if any(v is not None and not 0 <= v <= MAX_PER_WORKER for v in (self.cpus_per_worker, self.gpus_per_worker)):
            raise VaegenError(f"--cpus-per-worker and --gpus-per-worker must be in 0..{MAX_PER_WORKER}")
        if self.max_restarts < 0:
            raise VaegenError(f"--max-restarts={self.max_restarts} must be >= 0")

    @property
    def sized(self) -> bool:
        return self.workers != AUTO and self.cpus_per_worker is not None and self.gpus_per_worker is not None

    @property
    def device(self) -> str:
        return "cuda" if (self.gpus_per_worker or 0) > 0 else "cpu"

    def placed(self, nodes: Iterable[Mapping[str, float]], *, worker_gpu_bytes: float,
               gpu_memory_bytes: float | None = None) -> RunSettings:
        """These settings with every auto value sized for `nodes` (see size_placement)."""
        workers, cpus, gpus = size_placement(nodes, workers=None if self.workers == AUTO else self.workers,
                                             cpus_per_worker=self.cpus_per_worker,
                                             gpus_per_worker=self.gpus_per_worker,
                                             worker_gpu_bytes=worker_gpu_bytes, gpu_memory_bytes=gpu_memory_bytes)
        return dataclasses.replace(self, workers=workers, cpus_per_worker=cpus, gpus_per_worker=gpus)


def worker_gpu_bytes(weights_bytes: int, image_shape: tuple[int, int, int], decode_batch: int) -> int:
    """An estimate, on the generous side, of the GPU memory one DecoderWorker takes: its own CUDA context, the
    weights (twice: loaded and moved), and a decode batch's activations."""
    outputs = decode_batch * math.prod(image_shape)
    return CUDA_CONTEXT_BYTES + 2 * weights_bytes + outputs * ACTIVATION_BYTES_PER_OUTPUT_FLOAT


def _floor_step(value: float) -> float:
    """Rounded down to Ray's resource precision, never to 0."""
    return max(RAY_RESOURCE_STEP, math.floor(value / RAY_RESOURCE_STEP + 1e-9) * RAY_RESOURCE_STEP)


def gpu_fraction(per_gpu: int) -> float:
    """The GPU share that lets Ray put at most `per_gpu` workers on one GPU."""
    return 1.0 if per_gpu <= 1 else _floor_step(1.0 / per_gpu)


def models_per_gpu(node: Mapping[str, float], worker_bytes: float, gpu_memory_bytes: float | None) -> int:
    """How many workers one GPU of `node` holds: its declared memory (GPU_MEMORY_RESOURCE), else the memory
    given (the driver's GPU), else UNKNOWN_MEMORY_WORKERS_PER_GPU."""
    declared = node.get(GPU_MEMORY_RESOURCE)
    per_gpu = declared * 2**20 / node["GPU"] if declared else gpu_memory_bytes
    if not per_gpu:
        return UNKNOWN_MEMORY_WORKERS_PER_GPU
    return int(per_gpu * GPU_MEMORY_USABLE // worker_bytes)


def size_placement(nodes: Iterable[Mapping[str, float]], *, workers: int | None, cpus_per_worker: float | None,
                   gpus_per_worker: float | None, worker_gpu_bytes: float,
                   gpu_memory_bytes: float | None = None) -> tuple[int, float, float]:
    """(workers, CPUs per worker, GPUs per worker) for a cluster whose alive nodes have `nodes` resources
    (Ray's per-node resource dicts: "CPU", "GPU", custom ones); None = size it, a value = keep it."""
    gpu_nodes = [n for n in nodes if int(n.get("GPU", 0)) >= 1]
    if not gpu_nodes or gpus_per_worker == 0:
        return (workers or DEFAULT_CPU_WORKERS, DEFAULT_CPUS_PER_WORKER if cpus_per_worker is None
                else cpus_per_worker, gpus_per_worker or 0.0)
    gpus_total = sum(int(n["GPU"]) for n in gpu_nodes)
    fits = min(models_per_gpu(n, worker_gpu_bytes, gpu_memory_bytes) for n in gpu_nodes)
    cap = max(1, min(fits, MAX_WORKERS_PER_GPU))              # 1 at least: a GPU too small still takes one
    if gpus_per_worker is None:
        if workers is None:
            cpu_target = cpus_per_worker or GPU_CPUS_PER_WORKER
            fed = min(int(max(n.get("CPU", 0) - RESERVED_CPUS_PER_NODE, n.get("CPU", 0) / 2) / cpu_target)
                      // int(n["GPU"]) for n in gpu_nodes)
            per_gpu = max(1, min(fed, cap))
            workers = per_gpu * gpus_total
        else:
            per_gpu = max(1, min(cap, math.ceil(workers / gpus_total)))
        gpus_per_worker = gpu_fraction(per_gpu)
    elif workers is None:
        per_gpu = int(1 / gpus_per_worker + 1e-9) if gpus_per_worker <= 1 else 0
        workers = (per_gpu * gpus_total if per_gpu
                   else sum(int(int(n["GPU"]) / gpus_per_worker) for n in gpu_nodes)) or 1
    workers = min(workers, MAX_WORKERS)
    if cpus_per_worker is None:
        # As many CPUs as the busiest node can give each of its workers, at most GPU_CPUS_PER_WORKER.
        shares = [max(n.get("CPU", 0) - RESERVED_CPUS_PER_NODE, n.get("CPU", 0) / 2)
                  / max(1, math.ceil(workers * int(n["GPU"]) / gpus_total)) for n in gpu_nodes]
        cpus_per_worker = min(GPU_CPUS_PER_WORKER, _floor_step(min(shares)))
    return workers, cpus_per_worker, gpus_per_worker
