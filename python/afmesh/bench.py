"""``python -m afmesh.bench``: what Python adds to a layer.

Runs the 8-byte layer of ``afmesh bench`` (1A x 1F, 1 stage, 1 token,
hidden 8: an 8-byte FP8 row out, a 16-byte BF16 row back) twice in the same
run: through this package (the attention rank here, the FFN rank in a
child process, both in Python: ``dispatch`` + ``wait_combine_sum`` against
``get_batch`` + ``respond``), and through the Rust bench (``afmesh bench``,
found as ``--afmesh PATH``, ``$AFMESH_BIN``, ``target/release/afmesh`` up
from here, or on ``PATH``). It prints both p50s and the difference: the
microseconds Python adds per layer (dispatch + combine, both sides).

``python -m afmesh.bench --recv-copy`` instead measures the copy
``afmesh.fserver.register_recv_buffer`` costs per registered tensor in
``get_batch`` (the slot's bytes into the registered part, as
``fserver._registered`` does it), for a few tensor sizes.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np

import afmesh

SPEC = dict(stages=1, max_tokens=1, row_bytes=8, out_row_bytes=16, side_bytes=16)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mesh(addr, transport, cpu, embed):
    pin = cpu if cpu is not None and (os.cpu_count() or 1) >= 2 else None
    return afmesh.Mesh(addr, 1, 1, transport=transport, cpu=pin, embed_scheduler=embed,
                       setup_timeout=30)


def _ffn(addr, transport, cpu, layers):
    f = _mesh(addr, transport, cpu, False).ffn(afmesh.StageSpec(**SPEC))
    out = np.zeros(16, np.uint8)
    for _ in range(layers):
        b = f.get_batch(30)
        out[:8] = b.tokens(0).view(np.ndarray).reshape(-1)  # answer with the row
        f.respond(b, [out])
    f.shutdown()


def python_layer(transport, warmup, iters):
    """p50/p99 (us) of dispatch + wait_combine_sum through Python."""
    addr = f"127.0.0.1:{_free_port()}"
    child = subprocess.Popen(
        [sys.executable, "-m", "afmesh.bench", "--serve", addr, "--transport", transport,
         "--layers", str(warmup + iters)],
    )
    try:
        a = _mesh(addr, transport, 0, True).attention(afmesh.StageSpec(**SPEC))
        x = np.arange(8, dtype=np.uint8)
        side = np.zeros(8, np.uint8)
        out = np.zeros(8, np.uint16)  # 8 bf16
        times = np.empty(iters, np.int64)
        clock = time.perf_counter_ns
        for i in range(warmup + iters):
            x[0] = i & 0xFF
            t0 = clock()
            h = a.dispatch(0, x, side)
            a.wait_combine_sum(h, out, "bf16", 10.0)
            t1 = clock()
            if i >= warmup:
                times[i - warmup] = t1 - t0
        if out.view(np.uint8)[0] != (warmup + iters - 1) & 0xFF and out.view(np.uint8)[1] != 1:
            raise AssertionError("the combine did not echo the dispatched row")
        a.shutdown()
        child.wait(30)
    finally:
        if child.poll() is None:
            child.send_signal(signal.SIGKILL)
            child.wait()
    return np.percentile(times, 50) / 1e3, np.percentile(times, 99) / 1e3


def recv_copy(sizes=(32 << 10, 1 << 20, 4 << 20), reps=200):
    """p50 (us) of the registered-tensor copy per size in bytes."""
    out = []
    for n in sizes:
        src = np.random.default_rng(0).integers(0, 255, n, dtype=np.uint8)
        dst = np.zeros(n + 64, np.uint8)
        times = np.empty(reps, np.int64)
        for i in range(reps):
            t0 = time.perf_counter_ns()
            np.copyto(dst[:n], src)
            times[i] = time.perf_counter_ns() - t0
        if not np.array_equal(dst[:n], src):
            raise AssertionError("the copy is wrong")
        out.append((n, np.percentile(times, 50) / 1e3))
    return out


def _find_afmesh(given):
    if given:
        return given
    if os.environ.get("AFMESH_BIN"):
        return os.environ["AFMESH_BIN"]
    d = os.getcwd()
    while True:
        p = os.path.join(d, "target", "release", "afmesh")
        if os.access(p, os.X_OK):
            return p
        up = os.path.dirname(d)
        if up == d:
            break
        d = up
    return shutil.which("afmesh")


def rust_layer(binary, transport, warmup, iters):
    """p50/p99 (us) of the same layer through ``afmesh bench``."""
    cmd = [binary, "bench", "--stages", "1", "--transport", transport, "--tokens", "1",
           "--hidden", "8", "--warmup", str(warmup), "--iters", str(iters), "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True).stdout
    j = json.loads(out.strip().splitlines()[-1])
    return j["p50_us"], j["p99_us"], " ".join(cmd[1:])


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m afmesh.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--transport", default="shm", help="shm (default) or tcp")
    p.add_argument("--iters", type=int, default=20000)
    p.add_argument("--warmup", type=int, default=2000)
    p.add_argument("--afmesh", help="path of the afmesh CLI (release build)")
    p.add_argument("--recv-copy", action="store_true",
                   help="measure register_recv_buffer's copy instead")
    p.add_argument("--serve", help=argparse.SUPPRESS)
    p.add_argument("--layers", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        _ffn(args.serve, args.transport, 1, args.layers)
        return 0
    if args.recv_copy:
        for n, us in recv_copy():
            print(f"register_recv_buffer copy of {n >> 10} KiB: p50 {us:.2f} us "
                  f"({n / us / 1e3:.1f} GB/s)")
        return 0
    if args.iters < 1 or args.warmup < 0:
        p.error("--iters must be at least 1 and --warmup at least 0")
    py50, py99 = python_layer(args.transport, args.warmup, args.iters)
    print(f"python  8-byte layer ({args.transport}, 1A x 1F, {args.iters} layers): "
          f"p50 {py50:.2f} us, p99 {py99:.2f} us")
    binary = _find_afmesh(args.afmesh)
    if not binary:
        print("rust    afmesh CLI not found (cargo build --release, or --afmesh PATH): "
              "no comparison")
        return 1
    rs50, rs99, cmd = rust_layer(binary, args.transport, args.warmup, args.iters)
    print(f"rust    `afmesh {cmd}`: p50 {rs50:.2f} us, p99 {rs99:.2f} us")
    added = py50 - rs50
    print(f"added by Python per layer (dispatch + combine, both sides): {added:.2f} us "
          f"(target <= 5 us: {'met' if added <= 5 else 'missed'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
