"""What every ingest source shares: the plan's records (re-exported by sources.py, the interface, with
vae_core.config.IngestOptions, the flags' config), files named by URI (a local path or s3://bucket/key) read
through Storage, listings with the sizes and times that fingerprint an input, and one image's decode with
--skip-bad's rule."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import numpy as np
import pyarrow.fs as pafs
from PIL import Image

from cluster.store.storage import Storage, mtime_ns
from vae_core.config import IngestOptions, StorageConfig
from vae_core.data import BOMB_ERRORS, bomb_error, is_wide, shape_chw, shape_image
from vae_core.errors import VaegenError


FINGERPRINT_BATCH = 4096                   # items or files per JSON string hashed


class SourceItem(NamedTuple):
    """One unit of read work, small and picklable; in a task's row, the JSON list of its fields. A tuple, not a
    dataclass: a plan makes one per image file, and a task rebuilds each from its row, where a frozen dataclass's
    __init__ costs several times more."""
    split: str
    uri: str                               # one file: a local path or s3://bucket/key
    start: int = 0                         # a row/member range inside the file where it holds many images
    stop: int = -1                         # -1: to the end
    label: int = -1                        # the label of every image in the item, where its path names it
    raw: bool = False                      # its pixels are stored as they are (IDX, a Parquet `pixels` column):
                                           # nothing to decode, so a row costs a copy, not a decode
    label_key: str = ""                    # a tar's: the label members' extensions (';'-separated) every sample
                                           # must have one of; '' unlabelled


@dataclass(frozen=True)
class SourcePlan:
    kind: str                              # "fashion-mnist" | "image-folder" | "parquet" | "hf" | "webdataset"
    uri: str                               # what the user named (recorded in the manifest as given)
    items: tuple[SourceItem, ...]          # deterministic order: split, file, range
    label_names: tuple[str, ...] | None    # None: the dataset is unlabelled
    fingerprint: str                       # every item, each file's size and time, the options: same input, same value


class SourceImage(NamedTuple):
    """One image as a source reads it (one per image read: a tuple, as SourceItem)."""
    name: str                              # what names the image to a user (a path, "file.parquet row 12", a member)
    pixels: np.ndarray | None              # uint8 (C, H, W); None when the image is bad and options.skip_bad is set
    label: int                             # >= 0, or -1 when the dataset is unlabelled
    error: str = ""                        # why it is bad (one line), when pixels is None
    note: str = ""                         # what reading changed about it, for the user (WIDE_NOTE), counted


WIDE_NOTE = "16-bit image(s) scaled to 8 bits (round(v / 257))"


class FileRef(NamedTuple):
    """An input file as listed (a tuple, as SourceItem)."""
    uri: str
    size: int
    mtime_ns: int


# -- files by URI ---------------------------------------------------------------------------------------
def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def absolute(uri: str) -> str:
    """A local path made absolute (so items name the file wherever they are read); an s3:// URI as it is."""
    if is_s3(uri):
        return uri.rstrip("/")
    return os.path.abspath(uri.removeprefix("file://"))


@lru_cache(maxsize=64)
def storage_at(root: str, cfg: StorageConfig) -> Storage:
    """One Storage per folder, kept: on S3 each holds its clients, which are too dear to build per image."""
    return Storage(dataclasses.replace(cfg, root=root))


def split_uri(uri: str) -> tuple[str, str]:
    """A file's URI → (its folder, its name)."""
    uri = absolute(uri)
    folder, _, name = uri.rpartition("/")
    if is_s3(uri) and folder == "s3:/":               # s3://bucket alone names no object
        raise VaegenError(f"{uri} names a bucket, not a file")
    return folder or "/", name


def read_file(uri: str, cfg: StorageConfig) -> bytes:
    folder, name = split_uri(uri)
    return storage_at(folder, cfg).read_bytes(name)


def open_file(uri: str, cfg: StorageConfig):
    """A seekable pyarrow file for `uri` (what pyarrow.parquet and tarfile read from)."""
    folder, name = split_uri(uri)
    return storage_at(folder, cfg).open_input(name)


def open_stream(uri: str, cfg: StorageConfig, buffer_size: int = 1 << 20):
    """A buffered, forward-only pyarrow stream of `uri` (one sequential read of a tar)."""
    folder, name = split_uri(uri)
    return storage_at(folder, cfg).open_input(name, stream_buffer=buffer_size)


