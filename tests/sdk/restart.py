"""(d) Resume across a server restart. `phase1 FILE`: 3 steps, save_state, then 3 more steps (the
uninterrupted reference); `phase2 FILE` (after the restart): load the state with its optimizer and
run the same 3 steps; their losses must equal the reference."""
import json
import os
import sys

import tinker

from common import ready, BASE_URL, MODEL, check, datum, result, service, train_steps

phase, file = sys.argv[1], sys.argv[2]
batch = [datum([30, 31, 32], [40, 41]), datum([50, 51], [60, 61, 62])]


def steps(tc, n):
    return train_steps(tc, batch, n)


sc = service()
if phase == "phase1":
    tc = ready(sc.create_lora_training_client(base_model=MODEL, rank=4))
    steps(tc, 3)
    path = tc.save_state("before-restart").result().path
    ref = steps(tc, 3)
    with open(file, "w") as f:
        json.dump({"path": path, "ref": ref, "run": tc.model_id}, f)
    result(path=path, reference=ref)
else:
    saved = json.load(open(file))
    rc = tinker.RestClient(base_url=BASE_URL, api_key=os.environ['TINKER_API_KEY'])
    ids = [c.checkpoint_id for c in rc.list_checkpoints(saved["run"]).result().checkpoints]
    check("weights/before-restart" in ids, f"checkpoint lost by the restart: {ids}")
    tc = ready(sc.create_training_client_from_state_with_optimizer(saved["path"]))
    got = steps(tc, 3)
    for a, b in zip(got, saved["ref"]):
        check(abs(a - b) <= 1e-4 * max(1.0, abs(b)), f"resumed losses {got} != reference {saved['ref']}")
    result(resumed=got, reference=saved["ref"])
