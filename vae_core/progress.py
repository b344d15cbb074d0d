"""Progress for every step a user waits on: one tqdm bar (rate and ETA) on a terminal, and plain lines, one every
PLAIN_EVERY_S, when the output is a file or a pipe (a log, `| tee`, a Ray Job's log), as Ray's and tqdm's own log
output does: never the `\\r`-joined lines a terminal bar leaves in a file."""
from __future__ import annotations

from tqdm.auto import tqdm

PLAIN_EVERY_S = 5.0         # a line this often at most, when not on a terminal


class _Lines:
    """A bar's file when it is not a terminal: each display is its own line; tqdm's bare '\\r' and '\\n' writes
    (cursor moves meant for a terminal) are dropped."""

    def __init__(self, fp) -> None:
        self.fp = fp

    def write(self, text: str) -> None:
        text = text.replace("\r", "")
        if text.strip("\n"):
            self.fp.write(text)

    def flush(self) -> None:
        getattr(self.fp, "flush", lambda: None)()

    def __getattr__(self, name: str):
        return getattr(self.fp, name)


class Progress(tqdm):
    """tqdm, with plain periodic lines in place of the bar when its file is not a terminal."""
    _plain: bool | None = None

    def _is_plain(self) -> bool:
        if self._plain is None:                      # decided at the first display, once tqdm chose its file
            try:
                tty = bool(self.fp.isatty())
            except (AttributeError, ValueError, OSError):
                tty = False
            self._plain = not tty
            if self._plain:
                self.mininterval = max(self.mininterval, PLAIN_EVERY_S)
                self.fp = _Lines(self.fp)
            elif (self.ncols or 0) <= 0 or (self.nrows or 0) <= 0:
                # A terminal that reports no size (a fresh pty, some CI consoles): tqdm would show nothing at all.
                self.ncols = self.ncols if (self.ncols or 0) > 0 else None
                self.nrows = self.nrows if (self.nrows or 0) > 0 else None
                self.dynamic_ncols = False
        return self._plain

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if not self._is_plain():
            return super().display(msg, pos)
        if msg != "":                                 # '' clears a terminal line: nothing to clear in a file
            self.fp.write((msg or self.__str__()).rstrip() + "\n")
            self.fp.flush()
        return True


def progress_bar(*, total: float | None, desc: str, unit: str = "it", enabled: bool = True, **kwargs) -> Progress:
    """A Progress bar (a disabled one when not `enabled`: its update() does nothing)."""
    return Progress(total=total, desc=desc, unit=unit, disable=not enabled, **kwargs)

