"""The tier guard (conftest.py) fails a test that starts Ray or moto without its mark. It finds this session's
servers by their command line and the session token in their environment, and it must not take a raylet's
fork on its way to exec a Ray worker, which shows the raylet's command line and environment, for a new Ray."""
import os
import signal
import subprocess
import sys
import uuid

from conftest import _service_processes

FORK_AND_WAIT = """
import os, sys, time
child = os.fork()
if child == 0:
    time.sleep(60)              # a fork that has not exec'd yet: the parent's command line and environment
    os._exit(0)
print(child, flush=True)
time.sleep(60)
"""


def test_a_server_is_found_by_its_token_and_its_unexeced_fork_is_not():
    token = uuid.uuid4().hex          # not the session's: the guard watching this test does not see these processes
    with subprocess.Popen(["raylet", "-c", FORK_AND_WAIT], executable=sys.executable, stdout=subprocess.PIPE,
                          text=True, env={**os.environ, "VAEGEN_TEST_SESSION": token}) as server:
        child = None
        try:
            child = int(server.stdout.readline())
            with open(f"/proc/{child}/cmdline", "rb") as f:
                assert f.read().split(b"\0")[0] == b"raylet"            # the fork looks like the server
            assert _service_processes(f"VAEGEN_TEST_SESSION={token}") == {server.pid: "ray"}
            assert server.pid not in _service_processes()               # another session's server is not ours
        finally:
            server.kill()
            if child is not None:
                os.kill(child, signal.SIGKILL)
