"""Gen-2 (twinkle-kit 0.5.1) isolation and bad names.

Token A trains and saves; token B (its own session) can neither see nor load A's run, checkpoints
or twinkle:// paths (4xx each); A still sees them afterwards. Bad names get a 4xx whose `detail`
names the problem: an unknown loss class, an unknown template class, `twinkle://../x`, hub ids.

The 0.5.1 client keeps base URL, token and session in module globals, so switching tokens is
`set_api_key` + `set_session_id` (what init_twinkle_client does for a new client).
"""
from common import check, expect_4xx, feature, loss_of, parse_twinkle_path, result, setup, sft_model, step

args = setup(__doc__)

from twinkle_client import init_twinkle_client  # noqa: E402
from twinkle_client.http import set_api_key, set_session_id  # noqa: E402
from twinkle_client.sampler import vLLMSampler  # noqa: E402

FEATURES = [feature([1000, 1001, 1002], [2000, 2001]), feature([1100, 1101], [2100, 2101, 2102])]
refused = {}


def model_for(name):
    return sft_model(args.model_id, name, 1e-3)


step("token A: train + save")
client_a = init_twinkle_client(base_url=args.base_url, api_key=args.token)
session_a = client_a._session_id
model_a = model_for("iso")
loss_a = loss_of(model_a.forward_backward(inputs=FEATURES))
model_a.clip_grad_and_step()
path_a = model_a.save(name="iso-ckpt", save_optimizer=True).twinkle_path
run_a, _, _ = parse_twinkle_path(path_a)
sampler_path_a = model_a.save(name="iso-sampler", is_sampler=True).twinkle_path
sampler = vLLMSampler(model_id=args.model_id)
sampler.set_template("Template", model_id=args.model_id)

step("bad names (token A)")
refused["unknown_loss"] = expect_4xx("set_loss('NoSuchLoss')", model_a.set_loss, "NoSuchLoss",
                                     must_name="NoSuchLoss")
refused["unknown_template"] = expect_4xx("set_template('NoSuchTemplate')", model_a.set_template,
                                         "NoSuchTemplate", must_name="NoSuchTemplate")
refused["unknown_optimizer"] = expect_4xx("set_optimizer('NoSuchOptimizer')", model_a.set_optimizer,
                                          "NoSuchOptimizer", lr=1e-3, must_name="NoSuchOptimizer")
for label, bad in [("dotdot", "twinkle://../x"), ("dotdot_run", f"twinkle://{run_a}/../../x"),
                   ("two_segments", "twinkle://x/weights"), ("hub_id", "Qwen/Qwen3-0.6B"),
                   ("ms_hub_id", "ms://Qwen/Qwen3-0.6B"), ("raw_path", "/etc")]:
    refused[f"load_{label}"] = expect_4xx(f"load({bad!r})", model_a.load, bad)
refused["resume_dotdot"] = expect_4xx("resume_from_checkpoint('twinkle://../x')",
                                      model_a.resume_from_checkpoint, "twinkle://../x")
refused["sample_dotdot"] = expect_4xx(
    "sample(adapter_uri='twinkle://../x')", sampler.sample, [{"input_ids": [1000, 1001]}],
    {"max_tokens": 2, "temperature": 0.0, "num_samples": 1}, adapter_uri="twinkle://../x")
refused["sample_hub"] = expect_4xx(
    "sample(adapter_uri='ms://Qwen/Qwen3-0.6B')", sampler.sample, [{"input_ids": [1000, 1001]}],
    {"max_tokens": 2, "temperature": 0.0, "num_samples": 1}, adapter_uri="ms://Qwen/Qwen3-0.6B")
# The adapter still trains after the refusals.
loss_a2 = loss_of(model_a.forward_backward(inputs=FEATURES))
model_a.clip_grad_and_step()

step("token B: A's run and paths are invisible")
client_b = init_twinkle_client(base_url=args.base_url, api_key=args.second_token)
check(client_b._session_id != session_a, "token B got token A's session id")
runs_b = [r.training_run_id for r in client_b.list_training_runs()]
check(run_a not in runs_b, f"token B lists token A's run {run_a}: {runs_b}")
refused["b_get_run"] = expect_4xx("B get_training_run(A)", client_b.get_training_run, run_a)
refused["b_list_checkpoints"] = expect_4xx("B list_checkpoints(A)", client_b.list_checkpoints, run_a)
refused["b_checkpoint_path"] = expect_4xx("B get_checkpoint_path(A)", client_b.get_checkpoint_path,
                                          run_a, "weights/iso-ckpt")
refused["b_weights_info"] = expect_4xx("B get_weights_info(A)", client_b.get_weights_info, path_a)
refused["b_delete"] = expect_4xx("B delete_checkpoint(A)", client_b.delete_checkpoint, run_a,
                                 "weights/iso-ckpt")
model_b = model_for("iso")  # the same short adapter name as A's: scoped per session
refused["b_load"] = expect_4xx("B load(A's path)", model_b.load, path_a)
refused["b_resume"] = expect_4xx("B resume_from_checkpoint(A's path)", model_b.resume_from_checkpoint,
                                 path_a)
sampler_b = vLLMSampler(model_id=args.model_id)
sampler_b.set_template("Template", model_id=args.model_id)
refused["b_sample"] = expect_4xx(
    "B sample(adapter_uri=A's sampler path)", sampler_b.sample, [{"input_ids": [1000, 1001]}],
    {"max_tokens": 2, "temperature": 0.0, "num_samples": 1}, adapter_uri=sampler_path_a)
# B's own adapter of the same short name is a fresh one: its loss is A's first loss, not A's
# trained adapter's.
loss_b = loss_of(model_b.forward_backward(inputs=FEATURES))
check(abs(loss_b - loss_a) < 1e-3 * max(1.0, abs(loss_a)),
      f"B's fresh adapter 'iso' loss {loss_b} != A's first loss {loss_a} (shared adapter?)")

step("token A again: its run and checkpoint survived B's attempts")
set_api_key(args.token)
set_session_id(session_a)
runs_a = [r.training_run_id for r in client_a.list_training_runs()]
check(run_a in runs_a, f"token A no longer lists its run {run_a}: {runs_a}")
ckpts = [c.checkpoint_id for c in client_a.list_checkpoints(run_a)]
check("weights/iso-ckpt" in ckpts, f"A's checkpoint gone after B's delete attempt: {ckpts}")
model_a.load(path_a, load_optimizer=True)

result(refused=refused, run_a=run_a, loss_a=loss_a, loss_a2=loss_a2, loss_b=loss_b)
