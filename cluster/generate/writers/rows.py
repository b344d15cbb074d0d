"""What every shard writer takes: the rows of one shard (DecodedBatch), what they share (ShardInfo), and the
interface a writer implements."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol

import numpy as np


@dataclass(frozen=True)
class ShardInfo:
    """What every row of a shard shares, and what goes into the file's metadata."""
    index: int
    seed: int | None            # the shard's latent seed; None for reconstructions (posterior mean, no noise)
    model: str                  # name@v0001
    weights_sha256: str
    job_id: str
    label_names: tuple[str, ...] = ()   # class names of `label` (a ClassLabel for Hugging Face datasets)


@dataclass
class DecodedBatch:
    ids: np.ndarray             # int64 (B,) global sample ids (reconstructions: the input ids)
    labels: np.ndarray | None   # int64 (B,); None for an unconditional model's samples
    latents: np.ndarray         # float32 (B, Z): z for samples, the posterior mean for reconstructions
    images: np.ndarray          # uint8 (B, C, H, W)

    def __len__(self) -> int:
        return len(self.ids)


class ShardRows(NamedTuple):
    """What a shard's reader gives back: what every reader of its rows needs (latents stay in the file)."""
    ids: np.ndarray             # int64 (N,)
    labels: np.ndarray | None   # int64 (N,); None for a shard without labels
    images: np.ndarray          # uint8 (N, C, H, W), decoded (so lossy where the format is)


def concat_batches(batches: list[DecodedBatch]) -> DecodedBatch:
    labels = None if batches[0].labels is None else np.concatenate([b.labels for b in batches])
    return DecodedBatch(np.concatenate([b.ids for b in batches]), labels,
                        np.concatenate([b.latents for b in batches]), np.concatenate([b.images for b in batches]))


class ShardWriter(Protocol):
    """Collects a shard's rows (write) and gives the finished shard's bytes (close); read_rows reads such bytes
    back."""
    def __init__(self, info: ShardInfo) -> None: ...
    def write(self, batch: DecodedBatch) -> None: ...
    def close(self) -> bytes: ...
    @staticmethod
    def read_rows(data: bytes) -> ShardRows: ...


def sample_key(sample_id: int) -> str:
    """WebDataset key: no dots (WebDataset splits member names at the first one)."""
    return f"{sample_id:010d}"
