"""The Parquet shard writer: one row per sample, zstd, the Hugging Face features in the file's metadata.

The schema decision, for the `image` column: a Hugging Face `Image` struct<bytes, path> holding a PNG file whose
deflate stream is *stored* blocks (no compression inside the PNG).
- PNG, because every image reader takes it without glue: PIL, torchvision.io.decode_image, browsers and the Hub
  viewer, HF `datasets` (Image feature declared in the metadata), pandas/Ray Data users via PIL. The PGM/PPM
  bytes written before are refused by torchvision and browsers.
- Stored rather than deflated, because a deflate per image would cost several times the rest of the shard's
  write; a stored PNG is the pixels plus a filter byte per scanline and fixed headers, laid out for all images
  at once with NumPy, then one adler32 and one crc32 per image. The Parquet file's zstd then compresses the
  pixels as it would raw ones, so the shard stays as small.
- Not a raw fixed-shape tensor column: zero-copy to NumPy, but every image reader above would need glue to see
  an image; and not both, which would store every pixel twice. `decode_image_column` gives NumPy back."""
from __future__ import annotations

import functools
import io
import json
import struct
import zlib

import deflate
import numpy as np
import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq

from cluster.generate.writers.rows import DecodedBatch, ShardInfo, ShardRows, concat_batches
from vae_core import __version__
from vae_core.images import PNG_COLOUR_TYPES

DICTIONARY_COLUMNS = ["shard", "seed", "label", "height", "width", "channels"]   # few distinct values
# Parquet's `image` column is what Hugging Face `datasets.Image` reads: struct<bytes, path>, with the features in
# the schema's "huggingface" metadata; the bytes are a stored-deflate PNG (the module docstring says why).
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
# pa.binary() has 32-bit offsets: a shard's image bytes must stay below 2 GiB. Hugging Face's Image feature
# reads only this type (given large_binary it falls back to a plain struct), so the limit is kept, not lifted;
# cluster/generate/plan.py refuses a plan that could cross it.
PARQUET_MAX_IMAGE_BYTES = 2**31 - 1

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STORED_BLOCK = 65535                    # the most bytes one stored deflate block holds
ZLIB_HEADER = b"\x78\x01"              # deflate, 32 KiB window, no preset dictionary, "fastest" level
PNG_IEND = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))


def parquet_metadata(info: ShardInfo, labelled: bool) -> dict[str, str]:
    """The file metadata every Parquet shard carries: what made it, and the Hugging Face features."""
    return {"vaegen.model": info.model, "vaegen.weights_sha256": info.weights_sha256,
            "vaegen.code_version": __version__, "vaegen.job_id": info.job_id, "vaegen.shard": str(info.index),
            "huggingface": json.dumps({"info": {"features": hf_features(info.label_names, labelled)}})}


def hf_features(label_names: tuple[str, ...], labelled: bool = True) -> dict:
    """The Hugging Face `datasets` features of the columns it would not infer (others it reads from the Arrow
    types): `image` as Image, `label` as ClassLabel with names (a plain int64 when no names are known; no `label`
    at all for rows without labels, an unconditional model's samples)."""
    label = {"names": list(label_names), "_type": "ClassLabel"} if label_names else {"dtype": "int64", "_type": "Value"}
    return {"id": {"dtype": "int64", "_type": "Value"}, **({"label": label} if labelled else {}),
            "image": {"_type": "Image"}}


def _png_layout(image_shape) -> tuple[bytes, list[tuple[int, int, int]], int]:
    """What every PNG of `image_shape` shares: the bytes before the first stored block (signature, IHDR, IDAT's
    length and type, zlib header), the stored blocks as (file offset of the block header, raw start, raw length)
    and the file's size. The raw image is H scanlines of a filter byte (0: none) and W*C pixels."""
    c, h, w = image_shape
    if c not in PNG_COLOUR_TYPES:
        raise ValueError(f"images with {c} channels have no PNG form here (1 = grey, 3 = RGB)")
    raw = h * (1 + w * c)
    starts = range(0, raw, STORED_BLOCK)
    idat = len(ZLIB_HEADER) + 5 * len(starts) + raw + 4
    ihdr = struct.pack(">IIBBBBB", w, h, 8, PNG_COLOUR_TYPES[c], 0, 0, 0)
    head = (PNG_SIGNATURE + struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
            + struct.pack(">I", idat) + b"IDAT" + ZLIB_HEADER)
    blocks = [(len(head) + i * 5 + start, start, min(STORED_BLOCK, raw - start)) for i, start in enumerate(starts)]
    return head, blocks, len(head) + idat - len(ZLIB_HEADER) + 4 + len(PNG_IEND)


