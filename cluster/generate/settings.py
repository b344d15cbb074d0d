"""How a generation job runs, as opposed to what it makes (GenerateConfig): never part of the job id, so the
same job can be resumed with other settings."""
from __future__ import annotations

from dataclasses import dataclass

from vae_core.config import MAX_WORKERS
from vae_core.errors import VaegenError


@dataclass(frozen=True, kw_only=True)
class RunSettings:
    workers: int = 2                   # DecoderWorker actors (at most one per shard left to build)
    cpus_per_worker: float = 0.5       # Ray resources each actor asks for
    gpus_per_worker: float = 0.0       # > 0: the actors decode on CUDA
    address: str | None = None         # a Ray cluster to join; None: $RAY_ADDRESS, else a local Ray
    max_restarts: int = 3              # per actor; each restart retries the shard it was on
    progress: bool = True              # a progress bar on the driver

    def __post_init__(self) -> None:
        if not 1 <= self.workers <= MAX_WORKERS:
            raise VaegenError(f"--workers={self.workers} must be between 1 and {MAX_WORKERS}")
        if self.cpus_per_worker < 0 or self.gpus_per_worker < 0:
            raise VaegenError("--cpus-per-worker and --gpus-per-worker must be >= 0")
        if self.max_restarts < 0:
            raise VaegenError(f"max_restarts={self.max_restarts} must be >= 0")

    @property
    def device(self) -> str:
        return "cuda" if self.gpus_per_worker > 0 else "cpu"
