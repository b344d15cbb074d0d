"""The Parquet shard writer: one row per sample, zstd, the Hugging Face features in the file's metadata."""
from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vae_core import __version__

from .rows import DecodedBatch, ShardInfo, concat_batches

DICTIONARY_COLUMNS = ["shard", "seed", "label", "height", "width", "channels"]   # few distinct values
# Parquet's `image` column is what Hugging Face `datasets.Image` reads: struct<bytes, path>, with the features in
# the schema's "huggingface" metadata. The bytes are a binary Netpbm image (PGM for grey, PPM for RGB): PIL
# decodes it like any file, and it is the raw pixels behind a short header, so it compresses like raw pixels and
# costs a copy to build where PNG costs a deflate per image (the PNG-tar format is there for PNG consumers).
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
# pa.binary() has 32-bit offsets: a shard's image bytes must stay below 2 GiB. Hugging Face's Image feature
# reads only this type (given large_binary it falls back to a plain struct), so the limit is kept, not lifted;
# cluster/generate/plan.py refuses a plan that could cross it.
PARQUET_MAX_IMAGE_BYTES = 2**31 - 1


def parquet_metadata(info: ShardInfo) -> dict[str, str]:
    """The file metadata every Parquet shard carries: what made it, and the Hugging Face features."""
    return {"vaegen.model": info.model, "vaegen.weights_sha256": info.weights_sha256,
            "vaegen.code_version": __version__, "vaegen.job_id": info.job_id, "vaegen.shard": str(info.index),
            "huggingface": json.dumps({"info": {"features": hf_features(info.label_names)}})}




def hf_features(label_names: tuple[str, ...]) -> dict:
    """The Hugging Face `datasets` features of the columns it would not infer (others it reads from the Arrow
    types): `image` as Image, `label` as ClassLabel with names (a plain int64 when no names are known)."""
    label = {"names": list(label_names), "_type": "ClassLabel"} if label_names else {"dtype": "int64", "_type": "Value"}
    return {"id": {"dtype": "int64", "_type": "Value"}, "label": label, "image": {"_type": "Image"}}


def netpbm_header(image_shape) -> bytes:
    c, h, w = image_shape
    if c not in (1, 3):
        raise ValueError(f"images with {c} channels have no Netpbm form (1 = grey, 3 = RGB)")
    return b"P%d\n%d %d\n255\n" % (5 if c == 1 else 6, w, h)


def parquet_image_bytes(image_shape) -> int:
    """Bytes one image takes in the Parquet `image` column (Netpbm header + pixels)."""
    c, h, w = image_shape
    return len(b"P5\n%d %d\n255\n" % (w, h)) + c * h * w


def netpbm_images(images: np.ndarray) -> pa.BinaryArray:
    """uint8 (N, C, H, W) with C = 1 or 3 → binary PGM (P5) / PPM (P6) files, one per image, built as one
    buffer (header + HWC pixels per row) without a Python loop."""
    n, c, h, w = images.shape
    header = np.frombuffer(netpbm_header((c, h, w)), np.uint8)
    if n * (len(header) + h * w * c) > PARQUET_MAX_IMAGE_BYTES:       # the int32 offsets below would wrap
        raise ValueError(f"{n} images of {c}x{h}x{w} exceed the 2 GiB a Parquet binary column holds")
    files = np.empty((n, len(header) + h * w * c), np.uint8)
    files[:, :len(header)] = header
    files[:, len(header):] = images.transpose(0, 2, 3, 1).reshape(n, h * w * c)
    offsets = np.arange(n + 1, dtype=np.int32) * files.shape[1]
    return pa.BinaryArray.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(files)])


class ParquetShardWriter:
    """Columns: id, shard, seed, label (nullable), latent (fixed-size list float32), image (struct<bytes, path>:
    a PGM/PPM file, see IMAGE_TYPE), height, width, channels; zstd; model and code version in the metadata."""

    def __init__(self, info: ShardInfo) -> None:
        self.info = info
        self.batches: list[DecodedBatch] = []

    def write(self, batch: DecodedBatch) -> None:
        self.batches.append(batch)

    def table(self) -> pa.Table:
        rows = concat_batches(self.batches)
        n, (c, h, w), z = len(rows), rows.images.shape[1:], rows.latents.shape[1]
        image = pa.StructArray.from_arrays([netpbm_images(rows.images),
                                            pa.nulls(n, pa.string())], fields=list(IMAGE_TYPE))
        latent = pa.FixedSizeListArray.from_arrays(pa.array(rows.latents.astype(np.float32).ravel()), z)
        columns = {
            "id": pa.array(rows.ids, pa.int64()),
            "shard": pa.array(np.full(n, self.info.index, np.int32)),
            "seed": pa.nulls(n, pa.int64()) if self.info.seed is None else pa.array(np.full(n, self.info.seed)),
            "label": pa.nulls(n, pa.int64()) if rows.labels is None else pa.array(rows.labels, pa.int64()),
            "latent": latent, "image": image,
            "height": pa.array(np.full(n, h, np.int32)), "width": pa.array(np.full(n, w, np.int32)),
            "channels": pa.array(np.full(n, c, np.int32))}
        return pa.table(columns).replace_schema_metadata(parquet_metadata(self.info))

    def close(self) -> bytes:
        if not self.batches:
            raise ValueError(f"shard {self.info.index}: no rows to write")
        table = self.table()
        buf = io.BytesIO()
        # Dictionary encoding and min/max statistics only where they pay: pixel strings and latent lists are all
        # distinct, so a dictionary or min/max of them costs write time and helps no reader.
        pq.write_table(table, buf, compression="zstd", row_group_size=len(table),
                       use_dictionary=DICTIONARY_COLUMNS, write_statistics=["id", *DICTIONARY_COLUMNS])
        data = buf.getvalue()
        rows = pq.read_metadata(io.BytesIO(data)).num_rows           # the footer parses: the file is whole
        if rows != len(table):
            raise ValueError(f"shard {self.info.index}: Parquet holds {rows} rows, expected {len(table)}")
        return data