def parquet_image_bytes(image_shape) -> int:
    """Bytes one image takes in the Parquet `image` column (a stored-deflate PNG file)."""
    return _png_layout(image_shape)[2]


@functools.lru_cache(maxsize=8)
def _png_template(image_shape) -> tuple[np.ndarray, list[tuple[int, int, int]], int]:
    """One PNG file of `image_shape` with every byte that does not depend on the pixels in place (signature,
    IHDR, block headers, filter bytes 0, IEND), the blocks, and where IDAT's adler32 goes."""
    head, blocks, size = _png_layout(image_shape)
    template = np.zeros(size, np.uint8)
    template[:len(head)] = np.frombuffer(head, np.uint8)
    for i, (at, _, length) in enumerate(blocks):
        template[at:at + 5] = np.frombuffer(struct.pack("<BHH", i == len(blocks) - 1, length, length ^ 0xFFFF),
                                            np.uint8)
    template[size - len(PNG_IEND):] = np.frombuffer(PNG_IEND, np.uint8)
    template.flags.writeable = False
    return template, blocks, size - len(PNG_IEND) - 8


def _checksums(parts, n: int, checksum, start=None) -> np.ndarray:
    """`checksum` (deflate.adler32 / crc32: libdeflate's, the values zlib's give, several times faster on these
    short rows) of each row, continued over several column ranges `parts` of (N, k) views whose rows are
    contiguous; map over the rows, not a Python loop: the per-call overhead is the rest of the cost."""
    values = start
    for part in parts:
        rows = map(checksum, part) if values is None else map(checksum, part, values.tolist())
        values = np.fromiter(rows, np.uint32, n)
    return values


def _put_u32(files: np.ndarray, at: int, values: np.ndarray) -> None:
    files[:, at:at + 4] = values.astype(">u4").view(np.uint8).reshape(-1, 4)


def png_images(images: np.ndarray) -> pa.BinaryArray:
    """uint8 (N, C, H, W) with C = 1 or 3 → PNG files with stored deflate blocks, one per image, all laid out at
    once in one buffer (every file has the same size); the only per-image work is zlib's adler32 and crc32."""
    n, c, h, w = images.shape
    template, blocks, adler_at = _png_template((c, h, w))
    size = len(template)
    if n * size > PARQUET_MAX_IMAGE_BYTES:                             # the int32 offsets below would wrap
        raise ValueError(f"{n} images of {c}x{h}x{w} exceed the 2 GiB a Parquet binary column holds")
    files = np.empty((n, size), np.uint8)
    files[:] = template
    scanlines = images.transpose(0, 2, 3, 1).reshape(n, h, w * c)
    if len(blocks) == 1:                                                # the raw image sits in one block
        at, _, length = blocks[0]
        files[:, at + 5:at + 5 + length].reshape(n, h, 1 + w * c)[:, :, 1:] = scanlines
    else:
        raw = np.zeros((n, h, 1 + w * c), np.uint8)                     # filter byte 0 per scanline
        raw[:, :, 1:] = scanlines
        raw = raw.reshape(n, -1)
        for at, start, length in blocks:
            files[:, at + 5:at + 5 + length] = raw[:, start:start + length]
    _put_u32(files, adler_at, _checksums([files[:, at + 5:at + 5 + length] for at, _, length in blocks], n,
                                         deflate.adler32))
    idat_type = blocks[0][0] - len(ZLIB_HEADER) - 4                    # IDAT's crc covers its type and data
    _put_u32(files, adler_at + 4, _checksums([files[:, idat_type:adler_at + 4]], n, deflate.crc32))
    offsets = np.arange(n + 1, dtype=np.int32) * size
    return pa.BinaryArray.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(files)])


def decode_image_column(table: pa.Table, image_shape=None) -> np.ndarray:
    """The `image` column of a vaegen Parquet table (stored-deflate PNGs; any image PIL reads) as uint8 (N, C, H, W). `image_shape` (C, H, W) defaults to the table's channels/height/width columns.
    Shards laid out by png_images are read back with NumPy slices alone; anything else goes through PIL."""
    cells = table.column("image").combine_chunks().flatten()[0]     # flatten applies the slice offset
    n = len(cells)
    if image_shape is None:
        if n == 0:
            raise ValueError("an empty table does not say its image shape: pass image_shape")
        image_shape = tuple(int(table.column(k)[0].as_py()) for k in ("channels", "height", "width"))
    c, h, w = image_shape
    if n == 0:
        return np.empty((0, c, h, w), np.uint8)
    offsets = np.frombuffer(cells.buffers()[1], np.int32, n + 1, cells.offset * 4)
    data = np.frombuffer(cells.buffers()[2], np.uint8, offsets[-1] - offsets[0], offsets[0])
    if c in PNG_COLOUR_TYPES and cells.null_count == 0:
        head, blocks, size = _png_layout((c, h, w))
        if (np.diff(offsets) == size).all():
            files = data.reshape(n, size)
            if (files[:, :len(head)] == np.frombuffer(head, np.uint8)).all():
                raw = np.concatenate([files[:, at + 5:at + 5 + length] for at, _, length in blocks], axis=1)
                return raw.reshape(n, h, 1 + w * c)[:, :, 1:].reshape(n, h, w, c).transpose(0, 3, 1, 2).copy()
    mode = "L" if c == 1 else "RGB"
    out = np.empty((n, h, w, c), np.uint8)
    for i, cell in enumerate(cells.to_pylist()):
        with PIL.Image.open(io.BytesIO(cell)) as im:
            out[i] = np.asarray(im.convert(mode)).reshape(h, w, c)
    return out.transpose(0, 3, 1, 2).copy()


