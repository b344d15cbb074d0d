"""Where a generation job's files live under a storage root, and what they are called: the one definition that the
generation driver, its workers, `vaegen ls` (inventory), `vaegen show` (gallery) and the dataset card share.

    outputs/<job-id>/data/train-00000-of-00004.parquet | .tar   shards, in id order (Hugging Face's data-file
                                                                 convention: `datasets` finds them unaided)
                     _receipts/train-00000-of-00004.parquet.json one per shard, written after its shard
                     _lease.json                   which driver works on the job now (cluster/generate/lease.py)
                     _run.json                     how the last run went (running, shards-done, failed, ...)
                     _manifest.json                every shard with its checksums, the spec, the model
                     README.md (tar) | _README.md (Parquet)   the Hugging Face dataset card
                     _SUCCESS                      written last: {"manifest_sha256": ...}; the commit
                     _gallery.html                 `vaegen show`'s page, when asked for

Only the shards are named without a leading `_`: pyarrow's dataset discovery (pandas.read_parquet, Ray Data,
pyarrow.dataset) skips names starting with `_` or `.`, so `pandas.read_parquet(<job folder>)` reads the data and
nothing else. That is why a Parquet job's card is `_README.md`: a README.md there breaks every such reader, and
`datasets` takes a Parquet job's features (Image, ClassLabel names) from the files' own metadata. A tar job's card
stays README.md, where `datasets` reads the features it cannot find in a tar (class names); no pyarrow reader
reads a tar job's folder. Copy `_README.md` to README.md when uploading a Parquet job to the Hub.

Nothing here touches storage: these are names and keys only."""
from __future__ import annotations

import re
from dataclasses import dataclass

from vae_core.use_configs import KINDS

# Bump when a change alters shard bytes or a job's names or records: it is hashed into every job id, and a manifest
# of another version is refused. 7: the manifest names no absolute location (a copied root stays right).
OUTPUT_FORMAT_VERSION = 7
DATASETS = "datasets"
OUTPUTS = "outputs"
MANIFEST = "_manifest.json"
SUCCESS = "_SUCCESS"
RECEIPTS = "_receipts"
RUN_RECORD = "_run.json"
LEASE = "_lease.json"
CARD = "README.md"
HIDDEN_CARD = "_README.md"              # a Parquet job's card (see above)
GALLERY = "gallery.html"                # a model version's page
JOB_GALLERY = "_gallery.html"           # a job's page: beside the data, never read as data

DATA_DIR = "data"
SPLIT = "train"                         # every job is one split
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


def shard_index(name: str) -> int:
    """The index in a shard's name (shard_name's inverse)."""
    return int(name.rsplit("/", 1)[-1].removeprefix(f"{SPLIT}-").split("-", 1)[0])


def shard_name(index: int, fmt: str, num_shards: int) -> str:
    """data/train-00007-of-00010.parquet (.tar): Hugging Face's data-file name, zero-padded so that a listing is
    in id order."""
    return f"{DATA_DIR}/{SPLIT}-{index:05d}-of-{num_shards:05d}.{SHARD_EXTENSIONS[fmt]}"


def shard_glob(fmt: str) -> str:
    """Every shard of a job in `fmt`, as a glob relative to the job folder (the dataset card's data_files)."""
    return f"{DATA_DIR}/{SPLIT}-*.{SHARD_EXTENSIONS[fmt]}"


def shard_braces(fmt: str, num_shards: int) -> str:
    """All shard names as one brace pattern relative to the job folder, e.g.
    data/train-{00000..00003}-of-00004.tar (webdataset expands it)."""
    return f"{DATA_DIR}/{SPLIT}-{{{0:05d}..{num_shards - 1:05d}}}-of-{num_shards:05d}.{SHARD_EXTENSIONS[fmt]}"


def card_name(fmt: str) -> str:
    """The dataset card's name in a job of `fmt` (README.md, or _README.md for Parquet: see above)."""
    return HIDDEN_CARD if SHARD_EXTENSIONS[fmt] == "parquet" else CARD


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

    def card(self, fmt: str) -> str:
        return self.key(card_name(fmt))

    @property
    def gallery(self) -> str:
        return self.key(JOB_GALLERY)
