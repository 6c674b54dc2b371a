#!/usr/bin/env python3
"""PyTorch + PEFT / HF generate baseline for `twinkle bench ... --device cuda`, same shapes, on GPU 0.

Random-weight Qwen2.5 shapes (0.5B or 7B, optionally fewer layers), bf16, sdpa attention.
  train:  LoRA r=32 (alpha=r) on q,k,v,o,gate,up,down; cross-entropy (sum) forward+backward and
          an AdamW step over the LoRA parameters; tokens/s and MFU of fwd+bwd.
  sample: batch B random prompts, HF generate greedy (do_sample=False) of --max-tokens new tokens
          with the KV cache, no adapter; prefill timed separately; decode tokens/s.
Prints one JSON object per run. With --twinkle PATH it also runs `PATH bench ... --device cuda
--json` with the same options and prints the ratio (twinkle / torch for throughput: >1 means
twinkle is faster).

  python3 scripts/bench_torch_cuda.py train --shape qwen2.5-7b --seq 2048 --twinkle gpu-bundle/twinkle
"""

import json
import subprocess
import sys
import time

import bench_common

SHAPES = {
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         tie_word_embeddings=True),
    "qwen2.5-7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       tie_word_embeddings=False),
    # the benchmarks' code paths at a size the CPU execution layer (tools/cuda-emu) runs quickly
    "tiny": dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
}
# dense bf16 FLOP/s and HBM bytes/s by GPU name (as src/bench/cuda.rs)
PEAKS = [("H200", 989e12, 4.8e12), ("H100 PCIE", 756e12, 2.0e12), ("H100 NVL", 835e12, 3.9e12),
         ("H100", 989.4e12, 3.35e12), ("A100", 312e12, 2.0e12)]


def peaks(name):
    n = name.upper()
    for key, f, b in PEAKS:
        if all(part in n for part in key.split()):
            return f, b
    return None, None


def build(a, lora_rank):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    shape = dict(SHAPES[a.shape])
    if a.layers:
        shape["num_hidden_layers"] = a.layers
    cfg = Qwen2Config(**shape, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=32768,
                      attn_implementation="sdpa", use_cache=True)
    torch.manual_seed(0)
    # initialise directly in bf16 on the GPU (a 7B model in f32 on the host takes minutes)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = Qwen2ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    if lora_rank:
        from peft import LoraConfig, get_peft_model

        lc = LoraConfig(r=lora_rank, lora_alpha=lora_rank, lora_dropout=0.0,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                        "gate_proj", "up_proj", "down_proj"])
        model = get_peft_model(model, lc)
        for p in model.parameters():  # LoRA master weights in f32, as twinkle's
            if p.requires_grad:
                p.data = p.data.float()
    return model, cfg


def train_flops_per_token(cfg, seq, lora_params):
    """4N + 3 attn + 6 P_lora (perf-anchors §1.2/§1.4), N = linears + LM head."""
    h, i, l, v = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    hd = h // cfg.num_attention_heads
    qd, kvd = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    n = l * (h * qd + 2 * h * kvd + qd * h + 3 * h * i) + v * h
    attn = 4 * l * qd * seq / 2
    return 4 * n + 3 * attn + 6 * lora_params, n


def torch_train(a):
    import torch

    model, cfg = build(a, a.rank)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)
    g = torch.Generator().manual_seed(42)
    ids = torch.randint(0, cfg.vocab_size, (a.batch, a.seq + 1), generator=g).cuda()
    inp, tgt = ids[:, :-1], ids[:, 1:]
    r = bench_common.time_train(a, model, opt, inp, tgt, sync=torch.cuda.synchronize,
                                autocast=lambda: torch.autocast("cuda", dtype=torch.bfloat16))
    lora_params = sum(p.numel() for p in params)
    fpt, _ = train_flops_per_token(cfg, a.seq, lora_params)
    peak, _ = peaks(torch.cuda.get_device_name(0))
    achieved = fpt * a.batch * a.seq / r["fwd_bwd_s"]
    r.update({
        "device": "cuda", "gpu": torch.cuda.get_device_name(0), "train_tflops": achieved / 1e12,
        "mfu_fwd_bwd": achieved / peak if peak else None,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
    })
    return r


def torch_sample(a):
    import torch

    model, cfg = build(a, 0)
    model.eval()
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, cfg.vocab_size, (a.batch, a.prompt), generator=g).cuda()
    mask = torch.ones_like(ids)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None, attention_mask=mask)
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kw)  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        torch.cuda.synchronize()
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=a.max_tokens, min_new_tokens=a.max_tokens, **kw)
        torch.cuda.synchronize()
        total = time.perf_counter() - t0
    new = out.shape[1] - a.prompt
    decode = max(total - prefill, 1e-9)
    return {
        "kind": "sample", "device": "cuda", "gpu": torch.cuda.get_device_name(0),
        "batch": a.batch, "prompt": a.prompt, "max_tokens": new, "prefill_s": prefill,
        "decode_tokens_per_s": a.batch * max(new - 1, 1) / decode,
        "step_ms_mean": decode / max(new - 1, 1) * 1e3,
    }


def run_twinkle(a):
    cmd = [a.twinkle, "bench", a.what, "--device", "cuda", "--shape", a.shape, "--json"]
    if a.layers:
        cmd += ["--layers", str(a.layers)]
    return bench_common.run_twinkle(a, cmd)


def main():
    p = bench_common.parser(__doc__)
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    p.add_argument("--layers", type=int, default=0, help="0 = the shape's own")
    a = p.parse_args()
    res = {"what": a.what, "shape": a.shape}
    # twinkle first, before torch holds GPU memory in this process
    if a.twinkle:
        try:
            res["twinkle"] = run_twinkle(a)
        except subprocess.CalledProcessError as e:
            res["twinkle_error"] = (e.stderr or "")[-2000:]
    if not a.skip_torch:
        try:
            res["torch"] = torch_train(a) if a.what == "train" else torch_sample(a)
        except Exception as e:  # keep twinkle's numbers when the baseline fails (e.g. OOM)
            res["torch_error"] = repr(e)[-2000:]
    if "torch" in res and "twinkle" in res:
        key = "fwd_bwd_tokens_per_s" if a.what == "train" else "decode_tokens_per_s"
        res["ratio_twinkle_over_torch"] = res["twinkle"][key] / res["torch"][key]
    print(json.dumps(res))
    sys.stdout.flush()
    # A failed twinkle side fails the step (gpu-check counts it); a failed baseline does not.
    if "twinkle_error" in res:
        sys.exit(1)


if __name__ == "__main__":
    main()
