"""(f) Malformed requests over raw HTTP: each gets a 4xx with a JSON detail (or a failed future
with a message), never a 5xx, and the server keeps serving."""
import json
import os
import struct
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


cases = [
    ("bad json", "create_session", b"{not json", "application/json"),
    ("json array", "create_model", b"[]", "application/json"),
    ("missing fields", "create_model", {"session_id": session_id}, "application/json"),
    ("wrong field type", "create_model",
     {"session_id": session_id, "model_seq_id": "x", "base_model": MODEL}, "application/json"),
    ("unknown base model", "create_model",
     {"session_id": session_id, "model_seq_id": 77, "base_model": "no/such-model"}, "application/json"),
    ("rank 0", "create_model",
     {"session_id": session_id, "model_seq_id": 78, "base_model": MODEL, "lora_config": {"rank": 0}},
     "application/json"),
    ("bad protobuf", "forward_backward", b"\xff\xff\xff\xff garbage", "application/x-protobuf"),
    ("float target_tokens", "forward_backward", fb_body(target_dtype=pb.DTYPE_FLOAT32), "application/x-protobuf"),
    ("token out of range", "forward_backward", fb_body(tokens=(1, 10**9, 3)), "application/x-protobuf"),
    ("target out of range", "forward_backward", fb_body(targets=(2, 3, 10**12)), "application/x-protobuf"),
    ("length mismatch", "forward_backward", fb_body(targets=(2, 3)), "application/x-protobuf"),
    ("empty batch", "forward_backward", fb_body(data=False), "application/x-protobuf"),
    ("unknown loss", "forward_backward", fb_body(loss="nope"), "application/x-protobuf"),
    # server_config.max_tokens_per_request is 4096 in tests/tinker_sdk.rs.
    ("too many tokens", "forward_backward", fb_body(tokens=[1] * 5000, targets=[2] * 5000),
     "application/x-protobuf"),
    ("too many tags", "create_session", {"tags": [f"t{i}" for i in range(101)]}, "application/json"),
    ("huge session metadata", "create_session", {"user_metadata": {"blob": "x" * 70_000}},
     "application/json"),
    ("ppo clip bounds swapped", "forward_backward",
     fb_body(loss="ppo", config={"clip_low_threshold": 5.0, "clip_high_threshold": 0.1}),
     "application/x-protobuf"),
    ("unknown loss_fn_config key", "forward_backward", fb_body(config={"beta": 0.1}),
     "application/x-protobuf"),
    ("lr 1e308", "optim_step", {"model_id": model_id, "seq_id": 1004, "adam_params": {"learning_rate": 1e308}},
     "application/json"),
    ("unknown model", "optim_step", {"model_id": "nobody:train:0", "seq_id": 1}, "application/json"),
    ("negative lr", "optim_step", {"model_id": model_id, "seq_id": 1001, "adam_params": {"learning_rate": -1}},
     "application/json"),
    ("save without name", "save_weights", {"model_id": model_id, "seq_id": 1002}, "application/json"),
    ("bad checkpoint name", "save_weights", {"model_id": model_id, "seq_id": 1003, "path": "a/b"},
     "application/json"),
    ("unknown future", "retrieve_future", {"request_id": "req-nope"}, "application/json"),
    ("sample: no session", "asample", sample_body([1, 2], None), "application/json"),
    ("sample: token out of range", "asample", sample_body([1, 10**9], sampling_id), "application/json"),
    ("sample: 10 MB prompt", "asample", sample_body([5] * 2_500_000, sampling_id), "application/json"),
    ("sample: top_p 0", "asample", dict(sample_body([1, 2], sampling_id), sampling_params={"top_p": 0.0}),
     "application/json"),
]
table = {}
for name, path, body, ctype in cases:
    status, raw = call(path, body, ctype)
    check(400 <= status < 500, f"{name}: status {status} body {raw[:300]!r}")
    detail = json.loads(raw).get("detail", "")
    check(isinstance(detail, str) and detail, f"{name}: no detail in {raw[:300]!r}")
    table[name] = [status, detail[:160]]

for name, limit in [("too many tokens", "4096"), ("too many tags", "100"), ("huge session metadata", "65536")]:
    check(table[name][0] == 400 and limit in table[name][1], f"{name}: {table[name]}")

status, raw = call("get_server_capabilities", b"", key=None, method="GET")
check(status == 401, f"no key: {status}")
table["no api key"] = [status, json.loads(raw)["detail"]]
status, raw = call("get_server_capabilities", b"", key="not-a-tml-key", method="GET")
check(status == 401, f"bad key: {status}")
status, raw = call("no_such_endpoint", {})
check(status == 404 and json.loads(raw)["detail"], f"unknown endpoint: {status}")
table["unknown endpoint"] = [status, json.loads(raw)["detail"]]

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
result(table=table, loss_after=loss, overflow=overflow[:300])
