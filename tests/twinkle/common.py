"""Shared helpers of the twinkle-native client scripts (run by tests/twinkle_kit.rs).

The scripts drive the server with the UNMODIFIED PyPI clients: twinkle-kit 0.5.1 (gen2_*.py,
TWINKLE_KIT05_PYTHON) and twinkle-kit 0.1.3 (gen1_*.py, TWINKLE_KIT01_PYTHON), both from
scripts/setup-twinkle-venv.sh.

Usage (every script):  python tests/twinkle/<script>.py --base-url http://127.0.0.1:PORT
    [--model-id qwen3-tiny] [--token tok-a] [--second-token tok-b] [--data-file rows.jsonl]
Defaults come from env: TWINKLE_BASE_URL, TWINKLE_MODEL_ID, TWINKLE_TOKEN, TWINKLE_SECOND_TOKEN.

`setup()` must run before anything imports `twinkle` / `twinkle_client`: it exports
TWINKLE_SERVER_URL / TWINKLE_SERVER_TOKEN (0.1.3 reads them at import time for its heartbeat
threads, whose ContextVars do not see init_twinkle_client's values) and moves into a temp dir
(importing twinkle.utils creates ./.locks).

Each script prints `STEP ...` progress lines, `CHECK FAILED: ...` on a failed assertion (exit 1),
and one `RESULT {json}` line on success.
"""
import argparse
import json
import math
import os
import sys
import tempfile
import traceback

ARGS = None


def setup(description=""):
    global ARGS
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--base-url", default=os.environ.get("TWINKLE_BASE_URL", "http://127.0.0.1:8000"))
    p.add_argument("--model-id", default=os.environ.get("TWINKLE_MODEL_ID", "qwen3-tiny"),
                   help="the served model as the client names it (Gen-2: URL segment after /model/)")
    p.add_argument("--token", default=os.environ.get("TWINKLE_TOKEN", "tok-kit-a"))
    p.add_argument("--second-token", default=os.environ.get("TWINKLE_SECOND_TOKEN", "tok-kit-b"))
    p.add_argument("--data-file", default=os.environ.get("TWINKLE_DATA_FILE"),
                   help="Gen-1: a local .jsonl for the processor Dataset (written here when unset)")
    ARGS = p.parse_args()
    ARGS.base_url = ARGS.base_url.rstrip("/")
    os.environ["TWINKLE_SERVER_URL"] = ARGS.base_url
    os.environ["TWINKLE_SERVER_TOKEN"] = ARGS.token
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
    os.environ.setdefault("no_proxy", "127.0.0.1,localhost")
    os.chdir(tempfile.mkdtemp(prefix="twinkle-kit-"))
    sys.excepthook = _excepthook
    return ARGS


def _excepthook(kind, value, tb):
    """Uncaught exceptions: the traceback plus a one-line hint of what kind of failure it is."""
    traceback.print_exception(kind, value, tb)
    name = kind.__name__
    if name in ("ConnectionError", "ConnectTimeout", "ReadTimeout") or "Connection" in name:
        hint = "no server answered at " + (ARGS.base_url if ARGS else "?")
    elif name in ("ImportError", "ModuleNotFoundError", "AttributeError", "TypeError"):
        hint = "client-side error (wrong client version or call signature?)"
    else:
        hint = "server answer rejected (status/detail above)"
    print(f"SCRIPT FAILED: {name}: {hint}", file=sys.stderr, flush=True)
    sys.stderr.flush()
    os._exit(1)


def step(msg):
    print("STEP " + msg, flush=True)


def check(cond, msg):
    if not cond:
        print("CHECK FAILED: " + msg, file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)


def result(**kw):
    """Prints the result line and ends the process at once (the clients' heartbeat threads and
    torch teardown must not turn a finished script into a failure)."""
    print("RESULT " + json.dumps(kw, default=str), flush=True)
    sys.stderr.flush()
    os._exit(0)


def http_error(fn, *args, **kwargs):
    """Calls fn and expects an HTTP error answer. Returns (status, detail); (None, None) when the
    call succeeded. Gen-2 raises requests.HTTPError (with .response) from http_get/http_post;
    TwinkleClientError carries 'status N: detail' in its message; Gen-1 raise_for_status() raises
    requests.HTTPError too."""
    import re
    try:
        fn(*args, **kwargs)
    except StopIteration:
        return 410, "StopIteration"
    except Exception as e:  # noqa: BLE001 - any client error type
        resp = getattr(e, "response", None)
        if resp is not None:
            try:
                detail = resp.json().get("detail")
            except Exception:  # noqa: BLE001
                detail = resp.text
            return resp.status_code, detail if isinstance(detail, str) else json.dumps(detail)
        m = re.search(r"status (\d{3}): ?(.*)", str(e), re.S)
        if m:
            return int(m.group(1)), m.group(2)
        raise
    return None, None


