"""Helpers for afmesh's Python tests: free ports, spawned ranks that are
killed on every path, and an in-process attention+FFN pair."""

import os
import signal
import socket
import subprocess
import sys
import threading

import pytest

import afmesh

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Procs:
    """Spawned Python processes; every one is killed at teardown."""

    def __init__(self):
        self.procs = []

    def spawn(self, script, env, *args):
        full = dict(os.environ)
        full.update({k: str(v) for k, v in env.items()})
        p = subprocess.Popen(
            [sys.executable, os.path.join(HERE, script), *map(str, args)],
            env=full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.procs.append(p)
        return p

    def finish(self, p, timeout):
        """Waits up to `timeout` s for `p` (killing it on a timeout); returns
        (exit code, output)."""
        # Output is small (no pipe fills up), and tests may already have
        # read lines through p.stdout's buffer, which communicate() would
        # skip: wait, then read the rest through the same buffer.
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            raise AssertionError(
                f"process did not finish within {timeout}s:\n{p.stdout.read()}") from None
        out = p.stdout.read()
        return p.returncode, out

    def kill_all(self):
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
        for p in self.procs:
            try:
                p.communicate(timeout=5)
            except Exception:  # noqa: BLE001 - already killed; nothing more to do
                pass


@pytest.fixture
def procs():
    p = Procs()
    try:
        yield p
    finally:
        p.kill_all()


@pytest.fixture
def pair():
    """`make(spec)` joins a 1A1F mesh inside this process over tcp (the
    attention rank embeds the scheduler) and returns (attention, ffn);
    both are shut down at teardown."""
    made = []

    def make(spec, transport="tcp", memory=None, layout=None):
        addr = f"127.0.0.1:{free_port()}"
        got = {}

        def ffn():
            try:
                got["f"] = afmesh.Mesh(addr, 1, 1, transport=transport, layout=layout,
                                       setup_timeout=10).ffn(spec)
            except BaseException as e:  # noqa: BLE001 - re-raised below
                got["e"] = e

        t = threading.Thread(target=ffn)
        t.start()
        a = afmesh.Mesh(addr, 1, 1, transport=transport, embed_scheduler=True, layout=layout,
                        setup_timeout=10).attention(spec, memory=memory)
        t.join(15)
        assert not t.is_alive(), "the FFN rank did not join"
        if "e" in got:
            raise got["e"]
        made.extend([a, got["f"]])
        return a, got["f"]

    yield make
    for r in made:
        if not r.closed:
            r.shutdown()
