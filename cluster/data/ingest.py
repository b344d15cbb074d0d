"""Sources → datasets on storage: Fashion-MNIST (IDX), an image folder, or Parquet from anywhere.

Names are checked before anything is read; the whole input is read and validated before anything is written,
and the dataset is replaced atomically (datasets.ingest), so bad input or a failure publishes nothing."""
from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq

from cluster.data.datasets import KEEP_SUPERSEDED_S, array_split_from_table, ingest
from cluster.store.storage import Storage, open_storage
from vae_core.config import StorageConfig
from vae_core.data import FASHION_MNIST_DIR, ArrayDataset, read_fashion_mnist, read_image_folder
from vae_core.errors import VaegenError
from vae_core.names import check_name, is_valid_name

DEFAULT_NAMES = {"fashion-mnist": "fashion-mnist", "parquet": "parquet"}


def read_parquet_source(uri: str, split: str, s3_endpoint: str | None) -> ArrayDataset:
    """One Parquet file, or every *.parquet under a folder (local path or s3://bucket/prefix)."""
    storage = Storage(StorageConfig(root=uri, s3_endpoint=s3_endpoint))
    if storage.exists(""):                              # the URI names one file
        paths = [storage.path()]
    else:
        paths = [storage.path(e.key) for e in storage.list("", recursive=True) if e.key.endswith(".parquet")]
        if not paths:
            raise VaegenError(f"no Parquet input at {uri} (a .parquet file, or a folder holding some)")
    try:
        table = pa.concat_tables([pq.read_table(p, filesystem=storage.fs) for p in paths])
    except (OSError, ValueError, pa.ArrowException) as e:
        raise VaegenError(f"cannot read Parquet input {uri}: {str(e).splitlines()[0]}") from None
    if table.num_rows == 0:
        raise VaegenError(f"Parquet input {uri} holds no rows")
    data, _ = array_split_from_table(table)
    names = tuple(str(i) for i in range(int(data.labels.max(initial=-1)) + 1))
    return ArrayDataset({split: data}, names, uri)


def default_name(source: str, path: str | None) -> str:
    """The dataset name when --name is not given: the image folder's own name, from its absolute path (so
    '.' names the current folder); one that is not a valid name asks for --name."""
    if source != "image-folder":
        return DEFAULT_NAMES[source]
    base = os.path.basename(os.path.abspath(path))
    if not is_valid_name(base):
        raise VaegenError(f"cannot name the dataset after the folder {path!r} ({base!r} is not a valid name): "
                          "pass --name")
    return base


def ingest_source(source: str, path: str | None, storage_cfg: StorageConfig, *, name: str | None = None,
                  split: str = "train", shard_rows: int = 10_000, progress: bool = True,
                  keep_superseded_s: float = KEEP_SUPERSEDED_S) -> dict:
    """Check names, read and validate the whole input, then write: bad input publishes nothing."""
    if source not in ("fashion-mnist", "image-folder", "parquet"):
        raise VaegenError(f"unknown ingest source {source!r}")
    if source != "fashion-mnist" and not path:
        raise VaegenError(f"ingest {source} needs the input's path"
                          + (" (an image folder)" if source == "image-folder" else " (a Parquet file or folder URI)"))
    check_name(split, "--split")
    name = check_name(name, "--name") if name is not None else default_name(source, path)
    if source == "fashion-mnist":
        dataset = read_fashion_mnist(path or FASHION_MNIST_DIR)
    elif source == "image-folder":
        dataset = read_image_folder(path, split)
    else:
        dataset = read_parquet_source(path, split, storage_cfg.s3_endpoint)
    storage = open_storage(storage_cfg, for_writing=True)
    return ingest(storage, name, dataset, shard_rows=shard_rows, progress=progress,
                  keep_superseded_s=keep_superseded_s)
