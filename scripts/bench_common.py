"""What scripts/bench_torch_cuda.py and scripts/bench_vs_torch.py share: their command line and
how they run `twinkle bench` with the same options, so both baselines measure what they claim to.
"""

import argparse
import json
import subprocess


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
