"""Shared helpers of the SDK acceptance scripts (run by tests/tinker_sdk.rs with the venv python).

Environment: TWINKLE_BASE_URL (the gateway), TINKER_API_KEY, TWINKLE_MODEL (the served base model).
Each script prints one line `RESULT {json}` that the Rust test parses.
"""
import json
import os
import sys

import tinker
from tinker import types

BASE_URL = os.environ["TWINKLE_BASE_URL"]
MODEL = os.environ.get("TWINKLE_MODEL", "qwen3-tiny")


def service(api_key=None):
    return tinker.ServiceClient(base_url=BASE_URL, api_key=api_key or os.environ["TINKER_API_KEY"])


def datum(prompt, completion):
    """A cross-entropy datum: predict `completion` after `prompt` (token ids)."""
    seq = list(prompt) + list(completion)
    inputs, targets = seq[:-1], seq[1:]
    weights = [0.0] * (len(prompt) - 1) + [1.0] * len(completion)
    return types.Datum(
        model_input=types.ModelInput.from_ints(inputs),
        loss_fn_inputs={"target_tokens": targets, "weights": weights},
    )


def rl_datum(tokens, sampler_logprobs, advantages):
    inputs, targets = tokens[:-1], tokens[1:]
    return types.Datum(
        model_input=types.ModelInput.from_ints(inputs),
        loss_fn_inputs={"target_tokens": targets, "logprobs": sampler_logprobs, "advantages": advantages},
    )


def loss_of(out):
    return float(out.metrics["loss:sum"])


def train_steps(tc, batch, n):
    """`n` cross-entropy steps (forward_backward, then AdamW at lr 5e-3) on `batch`; their losses."""
    out = []
    for _ in range(n):
        fb = tc.forward_backward(batch, "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=5e-3)).result()
        out.append(loss_of(fb.result()))
    return out


def result(**kw):
    """Prints the result line and ends the process at once: every check has passed by then, and
    interpreter teardown with the SDK's background threads and torch loaded occasionally aborts
    (SIGABRT, nothing on stderr) on a loaded machine, which would fail a finished script."""
    print("RESULT " + json.dumps(kw), flush=True)
    sys.stderr.flush()
    os._exit(0)


def check(cond, msg):
    if not cond:
        print("CHECK FAILED: " + msg, file=sys.stderr, flush=True)
        sys.exit(1)


def ready(x):
    """Client-creation methods of SDK 0.38 return a future-like proxy; resolve it to the client."""
    if "Future" in type(x).__name__ or (hasattr(x, "result") and not hasattr(type(x), "forward_backward")
                                         and not hasattr(type(x), "sample")):
        return x.result()
    return x
