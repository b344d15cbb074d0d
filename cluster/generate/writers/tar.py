"""The WebDataset tar shard writers: per sample `<key>.png` (or `.jpg`), `<key>.cls` (the label, when the rows
have labels) and `<key>.json`, samples in id order, with fixed member metadata so that the same rows give the
same bytes for a given encoder (each writer's `encoder`, recorded in the job's manifest); and their reader,
`read_rows`, which gives a shard's rows back."""
from __future__ import annotations

import functools
import io
import json
import tarfile

import numpy as np

from cluster.generate.writers.rows import DecodedBatch, ShardInfo, ShardRows, sample_key
from vae_core.images import JPEG_QUALITY, decode_png, jpeg_encoder, jpeg_files, png_encoder, png_files

LATENT_FORMAT = "%.9g"          # PNG tar .json latents: 9 significant digits round-trip a float32 exactly
TAR_MTIME = 0                   # fixed member metadata: a rerun gives the same tar bytes
TAR_MODE = 0o644


def latent_texts(latents: np.ndarray) -> list[str]:
    """Each float32 row (B, Z) as the items of a JSON array: LATENT_FORMAT, 9 significant digits, which give
    back exactly the float32 (the Parquet column's value) and which json.dumps writes again for the float that
    json.loads reads (shorter than repr's 17 digits: a small latent's .json stays within one 512-byte tar block).
    Rows where %g and json differ (non-finite or integral values, |v| >= 1e8, where %g
    switches to exponents before repr does) are written by json.dumps instead."""
    row_format = ", ".join([LATENT_FORMAT] * latents.shape[1])
    return [json.dumps(row)[1:-1] if unusual else row_format % tuple(row)
            for row, unusual in zip(latents.tolist(), unusual_rows(latents).tolist())]


def unusual_rows(latents: np.ndarray) -> np.ndarray:
    """The rows (B, Z) that latent_texts writes by json.dumps: any value non-finite, integral or |v| >= 1e8."""
    values = np.asarray(latents, np.float64)
    with np.errstate(invalid="ignore"):
        return (~np.isfinite(values) | (np.abs(values) >= 1e8) | (values == np.round(values))).any(axis=1)


def json_members(ids: np.ndarray, labels: np.ndarray | None, latents: np.ndarray, head: str, tail: str) -> list[bytes]:
    """Every sample's `.json` text, `head` id, label and latent `tail`, as json.dumps(meta, sort_keys=True) writes it
    (head and tail hold the other keys, sorted). One %-format over the whole batch, split at its newlines (which no
    JSON text from json.dumps holds), spares the per-sample Python; the rare unusual_rows are written one by one."""
    n, z = latents.shape
    label = "null" if labels is None else "%d"
    sample = (head.replace("%", "%%") + f'%d, "label": {label}, "latent": [{", ".join([LATENT_FORMAT] * z)}]'
              + tail.replace("%", "%%"))
    rows = latents.tolist()
    args = ([x for i, row in zip(ids.tolist(), rows) for x in (i, *row)] if labels is None else
            [x for i, y, row in zip(ids.tolist(), labels.tolist(), rows) for x in (i, y, *row)])
    texts = ("\n".join([sample] * n) % tuple(args)).encode().split(b"\n")
    odd = np.flatnonzero(unusual_rows(latents))
    for row, text in zip(odd.tolist(), latent_texts(latents[odd])):
        y = "null" if labels is None else int(labels[row])
        texts[row] = f'{head}{int(ids[row])}, "label": {y}, "latent": [{text}]{tail}'.encode()
    return texts


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


USTAR_TEMPLATE = np.frombuffer(ustar_header("", 0), np.uint8).copy()   # name and size filled per member below
USTAR_TEMPLATE_SUM = int(USTAR_TEMPLATE.sum()) - int(USTAR_TEMPLATE[148:156].sum()) + 8 * 32 - 11 * ord("0")
KEY_DIGITS = len(sample_key(0))
PADDING = [b"\0" * k for k in range(512)]


