"""Sampling from saved sampler weights when the deployment has a `sampler` application: train a
few steps, save_weights_for_sampler, sample greedily through create_sampling_client(model_path).
Prints the training model id and the tokens; the Rust test checks that the sampler application
served them and that the model application's in-memory adapter gives the same tokens."""
from tinker import types

from common import ready, MODEL, check, datum, result, service

sc = service()
tc = ready(sc.create_lora_training_client(base_model=MODEL, rank=8, seed=3))
batch = [datum([1000, 1001, 1002], [2000, 2001, 2002]), datum([1100, 1101], [2100, 2101])]
for _ in range(5):
    fb = tc.forward_backward(batch, "cross_entropy")
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    fb.result()
path = tc.save_weights_for_sampler("routed").result().path
check(path.endswith("/sampler_weights/routed"), path)
scl = ready(sc.create_sampling_client(model_path=path))
params = types.SamplingParams(max_tokens=6, temperature=0.0, stop=[])
PROMPTS = [[1000, 1001, 1002], [1100, 1101]]
tokens = [scl.sample(types.ModelInput.from_ints(p), 1, params).result().sequences[0].tokens
          for p in PROMPTS]
check(all(len(t) == 6 for t in tokens), f"tokens {tokens}")
result(model_id=tc.model_id, path=path, prompts=PROMPTS, tokens=tokens)
