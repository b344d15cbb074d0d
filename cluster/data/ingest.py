"""Sources → datasets on storage: Fashion-MNIST (IDX), an image folder, or Parquet from anywhere.

Names are checked before anything is read; the whole input is read and validated before anything is written,
and the dataset is replaced atomically (datasets.ingest), so bad input or a failure publishes nothing."""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cluster.data.datasets import KEEP_SUPERSEDED_S, ingest
from cluster.store.storage import Storage, open_storage
from vae_core.config import MAX_CLASSES, StorageConfig
from vae_core.data import (
    FASHION_MNIST_DIR,
    ArrayDataset,
    ArraySplit,
    read_fashion_mnist,
    read_image_folder,
)
from vae_core.errors import VaegenError
from vae_core.names import check_name, is_valid_name

DEFAULT_NAMES = {"fashion-mnist": "fashion-mnist", "parquet": "parquet"}


def read_parquet_source(uri: str, split: str, storage_cfg: StorageConfig) -> ArrayDataset:
    """One Parquet file, or every *.parquet under a folder (local path or s3://bucket/prefix)."""
    storage = Storage(dataclasses.replace(storage_cfg, root=uri))
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
        dataset = read_parquet_source(path, split, storage_cfg)
    storage = open_storage(storage_cfg, for_writing=True)
    return ingest(storage, name, dataset, shard_rows=shard_rows, progress=progress,
                  keep_superseded_s=keep_superseded_s)


def array_split_from_table(table: pa.Table) -> tuple[ArraySplit, tuple[int, int, int]]:
    """A Parquet table from outside (pixels+height/width/channels, or PNG `image`) → uint8 arrays.
    Labels must be non-null integers ≥ 0; images are converted by vae_core.images.pil_to_chw's rules."""
    from vae_core.images import decode_png
    cols = set(table.column_names)
    if table.num_rows == 0:
        raise VaegenError("input Parquet holds no rows")
    if "label" not in cols:
        raise VaegenError("input Parquet needs a 'label' column")
    label_column = table.column("label")
    if not pa.types.is_integer(label_column.type):
        raise VaegenError(f"input Parquet 'label' must be integers, not {label_column.type}")
    if label_column.null_count:
        raise VaegenError(f"input Parquet 'label' has {label_column.null_count} empty value(s)")
    low, high = pc.min_max(label_column).values()
    if low.as_py() < 0:
        raise VaegenError(f"input Parquet has label {low.as_py()}: labels must be 0 or more")
    if high.as_py() >= MAX_CLASSES:                       # before anything is sized by the labels
        raise VaegenError(f"input Parquet has label {high.as_py()}: at most {MAX_CLASSES:,} classes "
                          f"(labels 0..{MAX_CLASSES - 1})")
    labels = label_column.to_numpy().astype(np.int64)
    if "pixels" in cols and {"height", "width", "channels"} <= cols:
        if not (pa.types.is_binary(table.column("pixels").type) or pa.types.is_large_binary(table.column("pixels").type)
                or pa.types.is_fixed_size_binary(table.column("pixels").type)):
            raise VaegenError(f"input Parquet 'pixels' must be binary, not {table.column('pixels').type}")
        for k in ("channels", "height", "width"):      # 8.5 or "8" would be truncated or parsed: refuse them
            if not pa.types.is_integer(table.column(k).type) or table.column(k).null_count:
                raise VaegenError(f"input Parquet '{k}' must be an integer column without nulls, not "
                                  f"{table.column(k).type}")
        c, h, w = (table.column(k)[0].as_py() for k in ("channels", "height", "width"))
        for k in ("channels", "height", "width"):
            if len(set(table.column(k).to_pylist())) != 1:
                raise VaegenError(f"input Parquet rows differ in {k}: all images must have one shape")
        if c not in (1, 3) or h <= 0 or w <= 0:
            raise VaegenError(f"input Parquet images must have 1 or 3 channels and a positive size, not {(c, h, w)}")
        values = table.column("pixels").to_pylist()
        if any(v is None for v in values):
            raise VaegenError("input Parquet 'pixels' has empty values")
        raw = b"".join(values)
        if len(raw) != len(labels) * c * h * w:
            raise VaegenError("input Parquet 'pixels' sizes do not match height×width×channels")
        return ArraySplit(np.frombuffer(raw, np.uint8).reshape(-1, c, h, w).copy(), labels), (c, h, w)
    if "image" in cols:
        arrays = []
        for row, v in enumerate(table.column("image").to_pylist()):
            data = v.get("bytes") if isinstance(v, dict) else v
            if not isinstance(data, bytes):
                raise VaegenError(f"input Parquet row {row}: 'image' holds no image bytes")
            try:
                arrays.append(decode_png(data))
            except (OSError, ValueError) as e:          # PIL's UnidentifiedImageError is an OSError
                raise VaegenError(f"input Parquet row {row}: 'image' is not a readable image "
                                  f"({str(e).splitlines()[0]})") from None
            except VaegenError as e:
                raise VaegenError(f"input Parquet row {row}: {e}") from None
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise VaegenError(f"input Parquet images differ in shape: {sorted(shapes)[:3]}")
        return ArraySplit(np.stack(arrays), labels), arrays[0].shape
    raise VaegenError("input Parquet needs 'pixels' (+ height, width, channels) or 'image' (PNG bytes) columns")
