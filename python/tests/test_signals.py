"""Ctrl-C (SIGINT) during a blocked wait raises KeyboardInterrupt within
100 ms, and the rank stays usable."""

import signal
import time


def test_sigint_interrupts_a_wait_within_100ms(procs):
    p = procs.spawn("interrupt_child.py", {})
    line = p.stdout.readline()
    assert line.strip() == "waiting", line
    time.sleep(0.2)  # let the wait block (it parks in 20 ms slices)
    sent = time.monotonic()
    p.send_signal(signal.SIGINT)
    line = p.stdout.readline().split()
    if not (line and line[0] == "interrupted"):
        # Show what the child said (a traceback's text, not just its
        # first line).
        code, rest = procs.finish(p, 10)
        raise AssertionError(f"child exit {code}: {' '.join(line)}\n{rest}")
    latency = float(line[1]) - sent
    assert latency < 0.1, latency
    code, out = procs.finish(p, 10)
    assert code == 0 and out.strip().endswith("ok"), out
