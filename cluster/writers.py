"""Shard writers: one class per output format, one interface. A writer collects decoded rows in memory and
`close()` returns the finished shard as bytes, checked; the caller publishes it as one object. Nothing here
touches storage, so an exception anywhere in a writer publishes nothing.

Both formats are deterministic: the same rows give the same bytes (fixed Parquet settings; tar members with a
fixed mtime, owner and mode, in id order; PNGs without timestamps)."""
from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vae_core import __version__
from vae_core.images import png_bytes

PNG_COMPRESS_LEVEL = 6          # part of the output format: changing it changes every PNG's bytes
LATENT_FORMAT = "%.9g"          # PNG tar .json latents: 9 significant digits round-trip a float32 exactly
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
TAR_MTIME = 0                   # fixed member metadata: a rerun gives the same tar bytes
TAR_MODE = 0o644


@dataclass(frozen=True)
class ShardInfo:
    """What every row of a shard shares, and what goes into the file's metadata."""
    index: int
    seed: int | None            # the shard's latent seed; None for reconstructions (posterior mean, no noise)
    model: str                  # name@v0001
    weights_sha256: str
    job_id: str
    label_names: tuple[str, ...] = ()   # class names of `label` (a ClassLabel for Hugging Face datasets)

    def metadata(self) -> dict[str, str]:
        return {"vaegen.model": self.model, "vaegen.weights_sha256": self.weights_sha256,
                "vaegen.code_version": __version__, "vaegen.job_id": self.job_id, "vaegen.shard": str(self.index),
                "huggingface": json.dumps({"info": {"features": hf_features(self.label_names)}})}


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


@dataclass
class DecodedBatch:
    ids: np.ndarray             # int64 (B,) global sample ids (reconstructions: the input ids)
    labels: np.ndarray | None   # int64 (B,); None for an unconditional model's samples
    latents: np.ndarray         # float32 (B, Z): z for samples, the posterior mean for reconstructions
    images: np.ndarray          # uint8 (B, C, H, W)

    def __len__(self) -> int:
        return len(self.ids)


def concat_batches(batches: list[DecodedBatch]) -> DecodedBatch:
    labels = None if batches[0].labels is None else np.concatenate([b.labels for b in batches])
    return DecodedBatch(np.concatenate([b.ids for b in batches]), labels,
                        np.concatenate([b.latents for b in batches]), np.concatenate([b.images for b in batches]))


class ShardWriter(Protocol):
    def __init__(self, info: ShardInfo) -> None: ...
    def write(self, batch: DecodedBatch) -> None: ...
    def close(self) -> bytes: ...


def sample_key(sample_id: int) -> str:
    """WebDataset key: no dots (WebDataset splits member names at the first one)."""
    return f"{sample_id:010d}"


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
        return pa.table(columns).replace_schema_metadata(self.info.metadata())

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


def latent_texts(latents: np.ndarray) -> list[str]:
    """Each float32 row (B, Z) as the items of a JSON array: LATENT_FORMAT, 9 significant digits, which give
    back exactly the float32 (the Parquet column's value) and which json.dumps writes again for the float that
    json.loads reads (shorter than repr's 17 digits: a small latent's .json stays within one 512-byte tar block).
    Rows where %g and json differ (non-finite or integral values, |v| >= 1e8, where %g
    switches to exponents before repr does) are written by json.dumps instead."""
    rows = latents.tolist()
    values = np.asarray(latents, np.float64)
    with np.errstate(invalid="ignore"):
        odd = (~np.isfinite(values) | (np.abs(values) >= 1e8) | (values == np.round(values))).any(axis=1).tolist()
    row_format = ", ".join([LATENT_FORMAT] * latents.shape[1])
    return [json.dumps(row)[1:-1] if unusual else row_format % tuple(row) for row, unusual in zip(rows, odd)]


