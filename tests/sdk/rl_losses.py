"""(c) importance_sampling and ppo steps on sampled tokens run and change the weights."""
from tinker import types

from common import ready, MODEL, check, datum, loss_of, result, rl_datum, service

sc = service()
tc = ready(sc.create_lora_training_client(base_model=MODEL, rank=4))
probe = [datum([5, 6, 7], [8, 9])]
scl = ready(tc.save_weights_and_get_sampling_client())
prompt = [11, 12, 13, 14]
out = {}
before = loss_of(tc.forward(probe, "cross_entropy").result())
for loss_fn, adv in (("importance_sampling", 1.0), ("ppo", -1.0)):
    seq = scl.sample(types.ModelInput.from_ints(prompt), 1,
                     types.SamplingParams(max_tokens=4, temperature=1.0, seed=7, stop=[])).result().sequences[0]
    tokens = prompt + list(seq.tokens)
    n = len(tokens) - 1
    lps = [0.0] * (len(prompt) - 1) + list(seq.logprobs)
    advs = [0.0] * (len(prompt) - 1) + [adv] * len(seq.tokens)
    fb = tc.forward_backward([rl_datum(tokens, lps, advs)], loss_fn).result()
    check(len(fb.loss_fn_outputs[0]["logprobs"].tolist()) == n, f"{loss_fn}: logprobs length")
    # Before any update the sampler and the trainer share the weights, so the ratio is 1.
    new_lps = fb.loss_fn_outputs[0]["logprobs"].tolist()[len(prompt) - 1:]
    if loss_fn == "importance_sampling":
        check(all(abs(a - b) < 1e-3 for a, b in zip(new_lps, seq.logprobs)),
              f"trainer logprobs {new_lps} != sampler logprobs {list(seq.logprobs)}")
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    after = loss_of(tc.forward(probe, "cross_entropy").result())
    check(after != before, f"{loss_fn}: the weights did not change ({before} == {after})")
    out[loss_fn] = {"loss": loss_of(fb), "probe_before": before, "probe_after": after}
    before = after
result(**out)
