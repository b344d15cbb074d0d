"""Where `--out FILE` writes (`vaegen sample`, `vaegen show`). A regular file, or a new one, is replaced in one
rename, so a failure leaves an existing file as it was. What is not an ordinary file is written through, as a
shell redirect would: `-` is stdout, a FIFO or a character device (/dev/null, a terminal) is streamed to, and a
symbolic link writes its target (renamed into place beside the target, so the link itself stays). Anything else
(a folder, a socket, a block device) is refused before any work, in one line naming the flag. Where a verb allows it
(`vaegen sample`), an s3:// --out is one PUT through the storage layer (s3_out)."""
from __future__ import annotations

import contextlib
import os
import stat
import sys

from cluster.store.local_files import create_temp, fsync_dir
from vae_core.errors import VaegenError

STDOUT = "-"


def is_stdout(path: str) -> bool:
    return path == STDOUT


def s3_out(path: str, storage_cfg):
    """(Storage, key) for an s3://bucket/.../name --out, its bucket checked for writes now (before any work); None
    for any other --out. Written with storage.publish(key, data): one PUT, replacing what is there."""
    if not path.startswith("s3://"):
        return None
    import dataclasses

    from cluster.store.storage import open_storage
    folder, _, name = path.rpartition("/")
    if not name or folder in ("s3:", "s3:/"):
        raise VaegenError(f"--out={path} must name a file in a bucket, e.g. s3://bucket/grid.png")
    storage = open_storage(dataclasses.replace(storage_cfg, root=folder), for_writing=True)
    return storage, name


def check_out(path: str, flag: str = "--out") -> None:
    """Refuse, before any work, an --out that cannot be written; a one-line VaegenError naming the flag."""
    if is_stdout(path):
        return
    target = os.path.realpath(path) if os.path.islink(path) else path
    shown = f"{flag}={path}" + (f" (a link to {target})" if target != path else "")
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        folder = os.path.dirname(os.path.abspath(target))
        if not os.path.isdir(folder):
            raise VaegenError(f"{shown}: folder {folder} does not exist") from None
        if not os.access(folder, os.W_OK):
            raise VaegenError(f"{shown}: folder {folder} is not writable") from None
        return
    except OSError as e:
        raise VaegenError(f"{shown}: {e.strerror or e}") from None
    if stat.S_ISDIR(mode):
        raise VaegenError(f"{shown} is a directory: give a file path, e.g. {os.path.join(path, 'out.png')}")
    if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)):
        raise VaegenError(f"{shown} is neither a regular file nor a FIFO, character device or '-' (stdout)")
    if stat.S_ISREG(mode) and not os.access(os.path.dirname(os.path.abspath(target)), os.W_OK):
        raise VaegenError(f"{shown}: folder {os.path.dirname(os.path.abspath(target))} is not writable")


def write_out(path: str, data: bytes, flag: str = "--out") -> None:
    """Write `data` where --out says (see the module's docstring); an OSError becomes one line naming the flag."""
    try:
        if is_stdout(path):
            sys.stdout.flush()
            with open(sys.stdout.fileno(), "wb", closefd=False) as f:     # bytes, past any text wrapper
                f.write(data)
            return
        target = os.path.realpath(path) if os.path.islink(path) else path
        with contextlib.suppress(FileNotFoundError):
            mode = os.stat(target).st_mode
            if stat.S_ISFIFO(mode) or stat.S_ISCHR(mode):
                with open(target, "wb") as f:      # a reader takes the bytes as they come: no temp file, no rename
                    f.write(data)
                return
        replace_file(target, data)
    except OSError as e:
        raise VaegenError(f"cannot write {flag}={path}: {e.strerror or e}") from None


def replace_file(path: str, data: bytes) -> None:
    """Write `data` to `path` as one rename: a temp file beside it, fsynced, then os.replace. A failure leaves
    an existing file as it was and creates no empty or partial one. A new file gets the mode open() would
    give (0666 less the umask); a replaced file keeps its mode."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mode = None
    fd, tmp = create_temp(folder, os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):            # the rename itself survives a power loss once its folder is synced
        fsync_dir(folder)
