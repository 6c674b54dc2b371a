"""(a) The minimal flow of specs/tinker-protocol.md §2 through the unmodified SDK."""
import os
import warnings

import tinker
from tinker import types

from common import ready, BASE_URL, MODEL, check, datum, loss_of, result, service

warnings.simplefilter("ignore", FutureWarning)
sc = service()
caps = sc.get_server_capabilities()
names = [m.model_name for m in caps.supported_models]
check(MODEL in names, f"{MODEL} not in capabilities {names}")

tc = ready(sc.create_lora_training_client(base_model=MODEL, rank=4))
info = tc.get_info()
check(info.model_data.model_name == MODEL, f"get_info model_name {info.model_data.model_name}")

batch = [datum([1, 2, 3, 4], [5, 6]), datum([7, 8, 9], [10, 11, 12])]
fb = tc.forward_backward(batch, "cross_entropy").result()
check(len(fb.loss_fn_outputs) == 2, "two outputs")
lp0 = fb.loss_fn_outputs[0]["logprobs"].tolist()
check(len(lp0) == 5, f"datum 0 has 5 logprobs, got {len(lp0)}")
first = loss_of(fb)
# loss:sum = -sum(weights * logprobs)
manual = -sum(w * l for o, d in zip(fb.loss_fn_outputs, batch)
              for w, l in zip(d.loss_fn_inputs["weights"].tolist(), o["logprobs"].tolist()))
check(abs(manual - first) < 1e-3 * max(1.0, abs(first)), f"loss:sum {first} != -sum(w*lp) {manual}")
tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()

fwd = tc.forward(batch, "cross_entropy").result()
after = loss_of(fwd)
check(after < first, f"loss did not drop after one step: {first} -> {after}")

state_path = tc.save_state("ckpt-1").result().path
check(state_path.endswith("/weights/ckpt-1"), state_path)
sampler_path = tc.save_weights_for_sampler("s-1").result().path
check(sampler_path.endswith("/sampler_weights/s-1"), sampler_path)

scl = ready(tc.save_weights_and_get_sampling_client())
prompt = types.ModelInput.from_ints([1, 2, 3])
params = types.SamplingParams(max_tokens=4, temperature=0.0, stop=[])
s = scl.sample(prompt, 2, params).result()
check(len(s.sequences) == 2, "two sequences")
check(all(len(q.tokens) == 4 for q in s.sequences), "max_tokens=4 with stop=[] gives 4 tokens")
check(s.sequences[0].tokens == s.sequences[1].tokens, "greedy samples agree")
check(len(s.sequences[0].logprobs) == 4, "one logprob per token")
lps = scl.compute_logprobs(types.ModelInput.from_ints([1, 2, 3, 4])).result()
check(lps[0] is None and all(isinstance(x, float) and x <= 0 for x in lps[1:]), f"compute_logprobs {lps}")

# The named sampler checkpoint holds the same weights as the ephemeral snapshot.
scl2 = ready(sc.create_sampling_client(model_path=sampler_path))
s2 = scl2.sample(prompt, 1, params).result()
check(s2.sequences[0].tokens == s.sequences[0].tokens, "named sampler weights sample like the snapshot")

# forward_backward_custom needs torch on the client (scripts/setup-venv.sh installs it).
custom = "skipped (no torch)"
try:
    import torch  # noqa: F401

    def custom_loss(data, logprobs_list):
        loss = sum(-(lp * d.loss_fn_inputs["weights"].to_torch()).sum() for d, lp in zip(data, logprobs_list))
        return loss, {"custom:sum": float(loss)}

    out = tc.forward_backward_custom(batch, custom_loss).result()
    check("loss:sum" in out.metrics, "custom loss metrics")
    custom = "ran"
except ImportError:
    pass

tc2 = ready(sc.create_training_client_from_state_with_optimizer(state_path))
fwd2 = tc2.forward(batch, "cross_entropy").result()
check(abs(loss_of(fwd2) - after) < 1e-4 * max(1.0, abs(after)), f"restored loss {loss_of(fwd2)} != {after}")
tc2.load_state(state_path).result()

rc = tinker.RestClient(base_url=BASE_URL, api_key=os.environ['TINKER_API_KEY'])
runs = rc.list_training_runs().result()
run_ids = [r.training_run_id for r in runs.training_runs]
check(tc.model_id in run_ids, f"{tc.model_id} not in {run_ids}")
ckpts = rc.list_checkpoints(tc.model_id).result()
ids = sorted(c.checkpoint_id for c in ckpts.checkpoints)
check(ids == ["sampler_weights/s-1", "weights/ckpt-1"], f"checkpoints {ids}")
user = rc.list_user_checkpoints().result()
check(len(user.checkpoints) >= 2, "user checkpoints")
run = rc.get_training_run(tc.model_id).result()
check(run.lora_rank == 4, f"lora_rank {run.lora_rank}")
wi = rc.get_weights_info_by_tinker_path(state_path).result()
check(wi.base_model == MODEL and wi.lora_rank == 4, f"weights_info {wi}")
rc.delete_checkpoint_from_tinker_path(sampler_path).result()
ids = sorted(c.checkpoint_id for c in rc.list_checkpoints(tc.model_id).result().checkpoints)
check(ids == ["weights/ckpt-1"], f"after delete {ids}")
sc.close("success").result() if hasattr(sc, "close") else None

result(first_loss=first, loss_after_step=after, restored_loss=loss_of(fwd2), sample=s.sequences[0].tokens,
       logprobs=lps, checkpoints=ids, custom=custom)
