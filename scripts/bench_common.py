"""What scripts/bench_torch_cuda.py and scripts/bench_vs_torch.py share: their command line and
how they run `twinkle bench` with the same options, so both baselines measure what they claim to.
"""

import argparse
import contextlib
import json
import subprocess
import time


def parser(doc):
    """The argument parser both benchmarks start from: `what`, then the run's shape options."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("what", choices=["train", "sample"])
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--twinkle", help="path of the twinkle binary to compare against")
    p.add_argument("--skip-torch", action="store_true")
    return p


def run_twinkle(a, cmd):
    """Runs `cmd` (`twinkle bench <what> ...` up to its device options) with the run's shape
    options added and returns the JSON object it prints last."""
    if a.what == "train":
        cmd += ["--seq", str(a.seq), "--batch", str(a.batch), "--rank", str(a.rank),
                "--steps", str(a.steps)]
    else:
        cmd += ["--batch", str(a.batch), "--prompt", str(a.prompt),
                "--max-tokens", str(a.max_tokens)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def time_train(a, model, opt, inp, tgt, sync=lambda: None, autocast=contextlib.nullcontext):
    """One warm-up then `a.steps` timed training steps of `model` on `inp` -> `tgt`: a forward
    alone, then forward + summed cross-entropy + backward, then `opt`'s step. `sync` waits for the
    device before each clock read (CUDA is asynchronous); `autocast` makes the context the
    forwards run in. Returns the per-step seconds and tokens/s both baselines report."""
    import torch

    t_fwd = t_fb = t_opt = 0.0
    for step in range(1 + a.steps):
        sync()
        t0 = time.perf_counter()
        with torch.no_grad(), autocast():
            model(input_ids=inp, use_cache=False)
        sync()
        t1 = time.perf_counter()
        with autocast():
            logits = model(input_ids=inp, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                 tgt.reshape(-1), reduction="sum")
        loss.backward()
        del logits, loss
        sync()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        t3 = time.perf_counter()
        if step >= 1:
            t_fwd += t1 - t0
            t_fb += t2 - t1
            t_opt += t3 - t2
    n = a.steps
    toks = a.batch * a.seq
    return {
        "kind": "train", "forward_s": t_fwd / n, "fwd_bwd_s": t_fb / n, "optim_s": t_opt / n,
        "fwd_bwd_tokens_per_s": toks * n / t_fb, "forward_tokens_per_s": toks * n / t_fwd,
        "step_tokens_per_s": toks * n / (t_fb + t_opt),
    }
