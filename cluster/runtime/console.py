"""What the terminal shows while a verb runs Ray: vaegen's own lines and progress bars; everything Ray prints goes
to a log file instead (`--verbose` shows it all, as Ray would).

Ray talks through many doors: Python logging (its handlers write to whatever `sys.stderr` is at emit time),
warnings, the C++ core worker writing straight to file descriptor 2, child processes that inherit fds 1 and 2,
and the lines its workers print, which the driver re-prints on `sys.stdout`/`sys.stderr` (log_to_driver). No
Ray switch closes all of them, so the split is made at the file-descriptor level: when Ray is about to start,
fds 1 and 2 are pointed at the log file (whatever writes there, from any thread or language, lands in the log)
and the terminal is kept on duplicated fds, which only vaegen writes to:
- `sys.stdout` becomes a stream to the terminal: vaegen's print()s. Writes from other threads are Ray re-printing
  its workers' stdout; of those only vaegen's own worker lines (WORKER_LINE, the epoch line) reach the terminal,
  the rest go to the log;
- `sys.stderr` stays on fd 2, the log: Ray's logging, warnings and thread tracebacks;
- tqdm bars default to the terminal's stderr (tqdm otherwise takes `sys.stderr` when a bar is made):
  patch_tqdm_default_file(), vaegen's only patch of a third-party class, made by capture() and undone by release();
- the CLI writes its error line to the terminal (terminal_stderr()).

The log file is created 0o600 (readable by its owner only): it holds what Ray prints, which never includes the
environment, but it may name hosts and paths."""
from __future__ import annotations

import io
import os
import re
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO

# Lines vaegen's own Ray workers print that belong on the terminal: the epoch line of Ray Train's rank 0.
# Ray may prefix a re-printed line with its origin, "(RayTrainWorker pid=…, ip=…) ".
WORKER_LINE = re.compile(r"^(?:\([^)]*\) )?epoch \d+/\d+: ")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
LOG_FOLDER = "logs"                       # under a local root: <root>/logs/<verb>-<UTC time>.log


def log_folder(root: str | None) -> Path:
    """Where a verb's log goes: under the root when the root is a local folder, else (an S3 root, or a verb with
    no root such as `submit`) in the user's cache folder, so that nothing but vaegen's data is ever written to a
    bucket."""
    if root is None or root.startswith("s3://"):
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return Path(cache) / "vaegen" / LOG_FOLDER
    from cluster.store.local_files import file_uri_path
    return Path(file_uri_path(root) if root.startswith("file://") else root) / LOG_FOLDER


@dataclass
class Console:
    """One verb's console: where its log goes and, once Ray is about to start, the captured state."""
    verb: str
    folder: Path
    verbose: bool = False
    log_path: Path | None = None
    terminal_out: TextIO | None = None
    terminal_err: TextIO | None = None
    _saved: tuple = field(default=(), repr=False)

    @property
    def capturing(self) -> bool:
        return self.terminal_out is not None

    def has_messages(self) -> bool:
        """Whether Ray wrote anything to this verb's log (a verb that only asked the job server may have not)."""
        if self.log_path is None:
            return False
        try:
            for stream in (sys.stdout, sys.stderr):
                stream.flush()                   # fails on a full disk: the size says what did get written
        except (OSError, ValueError):
            pass
        try:
            return os.path.getsize(self.log_path) > 0
        except OSError:
            return False


_current: Console | None = None


@contextmanager
def console_session(verb: str, root: str | None, verbose: bool = False) -> Iterator[Console]:
    """The console of one verb run. Nothing changes until capture() (Ray is about to start); on exit the fds,
    sys.stdout and tqdm are as they were."""
    global _current
    console = Console(verb=verb, folder=log_folder(root), verbose=verbose)
    previous, _current = _current, console
    try:
        yield console
    finally:
        _current = previous
        release(console)
        if console.log_path is not None and not console.has_messages():
            console.log_path.unlink(missing_ok=True)         # an empty log is not worth a file


def capture() -> Path | None:
    """Send everything but vaegen's own output to this verb's log file, from now until the session ends; the
    log's path, or None when there is no session (a library call, a test), it is verbose, or already done."""
    console = _current
    if console is None or console.verbose:
        return None
    if console.capturing:
        return console.log_path
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    path = console.folder / f"{console.verb}-{stamp}.log"
    try:
        console.folder.mkdir(parents=True, exist_ok=True)
        if console.folder.is_symlink():
            return None          # a link inside the root is never followed: no log, as for a read-only folder
        log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    except OSError:
        return None              # no log where it belongs (a read-only folder): Ray's output stays on the terminal
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    kept_out, kept_err = os.dup(1), os.dup(2)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    console.terminal_out = open(kept_out, "w", buffering=1, encoding=encoding, errors="replace")
    console.terminal_err = open(kept_err, "w", buffering=1, encoding=encoding, errors="replace")
    console.log_path = path
    router = TerminalStdout(console.terminal_out, log=sys.stdout)
    console._saved = (sys.stdout, router, patch_tqdm_default_file(console.terminal_err))
    sys.stdout = router
    return path


