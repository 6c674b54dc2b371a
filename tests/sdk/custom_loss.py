"""forward_backward_custom (client-side loss, needs torch in this process): a weighted
-sum(c * lp) loss. Its reported loss must equal the loss recomputed here from the returned
logprobs, its metrics must come back, and one AdamW step after it must move the model exactly as
the built-in cross_entropy with weights c does on a twin adapter (same seed)."""
import torch
from tinker import types

from common import ready, MODEL, check, result, service

sc = service()
SEED = 11
custom = ready(sc.create_lora_training_client(base_model=MODEL, rank=4, seed=SEED))
builtin = ready(sc.create_lora_training_client(base_model=MODEL, rank=4, seed=SEED))

SEQS = [[1000, 1001, 1002, 2000, 2001, 2002], [1100, 1101, 2100, 2101, 2102]]
# Per-position coefficients of the custom loss (kept client-side: only target_tokens and the
# gradient-derived weights reach the server).
COEF = [[0.0, 0.5, 1.0, 2.0, 1.5], [0.25, 1.0, 3.0, 0.5]]


def datum(seq, coef, weights):
    inputs = {"target_tokens": seq[1:], "coef": types.TensorData(data=coef, dtype="float32",
                                                                  shape=[len(coef)])}
    if weights:
        inputs = {"target_tokens": seq[1:], "weights": coef}
    return types.Datum(model_input=types.ModelInput.from_ints(seq[:-1]), loss_fn_inputs=inputs)


custom_data = [datum(s, c, False) for s, c in zip(SEQS, COEF)]
ce_data = [datum(s, c, True) for s, c in zip(SEQS, COEF)]


def weighted_loss(data, logprobs_list):
    loss = sum(-(d.loss_fn_inputs["coef"].to_torch() * lp).sum()
               for d, lp in zip(data, logprobs_list, strict=True))
    return loss, {"custom_metric:mean": 42.5, "tokens:sum": float(sum(len(lp) for lp in logprobs_list))}


def logprobs(tc):
    out = tc.forward(ce_data, "cross_entropy").result()
    return [v for o in out.loss_fn_outputs for v in o["logprobs"].tolist()]


before_a, before_b = logprobs(custom), logprobs(builtin)
check(max(abs(a - b) for a, b in zip(before_a, before_b)) < 1e-6, "same seed, same adapter")

fb = custom.forward_backward_custom(custom_data, weighted_loss)
opt = custom.optim_step(types.AdamParams(learning_rate=1e-2))
out = fb.result()
opt.result()
returned = [o["logprobs"].tolist() for o in out.loss_fn_outputs]
local = -sum(c * lp for cs, lps in zip(COEF, returned) for c, lp in zip(cs, lps))
reported = float(out.metrics["loss:sum"])
check(abs(reported - local) < 1e-4 * max(1.0, abs(local)), f"loss:sum {reported} != local {local}")
check(out.metrics.get("custom_metric:mean") == 42.5, f"metrics {out.metrics}")
check("surrogate_loss:sum" in out.metrics, f"metrics {out.metrics}")

ref = builtin.forward_backward(ce_data, "cross_entropy").result()
builtin.optim_step(types.AdamParams(learning_rate=1e-2)).result()
ce_loss = float(ref.metrics["loss:sum"])
check(abs(ce_loss - reported) < 1e-4 * max(1.0, abs(ce_loss)), f"custom {reported} vs CE {ce_loss}")

after_a, after_b = logprobs(custom), logprobs(builtin)
moved = max(abs(a - b) for a, b in zip(after_a, before_a))
diff = max(abs(a - b) for a, b in zip(after_a, after_b))
check(moved > 1e-3, f"the custom step did not change the model ({moved})")
check(diff < 1e-4, f"custom step and cross_entropy step differ by {diff}")
result(loss=reported, local=local, ce_loss=ce_loss, moved=moved, diff=diff,
       metrics=sorted(out.metrics))
