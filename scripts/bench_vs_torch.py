#!/usr/bin/env python3
"""PyTorch + PEFT baseline for `twinkle bench`, same shapes and thread count, on CPU.

Random-weight Qwen2.5-0.5B-shaped model (optionally fewer layers), f32, eager PyTorch.
  train:  LoRA r=32 (alpha=r) on q,k,v,o,gate,up,down; cross-entropy forward+backward and an
          AdamW step over the LoRA parameters; tokens/s of fwd+bwd (and of the full step).
  sample: batch B random prompts, prefill, then greedy decode with the KV cache (manual loop
          over model(...) with past_key_values), no adapter.
With --twinkle PATH it also runs `PATH bench ... --json` with the same options and prints the
ratio twinkle/torch (>1 means twinkle is faster).

Set up the venv with scripts/setup-bench-venv.sh, then e.g.
  ~/.cache/twinkle/bench-venv/bin/python scripts/bench_vs_torch.py train --layers 4 --seq 512 \
      --threads 2 --twinkle target/release/twinkle
"""

import json
import os
import resource
import sys
import time

import bench_common


def qwen05b_config(layers):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=layers,
        num_attention_heads=14, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6,
        max_position_embeddings=32768, tie_word_embeddings=True, torch_dtype="float32",
        attn_implementation="sdpa", use_cache=True,
    )


def build(layers, lora_rank):
    import torch
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(qwen05b_config(layers)).float()
    if lora_rank:
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=lora_rank, lora_alpha=lora_rank, lora_dropout=0.0,
                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                         "gate_proj", "up_proj", "down_proj"])
        model = get_peft_model(model, cfg)
    return model


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def torch_train(a):
    import torch

    model = build(a.layers, a.rank)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)
    g = torch.Generator().manual_seed(42)
    ids = torch.randint(0, 151936, (a.batch, a.seq + 1), generator=g)
    inp, tgt = ids[:, :-1], ids[:, 1:]
    r = bench_common.time_train(a, model, opt, inp, tgt)
    r.update({"peak_rss_mib": peak_rss_mib(), "loadavg": loadavg()})
    return r


def torch_sample(a):
    import torch

    model = build(a.layers, 0)
    model.eval()
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 151936, (a.batch, a.prompt), generator=g)
    steps = []
    from transformers import DynamicCache

    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(input_ids=ids, past_key_values=DynamicCache(), use_cache=True)
        prefill = time.perf_counter() - t0
        past = out.past_key_values
        nxt = out.logits[:, -1, :].argmax(-1, keepdim=True)
        for _ in range(a.max_tokens):
            t = time.perf_counter()
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1, :].argmax(-1, keepdim=True)
            steps.append(time.perf_counter() - t)
    dec = sum(steps)
    steps.sort()
    return {
        "kind": "sample", "prefill_s": prefill,
        "prefill_tokens_per_s": a.batch * a.prompt / prefill,
        "decode_tokens_per_s": a.batch * len(steps) / dec,
        "step_ms_mean": dec / len(steps) * 1e3, "step_ms_median": steps[len(steps) // 2] * 1e3,
        "peak_rss_mib": peak_rss_mib(), "loadavg": loadavg(),
    }


def run_twinkle(a):
    cmd = [a.twinkle, "bench", a.what, "--layers", str(a.layers), "--threads", str(a.threads),
           "--json"]
    return bench_common.run_twinkle(a, cmd)


def main():
    p = bench_common.parser(__doc__)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    a = p.parse_args()

    rows = {}
    if a.twinkle:
        rows["twinkle"] = run_twinkle(a)
    if not a.skip_torch:
        import torch

        torch.set_num_threads(a.threads)
        rows["torch"] = torch_train(a) if a.what == "train" else torch_sample(a)
        rows["torch"]["version"] = torch.__version__
    keys = (["fwd_bwd_tokens_per_s", "step_tokens_per_s", "forward_tokens_per_s", "forward_s",
             "fwd_bwd_s", "optim_s"] if a.what == "train" else
            ["prefill_tokens_per_s", "decode_tokens_per_s", "step_ms_mean", "step_ms_median"])
    keys += ["peak_rss_mib", "loadavg"]
    shape = (f"seq {a.seq} batch {a.batch} rank {a.rank}" if a.what == "train"
             else f"batch {a.batch} prompt {a.prompt} max_tokens {a.max_tokens}")
    print(f"{a.what}: qwen2.5-0.5b shape, {a.layers} layers, {shape}, {a.threads} threads")
    print(f"{'metric':24}" + "".join(f"{n:>14}" for n in rows) +
          ("   ratio" if len(rows) == 2 else ""))
    for k in keys:
        vals = [r.get(k) for r in rows.values()]
        line = f"{k:24}" + "".join(f"{v:>14.2f}" if isinstance(v, (int, float)) else f"  {v}"
                                  for v in vals)
        if len(rows) == 2 and all(isinstance(v, (int, float)) for v in vals) and vals[1]:
            r = vals[0] / vals[1]
            # Times and latencies: smaller is better, so invert to keep ">1 = twinkle faster".
            if k in ("forward_s", "fwd_bwd_s", "optim_s", "peak_rss_mib") or k.startswith("step_ms"):
                r = 1.0 / r if r else float("nan")
            line += f"  {r:6.2f}x"
        print(line)
    print(json.dumps(rows), file=sys.stderr)


if __name__ == "__main__":
    main()