def _digits(values: np.ndarray, base: int, width: int) -> np.ndarray:
    """(M,) non-negative ints -> (M, width) ASCII digits in `base`, zero-padded on the left."""
    powers = base ** np.arange(width - 1, -1, -1, dtype=np.int64)
    return (values[:, None] // powers % base).astype(np.uint8) + ord("0")


def ustar_headers(ids: np.ndarray, extensions: list[str], sizes: np.ndarray) -> np.ndarray:
    """ustar_header for every member of a batch at once, (N * E, 512): per sample id, one member per extension
    (`<key>.<ext>`, in that order), sizes (N, E). Each header is built from one template with NumPy: only the
    name, the size and the checksum differ between members. Ids must have KEY_DIGITS digits at most."""
    n, kinds = len(ids), len(extensions)
    headers = np.empty((n, kinds, 512), np.uint8)
    headers[:] = USTAR_TEMPLATE
    key = _digits(ids, 10, KEY_DIGITS)
    sums = USTAR_TEMPLATE_SUM + key.sum(axis=1, dtype=np.int64)
    size_digits = _digits(sizes.reshape(-1), 8, 11).reshape(n, kinds, 11)
    for k, ext in enumerate(extensions):
        suffix = np.frombuffer(f".{ext}".encode(), np.uint8)
        headers[:, k, :KEY_DIGITS] = key
        headers[:, k, KEY_DIGITS:KEY_DIGITS + len(suffix)] = suffix
        headers[:, k, 124:135] = size_digits[:, k]
        checksum = sums + int(suffix.sum()) + size_digits[:, k].sum(axis=1, dtype=np.int64)
        headers[:, k, 148:154] = _digits(checksum, 8, 6)
    return headers.reshape(n * kinds, 512)


def check_members(data: bytes, sizes: np.ndarray) -> None:
    """The read-back of a tar this module wrote, all headers at once: each member's header sits where the sizes
    before it put it, holds that size and a valid checksum, and the archive ends with two zero blocks in whole
    records. The same checks as tar_member_count's walk, without its Python loop per member."""
    blocks = np.frombuffer(data, np.uint8).reshape(-1, 512) if len(data) % 512 == 0 else None
    spans = 1 + -(-sizes // 512)                                       # a header, then the data's blocks
    at = np.cumsum(spans) - spans
    end = int(at[-1] + spans[-1]) if len(spans) else 0
    if blocks is None or end + 2 > len(blocks) or blocks[end:].any():
        raise ValueError("tar archive is truncated or does not end in zero blocks")
    headers = blocks[at]
    stored = (headers[:, 148:154].astype(np.int64) - ord("0")) @ 8 ** np.arange(5, -1, -1, dtype=np.int64)
    computed = headers.sum(axis=1, dtype=np.int64) - headers[:, 148:156].sum(axis=1, dtype=np.int64) + 8 * 32
    size = (headers[:, 124:135].astype(np.int64) - ord("0")) @ 8 ** np.arange(10, -1, -1, dtype=np.int64)
    bad = np.flatnonzero((stored != computed) | (size != sizes))
    if len(bad):
        raise ValueError(f"tar header {bad[0]} at byte {at[bad[0]] * 512} fails its checksum or size")


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


class TarShardWriter:
    """A WebDataset tar: per sample `<key>.<image_ext>` (the image), `<key>.cls` (the label as ASCII decimal,
    WebDataset's convention, so that `.to_tuple("png", "cls")` works; absent for an unconditional model's
    samples) and `<key>.json` (id, label, latent, shape, ...). A subclass says how a batch of images is encoded."""
    image_ext = ""

    def __init__(self, info: ShardInfo) -> None:
        self.info = info
        self.parts: list = []                   # every member's header, body and padding, in order
        self.sizes: list[np.ndarray] = []       # each member's size, in order: what close() checks
        self.rows = 0

    def encode(self, images) -> list[bytes]:
        raise NotImplementedError

    def write(self, batch: DecodedBatch) -> None:
        c, h, w = batch.images.shape[1:]
        # The JSON text is formatted by hand (json_members), sparing json.dumps's per-call work on every sample,
        # to exactly what json.dumps(meta, sort_keys=True) writes for what json.loads reads back from it: keys
        # sorted, ", " and ": " separators, latents as in latent_texts.
        head = f'{{"channels": {c}, "height": {h}, "id": '
        tail = (f', "model": {json.dumps(self.info.model)}, "seed": {json.dumps(self.info.seed)}, '
                f'"shard": {self.info.index}, "width": {w}}}')
        ids = batch.ids.tolist()
        labels = None if batch.labels is None else batch.labels.tolist()
        metas = json_members(batch.ids, batch.labels, batch.latents, head, tail)
        members = [self.encode(batch.images), *([] if labels is None else [[b"%d" % y for y in labels]]),
                   metas]
        extensions = [self.image_ext, *([] if batch.labels is None else ["cls"]), "json"]
        if any(len(kind) != len(ids) for kind in members):                  # zip below would drop samples
            raise ValueError(f"shard {self.info.index}: {[len(kind) for kind in members]} members for {len(ids)} rows")
        bodies = [body for sample in zip(*members) for body in sample]            # a sample's members together
        sizes = np.fromiter(map(len, bodies), np.int64, len(bodies))
        if len(ids) and max(ids) >= 10 ** KEY_DIGITS:
            headers = [ustar_header(f"{sample_key(i)}.{ext}", len(body))
                       for i, sample in zip(ids, zip(*members)) for ext, body in zip(extensions, sample)]
        else:                                                                     # every key has KEY_DIGITS digits
            flat = memoryview(ustar_headers(batch.ids, extensions, sizes.reshape(len(ids), -1)).tobytes())
            headers = [flat[k:k + 512] for k in range(0, len(flat), 512)]
        pads = [PADDING[p] for p in (-sizes % 512).tolist()]
        self.parts += [part for member in zip(headers, bodies, pads) for part in member]   # joined once, in close
        self.sizes.append(sizes)
        self.rows += len(batch)

    def close(self) -> bytes:
        if not self.rows:
            raise ValueError(f"shard {self.info.index}: no rows to write")
        length = 512 * int(sum(int((1 + -(-sizes // 512)).sum()) for sizes in self.sizes))
        self.parts.append(b"\0" * (-(length + 1024) % tarfile.RECORDSIZE + 1024))   # end blocks, whole records
        data, self.parts = b"".join(self.parts), []                     # one copy of the shard
        check_members(data, np.concatenate(self.sizes))                # the bytes as published parse as written
        return data

    @classmethod
    def read_rows(cls, data: bytes) -> ShardRows:
        """The rows of a shard this writer wrote, in id order: id and label from each sample's .json, the image
        decoded from its `<key>.<image_ext>`. A sample without its image member is an error (KeyError), not a
        row left out."""
        samples: dict[str, dict[str, bytes]] = {}          # members grouped by key, as webdataset groups them
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
        records = [(json.loads(samples[key]["json"]), samples[key][cls.image_ext]) for key in sorted(samples)]
        if not records:
            raise ValueError("tar shard holds no samples")
        labels = [meta["label"] for meta, _ in records]
        return ShardRows(np.array([meta["id"] for meta, _ in records], np.int64),
                         None if all(label is None for label in labels) else np.array(labels, np.int64),
                         np.stack([decode_png(image) for _, image in records]))


class PngTarShardWriter(TarShardWriter):
    """Lossless: `<key>.png`, encoded by vae_core.images.png_files (libdeflate)."""
    image_ext = "png"

    @staticmethod
    def encoder() -> dict:
        return png_encoder()

    def encode(self, images) -> list[bytes]:
        return png_files(images)


class JpegTarShardWriter(TarShardWriter):
    """Lossy: `<key>.jpg` at `quality` (a subclass per quality: jpeg_tar_writer), by libjpeg-turbo on the CPU of
    every worker, GPU or not: a JPEG's bytes are its encoder's, and the job id names one encoder (plan.py)."""
    image_ext = "jpg"
    quality = JPEG_QUALITY

    @classmethod
    def encoder(cls) -> dict:
        return jpeg_encoder(cls.quality)

    def encode(self, images) -> list[bytes]:
        return jpeg_files(images, self.quality)


@functools.cache
def jpeg_tar_writer(quality: int) -> type[JpegTarShardWriter]:
    """The JPEG writer class at `quality` (a writer is built from its ShardInfo alone)."""
    if quality == JpegTarShardWriter.quality:
        return JpegTarShardWriter
    return type(f"JpegQ{quality}TarShardWriter", (JpegTarShardWriter,), {"quality": quality})
