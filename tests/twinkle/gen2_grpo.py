"""Gen-2 (twinkle-kit 0.5.1) GRPO round, as cookbook/client/twinkle/short_math_grpo.py does it:
save(is_sampler=True) -> vLLMSampler.sample(inputs, sampling_params{num_samples, logprobs: 1},
adapter_uri) -> new_input_feature + old_logps ([lp[0][1] for lp in seq.logprobs]) ->
forward_backward(inputs, advantages, old_logps) under GRPOLoss(epsilon=0.2) -> clip_grad_and_step.
"""
import math

from common import check, loss_of, lora_config, parse_twinkle_path, result, setup, step

args = setup(__doc__)

from twinkle_client import init_twinkle_client  # noqa: E402
from twinkle_client.model import MultiLoraTransformersModel  # noqa: E402
from twinkle_client.sampler import vLLMSampler  # noqa: E402

PROMPTS = [[1000, 1001, 1002, 1003], [1500, 1501, 1502]]
NUM_GENERATIONS, MAX_TOKENS = 4, 4

step(f"init_twinkle_client({args.base_url!r})")
client = init_twinkle_client(base_url=args.base_url, api_key=args.token)
model = MultiLoraTransformersModel(model_id=args.model_id)
model.add_adapter_to_model("grpo", lora_config(), gradient_accumulation_steps=1)
model.set_loss("GRPOLoss", epsilon=0.2, beta=0.0)
model.set_optimizer("AdamW", lr=1e-2)
model.set_processor("InputProcessor")
model.set_template("Template", model_id=args.model_id)
sampler = vLLMSampler(model_id=args.model_id)
sampler.set_template("Template", model_id=args.model_id)

step("save(is_sampler=True)")
saved = model.save(name="grpo-sampler-weights", save_optimizer=False, is_sampler=True)
_, kind, _ = parse_twinkle_path(saved.twinkle_path)
check(kind == "sampler_weights", f"save(is_sampler=True) -> {saved.twinkle_path}")

step("sample")
responses = sampler.sample(
    inputs=[{"input_ids": p} for p in PROMPTS],
    sampling_params={"max_tokens": MAX_TOKENS, "temperature": 1.0, "top_p": 1.0, "seed": 7,
                     "num_samples": NUM_GENERATIONS, "logprobs": 1},
    adapter_uri=saved.twinkle_path,
)
check(len(responses) == len(PROMPTS), f"{len(responses)} sample responses for {len(PROMPTS)} prompts")
features, old_logps, lengths = [], [], []
for prompt, resp in zip(PROMPTS, responses):
    check(len(resp.sequences) == NUM_GENERATIONS,
          f"prompt {prompt}: {len(resp.sequences)} sequences, sampling_params.num_samples={NUM_GENERATIONS}")
    for seq in resp.sequences:
        toks = list(seq.tokens)
        check(1 <= len(toks) <= MAX_TOKENS, f"{len(toks)} tokens for max_tokens={MAX_TOKENS}")
        check(seq.logprobs is not None and len(seq.logprobs) == len(toks),
              f"logprobs {seq.logprobs!r:.200} for {len(toks)} tokens")
        for t, lp in zip(toks, seq.logprobs):
            check(lp is not None and len(lp) >= 1 and lp[0][0] == t and lp[0][1] <= 1e-6,
                  f"logprobs entry {lp!r} for sampled token {t} (logprobs=1: [[token, logprob]])")
        f = seq.new_input_feature
        check(isinstance(f, dict) and f.get("input_ids") == prompt + toks,
              f"new_input_feature.input_ids {f and f.get('input_ids')} != prompt + tokens {prompt + toks}")
        labels = f.get("labels")
        check(isinstance(labels, list) and len(labels) == len(f["input_ids"]),
              f"new_input_feature.labels {labels}")
        check([l for l in labels if l != -100] == toks,
              f"new_input_feature.labels {labels}: the labelled positions should be the completion {toks}")
        check(labels[-1] == -100 and labels.index(toks[0]) == len(prompt) - 1,
              f"labels {labels} are not rolled (labels[i] = input_ids[i+1])")
        features.append(f)
        old_logps.append([lp[0][1] for lp in seq.logprobs])
        lengths.append(len(toks))

# Group-relative advantages with zero mean per group (fixed +1/-1: the test is about the wire).
advantages = []
for _ in PROMPTS:
    advantages += [1.0 if i % 2 == 0 else -1.0 for i in range(NUM_GENERATIONS)]

step("forward_backward(advantages, old_logps)")
out = model.forward_backward(inputs=features, advantages=advantages, old_logps=old_logps)
loss = loss_of(out)
res = out.result
logps = res.get("logps") if isinstance(res, dict) else None
max_diff = None
if logps is not None:
    # On-policy: the trainer's logprobs of the sampled tokens match the sampler's.
    check(len(logps) == len(features), f"{len(logps)} logps rows for {len(features)} inputs")
    max_diff = 0.0
    for row, f, old in zip(logps, features, old_logps):
        if len(row) == len(f["labels"]):
            row = [v for v, l in zip(row, f["labels"]) if l != -100]
        check(len(row) == len(old), f"logps row {row} vs old_logps {old}")
        max_diff = max([max_diff] + [abs(float(a) - float(b)) for a, b in zip(row, old)])
    check(max_diff < 0.1, f"trainer logps differ from the sampler's by {max_diff} (same weights)")
check(math.isfinite(loss), f"GRPO loss {loss}")
# Ratio 1 everywhere and |advantage| = 1: the clipped surrogate's magnitude is at most 1.
check(abs(loss) <= 1.0 + 1e-3, f"on-policy GRPO loss with advantages of +-1 should be in [-1, 1], got {loss}")
model.clip_grad_and_step()
metric = model.calculate_metric(is_training=True).result
print("metric", metric, flush=True)

step("second forward_backward after the step")
out2 = model.forward_backward(inputs=features, advantages=advantages, old_logps=old_logps)
loss2 = loss_of(out2)
model.zero_grad()
# The step moved the policy in the advantages' direction: the completion logprobs of the
# advantage +1 sequences rose relative to those of the -1 sequences.
res2 = out2.result
logps2 = res2.get("logps") if isinstance(res2, dict) else None
moved = None
if logps2 is not None:
    deltas = {1.0: [], -1.0: []}
    for row, f, old, adv in zip(logps2, features, old_logps, advantages):
        if len(row) == len(f["labels"]):
            row = [v for v, l in zip(row, f["labels"]) if l != -100]
        deltas[adv].append(sum(float(a) - float(b) for a, b in zip(row, old)) / len(old))
    moved = sum(deltas[1.0]) / len(deltas[1.0]) - sum(deltas[-1.0]) / len(deltas[-1.0])
    print(f"mean logprob change: advantage +1 minus advantage -1 = {moved}", flush=True)
    check(moved > 0, f"after clip_grad_and_step the advantage +1 sequences did not gain on the -1 ones ({moved})")
else:
    check(loss2 != loss, f"GRPO loss unchanged after clip_grad_and_step ({loss})")

result(loss=loss, loss_after_step=loss2, moved=moved, max_logp_diff=max_diff, sequences=len(features),
       lengths=lengths, metric=metric)
