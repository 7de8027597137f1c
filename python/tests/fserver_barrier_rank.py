"""One process of a 2-group fserver job for barriers (spawned by
test_fserver.py): 1 worker and 1 server node of 2 processes each
(DMLC_GROUP_SIZE=2), so each instance group is a 1+1 mesh. Prints one
line per barrier, "<name> <entered> <left>" (time.time() in seconds),
then "ok"; or the afmesh exception's class name.

Group 1's server comes 0.5 s late to an instance barrier (the default,
instance_barrier=True); then both of group 1's processes come 0.5 s late
to a group barrier (instance_barrier=False)."""

import os
import sys
import time

import afmesh
import afmesh.fserver as f

SLOW = 0.5
role = os.environ["DMLC_ROLE"]
GPU = int(os.environ.get("STEPMESH_GPU", "0"))


def step(name, slow, **kw):
    if slow:
        time.sleep(SLOW)
    entered = time.time()
    f.barrier(True, True, **kw)
    print(name, entered, time.time(), flush=True)


try:
    f.init()
    if role != "scheduler":
        step("align", False)
        step("all", GPU == 1 and role == "server")
        step("group", GPU == 1, instance_barrier=False)
        step("end", False, instance_barrier=True)
    f.stop()
    print("ok", flush=True)
except afmesh.Error as e:
    print(type(e).__name__, e, flush=True)
    sys.exit(3)
