"""cluster.runtime.ray_session: whether the embedded Ray starts its dashboard, Ray starting on an install without the
dashboard's packages (ray without the [default] extra), the system settings the embedded Ray starts with, and
stopping it: no worker process of it left behind."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from cluster.runtime.ray_session import DASHBOARD_ENV, dashboard_import_error, include_dashboard

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Packages that only ray[default] brings and that Ray checks before it starts the dashboard
# (ray.dashboard.optional_deps). Not aiohttp: Ray's runtime-env agent needs it, so Ray cannot run without it.
DASHBOARD_PACKAGES = ("aiohttp_cors", "opencensus")


def missing_packages() -> ImportError | None:
    """The check as it goes on an install without the dashboard's packages: a real failed import."""
    return dashboard_import_error("vaegen_test_no_such_dashboard_package")


def test_the_dashboard_starts_when_asked_and_its_packages_import(monkeypatch):
    assert dashboard_import_error() is None          # this environment has ray[default]
    monkeypatch.setenv(DASHBOARD_ENV, "1")
    assert include_dashboard() is True
    assert include_dashboard(True) is True


def test_the_embedded_ray_starts_without_its_dashboard_unless_asked(monkeypatch):
    monkeypatch.delenv(DASHBOARD_ENV, raising=False)
    assert include_dashboard() is False
    monkeypatch.setenv(DASHBOARD_ENV, "0")
    assert include_dashboard() is False
    monkeypatch.setenv(DASHBOARD_ENV, "1")
    assert include_dashboard(False) is False          # the argument wins over the environment


def test_asked_for_without_its_packages_ray_starts_without_the_dashboard_and_says_so(monkeypatch, capsys):
    assert isinstance(missing_packages(), ImportError)
    monkeypatch.setenv(DASHBOARD_ENV, "1")
    assert include_dashboard(import_error=missing_packages) is False
    assert include_dashboard(True, import_error=missing_packages) is False
    assert "ray[default]" in capsys.readouterr().out


# A Python that cannot import the dashboard's packages, in this process and in every process Ray starts from it
# (they inherit PYTHONPATH): what Ray sees on a machine where they were never installed.
WITHOUT_DASHBOARD_PACKAGES = f"""
import sys

class WithoutDashboardPackages:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {DASHBOARD_PACKAGES!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, WithoutDashboardPackages())
"""

RUN_ON_EMBEDDED_RAY = """
import ray
from cluster.runtime.ray_session import dashboard_import_error, ray_runtime

assert dashboard_import_error() is not None, "the dashboard's packages are still importable"
with ray_runtime(num_cpus=1):
    print("task answered", ray.get(ray.remote(lambda: 41 + 1).remote()))
"""


@pytest.mark.ray
def test_vaegen_starts_ray_on_an_install_without_the_dashboard_packages(tmp_path, starts_ray):
    """Asked for the dashboard (as the default was before) where its packages are missing, Ray starts without it
    instead of raising "Cannot include dashboard with missing packages"."""
    (tmp_path / "sitecustomize.py").write_text(textwrap.dedent(WITHOUT_DASHBOARD_PACKAGES))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), REPO]), DASHBOARD_ENV: "1"}
    run = subprocess.run([sys.executable, "-c", RUN_ON_EMBEDDED_RAY], env=env, capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "task answered 42" in run.stdout
    assert "ray[default]" in run.stdout


EMBEDDED_RAY_SETTINGS = """
import json
import ray._private.state
from cluster.runtime.ray_session import ray_runtime

with ray_runtime(num_cpus=1):
    print(json.dumps(ray._private.state.state.get_system_config()))
"""


@pytest.mark.ray
def test_the_embedded_ray_prestarts_nothing_and_retries_its_sockets_often_within_the_same_budget(starts_ray):
    """Read back from the running Ray's GCS, so the settings reached Ray rather than only our dict. Its socket
    retries (the raylet connecting to the object store it has just started, workers to the raylet) come every
    100 ms, not every second, and still give up after 10 s."""
    run = subprocess.run([sys.executable, "-c", EMBEDDED_RAY_SETTINGS], capture_output=True, text=True, timeout=300,
                         cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
    assert run.returncode == 0, run.stderr[-3000:]
    settings = json.loads(run.stdout.strip().splitlines()[-1])
    assert settings["prestart_worker_first_driver"] is False
    retry_ms = settings["raylet_client_connect_timeout_milliseconds"]
    attempts = settings["raylet_client_num_connect_attempts"]
    assert retry_ms == 100 and retry_ms * attempts == 10_000        # Ray's default: 10 tries a second apart


WORKER_THAT_OUTLIVES_ITS_ACTOR = """
import os, threading, time
import ray
from cluster.runtime.ray_session import ray_runtime


@ray.remote(num_cpus=0)
class HangsOnExit:
    def __init__(self):
        # A thread that never ends: Python's exit waits for it, so the process outlives its actor, as a worker
        # deadlocked in Ray's exit handlers does.
        threading.Thread(target=threading.Event().wait, daemon=False).start()

    def pid(self):
        return os.getpid()


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


with ray_runtime(num_cpus=1):
    actor = HangsOnExit.remote()
    pid = ray.get(actor.pid.remote())
    del actor                                           # Ray ends the actor; its process cannot exit
    time.sleep(2)
    print("alive after its actor ended:", alive(pid))
deadline = time.time() + 10            # a moment for the kill to land; left alone, such a process never ends
while alive(pid) and time.time() < deadline:
    time.sleep(0.1)
print("alive after Ray stopped:", alive(pid))
"""


@pytest.mark.ray
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="workers are found through /proc")
def test_a_worker_process_that_outlives_the_ray_vaegen_started_is_killed_with_it(starts_ray):
    """Ray 2.60's workers can deadlock in their own exit handlers and never end; stopping the Ray this process
    started also kills every worker process of it still there."""
    run = subprocess.run([sys.executable, "-c", WORKER_THAT_OUTLIVES_ITS_ACTOR], capture_output=True, text=True,
                         timeout=300, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "alive after its actor ended: True" in run.stdout         # the hang happened
    assert "alive after Ray stopped: False" in run.stdout
