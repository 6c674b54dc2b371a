"""Reliability soak and bounded load (issue #12, item 9), driven by tests/reliability_soak.rs.

`soak.py SECONDS CLIENTS LOAD_CLIENTS LOAD_EACH`: CLIENTS threads each train their own LoRA adapter
(forward_backward + optim_step, a sample and a save_state now and then) for SECONDS while the Rust
test SIGKILLs the model application at random moments; then LOAD_CLIENTS threads each fire
LOAD_EACH samples at once, past the per-key bounds on pending requests and on samples in flight
(429 + Retry-After, which the SDK backs off on). Prints `READY` once every adapter has completed a step (from then on a snapshot
of it is on disk, so a kill may land anywhere), `SOAK_DONE` after the soak, then `RESULT {json}`:
per client its model id, acknowledged steps and the documented crash outcomes it met, and the HTTP
status of every response the SDK received, per phase.

The crash outcomes a client handles, as README documents them: a request the application was
running when it died fails with "interrupted" (the iteration is repeated; an interrupted
optim_step may or may not have been applied, so it is counted as ambiguous), and an optim_step
after a crash that lost the gradients of the forward_backward before it is refused with "has no
gradients" (the iteration is repeated). Anything else is an error the test reports."""
import collections
import sys
import threading
import time

import httpx
import tinker
from tinker import types

from common import MODEL, datum, ready, result, service

seconds, n_clients, load_clients, load_each = (float(sys.argv[1]), int(sys.argv[2]),
                                               int(sys.argv[3]), int(sys.argv[4]))

# Every HTTP response the SDK receives, by status: its own retries (429, 503) are invisible to
# the caller, and the test must see that no error status other than those ever came back.
statuses = collections.Counter()
bad = []  # (status, method, path, detail) of every unexpected error status, see counting_send
unavailable = []  # (path, detail) of the first 503s: retryable, but only expected at a restart
count_lock = threading.Lock()
_send = httpx.AsyncClient.send


def body_of(resp):
    try:
        return resp.text[:300]
    except Exception:  # a streamed body is not read yet; the status is what matters
        return ""


async def counting_send(self, request, *args, **kwargs):
    resp = await _send(self, request, *args, **kwargs)
    code = resp.status_code
    with count_lock:
        statuses[code] += 1
        # 408 is retrieve_future's long-poll "try again"; 429 (with Retry-After) and 503 are the
        # documented backpressure the SDK retries. Any other 4xx/5xx is a finding.
        if (code >= 400 and code not in (408, 429, 503)) or (code == 429 and "retry-after" not in resp.headers):
            bad.append((code, request.method, request.url.path, body_of(resp)))
        elif code == 503 and len(unavailable) < 10:
            unavailable.append((request.url.path, body_of(resp)))
    return resp


httpx.AsyncClient.send = counting_send


def crash_outcome(e):
    """The documented failure a kill causes, or None for anything else."""
    text = str(e)
    if "interrupted" in text:
        return "interrupted"
    if "has no gradients" in text:
        return "regrad"
    return None


class Client:
    def __init__(self, sc, i):
        self.i = i
        self.tc = ready(sc.create_lora_training_client(base_model=MODEL, rank=4, seed=100 + i))
        self.batch = [datum([30 + i, 31, 32], [40, 41 + i]), datum([50, 51 + i], [60, 61, 62])]
        self.acked = 0
        self.ambiguous = 0
        self.outcomes = collections.Counter()
        self.samples = 0
        self.saves = 0
        self.errors = []

    def attempt(self, fn):
        """Runs `fn`; a documented crash outcome is counted and gives None, anything else raises."""
        try:
            return fn()
        except tinker.RequestFailedError as e:
            kind = crash_outcome(e)
            if kind is None:
                raise
            self.outcomes[kind] += 1
            return None

    def step(self):
        if self.attempt(lambda: self.tc.forward_backward(self.batch, "cross_entropy").result()) is None:
            return
        adam = types.AdamParams(learning_rate=1e-3)
        try:
            self.tc.optim_step(adam).result()
            self.acked += 1
        except tinker.RequestFailedError as e:
            kind = crash_outcome(e)
            if kind is None:
                raise
            self.outcomes[kind] += 1
            if kind == "interrupted":
                self.ambiguous += 1

    def sample(self):
        scl = self.attempt(lambda: ready(self.tc.save_weights_and_get_sampling_client()))
        if scl is None:
            return
        params = types.SamplingParams(max_tokens=4, temperature=0.0, stop=[])
        prompt = types.ModelInput.from_ints([30 + self.i, 31, 32])
        if self.attempt(lambda: scl.sample(prompt, 1, params).result()) is not None:
            self.samples += 1

    def save(self):
        name = f"soak-{self.i}-{self.saves}-{time.monotonic_ns()}"
        if self.attempt(lambda: self.tc.save_state(name).result()) is not None:
            self.saves += 1

    def run(self, deadline):
        n = 0
        try:
            while time.monotonic() < deadline:
                self.step()
                n += 1
                if n % 8 == 0:
                    self.sample()
                if n % 12 == 0:
                    self.save()
        except Exception as e:  # reported to the test, which fails with it
            self.errors.append(f"{type(e).__name__}: {e}")

    def report(self):
        return dict(model_id=self.tc.model_id, acked=self.acked, ambiguous=self.ambiguous,
                    outcomes=dict(self.outcomes), samples=self.samples, saves=self.saves,
                    errors=self.errors)


def load_phase(sc):
    """LOAD_CLIENTS sampling clients fire LOAD_EACH samples each at the same moment: more
    unfinished requests than one API key may have, so some submissions are answered 429."""
    params = types.SamplingParams(max_tokens=16, temperature=0.0, stop=[])
    clients = [ready(sc.create_sampling_client(base_model=MODEL)) for _ in range(load_clients)]
    start = threading.Barrier(load_clients)
    done = collections.Counter()
    errors = []

    def fire(k, scl):
        start.wait()
        futs = [scl.sample(types.ModelInput.from_ints([20 + k, 21 + j, 22]), 1, params)
                for j in range(load_each)]
        for f in futs:
            try:
                f.result()
                with count_lock:
                    done["ok"] += 1
            except Exception as e:
                with count_lock:
                    errors.append(f"{type(e).__name__}: {e}")

    t0 = time.monotonic()
    threads = [threading.Thread(target=fire, args=(k, c)) for k, c in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return dict(submitted=load_clients * load_each, completed=done["ok"], errors=errors[:10],
                seconds=time.monotonic() - t0)


sc = service()
t0 = time.monotonic()
clients = [Client(sc, i) for i in range(n_clients)]
for c in clients:
    c.step()  # the first step writes the adapter's first durable snapshot
print("READY", flush=True)
deadline = time.monotonic() + seconds
threads = [threading.Thread(target=c.run, args=(deadline,)) for c in clients]
for t in threads:
    t.start()
for t in threads:
    t.join()
soak_statuses = dict(statuses)
print("SOAK_DONE", flush=True)
load = load_phase(sc)
with count_lock:
    load_statuses = {k: v - soak_statuses.get(k, 0) for k, v in statuses.items() if v - soak_statuses.get(k, 0)}
result(clients=[c.report() for c in clients], soak_statuses=soak_statuses, load_statuses=load_statuses,
       load=load, bad=bad[:20], unavailable=unavailable, seconds=time.monotonic() - t0)
