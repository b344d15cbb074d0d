"""How a generation job runs, as opposed to what it makes (GenerateConfig): never part of the job id, so the
same job can be resumed with other settings. Its auto values are sized by cluster/runtime/placement.py."""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cluster.runtime.placement import DEFAULT_CPUS_PER_WORKER, GPU_CPUS_PER_WORKER, size_placement
from cluster.runtime.ray_join import CONNECT_TIMEOUT_S
from vae_core.config import AUTO_WORKERS, MAX_PER_WORKER, MAX_WORKERS, check_finite, flag
from vae_core.errors import VaegenError


@dataclass(frozen=True, kw_only=True)
class RunSettings:
    workers: str | int = flag("--workers", "DecoderWorker actors (at most one per shard left to build); auto: "
                              "sized from the cluster (GPU nodes: the whole node)", default=AUTO_WORKERS, metavar="N|auto")
    cpus_per_worker: float | None = flag("--cpus-per-worker", "CPUs each DecoderWorker asks Ray for", default=None,
                                         unset=f"auto: {GPU_CPUS_PER_WORKER:g} on GPU nodes, "
                                               f"{DEFAULT_CPUS_PER_WORKER:g} without GPUs")
    gpus_per_worker: float | None = flag("--gpus-per-worker", "GPUs each DecoderWorker asks Ray for; > 0 decodes on "
                                         "CUDA", default=None, unset="auto: the cluster's GPUs shared by the workers, "
                                                                     "0 without GPUs")
    # Shared by every verb that runs on Ray (training declares no address of its own).
    address: str | None = flag("--address", "the Ray cluster to join, e.g. ray://head:10001 or auto", default=None,
                               metavar="ADDR", unset="$RAY_ADDRESS, else start a local Ray")
    connect_timeout: float = flag("--connect-timeout", "seconds to wait for the Ray cluster being joined to answer, "
                                  "then stop in one line naming the address", default=CONNECT_TIMEOUT_S,
                                  metavar="SECONDS")
    max_restarts: int = flag("--max-restarts", "restarts of each DecoderWorker that dies; each restart retries the "
                             "shard it was on", default=3)
    # Shared by every verb that shows progress.
    progress: bool = flag("--no-progress", "hide progress bars", default=True)

    def __post_init__(self) -> None:
        workers = self.workers
        if isinstance(workers, str) and workers != AUTO_WORKERS:
            try:
                workers = int(workers)
            except ValueError:
                raise VaegenError(f"--workers={self.workers!r} must be a number or {AUTO_WORKERS}") from None
            object.__setattr__(self, "workers", workers)
        if workers != AUTO_WORKERS and not 1 <= workers <= MAX_WORKERS:
            raise VaegenError(f"--workers={workers} must be between 1 and {MAX_WORKERS}")
        check_finite(self)
        if any(v is not None and not 0 <= v <= MAX_PER_WORKER for v in (self.cpus_per_worker, self.gpus_per_worker)):
            raise VaegenError(f"--cpus-per-worker and --gpus-per-worker must be in 0..{MAX_PER_WORKER}")
        if not self.connect_timeout > 0:
            raise VaegenError(f"--connect-timeout={self.connect_timeout:g} must be > 0")
        if self.max_restarts < 0:
            raise VaegenError(f"--max-restarts={self.max_restarts} must be >= 0")

    @property
    def sized(self) -> bool:
        return self.workers != AUTO_WORKERS and self.cpus_per_worker is not None and self.gpus_per_worker is not None

    @property
    def device(self) -> str:
        return "cuda" if (self.gpus_per_worker or 0) > 0 else "cpu"

    def placed(self, nodes: Iterable[Mapping[str, float]], *, worker_gpu_bytes: float,
               gpu_memory_bytes: float | None = None) -> RunSettings:
        """These settings with every auto value sized for `nodes` (see size_placement)."""
        workers, cpus, gpus = size_placement(nodes, workers=None if self.workers == AUTO_WORKERS else self.workers,
                                             cpus_per_worker=self.cpus_per_worker,
                                             gpus_per_worker=self.gpus_per_worker,
                                             worker_gpu_bytes=worker_gpu_bytes, gpu_memory_bytes=gpu_memory_bytes)
        return dataclasses.replace(self, workers=workers, cpus_per_worker=cpus, gpus_per_worker=gpus)
