"""Joining a Ray cluster: the address and its source are named at once, a dead one ends within --connect-timeout
in one line naming the address, where it came from and the fix, and a live one is joined as before."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cluster.runtime import ray_join
from cluster.runtime.ray_join import endpoint, join_ray, ray_target
from vae_core.errors import VaegenError

TOP = Path(__file__).resolve().parents[2]


def closed_port() -> int:
    """A port on 127.0.0.1 that refuses connections: bound, then let go."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "VAEGEN_"))}
    return {**env, "PYTHONPATH": str(TOP), **extra}


@pytest.mark.slow                       # three interpreters that import Ray
@pytest.mark.parametrize("source", ["--address", "RAY_ADDRESS", "auto"])
def test_a_recorded_address_that_refuses_ends_within_the_bound_in_one_line(tmp_path, source):
    """`vaegen train --address auto` on a machine where an earlier `ray start` left its address behind: the
    address is named at once, and after --connect-timeout one line names it, where it came from and the fix."""
    address = f"127.0.0.1:{closed_port()}"
    env, flag = clean_env(), []
    if source == "--address":
        flag = ["--address", address]
    elif source == "RAY_ADDRESS":
        env["RAY_ADDRESS"] = address
    else:                                                     # Ray's session file, where `ray start` records it
        (tmp_path / "tmp" / "ray").mkdir(parents=True)
        (tmp_path / "tmp" / "ray" / "ray_current_cluster").write_text(address + "\n")
        env["RAY_TMPDIR"] = str(tmp_path / "tmp")
        flag = ["--address", "auto"]
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "train", "--root", str(tmp_path / "root"),
                           "--workers", "auto", *flag, "--connect-timeout", "1"],
                          capture_output=True, text=True, env=env, timeout=120, check=False)
    named = {"--address": "(from --address)", "RAY_ADDRESS": "(from RAY_ADDRESS)",
             "auto": f"(from --address auto: the address `ray start` recorded in {tmp_path}/tmp/ray/"}[source]
    assert proc.stdout.startswith(f"vaegen: joining Ray at {address} {named}"), proc.stdout
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"vaegen: error: cannot join Ray at {address} {named}"), line
    assert "connection refused for 1 s" in line and "Fix: " in line and "--connect-timeout" in line
    if source == "auto":
        assert "`ray stop`" in line
    assert not (tmp_path / "root" / "models").exists() and not (tmp_path / "root" / "train-runs").exists()


def test_the_address_and_where_it_came_from(monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    assert ray_target(None) is None                                     # nothing anywhere: a local Ray starts
    assert ray_target("10.0.0.5:6379").source == "--address"
    nothing = ray_target("auto")
    assert nothing.address == "auto" and "no address recorded" in nothing.source   # Ray looks for a running one
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text("10.0.0.7:6379\n")
    recorded = ray_target("auto")
    assert recorded.address == "10.0.0.7:6379" and str(tmp_path / "ray" / "ray_current_cluster") in recorded.source
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    assert (ray_target(None).address, ray_target(None).source) == ("ray://head:10001", "RAY_ADDRESS")
    both = ray_target("10.0.0.5:6379")                                  # Ray's order: the variable wins
    assert both.address == "ray://head:10001" and "over --address 10.0.0.5:6379" in both.source
    assert endpoint("ray://head:10001") == ("head", 10001) and endpoint("10.0.0.5:6379") == ("10.0.0.5", 6379)
    assert endpoint("auto") is None


def test_a_refused_port_never_reaches_ray_init(capsys):
    target = ray_target(f"127.0.0.1:{closed_port()}")
    called = []
    with pytest.raises(VaegenError, match="connection refused for 0.5 s"):
        join_ray(target, 0.5, called.append)
    assert called == [] and capsys.readouterr().out.startswith(f"vaegen: joining Ray at {target.address}")


def test_a_listener_that_never_answers_as_ray_is_given_up_on(monkeypatch, capsys):
    """Something listens, but ray.init never returns: the wait still ends, in one line."""
    monkeypatch.setattr(ray_join, "MIN_INIT_S", 0.5)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        target = ray_target(f"127.0.0.1:{server.getsockname()[1]}")
        hung = threading.Event()
        with pytest.raises(VaegenError, match="did not answer as Ray within 0.2 s"):
            join_ray(target, 0.2, lambda _address: hung.wait(30))
        hung.set()
    capsys.readouterr()


def test_a_port_that_opens_during_the_wait_is_joined(capsys):
    """A head still starting: refused at first, then listening; ray.init gets the address once it answers."""
    port = closed_port()
    joined = []

    def start_late() -> None:
        time.sleep(0.7)
        server.bind(("127.0.0.1", port))
        server.listen()
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        threading.Thread(target=start_late, daemon=True).start()
        join_ray(ray_target(f"127.0.0.1:{port}"), 10, joined.append)
    assert joined == [f"127.0.0.1:{port}"]
    capsys.readouterr()


def test_a_live_cluster_is_joined_through_the_bounded_wait(ray_cluster, capsys):
    import ray

    from cluster.runtime.ray_session import ray_runtime
    cluster = ray_cluster()
    with ray_runtime(cluster.address, connect_timeout=30):
        assert ray.is_initialized() and len([n for n in ray.nodes() if n["Alive"]]) == 1
    assert capsys.readouterr().out.startswith(f"vaegen: joining Ray at {cluster.address} (from --address)")
    assert not ray.is_initialized()


def test_workers_auto_on_a_cluster_joins_it_once_for_the_sizing_and_the_training(ray_cluster, capsys):
    """`--workers auto --address A`: the cluster is joined once; its nodes size the job, and the training that
    follows runs on that same connection (it does not leave and join again)."""
    import ray

    from cluster.runtime.placement import joined_for_sizing, sized_training
    from cluster.runtime.ray_session import ray_runtime
    from vae_core.config import RayTrainConfig, TrainConfig, TrainJobConfig
    cluster = ray_cluster()
    job = TrainJobConfig(ray=RayTrainConfig(workers="auto"), train=TrainConfig(batch_size=128))
    with joined_for_sizing(job, cluster.address, connect_timeout=30):
        sized = sized_training(job, cluster.address, connect_timeout=30)
        with ray_runtime(cluster.address, connect_timeout=30):          # what the training enters
            assert ray.is_initialized()
    assert isinstance(sized.ray.workers, int) and sized.ray.workers >= 1
    assert capsys.readouterr().out.count("vaegen: joining Ray at") == 1
    assert not ray.is_initialized()
