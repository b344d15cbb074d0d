"""Where a generation job's files live under a storage root, and what they are called: the one definition that the
generation driver, its workers, `vaegen ls` (inventory), `vaegen show` (gallery) and the dataset card share.

    outputs/<job-id>/data/<split>-00000-of-00004.parquet | .tar   shards, in id order (Hugging Face's data-file
                                                                   convention: `datasets` finds them unaided)
                     _receipts/<split>-00000-of-00004.parquet.json one per shard, written after its shard
                     _lease.json                   which driver works on the job now (cluster/generate/lease.py)
                     _run.json                     how the last run went (running, shards-done, failed, ...)
                     _manifest.json                every shard with its checksums, the spec, the model
                     README.md                     the Hugging Face dataset card, in every format
                     _SUCCESS                      written last: {"manifest_sha256": ...}; the commit
                     _gallery.html                 `vaegen show`'s page, when asked for

A job is one split, named for what it holds: `train` for samples, the reconstructed split's own name for
reconstructions (`test` reconstructed is `data/test-…`, split `test` in the card).

The card is README.md wherever the job is, so the folder uploaded to the Hub as it is has its card, and `datasets`
reads the features the card declares (class names; for tars, what a tar cannot say). Readers built on pyarrow's
dataset discovery (pandas.read_parquet, pyarrow.dataset) read the `data/` folder, which holds the shards alone:
they take every file of a folder they are given, and a README.md is not Parquet. Every other name vaegen writes
beside the data starts with `_`, which that discovery skips; `vaegen show`'s page is `_gallery.html` wherever it
is written (a job's folder or a model version's).

Nothing here touches storage: these are names and keys only."""
from __future__ import annotations

import re
from dataclasses import dataclass

from vae_core.use_configs import KINDS

# Bump when a change alters shard bytes or a job's names or records: it is hashed into every job id, and a manifest
# of another version is refused. 7: the manifest names no absolute location (a copied root stays right); the card
# is README.md in every format; shards are named for the job's split.
OUTPUT_FORMAT_VERSION = 7
DATASETS = "datasets"
OUTPUTS = "outputs"
MANIFEST = "_manifest.json"
SUCCESS = "_SUCCESS"
RECEIPTS = "_receipts"
RUN_RECORD = "_run.json"
LEASE = "_lease.json"
CARD = "README.md"                      # in every job (see above)
GALLERY = "_gallery.html"               # `vaegen show`'s page, for a job and a model version alike

DATA_DIR = "data"
SAMPLES_SPLIT = "train"                 # every job is one split: samples are `train`, reconstructions their split's
SHARD_EXTENSIONS = {"parquet": "parquet", "png": "tar", "jpeg": "tar"}      # output format -> file extension
JOB_ID_DIGITS = 16                                          # hex digits of the spec's hash in a job id
JOB_ID = re.compile(rf"(?:{'|'.join(KINDS)})-[0-9a-f]+")          # what job_id() names


def dataset_key(name: str, *parts: str) -> str:
    """A key in a dataset's folder (cluster/data/datasets.py says what lives there)."""
    return "/".join((DATASETS, name, *parts))


def dataset_manifest_key(name: str) -> str:
    return dataset_key(name, MANIFEST)


def job_id(kind: str, identity_sha256: str) -> str:
    """A job's folder name: its kind and the start of the hash of everything that makes it."""
    return f"{kind}-{identity_sha256[:JOB_ID_DIGITS]}"


def job_prefix(job_id: str) -> str:
    return f"{OUTPUTS}/{job_id}"


def job_split(kind: str, split: str) -> str:
    """The split a job is, in its shards' names and its card: samples are `train`; reconstructions are named for
    the split they reconstruct (`split`, the spec's), as a name `datasets` takes for a split (word characters:
    a `-` or `.` of a vaegen name becomes `_`)."""
    return re.sub(r"\W", "_", split) if kind == "reconstructions" else SAMPLES_SPLIT


SHARD_INDEX = re.compile(r"-(\d+)-of-\d+\.[a-z]+$")


def shard_index(name: str) -> int:
    """The index in a shard's name (shard_name's inverse)."""
    return int(SHARD_INDEX.search(name).group(1))


def shard_name(index: int, fmt: str, num_shards: int, split: str) -> str:
    """data/train-00007-of-00010.parquet (.tar): Hugging Face's data-file name, zero-padded so that a listing is
    in id order; `split` is the job's (job_split)."""
    return f"{DATA_DIR}/{split}-{index:05d}-of-{num_shards:05d}.{SHARD_EXTENSIONS[fmt]}"


def shard_glob(fmt: str, split: str) -> str:
    """Every shard of a job in `fmt`, as a glob relative to the job folder (the dataset card's data_files)."""
    return f"{DATA_DIR}/{split}-*.{SHARD_EXTENSIONS[fmt]}"


def shard_braces(fmt: str, num_shards: int, split: str) -> str:
    """All shard names as one brace pattern relative to the job folder, e.g.
    data/train-{00000..00003}-of-00004.tar (webdataset expands it)."""
    return f"{DATA_DIR}/{split}-{{{0:05d}..{num_shards - 1:05d}}}-of-{num_shards:05d}.{SHARD_EXTENSIONS[fmt]}"


def receipt_name(shard: str) -> str:
    """A shard's receipt, relative to the job's prefix (flat: one file per shard under _receipts/)."""
    return f"{RECEIPTS}/{shard.rsplit('/', 1)[-1]}.json"


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
    def data(self) -> str:
        return self.key(DATA_DIR)

    @property
    def card(self) -> str:
        return self.key(CARD)

    @property
    def gallery(self) -> str:
        return self.key(GALLERY)
