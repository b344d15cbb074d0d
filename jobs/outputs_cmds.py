"""`vaegen ls`, `vaegen show` and `vaegen config show`: look at what a storage root holds."""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

from cluster.runtime.console import terminal_stderr

from .args import add_storage_args, storage_config
from .out_file import check_out, is_stdout, write_out


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ls", help="datasets, model versions (champion marked) and jobs with their state",
                       description="List what a storage root holds: datasets, model versions (* = champion) and "
                                   "generation jobs (finished, partial n/m shards, or failed).")
    p.add_argument("location", nargs="?", default=None, help="storage root (default: --root)")
    add_storage_args(p)
    p.set_defaults(run=run_ls)

    p = sub.add_parser("show", help="write a static _gallery.html for a job or a model version",
                       description="Write one self-contained gallery page beside a job's shards (or a model "
                                   "version's files): contact sheets per class, reconstructions beside their "
                                   "originals, the job's settings; the model's metrics, training settings, loss "
                                   "curves, sample grids after each epoch and its evaluation (NLL, -ELBO, "
                                   "classifier-FID, TSTR). No server, no external assets.")
    p.add_argument("target", help="a job or model-version URI (<root>/outputs/<job-id>, <root>/models/<name>/v0001), "
                                  "or a job id / model name[@version] under --root")
    p.add_argument("--per-class", type=int, default=None,
                   help="images per class on a contact sheet (default: 16, or 64 for a job without labels)")
    p.add_argument("--open", action="store_true",
                   help="open the gallery in the web browser when there is a display (Linux: $DISPLAY or "
                        "$WAYLAND_DISPLAY; $BROWSER picks the browser); print only its path either way")
    p.add_argument("--out", default=None, help="write the gallery to this local file instead (e.g. for an s3:// job); '-' = "
                        "stdout, a FIFO or device is written through, a symbolic link writes its target")
    add_storage_args(p)
    p.set_defaults(run=run_show)

    p = sub.add_parser("config", help="config files: `vaegen config show VERB [flags]` prints the effective settings",
                       description="Every verb takes --config FILE.toml (keys are the verb's long flags without "
                                   "'--'; a [VERB] table applies to that verb only); flags on the command line "
                                   "override the file, and a --preset fills only what neither sets.")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    a = actions.add_parser("show", help="print the settings VERB would run with, as a TOML config file",
                           description="Print the settings `vaegen VERB ...` would run with (file, then flags, "
                                       "then a --preset under both), as TOML that --config reads back to the same "
                                       "job. Example: vaegen config show train --preset fmnist-best > f.toml")
    a.add_argument("command", nargs=argparse.REMAINDER, help="the verb and its flags (and --config)")
    p.set_defaults(run=run_config_show)


def shown(text: str) -> str:
    """`text` safe for a terminal: each control or other unprintable character (an escape sequence's ESC, a
    newline, a bidi override in a folder's name) written as Python escapes it, \\x1b, \\n, \\u202e."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def _table(rows: list[list[str]]) -> str:
    rows = [[shown(cell) for cell in row] for row in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _when(t: object) -> str:
    """A record's time stamp as UTC, or '-' when it has none (or one that is not a time: records may be hand-edited)."""
    try:
        return time.strftime("%Y-%m-%d %H:%M", time.gmtime(t)) if isinstance(t, (int, float)) and t else "-"
    except (OverflowError, OSError, ValueError):
        return "-"


