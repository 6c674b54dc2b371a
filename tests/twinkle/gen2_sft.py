"""Gen-2 (twinkle-kit 0.5.1) SFT: memorise 4 pre-tokenized (prompt, completion) pairs, then
save -> list runs/checkpoints -> resume_from_checkpoint on a new adapter (same forward_only
loss) -> greedy sampling from saved sampler weights reproduces the completions.

Flow as the upstream Gen-2 cookbooks call it (self_cognition.py / short_math_grpo.py):
init_twinkle_client -> MultiLoraTransformersModel -> add_adapter_to_model(LoraConfig, GA=1) ->
set_template / set_processor / set_loss / set_optimizer -> forward_backward -> clip_grad_and_step
-> calculate_metric -> save(consumed_train_samples) -> resume_from_checkpoint; vLLMSampler.
"""
import math

from common import (check, feature, loss_of, min_token_logp, parse_twinkle_path, result, seq_nll,
                    setup, sft_model, step)

args = setup(__doc__)

from twinkle_client import init_twinkle_client  # noqa: E402
from twinkle_client.sampler import vLLMSampler  # noqa: E402

PAIRS = [
    ([1000, 1001, 1002], [2000, 2001, 2002]),
    ([1100, 1101, 1102], [2100, 2101, 2102]),
    ([1200, 1201, 1202], [2200, 2201, 2202]),
    ([1300, 1301, 1302], [2300, 2301, 2302]),
]
FEATURES = [feature(p, c) for p, c in PAIRS]
# The loss must fall below 10 % of its start within 40 steps; training then goes on (at most 80
# steps) until, measured after the last step, every memorised token has probability > 0.6 and so
# is the greedy argmax. (The adapter's initialisation is random, as in PEFT, so the trajectory
# differs from run to run: a loss threshold measured before the last step was not enough.)
MAX_STEPS, LR = 80, 1e-2

step(f"init_twinkle_client({args.base_url!r})")
client = init_twinkle_client(base_url=args.base_url, api_key=args.token)
caps = client.get_server_capabilities()
names = [m.get("model_name") if isinstance(m, dict) else getattr(m, "model_name", m)
         for m in caps.supported_models]
check(any(args.model_id in str(n) for n in names), f"{args.model_id} not in capabilities {names}")

step("model setup")
model = sft_model(args.model_id, "default", LR)

step("train")
losses = []
for i in range(MAX_STEPS):
    out = model.forward_backward(inputs=FEATURES)
    losses.append(loss_of(out))
    model.clip_grad_and_step()
    if losses[-1] < 0.01 * losses[0] and \
            min_token_logp(model.forward_only(inputs=FEATURES), FEATURES) > math.log(0.6):
        break
steps = len(losses)
print("losses", [round(x, 3) for x in losses], flush=True)
metric = model.calculate_metric(is_training=True).result
print("metric", metric, flush=True)
check(isinstance(metric, dict) and metric, f"calculate_metric gave {metric!r}")

check(min(losses[:40]) < 0.1 * losses[0],
      f"memorisation: the loss did not fall below 10% of {losses[0]:.4f} within 40 steps: {losses[:40]}")
before = model.forward_only(inputs=FEATURES)
nll_before = seq_nll(before, FEATURES)
check(nll_before < 0.1 * losses[0],
      f"memorisation: loss {losses[0]:.4f} -> forward_only nll {nll_before:.4f} after {steps} steps "
      f"(want < 10% of the start)")

step("save + listing")
consumed = steps * len(FEATURES)
saved = model.save(name="sft-final", save_optimizer=True, consumed_train_samples=consumed)
path = saved.twinkle_path
run_id, kind, name = parse_twinkle_path(path)
check(kind == "weights" and name == "sft-final", f"save -> {path}")
runs = client.list_training_runs()
run_ids = [r.training_run_id for r in runs]
check(run_id in run_ids, f"run {run_id} not in list_training_runs {run_ids}")
run = client.get_training_run(run_id)
check(run.training_run_id == run_id and run.is_lora and run.lora_rank == 8, f"get_training_run: {run}")
ckpts = client.list_checkpoints(run_id)
ck = [c for c in ckpts if c.checkpoint_id == "weights/sft-final"]
check(len(ck) == 1 and ck[0].twinkle_path == path,
      f"list_checkpoints({run_id}) = {[(c.checkpoint_id, c.twinkle_path) for c in ckpts]}")
check(client.get_checkpoint_twinkle_path(run_id, "weights/sft-final") == path, "get_checkpoint_path")
info = client.get_weights_info(path)
check(info.training_run_id == run_id and info.is_lora, f"get_weights_info: {info}")

step("resume_from_checkpoint on a new adapter")
model2 = sft_model(args.model_id, "resumed", LR)
fresh = seq_nll(model2.forward_only(inputs=FEATURES), FEATURES)
progress = model2.resume_from_checkpoint(path)
print("resume ->", progress, flush=True)
check(isinstance(progress, dict), f"resume_from_checkpoint result {progress!r}")
check(int(progress.get("cur_step", -1)) == steps, f"cur_step {progress.get('cur_step')} != {steps}")
check(int(progress.get("consumed_train_samples", -1)) == consumed,
      f"consumed_train_samples {progress.get('consumed_train_samples')} != {consumed}")
nll_resumed = seq_nll(model2.forward_only(inputs=FEATURES), FEATURES)
check(abs(nll_resumed - nll_before) <= 1e-3 + 1e-3 * abs(nll_before),
      f"resumed adapter nll {nll_resumed} != saved adapter nll {nll_before} (fresh adapter: {fresh})")

step("greedy sampling from saved sampler weights")
sampler_path = model.save(name="sft-sampler", save_optimizer=False, is_sampler=True).twinkle_path
s_run, s_kind, _ = parse_twinkle_path(sampler_path)
check(s_run == run_id and s_kind == "sampler_weights", f"save(is_sampler=True) -> {sampler_path}")
sampler = vLLMSampler(model_id=args.model_id)
sampler.set_template("Template", model_id=args.model_id)
responses = sampler.sample(
    inputs=[{"input_ids": p} for p, _ in PAIRS],
    sampling_params={"max_tokens": 3, "temperature": 0.0, "num_samples": 1},
    adapter_uri=sampler_path,
)
check(len(responses) == len(PAIRS), f"{len(responses)} sample responses for {len(PAIRS)} prompts")
samples = []
for (p, c), r in zip(PAIRS, responses):
    check(len(r.sequences) == 1, f"prompt {p}: {len(r.sequences)} sequences, wanted 1")
    got = list(r.sequences[0].tokens)
    samples.append(got)
    check(got == c, f"prompt {p}: greedy sample {got}, memorised {c}")

result(first_loss=losses[0], final_loss=losses[-1], nll=nll_before, nll_resumed=nll_resumed,
       steps=steps, run_id=run_id, path=path, sampler_path=sampler_path, samples=samples)
