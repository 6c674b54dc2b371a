"""Naming (issue #14, item 5): a model loaded from a local directory called `model` is served
under the name its route gives (`/api/v1/model/<TWINKLE_MODEL>`), by the model and the sampler
application alike; its `model_id` (TWINKLE_MODEL_DIR) still designates it, and an unserved
name is refused with the served names listed."""
import os

from tinker import types

from common import ready, MODEL, check, datum, loss_of, result, service

sc = service()
names = [m.model_name for m in sc.get_server_capabilities().supported_models]
check(names == [MODEL], f"capabilities list {names}, expected [{MODEL}]")

tc = ready(sc.create_lora_training_client(base_model=MODEL, rank=4))
model_name = tc.get_info().model_data.model_name
check(model_name == MODEL, f"get_info model_name {model_name}")
loss = loss_of(tc.forward_backward([datum([1, 2, 3, 4], [5, 6])], "cross_entropy").result())
check(loss > 0, f"loss {loss}")

# The base model through the sampler application, asked for by the same name.
params = types.SamplingParams(max_tokens=3, temperature=0.0, stop=[])
scl = ready(sc.create_sampling_client(base_model=MODEL))
seq = scl.sample(types.ModelInput.from_ints([1, 2, 3]), 1, params).result().sequences[0].tokens
check(len(seq) == 3, f"sampled {seq}")

# Clients that name the model by its model_id keep working.
by_id = ready(sc.create_lora_training_client(base_model=os.environ["TWINKLE_MODEL_DIR"], rank=4))
by_id_name = by_id.get_info().model_data.model_name

# A name nothing serves is refused, and the refusal lists the served name.
refused = None
try:
    ready(sc.create_lora_training_client(base_model="acme/not-served", rank=4))
except Exception as e:  # noqa: BLE001 - the SDK's error class is part of what is reported
    refused = f"{type(e).__name__}: {e}"
check(refused is not None, "an unserved base model was accepted")

result(names=names, model_name=model_name, loss=loss, sampled=seq, by_id_name=by_id_name,
       refused=refused)
