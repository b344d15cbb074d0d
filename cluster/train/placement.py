"""`--workers auto` for training: how many Ray Train workers, with how many CPUs and GPUs each.

- GPU nodes: one worker per GPU (gradients all-reduced over NCCL), each with its node's CPUs shared over its GPUs.
- No GPUs: one worker per node with CPUs, each with the node's CPUs as torch threads. Several CPU processes on
  one machine train slower than one process using all of its cores: each step's gradient all-reduce costs as much
  as a small batch's compute, and the cores are shared anyway. On the machine Ray is started on, that is one
  worker with every CPU.
- The global batch is split evenly, so the worker count is the largest that divides --batch-size.
On a joined cluster a node keeps RESERVED_CPUS_PER_NODE for the raylet, Ray Data's reads and a driver; the Ray
started here is given extra logical CPUs for those (cluster/train/on_ray.py: local_cpus) instead."""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from contextlib import nullcontext
from dataclasses import replace

from vae_core.config import AUTO_WORKERS, MAX_WORKERS, TrainJobConfig

RESERVED_CPUS_PER_NODE = 1.0


def sized_training(job: TrainJobConfig, address: str | None = None) -> TrainJobConfig:
    """`job` with --workers auto replaced by numbers for the Ray it will run on: the one this process is connected
    to, else the cluster at `address` (or $RAY_ADDRESS), else this machine (where a local Ray will start)."""
    if job.ray is None or job.ray.workers != AUTO_WORKERS:
        return job
    workers, cpus, gpus = size_training(ray_nodes(address), batch_size=job.train.batch_size)
    return replace(job, ray=replace(job.ray, workers=workers, cpus_per_worker=cpus, gpus_per_worker=gpus))


def ray_nodes(address: str | None) -> list[dict]:
    """Resources of the alive nodes training would run on; this machine's when a local Ray is to be started (the
    whole machine: nothing is reserved, see the module docstring)."""
    import ray
    address = address or os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized() and not address:
        import torch
        return [{"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count()), "local": True}]
    from cluster.runtime.ray_session import ray_runtime
    with nullcontext() if ray.is_initialized() else ray_runtime(address):
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
