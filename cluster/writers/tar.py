"""The WebDataset tar shard writer: per sample `<key>.png` and `<key>.json`, members in id order, with fixed
metadata so that the same rows give the same bytes."""
from __future__ import annotations

import json
import tarfile

import numpy as np

from vae_core.images import png_bytes

from .rows import DecodedBatch, ShardInfo, sample_key

PNG_COMPRESS_LEVEL = 6          # part of the output format: changing it changes every PNG's bytes
LATENT_FORMAT = "%.9g"          # PNG tar .json latents: 9 significant digits round-trip a float32 exactly
TAR_MTIME = 0                   # fixed member metadata: a rerun gives the same tar bytes
TAR_MODE = 0o644


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
