"""Joining a running Ray cluster, in bounded time and in view: the address being joined and where it came from
(--address, $RAY_ADDRESS, or for `auto` the address `ray start` recorded in Ray's session file) are named on the
terminal at once; nothing answering within --connect-timeout ends in one line naming the address, its source and
the fix; Ray's warnings during the wait reach the terminal, not only the verb's log.

Ray itself retries a dead address for many minutes (20 tries of a GCS client that each wait half a minute),
silently once its output goes to the log. So the address's port is tried first, with plain TCP connects, until
the deadline; only an address where something listens is handed to ray.init, which then runs on a thread that is
given up on at the deadline."""
from __future__ import annotations

import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from cluster.runtime.console import terminal_stderr, unseen_log_lines
from cluster.runtime.ray_private import recorded_address_file
from vae_core.errors import VaegenError

CONNECT_TIMEOUT_S = 30.0       # --connect-timeout's default: a live head answers in about a second
MIN_INIT_S = 10.0              # ray.init's own time once the port answered, however late in the bound that was
NOTE_EVERY_S = 5.0             # how often a wait says it is still waiting
# Ray's warnings and errors in its log: the C++ core's "[time W pid tid] …" lines and Python logging's.
RAY_WARNING = re.compile(r"^\[[^\]]* [WEF] \d+ \d+\]|\b(WARNING|ERROR)\b")
# What ray.init warns of because it ran on a thread, and join_ray then does itself.
HANDLED_HERE = re.compile(r"SIGTERM handler is not set")


@dataclass(frozen=True)
class RayTarget:
    """The address ray.init will join and where it came from, in words for the terminal."""
    address: str
    source: str
    fix: str


def ray_target(address: str | None) -> RayTarget | None:
    """Where a verb joins Ray, by Ray's own rules ($RAY_ADDRESS wins over the argument; `auto` is the address in
    Ray's session file), or None: no address anywhere, so a local Ray starts."""
    env = os.environ.get("RAY_ADDRESS") or None
    if env and address and env != address:
        chosen, source = env, f"RAY_ADDRESS, which Ray uses over --address {address}"
        fix = "unset RAY_ADDRESS or make it the cluster's address"
    elif address:
        chosen, source, fix = address, "--address", "give the running cluster's --address"
    elif env:
        chosen, source, fix = env, "RAY_ADDRESS", "set RAY_ADDRESS to the running cluster's address"
    else:
        return None
    if chosen != "auto":
        return RayTarget(chosen, source, f"{fix}, or drop it to start a local Ray")
    recorded_in = recorded_address_file()
    try:
        with open(recorded_in) as f:
            recorded = f.read().strip()
    except OSError:
        recorded = ""
    if not recorded:
        return RayTarget("auto", f"{source} auto, with no address recorded in {recorded_in}",
                         "start a cluster with `ray start --head`, or drop auto to start a local Ray")
    return RayTarget(recorded, f"{source} auto: the address `ray start` recorded in {recorded_in}",
                     f"a cluster stopped without `ray stop` leaves it there: `ray stop` (or deleting {recorded_in}) "
                     "clears it; `ray start --head` starts one; or drop auto to start a local Ray")


def endpoint(address: str) -> tuple[str, int] | None:
    """(host, port) of a GCS (host:port) or Ray Client (ray://host:port) address; None for anything else."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    return (host.strip("[]"), int(port)) if host and port.isdigit() else None


def join_ray(target: RayTarget, timeout: float, init: Callable[[str], object]) -> None:
    """init(address) once something listens at target's address, all within `timeout` seconds (ray.init gets at
    least MIN_INIT_S once the port answered); else one VaegenError line naming the address, its source and the fix."""
    print(f"vaegen: joining Ray at {target.address} (from {target.source}); waiting up to {timeout:g} s "
          "(--connect-timeout)", flush=True)
    deadline = time.monotonic() + timeout
    where = endpoint(target.address)
    if where is not None:
        wait_for_port(target, where, deadline, timeout)
    bounded_init(target, init, max(deadline, time.monotonic() + MIN_INIT_S), timeout)
    # ray.init, off the main thread, could not set its SIGTERM handler: the same one, so that a terminated driver
    # still unwinds (leases released, Ray disconnected) as it would had Ray set it.
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(signum))


def wait_for_port(target: RayTarget, where: tuple[str, int], deadline: float, timeout: float) -> None:
    """Return once a TCP connect to `where` succeeds; VaegenError when none did by `deadline`."""
    noted = time.monotonic()
    while True:
        try:
            socket.create_connection(where, timeout=max(0.1, min(5.0, deadline - time.monotonic()))).close()
            return
        except OSError as e:
            reason = e.strerror or str(e) or type(e).__name__
        now = time.monotonic()
        if now >= deadline:
            raise VaegenError(f"cannot join Ray at {target.address} (from {target.source}): {reason.lower()} for "
                              f"{timeout:g} s. Fix: {target.fix}; --connect-timeout waits longer")
        if now - noted >= NOTE_EVERY_S:
            noted = now
            print(f"vaegen: nothing answers at {target.address} yet ({reason.lower()}); trying for "
                  f"{deadline - now:.0f} s more", flush=True)
        time.sleep(min(0.5, max(0.0, deadline - now)))


def bounded_init(target: RayTarget, init: Callable[[str], object], deadline: float, timeout: float) -> None:
    """init(address) on a thread, showing Ray's warnings as it logs them; given up on at `deadline` (the thread is
    a daemon: Ray's retries end with the process)."""
    failed: list[BaseException] = []

    def run() -> None:
        try:
            init(target.address)
        except BaseException as e:                 # noqa: BLE001 - handed to the waiting thread, raised there
            failed.append(e)
    thread = threading.Thread(target=run, name="vaegen-ray-join", daemon=True)
    seen = unseen_log_lines(None)[1]
    thread.start()
    while thread.is_alive() and time.monotonic() < deadline:
        thread.join(timeout=0.5)
        lines, seen = unseen_log_lines(seen)
        for line in lines:
            if RAY_WARNING.search(line) and not HANDLED_HERE.search(line):
                print(f"ray: {line}", file=terminal_stderr(), flush=True)
    if thread.is_alive():
        raise VaegenError(f"cannot join Ray at {target.address} (from {target.source}): something listens there "
                          f"but did not answer as Ray within {timeout:g} s. Fix: {target.fix}; --connect-timeout "
                          "waits longer")
    if failed:
        first = (str(failed[0]).strip().splitlines() or [type(failed[0]).__name__])[0]
        raise VaegenError(f"cannot join Ray at {target.address} (from {target.source}): {first}. Fix: {target.fix}")
