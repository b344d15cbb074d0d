"""A local root's file operations: no link followed, files created as open() would, fsynced before and after
they are named."""
from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import unquote, urlparse

from vae_core.errors import VaegenError


# What a write raises on a full disk, and what the user is told besides "no space left".
FULL_DISK = {errno.ENOSPC: "", errno.EDQUOT: " (the disk quota is used up)"}


@contextmanager
def space_checked(path: str) -> Iterator[None]:
    """Run a write of `path`; a full disk (ENOSPC, EDQUOT) becomes one line. Each write is all or nothing (a
    temp file named only once whole) and shards are created only if absent, so what was written before stays
    valid and a rerun after freeing space resumes from it."""
    try:
        yield
    except OSError as e:
        if e.errno not in FULL_DISK:
            raise
        raise VaegenError(f"no space left on the disk holding {path}{FULL_DISK[e.errno]}: free space and rerun "
                          "to resume (what is already written is kept)") from None


def raise_link(path: str) -> None:
    raise VaegenError(f"refusing to follow the symbolic link {path}: vaegen reads, writes and deletes only inside "
                      "its root (the root itself may be a link); remove the link or point --root at its target")


def read_whole(path: str) -> bytes:
    """A file's bytes, its last segment not followed if it is a link (ELOOP): an fstat, then reads to its end, with
    no Python file object or pyarrow stream around them (an ingest reads each of its images this way)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        chunks, want = [], os.fstat(fd).st_size + 1              # + 1: a file that grew is read to its new end
        while chunk := os.read(fd, want):
            chunks.append(chunk)
            want = 1 << 20
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)
    finally:
        os.close(fd)


def file_uri_path(uri: str) -> str:
    """The local path of a file: URI as RFC 8089 has it: file:///absolute/path or file://localhost/absolute/path.
    A host (file://server/path) or a relative path (file://folder) is one line, never a guess."""
    parsed = urlparse(uri)
    if parsed.netloc not in ("", "localhost"):
        raise VaegenError(f"storage root {uri!r} names the host {parsed.netloc!r}: a file URI is "
                          "file:///absolute/path (RFC 8089); for a relative folder give the path alone")
    if not parsed.path.startswith("/"):
        raise VaegenError(f"storage root {uri!r} is not an absolute file URI: use file:///absolute/path")
    return unquote(parsed.path)


def create_temp(folder: str, name: str) -> tuple[int, str]:
    """A new temp file beside `folder/name`, created as open() creates files: mode 0o666 less the umask (and any
    default ACL). mkstemp's 0600 would follow the rename and hide published files from every other user."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = os.path.join(folder, f".{name}.tmp-{secrets.token_hex(6)}")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary file name", folder)


def fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):    # a filesystem without folder sync
            raise
    finally:
        os.close(fd)


def make_dirs(folder: str) -> None:
    """os.makedirs, then fsync the parent of each folder it created: a new folder's name is data too."""
    if os.path.isdir(folder):
        return
    created, f = [], folder
    while not os.path.isdir(f) and os.path.dirname(f) != f:
        created.append(f)
        f = os.path.dirname(f)
    os.makedirs(folder, exist_ok=True)
    for made in reversed(created):
        fsync_dir(os.path.dirname(made))
