"""(f) The hostile-input table of issue #12: malformed and abusive requests over raw HTTP, one or
more rows per item of the issue (the first field of each row). Each gets a 4xx with a JSON
detail (or a failed future with a message), never a 5xx, and the server keeps serving and
training afterwards. Items whose hostile input is not an HTTP request are covered by their own
tests, named in OTHER_TESTS; the script checks that every item 1-8 has a row or such a test."""
import json
import os
import socket
import struct
import urllib.parse
import urllib.error
import urllib.request

from tinker.proto import tinker_public_pb2 as pb

from common import ready, BASE_URL, MODEL, check, result, service

KEY = os.environ["TINKER_API_KEY"]


def call(path, body, ctype="application/json", key=KEY, method="POST"):
    headers = {"Content-Type": ctype}
    if key is not None:
        headers["X-API-Key"] = key
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(BASE_URL + "/api/v1/" + path, data=data if method == "POST" else None,
                                 headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


# A real session and model to aim the bad requests at.
sc = service()
tc = ready(sc.create_lora_training_client(base_model=MODEL, rank=4))
model_id = tc.model_id
session_id = model_id.split(":")[0]
scl = ready(tc.save_weights_and_get_sampling_client())
sampling_id = scl._sampling_session_id if hasattr(scl, "_sampling_session_id") else None


def fb_body(tokens=(1, 2, 3), targets=(2, 3, 4), target_dtype=pb.DTYPE_INT64, data=True, loss="cross_entropy",
            config=None):
    req = pb.ForwardBackwardRequest(model_id=model_id, seq_id=1000, loss_fn=loss)
    for k, v in (config or {}).items():
        req.loss_fn_config[k] = v
    if data:
        d = req.data.add()
        d.model_input.add().encoded_text.tokens = struct.pack(f"<{len(tokens)}i", *tokens)
        t = d.loss_fn_inputs["target_tokens"]
        t.dtype = target_dtype
        t.shape.append(len(targets))
        t.dense = (struct.pack(f"<{len(targets)}q", *targets) if target_dtype == pb.DTYPE_INT64
                   else struct.pack(f"<{len(targets)}f", *targets))
    return req.SerializeToString()


def sample_body(tokens, sid):
    return {"num_samples": 1, "prompt": {"chunks": [{"type": "encoded_text", "tokens": tokens}]},
            "sampling_params": {"max_tokens": 2}, "sampling_session_id": sid, "type": "sample"}


# Items of issue #12: 1 panics/broken runs, 2 restarts, 3 readiness, 4 bounded resources,
# 5 non-finite numbers, 6 exposure, 7 cluster identity, 8 protocol hygiene.
cases = [
    (8, "bad json", "create_session", b"{not json", "application/json"),
    (8, "json array", "create_model", b"[]", "application/json"),
    (8, "missing fields", "create_model", {"session_id": session_id}, "application/json"),
    (8, "wrong field type", "create_model",
     {"session_id": session_id, "model_seq_id": "x", "base_model": MODEL}, "application/json"),
    (8, "unknown base model", "create_model",
     {"session_id": session_id, "model_seq_id": 77, "base_model": "no/such-model"}, "application/json"),
    (4, "rank 0", "create_model",
     {"session_id": session_id, "model_seq_id": 78, "base_model": MODEL, "lora_config": {"rank": 0}},
     "application/json"),
    (8, "bad protobuf", "forward_backward", b"\xff\xff\xff\xff garbage", "application/x-protobuf"),
    (8, "float target_tokens", "forward_backward", fb_body(target_dtype=pb.DTYPE_FLOAT32), "application/x-protobuf"),
    (1, "token out of range", "forward_backward", fb_body(tokens=(1, 10**9, 3)), "application/x-protobuf"),
    (1, "target out of range", "forward_backward", fb_body(targets=(2, 3, 10**12)), "application/x-protobuf"),
    (1, "length mismatch", "forward_backward", fb_body(targets=(2, 3)), "application/x-protobuf"),
    (8, "empty batch", "forward_backward", fb_body(data=False), "application/x-protobuf"),
    (8, "unknown loss", "forward_backward", fb_body(loss="nope"), "application/x-protobuf"),
    # server_config.max_tokens_per_request is 4096 in tests/tinker_sdk.rs.
    (4, "too many tokens", "forward_backward", fb_body(tokens=[1] * 5000, targets=[2] * 5000),
     "application/x-protobuf"),
    (4, "too many tags", "create_session", {"tags": [f"t{i}" for i in range(101)]}, "application/json"),
    (4, "huge session metadata", "create_session", {"user_metadata": {"blob": "x" * 70_000}},
     "application/json"),
    (1, "ppo clip bounds swapped", "forward_backward",
     fb_body(loss="ppo", config={"clip_low_threshold": 5.0, "clip_high_threshold": 0.1}),
     "application/x-protobuf"),
    (1, "unknown loss_fn_config key", "forward_backward", fb_body(config={"beta": 0.1}),
     "application/x-protobuf"),
    (5, "lr 1e308", "optim_step", {"model_id": model_id, "seq_id": 1004, "adam_params": {"learning_rate": 1e308}},
     "application/json"),
    (2, "unknown model", "optim_step", {"model_id": "nobody:train:0", "seq_id": 1}, "application/json"),
    (5, "negative lr", "optim_step", {"model_id": model_id, "seq_id": 1001, "adam_params": {"learning_rate": -1}},
     "application/json"),
    (8, "save without name", "save_weights", {"model_id": model_id, "seq_id": 1002}, "application/json"),
    (8, "bad checkpoint name", "save_weights", {"model_id": model_id, "seq_id": 1003, "path": "a/b"},
     "application/json"),
    (8, "unknown future", "retrieve_future", {"request_id": "req-nope"}, "application/json"),
    (8, "sample: no session", "asample", sample_body([1, 2], None), "application/json"),
    (1, "sample: token out of range", "asample", sample_body([1, 10**9], sampling_id), "application/json"),
    (4, "sample: 10 MB prompt", "asample", sample_body([5] * 2_500_000, sampling_id), "application/json"),
    (5, "sample: top_p 0", "asample", dict(sample_body([1, 2], sampling_id), sampling_params={"top_p": 0.0}),
     "application/json"),
    (4, "sample: 10000 num_samples", "asample", dict(sample_body([1, 2], sampling_id), num_samples=10_000),
     "application/json"),
    (5, "NaN lr (not JSON)", "optim_step",
     b'{"model_id": "%s", "seq_id": 1005, "adam_params": {"learning_rate": NaN}}' % model_id.encode(),
     "application/json"),
    (8, "sampler weights of an unknown kind", "save_weights_for_sampler",
     {"model_id": model_id, "sampling_session_seq_id": 1, "kind": "bogus"}, "application/json"),
    (8, "garbage session finish", f"sessions/{session_id}/finish", b"\x00garbage", "application/json"),
    (2, "load_state of a checkpoint that does not exist", "load_weights",
     {"model_id": model_id, "seq_id": 1006, "path": f"tinker://{model_id}/weights/never-saved", "optimizer": True},
     "application/json"),
]
table = {}
for item, name, path, body, ctype in cases:
    status, raw = call(path, body, ctype)
    check(400 <= status < 500, f"#{item} {name}: status {status} body {raw[:300]!r}")
    detail = json.loads(raw).get("detail", "")
    check(isinstance(detail, str) and detail, f"#{item} {name}: no detail in {raw[:300]!r}")
    table[name] = [item, status, detail[:160]]

for name, limit in [("too many tokens", "4096"), ("too many tags", "100"), ("huge session metadata", "65536"),
                    ("sample: 10000 num_samples", "128")]:
    check(table[name][1] == 400 and limit in table[name][2], f"{name}: {table[name]}")

status, raw = call("get_server_capabilities", b"", key=None, method="GET")
check(status == 401, f"no key: {status}")
table["no api key"] = [6, status, json.loads(raw)["detail"]]
status, raw = call("get_server_capabilities", b"", key="not-a-tml-key", method="GET")
check(status == 401, f"bad key: {status}")
status, raw = call("no_such_endpoint", {})
check(status == 404 and json.loads(raw)["detail"], f"unknown endpoint: {status}")
table["unknown endpoint"] = [8, status, json.loads(raw)["detail"]]


def gateway(path, key=None):
    req = urllib.request.Request(BASE_URL + path, headers={"X-API-Key": key} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


# 6: no echo route in the product, and liveness says nothing about pids or addresses.
status, raw = gateway("/echo")
check(status == 404, f"/echo: {status} {raw[:200]!r}")
table["/echo"] = [6, status, raw[:80].decode(errors="replace")]
status, raw = gateway("/healthz")
check(status == 200 and b"pid" not in raw and b"127.0.0.1" not in raw, f"/healthz: {status} {raw[:300]!r}")
healthz = raw[:80].decode(errors="replace")

# 8: a broken chunked body is a 400 from the gateway, not a 502.
u = urllib.parse.urlparse(BASE_URL)
with socket.create_connection((u.hostname, u.port), timeout=30) as sock:
    sock.sendall(b"POST /api/v1/create_session HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"X-API-Key: " + KEY.encode() + b"\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                 b"zz\r\n{}\r\n0\r\n\r\n")
    head = sock.recv(4096).split(b"\r\n", 1)[0]
check(head.split()[1:2] == [b"400"], f"malformed chunked body: {head!r}")
table["malformed chunked body"] = [8, 400, head.decode(errors="replace")]

# Items whose hostile input is not a request of this script, and the test that covers each.
OTHER_TESTS = {
    1: "tests/model_app_panic.rs (a panicking job leaves every adapter as it was)",
    2: "tests/tinker_sdk.rs sdk_training_client_survives_a_model_app_crash",
    3: "tests/platform_ready.rs, tests/sdk/early_start.py (503 + Retry-After while starting)",
    4: "tests/server_limits.rs (64 pending futures per key -> 429)",
    6: "tests/file_modes.rs (0600/0700), tests/platform_serve.rs (control port needs its token)",
    7: "tests/cluster_multinode.rs (join/start --head from a running TWINKLE_HOME is refused)",
    8: "tests/server_tinker_hygiene.rs, tests/server_sweeper.rs",
}
covered = {row[0] for row in table.values()} | set(OTHER_TESTS)
check(covered >= set(range(1, 9)), f"items without a row or a test: {set(range(1, 9)) - covered}")
for item in range(1, 9):
    rows = [f"{n} -> {r[1]}" for n, r in table.items() if r[0] == item]
    print(f"item {item}: " + "; ".join(rows) + (f" | also {OTHER_TESTS[item]}" if item in OTHER_TESTS else ""),
          flush=True)

# Still serving: a real step works after all of the above.
from common import datum, loss_of  # noqa: E402
from tinker import types  # noqa: E402

# An overflowing loss (f32 weights near the type's maximum: each −w·lp is inf) is a clear user
# error on the future, not a null in JSON, and adds nothing to the gradient.
huge = types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3, 4]),
                   loss_fn_inputs={"target_tokens": [2, 3, 4, 5], "weights": [3.0e38] * 4})
try:
    tc.forward_backward([huge], "cross_entropy").result()
    overflow = "accepted"
except Exception as e:  # the SDK raises the failed future's error
    overflow = str(e)
check("overflowed" in overflow, f"overflowing loss: {overflow[:300]}")

loss = loss_of(tc.forward_backward([datum([1, 2, 3], [4, 5])], "cross_entropy").result())
check(loss > 0, "server still trains")
result(table=table, loss_after=loss, overflow=overflow[:300], healthz=healthz)
