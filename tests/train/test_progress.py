"""Every wait shows progress with a rate: training moves per step (not once per epoch), the prior fit per EM
iteration, the reference classifier per batch; on a terminal as bars, elsewhere (a pipe, a log) as plain lines
with no carriage returns."""
from __future__ import annotations

import io
import re
import subprocess

import pytest

from runtime.test_console import TOP, VAEGEN, cli_env, run_on_a_terminal, small_fashion_source
from vae_core.progress import PLAIN_EVERY_S, Progress

RATE = r"[\d.]+[kM]?(?:img|EM step|it)/s"


class Pipe(io.StringIO):
    def isatty(self) -> bool:
        return False


def test_a_bar_into_a_pipe_is_plain_lines_with_a_rate():
    out = Pipe()
    with Progress(total=4, desc="fit the prior", unit="EM step", file=out, mininterval=0) as bar:
        for _ in range(4):
            bar.update()
    text = out.getvalue()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert lines[0].startswith("fit the prior:   0%") and lines[-1].startswith("fit the prior: 100%")
    assert re.search(RATE, lines[-1]), lines[-1]
    assert bar.mininterval >= PLAIN_EVERY_S                 # periodic lines, not one per update


@pytest.mark.slow           # ingests, trains one epoch with a fitted prior, then evaluates, twice over
def test_train_and_evaluate_show_progress_on_a_terminal_and_plain_lines_in_a_pipe(tmp_path):
    source = small_fashion_source(tmp_path / "source", train=2000, test=200)
    root = str(tmp_path / "root")
    env = cli_env()
    subprocess.run(VAEGEN + ["ingest", "fashion-mnist", str(source), "--root", root, "--no-progress"], cwd=TOP,
                   env=env, check=True, capture_output=True, timeout=300)
    train = ["train", "--root", root, "--epochs", "1", "--hidden-dim", "32", "--latent-dim", "4",
             "--prior-components", "3", "--batch-size", "32"]
    evaluate = ["evaluate", "--root", root, "--k", "4", "--limit", "100", "--samples", "200",
                "--classifier-epochs", "1"]

    code, shown = run_on_a_terminal(train + ["--name", "tty"], env)
    assert code == 0, shown[-3000:]
    steps = re.findall(r"train tty: +(\d+)%", shown)
    assert len(set(steps)) > 2 and "100" in steps, shown[-3000:]    # moved within the one epoch, not 0 then 100
    assert re.search(rf"train tty: 100%.*{RATE}", shown) and re.search(rf"fit the prior \(3 Gaussians\): 100%.*"
                                                                         rf"{RATE}", shown), shown[-3000:]
    code, shown = run_on_a_terminal(evaluate + ["--model", "tty"], env)
    assert code == 0, shown[-3000:]
    assert re.search(rf"reference classifier for fashion-mnist \(1 epoch\): 100%.*{RATE}", shown), shown[-3000:]

    piped = subprocess.run(VAEGEN + train + ["--name", "piped"], cwd=TOP, env=env, capture_output=True, text=True,
                           timeout=600, check=False)
    assert piped.returncode == 0, piped.stderr[-3000:]
    assert "\r" not in piped.stdout + piped.stderr
    assert re.search(rf"^train piped: 100%.*{RATE}.*$", piped.stderr, re.M), piped.stderr[-3000:]
    assert re.search(r"^fit the prior \(3 Gaussians\): 100%", piped.stderr, re.M), piped.stderr[-3000:]


def test_ray_rank_zero_reports_steps_within_an_epoch_as_lines_the_console_shows(monkeypatch, capsys):
    """A Ray Train worker's output reaches the driver line by line: rank 0 writes a line with its progress, rate
    and time left, shaped so that the console routes it to the terminal (WORKER_LINE)."""
    from cluster.runtime.console import WORKER_LINE
    from cluster.train import on_ray
    monkeypatch.setattr(on_ray, "STEP_LINE_EVERY_S", 0.0)
    steps = on_ray.StepLines(epochs=3, share=100, world=2)
    for _ in range(4):
        steps(1, 25)                                        # the last step of the epoch: the epoch line follows
    lines = capsys.readouterr().out.splitlines()
    assert [re.match(r"epoch 2/3: (\d+)% of its steps, [\d,]+ img/s, \d+ s left$", line)[1] for line in lines] == \
        ["25", "50", "75"]
    assert all(WORKER_LINE.match(f"(RayTrainWorker pid=1) {line}") for line in lines)
