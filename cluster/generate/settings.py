"""How a generation job runs, as opposed to what it makes (GenerateConfig): never part of the job id, so the
same job can be resumed with other settings."""
from __future__ import annotations

from dataclasses import dataclass

from vae_core.config import MAX_WORKERS, flag
from vae_core.errors import VaegenError


@dataclass(frozen=True, kw_only=True)
class RunSettings:
    workers: int = flag("--workers", "DecoderWorker actors (at most one per shard left to build)", default=2)
    cpus_per_worker: float = flag("--cpus-per-worker", "CPUs each DecoderWorker asks Ray for", default=0.5)
    gpus_per_worker: float = flag("--gpus-per-worker", "GPUs each DecoderWorker asks Ray for; > 0 decodes on CUDA",
                                  default=0.0)
    # Shared by every verb that runs on Ray (training declares no address of its own).
    address: str | None = flag("--address", "the Ray cluster to join, e.g. ray://head:10001 or auto", default=None,
                               metavar="ADDR", unset="$RAY_ADDRESS, else start a local Ray")
    max_restarts: int = flag("--max-restarts", "restarts of each DecoderWorker that dies; each restart retries the "
                             "shard it was on", default=3)
    # Shared by every verb that shows progress.
    progress: bool = flag("--no-progress", "hide progress bars", default=True)

    def __post_init__(self) -> None:
        if not 1 <= self.workers <= MAX_WORKERS:
            raise VaegenError(f"--workers={self.workers} must be between 1 and {MAX_WORKERS}")
        if self.cpus_per_worker < 0 or self.gpus_per_worker < 0:
            raise VaegenError("--cpus-per-worker and --gpus-per-worker must be >= 0")
        if self.max_restarts < 0:
            raise VaegenError(f"--max-restarts={self.max_restarts} must be >= 0")

    @property
    def device(self) -> str:
        return "cuda" if self.gpus_per_worker > 0 else "cpu"
