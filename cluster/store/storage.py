"""One storage root, local folder or s3://bucket/prefix, behind one small API: pyarrow.fs for local files and
S3 listings (and what Ray reads), boto3 for S3 object reads and writes (one GET, one conditional PUT). Keys
are '/'-separated and relative to the root, and every method refuses a key that could leave the root or alias
another one (see check_key). A local root is a closed world: no method reads, writes, lists or deletes through a
symbolic link inside it (the root itself may be one), so a planted link can neither leak a write nor steer a
deletion outside it.

S3's side (the endpoint, bounded retries) is in s3.py, a local root's file operations in local_files.py."""
from __future__ import annotations

import errno
import os
import random
import stat
import tempfile
from collections.abc import Callable
from functools import cached_property
from typing import NamedTuple
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs

from cluster.store.local_files import (
    create_temp,
    file_uri_path,
    fsync_dir,
    make_dirs,
    raise_link,
    read_whole,
    space_checked,
)
from cluster.store.s3 import ARROW_TIMED_OUT, REFUSED_CREDENTIALS, S3Endpoint, S3Requests
from vae_core.config import StorageConfig
from vae_core.errors import VaegenError


def check_key(key: object, *, root_ok: bool = False) -> str:
    """`key` if it is a safe key ('/'-separated segments, none empty, '.' or '..'; no leading '/', backslash or
    NUL), else a one-line VaegenError. The empty key means the root itself, allowed only where `root_ok`."""
    if not isinstance(key, str):
        raise VaegenError(f"storage key {key!r} is not a string")
    if key == "" and root_ok:
        return key
    if key == "" or "\\" in key or "\0" in key or key.startswith("/") or \
            any(segment in ("", ".", "..") for segment in key.split("/")):
        raise VaegenError(f"refusing storage key {key!r}: a key is '/'-separated names, none of them empty, "
                          "'.' or '..', with no leading '/', backslash or NUL")
    return key


class Entry(NamedTuple):
    """A file under a root (a tuple: a listing makes one per file)."""
    key: str          # relative to the root
    size: int
    mtime_ns: int     # when it was last written (what fingerprints an input)


def mtime_ns(info: pafs.FileInfo) -> int:
    """A pyarrow FileInfo's modification time in ns (0 where the store gives none)."""
    return int(info.mtime.timestamp() * 1e9) if info.mtime is not None else 0