def run_ls(args: argparse.Namespace) -> int:
    from cluster.show.inventory import list_datasets, list_jobs, list_models, require_root
    from cluster.store.storage import open_storage
    from vae_core.config import StorageConfig

    from .flags import build
    storage = require_root(open_storage(build(StorageConfig, args, root=args.location or args.root)))
    print(f"{shown(storage.uri)}\n")
    datasets = list_datasets(storage)
    print("datasets" + ("" if datasets else ": none"))
    if datasets:
        print(_table([["NAME", "SHAPE", "CLASSES", "SPLITS"]] + [
            [d.name, "corrupt", "-", d.problem] if d.problem else
            [d.name, "x".join(map(str, d.image_shape)), str(d.classes),
             ", ".join(f"{s} {n:,}" for s, n in d.splits.items())] for d in datasets]))
    models = list_models(storage)
    print("\nmodels (* = champion)" + ("" if models else ": none"))
    if models:
        print(_table([["", "MODEL", "DATASET", "SHAPE", "TEST LOSS", "NLL", "PROBLEM"]] + [
            ["*" if m.champion else "", f"{m.name}@{m.version}", m.dataset or "-",
             "x".join(map(str, m.image_shape)) if m.image_shape else "-",
             "-" if m.test_loss is None else f"{m.test_loss:.2f}", "-" if m.nll is None else f"{m.nll:.2f}",
             f"corrupt: {m.problem}" if m.problem else ""]
            for m in models]))
    jobs = list_jobs(storage)
    print("\njobs" + ("" if jobs else ": none"))
    if jobs:
        print(_table([["JOB", "STATE", "SHARDS", "ROWS", "KIND", "FORMAT", "MODEL", "WHEN (UTC)", "ERROR"]] + [
            [j.job_id, j.state, j.progress, f"{j.rows_done:,}" if j.state == "finished" else "-", j.kind, j.format,
             j.model, _when(j.when), j.error[:80]] for j in jobs]))
    return 0


def run_show(args: argparse.Namespace) -> int:
    from cluster.show.gallery import write_gallery
    from cluster.store.layout import SUCCESS
    from vae_core.errors import VaegenError
    if args.per_class is not None and args.per_class <= 0:
        raise VaegenError(f"--per-class={args.per_class} must be > 0")
    if args.out:
        result = gallery_to_out(args)
    else:
        result = write_gallery(args.target, storage_config(args), per_class=args.per_class)
    if is_stdout(args.out or ""):
        print(f"gallery of {result.title}: {result.summary}, written to stdout", file=terminal_stderr())
        return 0
    if args.open:
        print(result.location)                         # a script reads the path; a person also gets the page
        open_in_browser(result.location)
        return 0
    if result.partial:
        print(f"vaegen: {result.title} is PARTIAL (no {SUCCESS}): {result.summary}; showing what is there")
    print(f"gallery of {result.title}: {result.summary}\n  {result.location}")
    return 0


def gallery_to_out(args: argparse.Namespace):
    """write_gallery into a folder of its own, then the page to --out as jobs/out_file.py writes (a FIFO, a
    device, '-' or a link's target included)."""
    import tempfile

    from cluster.show.gallery import write_gallery
    from vae_core.errors import VaegenError
    out = args.out
    if "://" in out and not out.startswith("file://"):
        raise VaegenError(f"--out={out!r} must be a local file path (leave --out off to write beside the job)")
    path = out if is_stdout(out) else os.path.expanduser(out.removeprefix("file://"))
    check_out(path)                                    # before any work
    with tempfile.TemporaryDirectory(prefix="vaegen-gallery-") as folder:
        page = os.path.join(folder, "gallery.html")
        result = write_gallery(args.target, storage_config(args), per_class=args.per_class, out=page)
        with open(page, "rb") as f:
            write_out(path, f.read())
    result.location = path if is_stdout(path) else os.path.abspath(path)
    return result


def has_display(environ=os.environ, platform: str = sys.platform) -> bool:
    """Whether a browser window can be shown: always on macOS and Windows; on Linux and other Unixes only with
    an X or Wayland display (over SSH or in a container there is none, and a text browser would take the
    terminal)."""
    return platform in ("darwin", "win32") or bool(environ.get("DISPLAY") or environ.get("WAYLAND_DISPLAY"))


def open_in_browser(location: str) -> bool:
    """Open a local gallery in the user's browser (webbrowser: $BROWSER, else the desktop's); False, and a note
    on stderr, when there is no display or the page is not a local file."""
    import webbrowser
    if "://" in location and not location.startswith("file://"):
        print(f"vaegen: {location} is not a local file: write one with --out FILE to open it", file=terminal_stderr())
        return False
    if not has_display():
        return False
    url = location if location.startswith("file://") else pathlib.Path(location).resolve().as_uri()
    opened = webbrowser.open(url)
    if not opened:
        print("vaegen: no web browser could be started: open the path above", file=terminal_stderr())
    return opened


def run_config_show(args: argparse.Namespace) -> int:
    from .config_file import effective_settings, to_toml
    verb, settings = effective_settings(args.build_parser(), args.command)
    print(f"# effective settings of `vaegen {verb}` (a --config file for it)")
    print(to_toml(settings), end="")
    return 0