USTAR_MODE_IDS = b"%07o\0" % TAR_MODE + b"0000000\0" * 2                  # mode, uid, gid
USTAR_MTIME = b"%011o\0" % TAR_MTIME
USTAR_TAIL = b"0" + b"\0" * 100 + b"ustar\x0000" + b"\0" * (64 + 16 + 167)   # type, link, magic, owner, dev, prefix
USTAR_FIXED_SUM = sum(USTAR_MODE_IDS) + sum(USTAR_MTIME) + sum(USTAR_TAIL) + 8 * 32  # checksum field = 8 spaces


def ustar_header(name: str, size: int) -> bytes:
    """One 512-byte POSIX ustar header with fixed metadata (mtime, uid/gid 0, no owner names): byte for byte
    what tarfile writes for such a member, without tarfile's per-member TarInfo work."""
    name_field, size_field = name.encode().ljust(100, b"\0"), b"%011o\0" % size
    checksum = USTAR_FIXED_SUM + sum(name_field) + sum(size_field)
    return name_field + USTAR_MODE_IDS + size_field + USTAR_MTIME + b"%06o\0 " % checksum + USTAR_TAIL


def tar_member_count(data: bytes) -> int:
    """Walk a tar's headers, checking each checksum and that the archive ends with its two zero blocks."""
    view, offset, count = memoryview(data), 0, 0
    while offset + 512 <= len(data) and any(view[offset:offset + 512]):
        header = bytes(view[offset:offset + 512])
        stored = int(header[148:155].rstrip(b"\0 ") or b"0", 8)
        if stored != sum(header[:148]) + sum(header[156:]) + 8 * 32:
            raise ValueError(f"tar header {count} at byte {offset} fails its checksum")
        size = int(header[124:135], 8)
        offset += 512 + -(-size // 512) * 512
        count += 1
    if offset + 1024 > len(data) or len(data) % 512:
        raise ValueError("tar archive is truncated")
    return count


class PngTarShardWriter:
    """A WebDataset tar: per sample `<key>.png` (the image) and `<key>.json` (id, label, latent, shape, ...)."""

    def __init__(self, info: ShardInfo) -> None:
        self.info = info
        self.parts: list[bytes] = []
        self.rows = 0

    def _add(self, name: str, data: bytes) -> None:
        self.parts += (ustar_header(name, len(data)), data, b"\0" * (-len(data) % 512))

    def write(self, batch: DecodedBatch) -> None:
        c, h, w = batch.images.shape[1:]
        # The JSON text is formatted by hand, sparing json.dumps's per-call work on every sample, to exactly
        # what json.dumps(meta, sort_keys=True) writes for what json.loads reads back from it: keys sorted, ", " and
        # ": " separators, latents as in latent_texts.
        head = f'{{"channels": {c}, "height": {h}, "id": '
        tail = (f', "model": {json.dumps(self.info.model)}, "seed": {json.dumps(self.info.seed)}, '
                f'"shard": {self.info.index}, "width": {w}}}')
        labels = [None] * len(batch) if batch.labels is None else batch.labels.tolist()
        for sample_id, label, latent, image in zip(batch.ids.tolist(), labels, latent_texts(batch.latents),
                                                   batch.images):
            key = sample_key(sample_id)
            meta = f'{head}{sample_id}, "label": {"null" if label is None else label}, "latent": [{latent}]{tail}'
            self._add(f"{key}.png", png_bytes(image, PNG_COMPRESS_LEVEL))
            self._add(f"{key}.json", meta.encode())
        self.rows += len(batch)

    def close(self) -> bytes:
        if not self.rows:
            raise ValueError(f"shard {self.info.index}: no rows to write")
        body = b"".join(self.parts)
        data = body + b"\0" * (-(len(body) + 1024) % tarfile.RECORDSIZE + 1024)   # end blocks, whole records
        members = tar_member_count(data)
        if members != 2 * self.rows:
            raise ValueError(f"shard {self.info.index}: tar holds {members} members, expected {2 * self.rows}")
        return data


WRITERS: dict[str, type[ShardWriter]] = {"parquet": ParquetShardWriter, "png": PngTarShardWriter}
