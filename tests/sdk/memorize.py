"""(b) Memorisation: 4 (prompt, completion) pairs, 30 steps of cross_entropy + AdamW at lr 1e-2; the
loss must fall below 5% of its first value and greedy sampling from the saved sampler weights must
reproduce every completion."""
import os

from tinker import types

from common import ready, MODEL, check, datum, loss_of, result, service

PAIRS = [
    ([1000, 1001, 1002], [2000, 2001, 2002]),
    ([1100, 1101, 1102], [2100, 2101, 2102]),
    ([1200, 1201, 1202], [2200, 2201, 2202]),
    ([1300, 1301, 1302], [2300, 2301, 2302]),
]
sc = service()
RANK = int(os.environ.get("MEMO_RANK", "8"))
tc = ready(sc.create_lora_training_client(base_model=MODEL, rank=RANK, seed=0))
batch = [datum(p, c) for p, c in PAIRS]
losses = []
STEPS = int(os.environ.get("MEMO_STEPS", "30"))
LR = float(os.environ.get("MEMO_LR", "1e-2"))
for step in range(STEPS):
    fb = tc.forward_backward(batch, "cross_entropy")
    opt = tc.optim_step(types.AdamParams(learning_rate=LR))
    losses.append(loss_of(fb.result()))
    opt.result()
final = loss_of(tc.forward(batch, "cross_entropy").result())
print("losses", [round(l, 2) for l in losses], final)
check(final < 0.05 * losses[0], f"loss {losses[0]} -> {final}: not below 5%")

path = tc.save_weights_for_sampler("memorized").result().path
scl = ready(sc.create_sampling_client(model_path=path))
params = types.SamplingParams(max_tokens=3, temperature=0.0, stop=[])
samples = []
for p, c in PAIRS:
    got = scl.sample(types.ModelInput.from_ints(p), 1, params).result().sequences[0].tokens
    samples.append(got)
    check(got == c, f"prompt {p}: sampled {got}, expected {c}")
result(first_loss=losses[0], final_loss=final, samples=samples, steps=STEPS, lr=LR)
