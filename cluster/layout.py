"""Where a generation job's files live under a storage root, and what they are called: the one definition that the
generation driver, its workers, `vaegen ls` (inventory), `vaegen show` (gallery) and the dataset card share.

    outputs/<job-id>/part-00000.parquet | .tar     shards, in id order (5-digit index: MAX_SHARDS per job)
                     _receipts/part-00000.parquet.json   one per shard, written after its shard
                     _lease.json                   which driver works on the job now (cluster/job_lease.py)
                     _run.json                     how the last run went (running, shards-done, failed, ...)
                     manifest.json                 every shard with its checksums, the spec, the model
                     README.md                     the Hugging Face dataset card
                     _SUCCESS                      written last: {"manifest_sha256": ...}; the commit
                     gallery.html                  `vaegen show`'s page, when asked for

Nothing here touches storage: these are names and keys only."""
from __future__ import annotations

import re
from dataclasses import dataclass

from vae_core.config import KINDS

OUTPUTS = "outputs"
MANIFEST = "manifest.json"
SUCCESS = "_SUCCESS"
RECEIPTS = "_receipts"
RUN_RECORD = "_run.json"
LEASE = "_lease.json"
CARD = "README.md"
GALLERY = "gallery.html"

SHARD_STEM = "part"
SHARD_EXTENSIONS = {"parquet": "parquet", "png": "tar"}      # output format -> file extension
JOB_ID_DIGITS = 16                                          # hex digits of the spec's hash in a job id
JOB_ID = re.compile(rf"(?:{'|'.join(KINDS)})-[0-9a-f]+")          # what job_id() names


def job_id(kind: str, identity_sha256: str) -> str:
    """A job's folder name: its kind and the start of the hash of everything that makes it."""
    return f"{kind}-{identity_sha256[:JOB_ID_DIGITS]}"


def job_prefix(job_id: str) -> str:
    return f"{OUTPUTS}/{job_id}"


def shard_name(index: int, fmt: str) -> str:
    """part-00007.parquet / part-00007.tar: zero-padded so that a listing is in id order."""
    return f"{SHARD_STEM}-{index:05d}.{SHARD_EXTENSIONS[fmt]}"


def shard_index(name: str) -> int:
    """The index in a shard's name (shard_name's inverse)."""
    return int(name.removeprefix(f"{SHARD_STEM}-").split(".", 1)[0])


def shard_glob(fmt: str) -> str:
    """Every shard of a job in `fmt`, as a glob (the dataset card's data_files)."""
    return f"{SHARD_STEM}-*.{SHARD_EXTENSIONS[fmt]}"


def shard_braces(fmt: str, num_shards: int) -> str:
    """All shard names as one brace pattern, e.g. part-{00000..00003}.tar (webdataset expands it)."""
    return f"{SHARD_STEM}-{{{0:05d}..{num_shards - 1:05d}}}.{SHARD_EXTENSIONS[fmt]}"


def receipt_name(shard: str) -> str:
    """A shard's receipt, relative to the job's prefix."""
    return f"{RECEIPTS}/{shard}.json"


@dataclass(frozen=True)
class JobKeys:
    """Every storage key of one job, from its prefix (outputs/<job-id>)."""
    prefix: str

    @classmethod
    def of(cls, job_id: str) -> "JobKeys":
        return cls(job_prefix(job_id))

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def shard(self, name: str) -> str:
        return self.key(name)

    def receipt(self, shard: str) -> str:
        return self.key(receipt_name(shard))

    @property
    def receipts(self) -> str:
        return self.key(RECEIPTS)

    @property
    def manifest(self) -> str:
        return self.key(MANIFEST)

    @property
    def success(self) -> str:
        return self.key(SUCCESS)

    @property
    def run_record(self) -> str:
        return self.key(RUN_RECORD)

    @property
    def lease(self) -> str:
        return self.key(LEASE)

    @property
    def card(self) -> str:
        return self.key(CARD)

    @property
    def gallery(self) -> str:
        return self.key(GALLERY)
