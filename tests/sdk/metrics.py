"""Issue 16: after a training step and a sample through the SDK, the gateway's /metrics parses
with Prometheus's own text parser (prometheus_client), counts them, and its histograms are
consistent. Every SDK request carries the client's X-Request-Id (TWINKLE_REQUEST_ID)."""
import math
import os
import urllib.request
import warnings

from prometheus_client.parser import text_string_to_metric_families
from tinker import types

import tinker
from common import BASE_URL, MODEL, check, datum, ready, result

warnings.simplefilter("ignore", FutureWarning)
REQUEST_ID = os.environ["TWINKLE_REQUEST_ID"]


def scrape():
    with urllib.request.urlopen(f"{BASE_URL}/metrics", timeout=30) as r:
        check(r.status == 200, f"/metrics answered {r.status}")
        ctype = r.headers.get("Content-Type", "")
        check(ctype.startswith("text/plain; version=0.0.4"), f"content type {ctype}")
        return list(text_string_to_metric_families(r.read().decode()))


def samples(fams, name, **labels):
    """Values of samples called `name` whose labels include `labels`."""
    return [s.value for f in fams for s in f.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]


def check_histograms(fams):
    """Cumulative buckets never decrease, +Inf equals _count, and _sum is finite."""
    checked = 0
    for f in (f for f in fams if f.type == "histogram"):
        series = {}
        for s in f.samples:
            key = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
            series.setdefault(key, {"buckets": [], "count": None, "sum": None})
            if s.name.endswith("_bucket"):
                series[key]["buckets"].append((float(s.labels["le"]), s.value))
            elif s.name.endswith("_count"):
                series[key]["count"] = s.value
            elif s.name.endswith("_sum"):
                series[key]["sum"] = s.value
        for key, h in series.items():
            b = sorted(h["buckets"])
            check(b and b[-1][0] == math.inf, f"{f.name}{key}: no +Inf bucket")
            check(all(x[1] <= y[1] for x, y in zip(b, b[1:])), f"{f.name}{key}: buckets decrease")
            check(b[-1][1] == h["count"], f"{f.name}{key}: +Inf {b[-1][1]} != count {h['count']}")
            check(h["sum"] is not None and math.isfinite(h["sum"]) and h["sum"] >= 0, f"{f.name}{key}: sum")
            checked += 1
    return checked


sc = tinker.ServiceClient(base_url=BASE_URL, api_key=os.environ["TINKER_API_KEY"],
                          default_headers_overrides={"X-Request-Id": REQUEST_ID})
tc = ready(sc.create_lora_training_client(base_model=MODEL, rank=4))
batch = [datum([1, 2, 3, 4], [5, 6]), datum([7, 8, 9], [10, 11, 12])]
tc.forward_backward(batch, "cross_entropy").result()
tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
scl = ready(tc.save_weights_and_get_sampling_client())
scl.sample(types.ModelInput.from_ints([1, 2, 3]), 1,
           types.SamplingParams(max_tokens=4, temperature=0.0, stop=[])).result()

first = scrape()
ok = lambda op: sum(samples(first, "twinkle_model_jobs_total", app="model", op=op, outcome="ok"))
for op in ("forward_backward", "optim_step", "sample"):
    check(ok(op) >= 1, f"no finished {op} job counted")
fb_tokens = sum(samples(first, "twinkle_model_tokens_total", app="model", op="forward_backward"))
check(fb_tokens == 10, f"forward_backward tokens {fb_tokens} != 10 (5 + 5 positions)")
sampled = sum(samples(first, "twinkle_model_tokens_total", app="model", op="sample"))
check(1 <= sampled <= 4, f"sampled tokens {sampled} (max_tokens 4)")
fb_route = samples(first, "twinkle_http_requests_total", app="server", route="/api/v1/forward_backward",
                   method="POST", status="200")
check(sum(fb_route) >= 1, "server's forward_backward route not counted")
check(sum(samples(first, "twinkle_gateway_requests_total", app="gateway", upstream="server")) >= 4,
      "gateway did not count the forwarded requests")
for app in ("gateway", "server", "model"):
    check(samples(first, "twinkle_process_resident_memory_bytes", app=app), f"no RSS for {app}")
    check(samples(first, "twinkle_process_cpu_seconds_total", app=app), f"no CPU seconds for {app}")
for app in ("server", "model"):
    check(samples(first, "twinkle_app_state", app=app, state="running") == [1.0], f"{app} not running")
    check(samples(first, "twinkle_app_restarts_total", app=app) == [0.0], f"{app} restarted")
check(sum(samples(first, "twinkle_model_adapters", app="model", place="resident")) >= 1, "no resident adapter")
check(samples(first, "twinkle_model_queue_depth", app="model") == [0.0], "model queue not empty")
histograms = check_histograms(first)
check(histograms >= 5, f"only {histograms} histogram series")
check(not any("request_id" in s.labels or REQUEST_ID in s.labels.values() for f in first for s in f.samples),
      "a request id leaked into a label")

# Counters are monotonic across requests: the second scrape never counts less.
second = scrape()
before = {(s.name, tuple(sorted(s.labels.items()))): s.value
          for f in first if f.type in ("counter", "histogram") for s in f.samples}
for f in second:
    for s in f.samples:
        key = (s.name, tuple(sorted(s.labels.items())))
        if key in before:
            check(s.value >= before[key], f"{key} went down: {before[key]} -> {s.value}")

names = sorted({f.name for f in second} | {s.name for f in second for s in f.samples})
result(names=names, histograms=histograms, fb_tokens=fb_tokens)
