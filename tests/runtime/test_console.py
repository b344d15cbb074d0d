"""The console: a verb that runs Ray shows only vaegen's own lines and its progress bars; what Ray prints goes to a
log file the run names; --verbose shows everything.

"vaegen's own", the rule these tests hold the terminal to: after ANSI codes are removed and the output is cut at
every \\r and \\n, each piece is empty, a tqdm bar (`desc:  42%|███   | 27/64 [...]`), or one of VAEGEN_LINES —
the line shapes vaegen prints itself (pipeline steps, the epoch line, the summary, the evaluation table, and
`vaegen: ...` notes and errors)."""
from __future__ import annotations

import gzip
import os
import pty
import re
import select
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TOP = Path(__file__).resolve().parents[2]
VAEGEN = [sys.executable, "-m", "jobs.cli"]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
VAEGEN_LINES = [re.compile(p) for p in (
    r"\[\d/\d\] .+",                                   # pipeline steps
    r"epoch \d+/\d+: loss .+",                         # Ray Train rank 0's epoch line
    r"epoch \d+/\d+: \d+% of its steps, .+ img/s, .+", # and its progress within an epoch
    r"model   \S+ → .+", r"        test loss .+",      # the pipeline's summary
    r"(samples|recons ) [\d,]+ rows in [\d,]+ shards? → .+",
    r"  \S+@v\d+  .+",                                 # the evaluation table
    r"(samples|reconstructions) job \S+ from .+",      # `vaegen generate`'s summary
    r"vaegen: .+",                                     # vaegen's notes and errors
)]
PROGRESS_BAR = re.compile(r".*: +\d+%\|.*\|.*")
SECRET = "vaegen-console-test-secret-value"


def foreign_pieces(text: str) -> list[str]:
    """The pieces of terminal output that are neither vaegen's own lines nor progress bars."""
    pieces = (p.rstrip() for p in re.split(r"[\r\n]", ANSI.sub("", text)))
    return [p for p in pieces if p and not PROGRESS_BAR.fullmatch(p)
            and not any(rule.fullmatch(p) for rule in VAEGEN_LINES)]


def run_on_a_terminal(argv: list[str], env: dict, timeout: float = 600) -> tuple[int, str]:
    """Run vaegen with a pseudo-terminal as its stdout and stderr (as a user's shell would); exit code, output."""
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(VAEGEN + argv, cwd=TOP, env=env, stdin=subprocess.DEVNULL, stdout=terminal,
                            stderr=terminal, close_fds=True)
    os.close(terminal)
    chunks = []
    try:
        while True:
            ready, _, _ = select.select([controller], [], [], timeout)
            if not ready:
                proc.kill()
                raise AssertionError(f"vaegen {' '.join(argv)} printed nothing for {timeout} s")
            try:
                chunk = os.read(controller, 65536)
            except OSError:                      # EIO: every writer of the terminal has closed it
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(controller)
        code = proc.wait(timeout=60)
    return code, b"".join(chunks).decode("utf-8", "replace")


def small_fashion_source(folder: Path, train: int = 600, test: int = 100) -> Path:
    """A Fashion-MNIST IDX folder holding the first real images of each split (what `--source` reads)."""
    from vae_core.data import FASHION_MNIST_DIR, FASHION_MNIST_FILES, read_idx
    folder.mkdir()
    for split, n in (("train", train), ("test", test)):
        for name in FASHION_MNIST_FILES[split]:
            a = read_idx(Path(FASHION_MNIST_DIR) / name)[:n]
            header = struct.pack(">4B", 0, 0, 8, a.ndim) + struct.pack(f">{a.ndim}I", *a.shape)
            (folder / name).write_bytes(gzip.compress(header + a.tobytes()))
    return folder


def cli_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "VAEGEN_"))}
    env.update(AWS_SECRET_ACCESS_KEY=SECRET, PYTHONPATH=str(TOP))
    return env


def named_log(output: str) -> Path:
    found = re.findall(r"vaegen: Ray's messages are in (\S+) ", ANSI.sub("", output))
    assert len(found) == 1, output[-3000:]
    return Path(found[0])


@pytest.mark.slow
def test_the_pipeline_shows_only_vaegens_lines_and_keeps_rays_in_the_log_it_names(tmp_path):
    source = small_fashion_source(tmp_path / "source")
    root = tmp_path / "root"
    code, output = run_on_a_terminal(["pipeline", "--root", str(root), "--source", str(source), "--epochs", "2",
                                      "--count", "64", "--shard-size", "64", "--workers", "1"], cli_env())
    assert code == 0, output[-3000:]
    assert foreign_pieces(output) == [], output[-3000:]
    assert re.search(r"^epoch 2/2: loss ", ANSI.sub("", output), re.M), output[-3000:]     # epochs stay visible
    assert re.search(r"%\|", output), "no progress bar reached the terminal"
    shown = ANSI.sub("", output)                           # Ray's start-up is announced before it begins
    assert "vaegen: starting a local Ray" in shown and shown.index("vaegen: starting a local Ray") < shown.index("[2/")
    log = named_log(output)
    assert log.parent == root / "logs" and log.name.startswith("pipeline-"), log
    assert log.stat().st_mode & 0o077 == 0, oct(log.stat().st_mode)                         # the owner's only
    text = log.read_text(errors="replace")
    assert re.search(r"\bray\b|raylet|core_worker", text, re.I), text[:2000]               # Ray's lines are here
    assert SECRET not in text and SECRET not in output

    # --verbose (here on another verb that starts Ray) shows Ray's lines, and writes no log.
    before = set((root / "logs").iterdir())
    code, output = run_on_a_terminal(["generate", "--verbose", "--root", str(root), "--model", "fashion-mnist-mlp",
                                      "--count", "32", "--shard-size", "32"], cli_env())
    assert code == 0, output[-3000:]
    assert foreign_pieces(output), output[-3000:]
    assert "Ray's messages are in" not in output
    assert set((root / "logs").iterdir()) == before