class Storage(S3Requests):
    """A root and what vaegen does with it: read, list, publish atomically (all or nothing), delete."""

    def __init__(self, cfg: StorageConfig) -> None:
        self.cfg = cfg
        uri = cfg.root
        if not uri.strip():
            raise VaegenError("the storage root is empty: give --root a folder, file:///absolute/path or "
                              "s3://bucket/prefix")
        scheme = urlparse(uri).scheme if "://" in uri else ""
        if scheme == "s3":
            parsed = urlparse(uri)
            if not parsed.netloc:
                raise VaegenError(f"storage root {uri!r} names no bucket (s3://bucket/prefix)")
            self.bucket, self.prefix = parsed.netloc, parsed.path.strip("/")
            if self.prefix:
                check_key(self.prefix)
            self.endpoint: S3Endpoint | None = S3Endpoint.from_config(cfg)
            self.fs: pafs.FileSystem = self.endpoint.arrow_fs()
            self.base = f"{self.bucket}/{self.prefix}".rstrip("/")
        elif scheme in ("", "file"):
            path = file_uri_path(uri) if scheme else uri
            self.bucket, self.prefix, self.endpoint = None, "", None
            self.fs, self.base = pafs.LocalFileSystem(), os.path.abspath(path)
        else:
            raise VaegenError(f"unsupported storage URI scheme {scheme!r} in {uri!r} "
                              "(use a local path, file:///absolute/path, or s3://bucket/prefix)")
        self.uri = f"s3://{self.base}" if self.is_s3 else self.base
        self._jitter = random.Random()

    @property
    def is_s3(self) -> bool:
        return self.bucket is not None

    def __repr__(self) -> str:
        return f"Storage({self.uri!r})"

    def __getstate__(self) -> dict:            # boto3 clients do not pickle: rebuild on the other side
        return {"cfg": self.cfg}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["cfg"])

    @cached_property
    def s3_client(self):
        return self.endpoint.boto3_client()

    # -- paths -------------------------------------------------------------------------------------
    def path(self, key: str = "") -> str:
        """The pyarrow.fs path of a key (what Ray Data / Ray Train take with `filesystem=self.fs`); "" = the root.
        Locally, a key that passes through a symbolic link inside the root is refused here, so every method is."""
        check_key(key, root_ok=True)
        if not key:
            return self.base
        if not self.is_s3:
            self._refuse_links(key)
        return f"{self.base}/{key}"

    def _refuse_links(self, key: str) -> None:
        path = self.base
        for segment in key.split("/"):
            path = f"{path}/{segment}"
            try:
                mode = os.lstat(path).st_mode
            except (FileNotFoundError, NotADirectoryError):
                return                                 # nothing further along exists to follow
            if stat.S_ISLNK(mode):
                raise_link(path)

    def uri_of(self, key: str = "") -> str:
        return f"s3://{self.path(key)}" if self.is_s3 else self.path(key)

    def object_key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    # -- checks ------------------------------------------------------------------------------------
    def check_writable(self) -> "Storage":
        """Fail now, with one clear line, if the root cannot take writes (before any work is done)."""
        if self.is_s3:
            self._s3_call(lambda c: c.head_bucket(Bucket=self.bucket), what=f"bucket {self.bucket!r}")
            return self
        try:
            os.makedirs(self.base, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.base, prefix=".vaegen-probe-"):
                pass
        except OSError as e:
            raise VaegenError(f"storage root {self.base} is not writable: {e.strerror or e}") from None
        return self

    def check_readable(self) -> "Storage":
        """Fail now, with one clear line, if the root is not there: a local root must be an existing folder (a
        typo is an error, not an empty listing); an S3 root's bucket must exist and accept our credentials
        (a listing of a missing bucket through pyarrow is merely empty)."""
        if self.is_s3:
            self._s3_call(lambda c: c.head_bucket(Bucket=self.bucket), what=f"bucket {self.bucket!r}")
        elif not os.path.isdir(self.base):
            what = "is not a folder" if os.path.exists(self.base) else "does not exist"
            raise VaegenError(f"storage root {self.base} {what}")
        return self

    # -- reads -------------------------------------------------------------------------------------
    def exists(self, key: str) -> bool:
        return self.file_info(key).type == pafs.FileType.File

    def read_bytes(self, key: str) -> bytes:
        """The whole object. On S3 one GET, so one version of it: pyarrow's read (a HEAD for the size, then a
        ranged GET) returns the first bytes of a newer, longer version when the key is replaced in between."""
        if self.is_s3:
            check_key(key, root_ok=True)
            body = self._get(key)[1]
            if body is None:
                raise VaegenError(f"{self.uri_of(key)} does not exist")
            return body
        path = self.path(key)
        try:
            return read_whole(path)
        except FileNotFoundError:
            raise VaegenError(f"{path} does not exist") from None
        except OSError as e:
            if e.errno == errno.ELOOP and os.path.islink(path):
                raise_link(path)                       # made a link since path() looked
            raise VaegenError(f"cannot read {path}: {e.strerror or e}") from None

    def file_info(self, key: str) -> pafs.FileInfo:
        """pyarrow's FileInfo of `key` (type, size, mtime); its type is NotFound where there is nothing."""
        return self._arrow(lambda: self.fs.get_file_info(self.path(key)), key)

    def open_input(self, key: str, stream_buffer: int = 0):
        """A pyarrow file of `key` to read from: seekable (what pyarrow.parquet and tarfile take), or with
        `stream_buffer` bytes a buffered forward-only stream (one sequential read)."""
        path = self.path(key)
        if stream_buffer:
            return self._arrow(lambda: self.fs.open_input_stream(path, buffer_size=stream_buffer), key)
        return self._arrow(lambda: self.fs.open_input_file(path), key)

    def list(self, prefix: str, recursive: bool = False) -> list[Entry]:
        """Files under a key prefix (a 'folder'), sorted; S3's zero-byte 'dir/' marker keys are skipped."""
        walk = self._s3_walk if self.is_s3 else self._local_walk
        found = [f for f in walk(prefix, recursive) if f[1] >= 0]
        found.sort()
        return list(map(Entry._make, found))

    def _s3_walk(self, prefix: str, recursive: bool) -> list[tuple[str, int, int]]:
        """(key, size, mtime_ns) of each object under a prefix of an S3 root, S3's zero-byte 'dir/' marker keys
        skipped. Local roots are walked by _local_walk, which refuses links; pyarrow would follow them."""
        infos = self._arrow(lambda: self.fs.get_file_info(
            pafs.FileSelector(self.path(prefix), recursive=recursive, allow_not_found=True)), prefix)
        start = len(self.base) + 1
        return [(i.path[start:], i.size, mtime_ns(i)) for i in infos
                if i.type == pafs.FileType.File and not i.path.endswith("/")]

    def list_dirs(self, prefix: str) -> list[str]:
        if not self.is_s3:
            return sorted(key.rsplit("/", 1)[-1] for key, size, _ in self._local_walk(prefix, False) if size < 0)
        infos = self._arrow(lambda: self.fs.get_file_info(
            pafs.FileSelector(self.path(prefix), recursive=False, allow_not_found=True)), prefix)
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)

    def _local_walk(self, prefix: str, recursive: bool) -> list[tuple[str, int, int]]:
        """(key, size, mtime_ns) of each regular file and (key, -1, 0) of each folder under `prefix`, never through
        a link: a link met on the way is refused in one line. An entry that another process renames or deletes
        meanwhile (a publish's temp file) is skipped; a prefix that is missing or not a folder lists nothing."""
        found: list[tuple[str, int, int]] = []
        pending = [prefix]
        while pending:
            folder = pending.pop()
            try:
                with os.scandir(self.path(folder)) as entries:
                    listed = list(entries)
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as e:
                raise VaegenError(f"cannot read {self.uri_of(folder)}: {e.strerror or e}") from None
            above = f"{folder}/" if folder else ""
            for entry in listed:                   # a file first: a large listing is mostly files
                if entry.is_symlink():
                    raise_link(entry.path)
                try:
                    if entry.is_file(follow_symlinks=False):
                        st = entry.stat(follow_symlinks=False)
                        found.append((above + entry.name, st.st_size, st.st_mtime_ns))
                    elif entry.is_dir(follow_symlinks=False):
                        found.append((above + entry.name, -1, 0))
                        if recursive:
                            pending.append(above + entry.name)
                except FileNotFoundError:
                    continue
        return found

    # -- writes ------------------------------------------------------------------------------------
    def publish(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        """Make `key` hold exactly `data`, atomically: readers see the old state or the whole new object.

        S3: one PUT (never a multipart stream, which can leave a partial object), retried on transient errors.
        Local: a temp file created as open() would (mode 0o666 less the umask), fsynced, renamed (linked, for
        if_absent) into place, then the folder fsynced: after a crash the key holds the old or the new bytes.

        With if_absent, an existing object is left alone and False is returned (S3 answers 412). A retried
        conditional PUT can meet its own earlier try: one whose connection was reset, or that got a 5xx, may
        have landed, and the retry then gets 412. Only in that case is the object read back, and equal bytes
        count as ours (True). So True: `key` now holds exactly `data`; False: it holds other bytes, or held
        them when we looked (callers compare the sha256 they expect, so a False is never taken on trust)."""
        check_key(key)
        if self.is_s3:
            return self._put(key, data, if_absent)
        dest = self.path(key)
        if if_absent and os.path.lexists(dest):
            return False                               # spares the write and the fsync; the link decides races
        with space_checked(dest):
            return self._publish_local(dest, data, if_absent)

    @staticmethod
    def _publish_local(dest: str, data: bytes, if_absent: bool) -> bool:
        folder = os.path.dirname(dest)
        make_dirs(folder)
        fd, tmp = create_temp(folder, os.path.basename(dest))
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())                   # the bytes are on disk before a name points at them
            if if_absent:
                try:
                    os.link(tmp, dest)                 # atomic create-if-absent
                except FileExistsError:
                    return False
                os.unlink(tmp)
            else:
                os.replace(tmp, dest)
            fsync_dir(folder)                         # ...and the name is on disk before we say it is
            return True
        finally:
            if os.path.lexists(tmp):
                os.unlink(tmp)

    def copy(self, source: str, dest: str) -> None:
        """Make `dest` hold `source`'s bytes, atomically as publish does. S3: a server-side copy (CopyObject), so
        no byte passes through this process; local: read and published."""
        check_key(source), check_key(dest)
        if self.is_s3:
            self._copy(source, dest)
        else:
            self.publish(dest, self.read_bytes(source))

    def compare_and_swap(self, key: str, data: bytes, accept: Callable[[bytes | None], bool]) -> bool:
        """Write `data` only if `accept(current contents or None)` holds and nobody wrote `key` in between.

        S3: read the ETag, then PUT If-Match=<etag> (If-None-Match=* when absent), retried on 409 and other
        transient errors; then 412 → False, unless (as in publish) an earlier try of ours may have landed and
        the object holds exactly `data`: True. Put something unique to the writer in `data` (a run id) where
        two writers could write equal bytes. The one case left: a try of ours landed, its answer was lost, and
        another writer's swap (which accepted our bytes) replaced it before we looked: False, though ours was
        briefly there. Local: an flock beside the key around read-check-rename. Either way one whole-object
        write."""
        check_key(key)
        if self.is_s3:
            return self._compare_and_swap_s3(key, data, accept)
        import fcntl
        lock_path = self.path(f"{key}.lock")
        with space_checked(lock_path):
            make_dirs(os.path.dirname(lock_path))
            lock = open(lock_path, "a")
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)          # released when the file closes
            current = self.read_bytes(key) if self.exists(key) else None
            if not accept(current):
                return False
            return self.publish(key, data)


    def delete(self, key: str) -> None:
        check_key(key)
        if self.is_s3:
            self._s3_call(lambda c: c.delete_object(Bucket=self.bucket, Key=self.object_key(key)), what=key)
        else:
            try:
                os.unlink(self.path(key))
            except FileNotFoundError:
                pass


    # -- S3 calls: bounded retries; one line for the user, never the credentials ---------------------


    def _arrow(self, call, key: str):
        try:
            return call()
        except FileNotFoundError:
            raise VaegenError(f"{self.uri_of(key)} does not exist") from None
        except (OSError, pa.ArrowException) as e:
            message = str(e).splitlines()[0]
            # Credentials first: "The AWS Access Key Id you provided does not exist" is no missing bucket.
            if self.is_s3 and any(code in str(e) for code in REFUSED_CREDENTIALS):
                raise VaegenError(f"S3 credentials were refused for {self.uri_of(key)}; check AWS_ACCESS_KEY_ID/"
                                  "AWS_SECRET_ACCESS_KEY") from None
            if self.is_s3 and ("NoSuchBucket" in str(e) or "NO_SUCH_BUCKET" in str(e) or "does not exist" in message):
                raise VaegenError(f"bucket {self.bucket!r} does not exist at {self.endpoint.name}") from None
            if self.is_s3 and ARROW_TIMED_OUT in str(e):
                raise VaegenError(self.endpoint.unanswered()) from None
            raise VaegenError(f"cannot read {self.uri_of(key)}: {message}") from None


def open_storage(cfg: StorageConfig, *, for_writing: bool = False) -> Storage:
    storage = Storage(cfg)
    return storage.check_writable() if for_writing else storage


def open_storage_to_write_later(cfg: StorageConfig) -> Storage:
    """A root a verb writes to once its inputs check out (then check_writable()): an S3 root's endpoint, bucket and
    credentials are checked now, writing nothing; a local root is not created until then, but one that could never
    be (below a file, or in a folder this user cannot write) is refused now."""
    if cfg.root.startswith("s3://"):
        return open_storage(cfg, for_writing=True)
    storage = Storage(cfg)
    folder = os.path.abspath(storage.base)
    while not os.path.exists(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)                  # the nearest folder that exists: the root goes there
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
        raise VaegenError(f"storage root {storage.base} is not writable: {folder} is not a folder this user can "
                          "write to")
    return storage