def expect_4xx(label, fn, *args, must_name=None, **kwargs):
    """fn must fail with a 4xx whose `detail` is a non-empty string (containing `must_name`)."""
    status, detail = http_error(fn, *args, **kwargs)
    print(f"REFUSED {label}: {status} {detail!r}"[:400], flush=True)
    check(status is not None, f"{label}: expected a 4xx, the call succeeded")
    check(400 <= status < 500, f"{label}: expected a 4xx, got {status}: {detail}")
    check(isinstance(detail, str) and detail.strip(), f"{label}: 4xx without a `detail`")
    if must_name is not None:
        check(must_name in detail, f"{label}: detail should name {must_name!r}: {detail!r}")
    return status


def feature(prompt, completion):
    """An InputFeature with rolled labels: labels[i] is the target of position i, i.e.
    input_ids[i+1] where that token belongs to the completion, -100 elsewhere (prompt positions
    and the last position)."""
    ids = list(prompt) + list(completion)
    labels = [-100] * len(ids)
    for i in range(len(prompt) - 1, len(ids) - 1):
        labels[i] = ids[i + 1]
    return {"input_ids": ids, "labels": labels}


def loss_of(res):
    """The `loss` of a forward_backward result (Gen-2 `.result`, Gen-1 the returned dict)."""
    if hasattr(res, "result"):
        res = res.result
    check(isinstance(res, dict) and "loss" in res, f"forward_backward result without a loss: {res!r:.300}")
    loss = float(res["loss"])
    check(math.isfinite(loss), f"loss is not finite: {res['loss']!r}")
    return loss


def seq_nll(res, features):
    """Mean negative log-likelihood over the labelled positions, from a forward/forward_only/
    forward_backward result's `logps` (one list per input; aligned with input_ids, or holding
    only the labelled positions)."""
    if hasattr(res, "result"):
        res = res.result
    check(isinstance(res, dict) and isinstance(res.get("logps"), list),
          f"result without `logps`: {res!r:.300}")
    logps = res["logps"]
    check(len(logps) == len(features), f"{len(logps)} logps rows for {len(features)} inputs")
    total, n = 0.0, 0
    for row, f in zip(logps, features):
        mask = [l != -100 for l in f["labels"]]
        if len(row) == len(mask):
            vals = [v for v, m in zip(row, mask) if m]
        else:
            check(len(row) == sum(mask), f"logps row of {len(row)} for {len(mask)} positions "
                  f"({sum(mask)} labelled)")
            vals = row
        total -= sum(float(v) for v in vals)
        n += len(vals)
    return total / max(n, 1)


def min_token_logp(res, features):
    """The smallest log-probability of a labelled target token in a forward_only result: above
    log(0.5) every target is its position's greedy argmax (no other token can be likelier)."""
    if hasattr(res, "result"):
        res = res.result
    logps = res["logps"]
    worst = 0.0
    for row, f in zip(logps, features):
        mask = [l != -100 for l in f["labels"]]
        vals = [v for v, m in zip(row, mask) if m] if len(row) == len(mask) else row
        worst = min([worst] + [float(v) for v in vals])
    return worst


def lora_config():
    """Every linear layer plus the output head. PEFT's "all-linear" leaves lm_head out, and the
    generated tiny model's random head caps how far LoRA on the other layers can move its logits
    (about 1.3 nats), so memorisation needs LoRA on lm_head too (listed explicitly, as in PEFT).
    A regular expression (PEFT matches a string against whole module names) rather than a list:
    PEFT turns a list into a set, which twinkle-kit 0.1.3's serializer cannot encode."""
    from peft import LoraConfig
    return LoraConfig(r=8, lora_alpha=32,
                      target_modules=r".*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)|lm_head")


def sft_model(model_id, adapter, lr):
    """A Gen-2 model client with adapter `adapter` set up for SFT as the Gen-2 cookbooks do: the
    served chat template, the default processor, cross-entropy and AdamW at `lr`."""
    from twinkle_client.model import MultiLoraTransformersModel  # the client, after setup()
    m = MultiLoraTransformersModel(model_id=model_id)
    m.add_adapter_to_model(adapter, lora_config(), gradient_accumulation_steps=1)
    m.set_template("Template", model_id=model_id)
    m.set_processor("InputProcessor")
    m.set_loss("CrossEntropyLoss")
    m.set_optimizer("AdamW", lr=lr)
    return m


def parse_twinkle_path(path):
    """twinkle://<run_id>/<weights|sampler_weights>/<name> -> (run_id, kind, name)."""
    check(isinstance(path, str) and path.startswith("twinkle://"), f"not a twinkle:// path: {path!r}")
    parts = path[len("twinkle://"):].split("/")
    check(len(parts) == 3 and parts[1] in ("weights", "sampler_weights"),
          f"twinkle path should be twinkle://<run>/<weights|sampler_weights>/<name>: {path!r}")
    return parts[0], parts[1], parts[2]
