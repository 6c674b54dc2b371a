"""(e) Two API keys: B cannot list, load or delete A's checkpoints; path traversal and absolute
paths are refused with a user error."""
import json
import os
import urllib.error
import urllib.request

import tinker

from common import ready, BASE_URL, MODEL, check, result, service

key_a, key_b = os.environ["TINKER_API_KEY"], os.environ["TWINKLE_SECOND_KEY"]
sa, sb = service(key_a), service(key_b)
ta = ready(sa.create_lora_training_client(base_model=MODEL, rank=4))
path = ta.save_state("mine").result().path
rb = tinker.RestClient(base_url=BASE_URL, api_key=key_b)
refused = {}


def expect_error(name, fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - any SDK error class is a refusal
        refused[name] = type(e).__name__
        return
    check(False, f"{name}: B was allowed")


expect_error("list", lambda: rb.list_checkpoints(ta.model_id).result())
expect_error("get_run", lambda: rb.get_training_run(ta.model_id).result())
expect_error("load", lambda: ready(sb.create_training_client_from_state(path)))
expect_error("delete", lambda: rb.delete_checkpoint_from_tinker_path(path).result())
runs_b = [r.training_run_id for r in rb.list_training_runs().result().training_runs]
check(ta.model_id not in runs_b, "B lists A's run")
ra = tinker.RestClient(base_url=BASE_URL, api_key=key_a)
ids = [c.checkpoint_id for c in ra.list_checkpoints(ta.model_id).result().checkpoints]
check(ids == ["weights/mine"], f"A's checkpoint was touched: {ids}")


def post(path_, body, key=key_a):
    req = urllib.request.Request(BASE_URL + "/api/v1/" + path_, data=json.dumps(body).encode(),
                                 headers={"X-API-Key": key, "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


traversal = {}
for bad in ["tinker://../../etc/weights/x", "/etc/passwd", "tinker://a/weights/../../x",
            "tinker://" + ta.model_id + "/weights/..", "file:///etc/passwd"]:
    status, body = post("load_weights", {"model_id": ta.model_id, "path": bad, "seq_id": 99, "optimizer": False})
    check(400 <= status < 500 and "detail" in body, f"{bad}: status {status} body {body}")
    traversal[bad] = status
    try:
        ready(sa.create_training_client_from_state(bad))
        check(False, f"SDK load of {bad} succeeded")
    except Exception as e:  # noqa: BLE001
        refused["sdk:" + bad] = type(e).__name__
result(refused=refused, traversal=traversal)