def parquet_write_options(table: pa.Table) -> dict:
    """pq.write_table's settings for a shard's table (one row group): part of the shard's bytes.
    - zstd level 1 on every column: it Huffman-codes the literals, which is where noisy pixels shrink; every
      faster codec or level leaves them raw (zstd's negative levels, lz4, snappy: much larger files), and higher
      levels cost more for the same size. zstd is most of a small-image shard's CPU: the floor of its cost.
    - Dictionary encoding and min/max statistics only where they pay: pixel strings and latent lists are all
      distinct, so a dictionary or min/max of them costs write time and helps no reader.
    - No page index, bloom filter or content-defined chunking: readers scan whole shards. The default data page
      size: smaller or larger pages compress alike and cost no less."""
    return {"compression": "zstd", "compression_level": 1, "row_group_size": len(table),
            "use_dictionary": [k for k in DICTIONARY_COLUMNS if k in table.column_names],
            "write_statistics": ["id", *(k for k in DICTIONARY_COLUMNS if k in table.column_names)],
            "write_page_index": False, "use_content_defined_chunking": False}


class ParquetShardWriter:
    """Columns: id, shard, seed, label (only for labelled rows), latent (fixed-size list float32), image
    (struct<bytes, path>: a stored-deflate PNG file, see IMAGE_TYPE), height, width, channels; zstd; model and
    code version in the metadata."""

    def __init__(self, info: ShardInfo) -> None:
        self.info = info
        self.batches: list[DecodedBatch] = []

    def write(self, batch: DecodedBatch) -> None:
        self.batches.append(batch)

    def table(self) -> pa.Table:
        rows = concat_batches(self.batches)
        n, (c, h, w), z = len(rows), rows.images.shape[1:], rows.latents.shape[1]
        image = pa.StructArray.from_arrays([png_images(rows.images),
                                            pa.nulls(n, pa.string())], fields=list(IMAGE_TYPE))
        latent = pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(rows.latents, np.float32).ravel()), z)
        columns = {
            "id": pa.array(rows.ids, pa.int64()),
            "shard": pa.array(np.full(n, self.info.index, np.int32)),
            "seed": pa.nulls(n, pa.int64()) if self.info.seed is None else pa.array(np.full(n, self.info.seed)),
            # rows without labels (an unconditional model's samples) have no label column at all
            **({} if rows.labels is None else {"label": pa.array(rows.labels, pa.int64())}),
            "latent": latent, "image": image,
            "height": pa.array(np.full(n, h, np.int32)), "width": pa.array(np.full(n, w, np.int32)),
            "channels": pa.array(np.full(n, c, np.int32))}
        return pa.table(columns).replace_schema_metadata(parquet_metadata(self.info, rows.labels is not None))

    def close(self) -> bytes:
        if not self.batches:
            raise ValueError(f"shard {self.info.index}: no rows to write")
        table = self.table()
        buf = io.BytesIO()
        pq.write_table(table, buf, **parquet_write_options(table))
        data = buf.getvalue()
        # The footer parses and counts the rows: a writer bug or a truncated buffer fails here, before anything
        # is published (reading the footer alone costs nothing next to the write).
        rows = pq.read_metadata(io.BytesIO(data)).num_rows
        if rows != len(table):
            raise ValueError(f"shard {self.info.index}: Parquet holds {rows} rows, expected {len(table)}")
        return data

    @staticmethod
    def read_rows(data: bytes) -> ShardRows:
        """The rows of a shard this writer wrote, in file order: labels None for a shard without a label column,
        images by decode_image_column."""
        table = pq.read_table(io.BytesIO(data))
        return ShardRows(table.column("id").to_numpy(),
                         table.column("label").to_numpy() if "label" in table.column_names else None,
                         decode_image_column(table))