PROBE = textwrap.dedent("""
    import logging, os, subprocess, sys, threading, warnings
    from tqdm.auto import tqdm
    from cluster.runtime.console import capture, console_session, log_line, terminal_stderr

    with console_session("probe", sys.argv[1]) as session:
        print("vaegen: before capture", flush=True)
        path = capture()
        kept = sys.stdout          # as Ray's colorama keeps it, for an at-exit reset
        print("vaegen: a line of ours")
        os.write(1, b"native line on fd 1\\n")
        os.write(2, b"native line on fd 2\\n")
        logging.getLogger("ray").warning("a logged line")
        warnings.warn("a warning")
        def worker_lines():       # what Ray's log thread re-prints of its workers' stdout
            print("(raylet) worker chatter")
            print("epoch 1/2: loss 1.00 val 1.00 kl 0.10 5 img/s")
        thread = threading.Thread(target=worker_lines)
        thread.start(); thread.join()
        for _ in tqdm(range(3), desc="bar"):
            pass
        subprocess.run(["sh", "-c", "echo child stdout; echo child stderr >&2"], check=True)
        log_line("vaegen: error: the error line")
        print("vaegen: error: the error line", file=terminal_stderr(), flush=True)
    print("vaegen: after release", flush=True)
    kept.isatty()
    print("vaegen: through a kept reference", file=kept, flush=True)
    os.write(2, b"native after release\\n")
    print(path)
""")


def test_capture_sends_every_kind_of_output_but_vaegens_to_the_log(tmp_path):
    """The mechanism without Ray: fd writes, logging, warnings, another thread's prints, a child process, tqdm."""
    proc = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path)], cwd=TOP, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(TOP)})
    assert proc.returncode == 0, proc.stderr
    *shown, path = proc.stdout.splitlines()
    assert shown == ["vaegen: before capture", "vaegen: a line of ours",
                     "epoch 1/2: loss 1.00 val 1.00 kl 0.10 5 img/s", "vaegen: after release",
                     "vaegen: through a kept reference"]
    assert foreign_pieces(proc.stderr) == ["native after release"], proc.stderr
    assert "bar: 100%|" in proc.stderr and "vaegen: error: the error line" in proc.stderr
    log = Path(path)
    assert log.parent == tmp_path / "logs"
    text = log.read_text()
    for line in ("native line on fd 1", "native line on fd 2", "a logged line", "a warning",
                 "(raylet) worker chatter", "child stdout", "child stderr", "vaegen: error: the error line"):
        assert line in text, (line, text)
    assert "vaegen: a line of ours" not in text and "epoch 1/2" not in text and "bar:" not in text


def test_verbose_is_taken_anywhere_before_a_bare_double_dash():
    from jobs.cli import without_verbose
    assert without_verbose(["pipeline", "--verbose", "--epochs", "1"]) == (["pipeline", "--epochs", "1"], True)
    assert without_verbose(["submit", "--", "train", "--verbose"])[1] is False
    assert without_verbose(["submit", "--", "train", "--verbose"])[0] == ["submit", "--", "train", "--verbose"]


def test_a_local_root_keeps_its_log_beside_its_data_and_an_s3_root_in_the_cache(tmp_path, monkeypatch):
    from cluster.runtime.console import log_folder
    assert log_folder(str(tmp_path)) == tmp_path / "logs"
    assert log_folder(f"file://{tmp_path}") == tmp_path / "logs"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert log_folder("s3://bucket/prefix") == tmp_path / "cache" / "vaegen" / "logs"
    assert log_folder(None) == tmp_path / "cache" / "vaegen" / "logs"              # `submit`: no root


def test_a_logs_folder_linked_out_of_the_root_gets_no_log(tmp_path):
    """The log is the root's too: a `logs` link planted in the root is not followed, and Ray's output stays on
    the terminal instead."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "logs").symlink_to(outside)
    proc = subprocess.run([sys.executable, "-c", PROBE, str(root)], cwd=TOP, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(TOP)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "None" and list(outside.iterdir()) == []
    assert "native line on fd 1" in proc.stdout + proc.stderr          # shown, not written behind the link
