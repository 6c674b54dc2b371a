"""Crash during training (issue #12, item 2). `crash.py PID`: train 3 steps, save_state, then
kill -9 the model application (PID) and keep using the SAME TrainingClient: it answers again once
the application is back, at the state of the last completed step, and 2 more steps give the same
losses as a control client loaded from the save_state taken before the kill."""
import os
import signal
import sys
import time

import tinker
from tinker import types

from common import ready, MODEL, check, datum, loss_of, result, service

pid = int(sys.argv[1])
batch = [datum([30, 31, 32], [40, 41]), datum([50, 51], [60, 61, 62])]


def steps(tc, n):
    out = []
    for _ in range(n):
        fb = tc.forward_backward(batch, "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=5e-3)).result()
        out.append(loss_of(fb.result()))
    return out


def forward(tc):
    return loss_of(tc.forward(batch, "cross_entropy").result())


sc = service()
tc = ready(sc.create_lora_training_client(base_model=MODEL, rank=4))
first = steps(tc, 3)
path = tc.save_state("before-kill").result().path
before = forward(tc)
# Work since the last step is what a crash may lose: an accumulated gradient here.
tc.forward_backward(batch, "cross_entropy").result()
time.sleep(0.5)  # the snapshot of the last step is written in the background
os.kill(pid, signal.SIGKILL)
t0 = time.time()
# The same client: the submission waits for the restarted application.
after = forward(tc)
waited = time.time() - t0
check(abs(after - before) <= 1e-5 * max(1.0, abs(before)), f"loss after the crash {after} != before {before}")
got = steps(tc, 2)
control = ready(sc.create_training_client_from_state_with_optimizer(path))
ref = steps(control, 2)
for a, b in zip(got, ref):
    check(abs(a - b) <= 1e-4 * max(1.0, abs(b)), f"continued losses {got} != control {ref}")
result(first=first, before=before, after=after, continued=got, control=ref, waited=waited)
