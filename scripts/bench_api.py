#!/usr/bin/env python3
"""API overhead of the Tinker front: forward_backward + optim_step through the real SDK versus
the engine's own compute for the same two calls. Starts its own `twinkle serve` on
config/quickstart.yaml (generated qwen3-tiny, CPU).

Usage: $TWINKLE_VENV/bin/python scripts/bench_api.py [--bin target/release/twinkle] [--iters 30]
Prints p50/p90 of the SDK round trip and of the same two calls sent straight to the model
application, and the paired overhead: per SDK iteration, its wall time minus the engine compute
of its two calls as the model application logged it (`compute done`, no HTTP or JSON), split into
the front (SDK + gateway + server: SDK wall minus the server's job time) and the server->model hop
(job time minus compute). Goal: overhead p50 <= 10 ms.
"""
import argparse
import json
import os
import pathlib
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import tinker
from tinker import types

ROOT = pathlib.Path(__file__).resolve().parent.parent


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url, body, token):
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", "X-Twinkle-Internal": token})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=str(ROOT / "target/debug/twinkle"))
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--seq", type=int, default=64, help="tokens per datum")
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="twinkle-bench-")
    port = free_port()
    cfg = (ROOT / "config/quickstart.yaml").read_text().replace("port: 8000", f"port: {port}")
    cfg_path = pathlib.Path(tmp, "cfg.yaml")
    cfg_path.write_text(cfg)
    token = os.urandom(16).hex()
    env = dict(os.environ, TWINKLE_HOME=f"{tmp}/home", TWINKLE_SAVE_DIR=f"{tmp}/save",
               TWINKLE_INTERNAL_TOKEN=token, NO_PROXY="127.0.0.1", TINKER_TELEMETRY="0")
    log = open(f"{tmp}/serve.log", "w")
    serve = subprocess.Popen([args.bin, "serve", "--config", str(cfg_path), "--log-level", "info,twinkle::apps::server=debug,twinkle::apps::model::http=debug"], env=env, stdout=log,
                             stderr=log, start_new_session=True)
    try:
        model_addr = None
        for _ in range(600):
            time.sleep(0.2)
            st = subprocess.run([args.bin, "status", "--json"], env=env, capture_output=True, text=True)
            if st.returncode == 0:
                apps = json.loads(st.stdout)["applications"]
                if all(a["state"] == "running" for a in apps):
                    model_addr = next(a["address"] for a in apps if a["import_path"] == "model")
                    break
        if model_addr is None:
            sys.exit(f"serve did not come up; log in {tmp}/serve.log")
        base = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                urllib.request.urlopen(base + "/api/v1/healthz", timeout=2)
                break
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.2)

        seqs = [[(1000 + 37 * b + 13 * i) % 150000 for i in range(args.seq + 1)] for b in range(args.batch)]
        adam = {"learning_rate": 1e-4, "beta1": 0.9, "beta2": 0.95, "eps": 1e-12,
                "weight_decay": 0.0, "grad_clip_norm": 0.0}

        # SDK path.
        sc = tinker.ServiceClient(base_url=base, api_key="tml-bench")
        tc = sc.create_lora_training_client(base_model="qwen3-tiny", rank=8)
        tc = tc.result() if hasattr(tc, "result") and not hasattr(type(tc), "forward_backward") else tc
        batch = [types.Datum(model_input=types.ModelInput.from_ints(s[:-1]),
                             loss_fn_inputs={"target_tokens": s[1:], "weights": [1.0] * args.seq})
                 for s in seqs]
        sdk = []
        for i in range(args.iters + 3):
            t = time.perf_counter()
            fb = tc.forward_backward(batch, "cross_entropy")
            op = tc.optim_step(types.AdamParams(**adam))
            fb.result()
            op.result()
            if i >= 3:
                sdk.append((time.perf_counter() - t) * 1e3)

        # Direct path: the model application alone.
        url = f"http://{model_addr}/_internal/v1/"
        post(url + "create_adapter", {"model_id": "bench:train:0", "rank": 8, "train_attn": True,
                                      "train_mlp": True, "train_unembed": True}, token)
        data = [{"tokens": s[:-1], "target_tokens": s[1:], "k": 1, "weights": [1.0] * args.seq} for s in seqs]
        direct = []
        for i in range(args.iters + 3):
            t = time.perf_counter()
            post(url + "forward_backward", {"model_id": "bench:train:0", "forward_only": False,
                                            "loss_fn": "cross_entropy", "loss_config": {}, "data": data}, token)
            post(url + "optim_step", {"model_id": "bench:train:0", "adam_params": adam}, token)
            if i >= 3:
                direct.append((time.perf_counter() - t) * 1e3)

        # Server-side compute per SDK iteration (the model app's time for both calls, from the
        # server's debug log): the SDK wall time minus it is the front's + SDK's own overhead,
        # robust to the compute-time noise of a shared machine.
        import re
        jobs = [float(m.group(1)) for m in re.finditer(r'job done .*?ms=([0-9.]+)',
                                                      pathlib.Path(tmp, "serve.log").read_text())]
        jobs = jobs[-2 * len(sdk):]
        per_iter = [jobs[2 * i] + jobs[2 * i + 1] for i in range(len(sdk))]
        paired = [a - b for a, b in zip(sdk, per_iter)]
        # Engine compute of the SDK phase's calls (the direct phase's come after them).
        compute = [float(m.group(1)) for m in re.finditer(
            r'compute done route="(?:forward_backward|optim_step)" ms=([0-9.]+)',
            pathlib.Path(tmp, "serve.log").read_text())]
        compute = compute[:2 * (args.iters + 3)][-2 * len(sdk):]
        engine = [compute[2 * i] + compute[2 * i + 1] for i in range(len(sdk))]
        total = [a - b for a, b in zip(sdk, engine)]
        hop = [a - b for a, b in zip(per_iter, engine)]
        report = {
            "batch": args.batch, "tokens_per_datum": args.seq, "iters": args.iters, "binary": args.bin,
            "sdk_ms": {"p50": statistics.median(sdk), "p90": pct(sdk, 0.9)},
            "direct_ms": {"p50": statistics.median(direct), "p90": pct(direct, 0.9)},
            "overhead_p50_ms": statistics.median(sdk) - statistics.median(direct),
            "server_compute_ms": {"p50": statistics.median(per_iter)},
            "engine_compute_ms": {"p50": statistics.median(engine)},
            "overhead_vs_engine_ms": {"p50": statistics.median(total), "p90": pct(total, 0.9)},
            "front_ms": {"p50": statistics.median(paired), "p90": pct(paired, 0.9)},
            "server_to_model_hop_ms": {"p50": statistics.median(hop), "p90": pct(hop, 0.9)},
        }
        report["serve_log"] = f"{tmp}/serve.log"
        print(json.dumps(report, indent=2))
    finally:
        os.killpg(serve.pid, 15)
        serve.wait(timeout=60)


if __name__ == "__main__":
    main()
