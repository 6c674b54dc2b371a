"""Crash during training (issue #12, item 2). `crash.py PID BIN HOME LIVE`: train 3 steps,
save_state, then kill -9 the model application (PID) and keep using the SAME TrainingClient: it
answers again once the application is back, at the state of the last completed step, and 2 more
steps give the same losses as a control client loaded from the save_state taken before the kill.
Each answered optim_step has its snapshot on disk already (issue #12, item 9). Then a crash that
loses the adapter (its snapshots in LIVE deleted first): the next call fails as a
server error, the run is marked corrupted, and load_state on the same client recovers it."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import tinker

from common import ready, MODEL, check, datum, loss_of, result, service, train_steps

pid, twinkle_bin, home, live = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
batch = [datum([30, 31, 32], [40, 41]), datum([50, 51], [60, 61, 62])]


def steps(tc, n):
    return train_steps(tc, batch, n)


def forward(tc):
    return loss_of(tc.forward(batch, "cross_entropy").result())


def after_crash(fn):
    """The first call after a kill: a request the dead application may have read fails as a
    retryable server error ("interrupted"), as documented; it is retried once."""
    try:
        return fn()
    except tinker.RequestFailedError as e:
        if "interrupted" not in str(e):
            raise
        return fn()


def snapshot_dir(client):
    """A snapshot directory is named by the SHA-256 of the model id (src/apps/model/durable.rs)."""
    return hashlib.sha256(client.model_id.encode()).hexdigest()


def check_snapshot(client, step):
    """The snapshot of `client`'s adapter is at `step` as soon as optim_step has answered (the
    answer waits for it, src/apps/model/durable.rs): read it at once, no waiting for a writer.
    Only a missing file is read again briefly: a background write of the same state (queued at
    create) swaps the directory by two renames."""
    snap = os.path.join(live, snapshot_dir(client), "optimizer_state.json")
    for _ in range(20):
        try:
            got = json.load(open(snap))["step"]
        except (OSError, ValueError, KeyError):
            time.sleep(0.05)
            continue
        check(got == step, f"snapshot at step {got}, expected {step}, right after optim_step answered")
        return
    check(False, f"no snapshot at step {step} in {snap}")


sc = service()
tc = ready(sc.create_lora_training_client(base_model=MODEL, rank=4))
first = steps(tc, 3)
path = tc.save_state("before-kill").result().path
before = forward(tc)
# Work since the last step is what a crash may lose: an accumulated gradient here.
tc.forward_backward(batch, "cross_entropy").result()
check_snapshot(tc, 3)
os.kill(pid, signal.SIGKILL)
t0 = time.time()
# The same client: the submission waits for the restarted application.
after = after_crash(lambda: forward(tc))
waited = time.time() - t0
check(abs(after - before) <= 1e-5 * max(1.0, abs(before)), f"loss after the crash {after} != before {before}")
got = steps(tc, 2)
control = ready(sc.create_training_client_from_state_with_optimizer(path))
ref = steps(control, 2)
for a, b in zip(got, ref):
    check(abs(a - b) <= 1e-4 * max(1.0, abs(b)), f"continued losses {got} != control {ref}")

# A crash with no snapshot left: the adapter is lost.
st = json.loads(subprocess.run([twinkle_bin, "status", "--json"], env=dict(os.environ, TWINKLE_HOME=home),
                               capture_output=True, check=True).stdout)
pid2 = next(a["pid"] for a in st["applications"] if a["import_path"] == "model")
check(pid2 and pid2 != pid, f"model app pid after the restart: {pid2}")
check_snapshot(tc, 5)
shutil.rmtree(os.path.join(live, snapshot_dir(tc)))
os.kill(pid2, signal.SIGKILL)
try:
    after_crash(lambda: forward(tc))
    check(False, "a lost adapter must fail the call")
except tinker.RequestFailedError as e:
    check(e.category.value == "server" if hasattr(e.category, "value") else str(e.category).lower().endswith("server"),
          f"lost adapter category: {e.category}")
    check("corrupted" in str(e), f"lost adapter message: {e}")
rc = tinker.RestClient(base_url=os.environ["TWINKLE_BASE_URL"], api_key=os.environ["TINKER_API_KEY"])
check(rc.get_training_run(tc.model_id).result().corrupted, "the run is marked corrupted")
tc.load_state(path).result()
recovered = forward(tc)
check(abs(recovered - before) <= 1e-5 * max(1.0, abs(before)), f"recovered loss {recovered} != {before}")
check(not rc.get_training_run(tc.model_id).result().corrupted, "load_state clears corrupted")
result(recovered=recovered, first=first, before=before, after=after, continued=got, control=ref, waited=waited)
