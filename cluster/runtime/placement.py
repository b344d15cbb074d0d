"""`--workers auto`: how many Ray workers, with how many CPUs and GPUs each, for training and for generation.
One module, so both read a node's resources the same way and leave it the same reserve.

Training (size_training):
- GPU nodes: one worker per GPU (gradients all-reduced over NCCL), each with its node's CPUs shared over its GPUs.
- No GPUs: one worker per node with CPUs, each with the node's CPUs as torch threads. Several CPU processes on
  one machine train slower than one process using all of its cores: each step's gradient all-reduce costs as much
  as a small batch's compute, and the cores are shared anyway. On the machine Ray is started on, that is one
  worker with every CPU.
- The global batch is split evenly, so the worker count is the largest that divides --batch-size.
On a joined cluster a node keeps RESERVED_CPUS_PER_NODE for the raylet, Ray Data's reads and a driver; the Ray
started here is given extra logical CPUs for those (cluster/train/on_ray.py: local_cpus) instead.

Generation (size_placement), once Ray is up:
- GPU nodes: the whole node. k workers per GPU, k the smallest over the GPU nodes of what their CPUs feed
  (one worker per usable CPU, shared over the node's GPUs) and what one GPU's memory holds (a worker's GPU
  footprint: its CUDA context, the weights, a decode batch's activations); each asks for 1/k GPU (rounded down
  to Ray's 4 decimals, so Ray itself never packs more than k on one GPU). A GPU whose memory is unknown takes
  at most UNKNOWN_MEMORY_WORKERS_PER_GPU. Every GPU gets workers.
- CPU-only clusters: DEFAULT_CPU_WORKERS workers × DEFAULT_CPUS_PER_WORKER CPU, decoding on the CPU.
A flag given explicitly is kept as given; only the unset ones are sized around it."""
from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import replace

from cluster.runtime.ray_join import CONNECT_TIMEOUT_S, ray_target
from vae_core.config import AUTO_WORKERS, MAX_WORKERS, TrainJobConfig

RESERVED_CPUS_PER_NODE = 1.0           # left to the raylet, the object store and a driver on the node
DEFAULT_CPU_WORKERS = 2
DEFAULT_CPUS_PER_WORKER = 0.5          # CPU-only clusters: the settings vaegen always had
GPU_CPUS_PER_WORKER = 1.0              # a GPU worker encodes and publishes on the CPU while the GPU decodes
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


def sized_training(job: TrainJobConfig, address: str | None = None,
                   connect_timeout: float = CONNECT_TIMEOUT_S) -> TrainJobConfig:
    """`job` with --workers auto replaced by numbers for the Ray it will run on: the one this process is connected
    to, else the cluster at `address` (or $RAY_ADDRESS), else this machine (where a local Ray will start)."""
    if job.ray is None or job.ray.workers != AUTO_WORKERS:
        return job
    workers, cpus, gpus = size_training(ray_nodes(address, connect_timeout), batch_size=job.train.batch_size)
    return replace(job, ray=replace(job.ray, workers=workers, cpus_per_worker=cpus, gpus_per_worker=gpus))


@contextmanager
def joined_for_sizing(job: TrainJobConfig, address: str | None = None,
                      connect_timeout: float = CONNECT_TIMEOUT_S) -> Iterator[None]:
    """Around sized_training and the work that follows it: where --workers auto is sized on a cluster (an
    address, or $RAY_ADDRESS as inside a Ray Job), the one join both use. Else nothing: sizing would join, leave,
    and the training would join the same cluster again."""
    import ray
    if job.ray is None or job.ray.workers != AUTO_WORKERS or ray.is_initialized() or ray_target(address) is None:
        yield
        return
    from cluster.runtime.ray_session import ray_runtime
    with ray_runtime(address, connect_timeout=connect_timeout):
        yield


def ray_nodes(address: str | None, connect_timeout: float = CONNECT_TIMEOUT_S) -> list[dict]:
    """Resources of the alive nodes training would run on; this machine's when a local Ray is to be started (the
    whole machine: nothing is reserved, see the module docstring)."""
    import ray
    if not ray.is_initialized() and not (address or os.environ.get("RAY_ADDRESS")):
        import torch
        return [{"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count()), "local": True}]
    from cluster.runtime.ray_session import ray_runtime
    with nullcontext() if ray.is_initialized() else ray_runtime(address, connect_timeout=connect_timeout):
        return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]


def size_training(nodes: Iterable[Mapping[str, float]], *, batch_size: int) -> tuple[int, float, float]:
    """(workers, CPUs per worker, GPUs per worker) for alive nodes with these resources (Ray's per-node dicts;
    "local": True marks this machine, whose CPUs are all given to the workers)."""
    nodes = list(nodes)
    gpu_nodes = [n for n in nodes if int(n.get("GPU", 0)) >= 1]
    if gpu_nodes:
        workers = sum(int(n["GPU"]) for n in gpu_nodes)
        cpus = min(max(1.0, float(int(usable_cpus(n) / int(n["GPU"])))) for n in gpu_nodes)
        gpus = 1.0
    else:
        cpu_nodes = [n for n in nodes if n.get("CPU", 0) >= 1] or nodes
        workers = len(cpu_nodes)
        cpus = min(max(1.0, float(int(usable_cpus(n)))) for n in cpu_nodes) if cpu_nodes else 1.0
        gpus = 0.0
    workers = max(1, min(workers, MAX_WORKERS))
    while batch_size % workers:                      # the global batch splits evenly (1 always does)
        workers -= 1
    return workers, cpus, gpus


def usable_cpus(node: Mapping[str, float]) -> float:
    cpus = float(node.get("CPU", 0))
    return cpus if node.get("local") else max(1.0, cpus - RESERVED_CPUS_PER_NODE)


# -- generation --------------------------------------------------------------------------------------------
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
