"""A 1A1F pair in one process whose attention rank waits for a combine
that never comes; test_signals.py sends SIGINT."""

import signal
import threading
import time

import numpy as np

import afmesh
from conftest import free_port

# A runner started in the background (`nohup ... &`, a shell without job
# control) hands SIGINT down ignored, and Python then installs no handler
# for it: Ctrl-C, what this child is for, would do nothing.
signal.signal(signal.SIGINT, signal.default_int_handler)

spec = afmesh.StageSpec(1, 1, 8, 8, 0)
addr = f"127.0.0.1:{free_port()}"
got = {}
t = threading.Thread(target=lambda: got.setdefault(
    "f", afmesh.Mesh(addr, 1, 1, transport="tcp", setup_timeout=10).ffn(spec)))
t.start()
a = afmesh.Mesh(addr, 1, 1, transport="tcp", embed_scheduler=True, setup_timeout=10).attention(spec)
t.join(10)
h = a.dispatch(0, np.zeros(8, np.uint8))
print("waiting", flush=True)
try:
    a.wait_combine(h, 30)
    print("combined?", flush=True)
except KeyboardInterrupt:
    print("interrupted", time.monotonic(), flush=True)
# The rank is still usable after the interrupt: answer, then combine.
f = got["f"]
f.respond(f.get_batch(5), [np.ones(8, np.uint8)])
assert bytes(a.wait_combine(h, 5).partial(0)) == b"\x01" * 8
print("ok", flush=True)