def release(console: Console) -> None:
    """Undo capture(): fds 1 and 2 back on the terminal, sys.stdout and tqdm as they were."""
    if not console.capturing:
        return
    stdout, router, restore_tqdm = console._saved
    for stream in (sys.stdout, sys.stderr, stdout):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    sys.stdout = stdout
    # Whoever kept a reference to the router (Ray's colorama does, for its at-exit reset) writes where
    # sys.stdout now does, rather than to a closed file.
    router.terminal = router.log = stdout
    restore_tqdm()
    os.dup2(console.terminal_out.fileno(), 1)
    os.dup2(console.terminal_err.fileno(), 2)
    console.terminal_out.close()
    console.terminal_err.close()
    console.terminal_out = console.terminal_err = None


def terminal_stderr() -> TextIO:
    """Where vaegen's error line goes: the terminal, whether or not Ray's output is being captured."""
    console = _current
    return console.terminal_err if console is not None and console.capturing else sys.stderr


def log_line(text: str) -> None:
    """Write one line to the log too (the error the terminal showed, beside Ray's lines that explain it)."""
    console = _current
    if console is not None and console.capturing:
        try:
            sys.stderr.write(text.rstrip("\n") + "\n")
            sys.stderr.flush()
        except OSError:
            pass                 # the log's disk is full (often the very error being told): the terminal has it


def unseen_log_lines(offset: int | None) -> tuple[list[str], int]:
    """The whole lines the log gained past `offset` (a byte offset this returned before), and the offset after
    them; None: no lines, and the log's end now. Nothing to read (no log, not captured): ([], 0)."""
    console = _current
    if console is None or not console.capturing or console.log_path is None:
        return [], 0
    try:
        sys.stderr.flush()
        with open(console.log_path, "rb") as f:
            if offset is None:
                return [], f.seek(0, os.SEEK_END)
            f.seek(offset)
            data = f.read()
    except (OSError, ValueError):
        return [], offset or 0
    whole = data[:data.rfind(b"\n") + 1]
    return whole.decode("utf-8", "replace").splitlines(), (offset or 0) + len(whole)


class TerminalStdout(io.TextIOBase):
    """sys.stdout while Ray's output is captured: the main thread's writes (vaegen's prints) go to the terminal;
    another thread's are Ray re-printing its workers' output, and go line by line to the terminal when they are
    vaegen's own worker lines (WORKER_LINE), else to the log."""

    def __init__(self, terminal: TextIO, log: TextIO):
        super().__init__()
        self.terminal, self.log = terminal, log
        self._partial: dict[int, str] = {}
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        if threading.current_thread() is threading.main_thread():
            return self.terminal.write(text)
        with self._lock:
            buffered = self._partial.pop(threading.get_ident(), "") + text
            *lines, rest = buffered.split("\n")
            if rest:
                self._partial[threading.get_ident()] = rest
            for line in lines:
                own = WORKER_LINE.match(ANSI.sub("", line))
                (self.terminal if own else self.log).write(ANSI.sub("", line) + "\n" if own else line + "\n")
        return len(text)

    def flush(self) -> None:
        self.terminal.flush()
        self.log.flush()

    def isatty(self) -> bool:
        return self.terminal.isatty()

    def fileno(self) -> int:
        return self.terminal.fileno()

    @property
    def encoding(self) -> str:
        return self.terminal.encoding

    def writable(self) -> bool:
        return True


def patch_tqdm_default_file(terminal: TextIO) -> Callable[[], None]:
    """Patch tqdm.std.tqdm.__init__ so that bars made without a `file` go to `terminal` (they take sys.stderr, now
    the log, when made); returns the undo. A patch because tqdm has no setting for its default file; only capture()
    makes it, and vaegen's bars are the only ones made in this process while the console is captured."""
    try:
        import tqdm.std
    except ImportError:                      # pragma: no cover - tqdm is a dependency
        return lambda: None
    original = tqdm.std.tqdm.__init__

    def __init__(self, *args, **kwargs):
        if len(args) < 5 and kwargs.get("file") is None:       # `file` is tqdm's fifth parameter
            kwargs["file"] = terminal
        original(self, *args, **kwargs)

    tqdm.std.tqdm.__init__ = __init__

    def undo() -> None:
        tqdm.std.tqdm.__init__ = original
    return undo