def file_info(uri: str, cfg: StorageConfig) -> FileRef | None:
    """The file at `uri`, or None when there is none (a folder, or nothing)."""
    uri = absolute(uri)
    if not is_s3(uri):
        try:
            st = os.stat(uri)
        except (FileNotFoundError, NotADirectoryError):
            return None
        return FileRef(uri, st.st_size, st.st_mtime_ns) if os.path.isfile(uri) else None
    if uri.count("/") < 3:
        return None                                  # s3://bucket: a folder
    folder, name = split_uri(uri)
    info = storage_at(folder, cfg).file_info(name)
    return FileRef(uri, info.size, mtime_ns(info)) if info.type == pafs.FileType.File else None


def list_files(uri: str, cfg: StorageConfig) -> list[FileRef]:
    """Every file under the folder `uri` (recursively, sorted by URI), skipping names that start with '.' or '_'
    (hidden files, and what pyarrow and `datasets` skip too). A local folder that does not exist is one line."""
    uri = absolute(uri)
    storage = storage_at(uri, cfg)
    if not is_s3(uri):
        if not os.path.isdir(uri):
            raise VaegenError(f"{uri} does not exist" if not os.path.exists(uri) else f"{uri} is not a folder")
    else:
        storage.check_readable()
    # Sorted by key, so by URI; a local listing refuses any link it meets: the paths below have none.
    above = uri + "/"
    return [FileRef(above + key, size, mtime) for key, size, mtime in storage.list("", recursive=True)
            if _visible(key)]


def _visible(key: str) -> bool:
    slashed = "/" + key
    return "/." not in slashed and "/_" not in slashed


def fingerprint(kind: str, uri: str, items, files: list[FileRef], label_names, options: IngestOptions) -> str:
    """The identity of an input as planned: same files (size and time), items, names and options, same value."""
    digest = hashlib.sha256(json.dumps([kind, uri, dataclasses.asdict(options), label_names], default=str).encode())
    for section, rows in (("SourceItem", items), ("FileRef", files)):   # tuples: JSON lists, each field in order
        digest.update(json.dumps([section, len(rows)]).encode())
        for at in range(0, len(rows), FINGERPRINT_BATCH):   # a batch at a time: a million files never make one string
            digest.update(json.dumps(rows[at:at + FINGERPRINT_BATCH]).encode())
    return digest.hexdigest()


# -- one image ---------------------------------------------------------------------------------------
def bad_image(name: str, why: str, label: int, options: IngestOptions) -> SourceImage:
    """A bad image: with --skip-bad a SourceImage that says why, else the one-line error."""
    why = str(why).splitlines()[0] if str(why) else type(why).__name__
    if options.skip_bad:
        return SourceImage(name, None, label, why)
    raise VaegenError(f"cannot read image {name}: {why}")


def decode_image(data: bytes, name: str, label: int, options: IngestOptions) -> SourceImage:
    """Encoded image bytes (any format Pillow reads) → a SourceImage shaped by the options. Its caller holds
    vae_core.data.bombs_refused() (a task, once for all its images), so an image that claims more pixels than
    Pillow's limit is refused before it is decoded; else Pillow warns of it first."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            if Image.MAX_IMAGE_PIXELS and im.width * im.height > Image.MAX_IMAGE_PIXELS:
                raise bomb_error(f"{im.width}x{im.height} pixels, more than Pillow's limit of "
                                 f"{Image.MAX_IMAGE_PIXELS:,}")
            note = WIDE_NOTE if is_wide(im) else ""
            return SourceImage(name, shape_image(im, options.size, options.mode), label, note=note)
    except BOMB_ERRORS as e:
        return bad_image(name, bomb_error(e), label, options)
    except (OSError, ValueError, SyntaxError, VaegenError) as e:
        return bad_image(name, e, label, options)       # PIL's UnidentifiedImageError is an OSError


def shaped_array(pixels: np.ndarray, name: str, label: int, options: IngestOptions) -> SourceImage:
    """Decoded uint8 (C, H, W) pixels → a SourceImage shaped by the options."""
    try:
        return SourceImage(name, shape_chw(pixels, options.size, options.mode), label)
    except (ValueError, VaegenError) as e:
        return bad_image(name, e, label, options)
