"""Sources → datasets on storage: Fashion-MNIST (IDX), an image folder, or Parquet from anywhere."""
from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq

from vae_core.config import StorageConfig
from vae_core.data import FASHION_MNIST_DIR, ArrayDataset, read_fashion_mnist, read_image_folder
from vae_core.errors import VaegenError

from .datasets import array_split_from_table, ingest
from .storage import Storage, open_storage


def read_parquet_source(uri: str, split: str, s3_endpoint: str | None) -> ArrayDataset:
    storage = Storage(StorageConfig(root=uri, s3_endpoint=s3_endpoint))
    files = [e.key for e in storage.list("", recursive=True) if e.key.endswith(".parquet")]
    try:
        if files:
            tables = [pq.read_table(storage.path(k), filesystem=storage.fs) for k in files]
            table = pa.concat_tables(tables)
        elif storage.exists(""):
            table = pq.read_table(storage.path(), filesystem=storage.fs)
        else:
            raise VaegenError(f"no Parquet input at {uri}")
    except (OSError, ValueError) as e:
        raise VaegenError(f"cannot read Parquet input {uri}: {str(e).splitlines()[0]}") from None
    data, _ = array_split_from_table(table)
    names = tuple(str(i) for i in range(int(data.labels.max(initial=-1)) + 1))
    return ArrayDataset({split: data}, names, uri)


def ingest_source(source: str, path: str | None, storage_cfg: StorageConfig, *, name: str | None = None,
                  split: str = "train", shard_rows: int = 10_000, progress: bool = True) -> dict:
    """Read and validate the whole input first, then write: bad input publishes nothing."""
    if source == "fashion-mnist":
        dataset, default_name = read_fashion_mnist(path or FASHION_MNIST_DIR), "fashion-mnist"
    elif source == "image-folder":
        if not path:
            raise VaegenError("ingest image-folder needs the folder's path")
        dataset, default_name = read_image_folder(path, split), os.path.basename(os.path.normpath(path))
    elif source == "parquet":
        if not path:
            raise VaegenError("ingest parquet needs the input file or folder URI")
        dataset, default_name = read_parquet_source(path, split, storage_cfg.s3_endpoint), "parquet"
    else:
        raise VaegenError(f"unknown ingest source {source!r}")
    storage = open_storage(storage_cfg, for_writing=True)
    return ingest(storage, name or default_name, dataset, shard_rows=shard_rows, progress=progress)
