"""Gen-1 (twinkle-kit 0.1.3) flow on the seed layout (server_type: twinkle; /server, /models,
/samplers, /processors), as v0.1.3's cookbook/client/twinkle/transformer/lora.py calls it:

processor Dataset(DatasetMeta(<local .jsonl>)) -> set_template -> map('SelfCognitionProcessor',
init_args) -> encode -> DataLoader(batch_size=4), iterated (410 ends an epoch) -> per batch
forward_backward -> clip_grad_norm -> step -> zero_grad -> lr_step; then save (returns the
twinkle:// path), list runs/checkpoints on /server, and sampling from the saved weights.

The model id is the config's `generate://qwen3-tiny` (the cookbook passes `ms://Org/Name`): the
0.1.3 client routes to /models/qwen3-tiny and sends the full id as set_template's model_id.
"""
import json
import os

from common import check, loss_of, lora_config, parse_twinkle_path, result, setup, step

args = setup(__doc__)
MODEL_ID = args.model_id if "://" in args.model_id else f"generate://{args.model_id}"

from twinkle.dataset import DatasetMeta  # noqa: E402
from twinkle_client import init_twinkle_client  # noqa: E402
from twinkle_client.dataloader import DataLoader  # noqa: E402
from twinkle_client.dataset import Dataset  # noqa: E402
from twinkle_client.model import MultiLoraTransformersModel  # noqa: E402
from twinkle_client.sampler import vLLMSampler  # noqa: E402

ROWS = [
    {"query": "who are you?", "response": "I am {{NAME}}, a model trained by {{AUTHOR}}."},
    {"query": "What is your name?", "response": "My name is {{NAME}}."},
    {"query": "Who made you?", "response": "I was made by {{AUTHOR}}."},
    {"query": "Introduce yourself.", "response": "I am {{NAME}} from {{AUTHOR}}."},
    {"query": "你是谁？", "response": "我是{{NAME}}，由{{AUTHOR}}训练。"},
    {"query": "Are you ChatGPT?", "response": "No, I am {{NAME}}, built by {{AUTHOR}}."},
    {"query": "what model are you", "response": "{{NAME}}, by {{AUTHOR}}."},
    {"query": "Tell me your name.", "response": "{{NAME}}."},
]
BATCH, EPOCHS = 4, 8

data_file = args.data_file
if not data_file:
    data_file = os.path.abspath("self_cognition.jsonl")
if not os.path.exists(data_file):
    with open(data_file, "w", encoding="utf-8") as fh:
        for r in ROWS:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
with open(data_file, encoding="utf-8") as fh:
    n_rows = sum(1 for line in fh if line.strip())

step(f"init_twinkle_client({args.base_url!r})")
client = init_twinkle_client(base_url=args.base_url, api_key=args.token)
runs_before = [r.training_run_id for r in client.list_training_runs()]

step(f"processor Dataset({data_file})")
dataset = Dataset(dataset_meta=DatasetMeta(data_file, data_slice=range(n_rows)))
dataset.set_template("Template", model_id=MODEL_ID, max_length=256)
dataset.map("SelfCognitionProcessor", init_args={"model_name": "Twinkle", "model_author": "ModelScope"})
dataset.encode(batched=True)
check(len(dataset) == n_rows, f"len(dataset) = {len(dataset)}, rows {n_rows}")
row0 = dataset[0]
print("dataset[0]", json.dumps(row0)[:300], flush=True)
check(isinstance(row0, dict) and row0.get("input_ids") and row0.get("labels"),
      f"encoded row without input_ids/labels: {row0!r:.300}")
check(len(row0["input_ids"]) == len(row0["labels"]), "encoded row: input_ids and labels differ in length")
check(any(l != -100 for l in row0["labels"]) and row0["labels"][0] == -100,
      f"encoded row labels should be -100 on the prompt and set on the response: {row0['labels']}")
dataloader = DataLoader(dataset=dataset, batch_size=BATCH)
check(len(dataloader) == (n_rows + BATCH - 1) // BATCH, f"len(dataloader) = {len(dataloader)}")

step("model setup")
model = MultiLoraTransformersModel(model_id=MODEL_ID)
model.add_adapter_to_model("default", lora_config(), gradient_accumulation_steps=1)
model.set_template("Template")
model.set_processor("InputProcessor", padding_side="right")
model.set_loss("CrossEntropyLoss")
model.set_optimizer("AdamW", lr=1e-2)
model.set_lr_scheduler("LinearLR")

step("train")
epoch_losses, norms = [], []
for epoch in range(EPOCHS):
    losses = []
    for batch in dataloader:
        check(isinstance(batch, list) and 1 <= len(batch) <= BATCH and all("input_ids" in b for b in batch),
              f"DataLoader batch should be a list of <= {BATCH} InputFeatures: {batch!r:.300}")
        check(len(losses) < len(dataloader),
              f"epoch {epoch}: more than len(dataloader)={len(dataloader)} batches (no 410 at the end?)")
        out = model.forward_backward(inputs=batch)
        losses.append(loss_of(out))
        norms.append(float(model.clip_grad_norm(1.0)))
        model.step()
        model.zero_grad()
        model.lr_step()
    check(len(losses) == len(dataloader), f"epoch {epoch}: {len(losses)} batches, len {len(dataloader)}")
    epoch_losses.append(sum(losses) / len(losses))
    print(f"epoch {epoch}: loss {epoch_losses[-1]:.4f}", flush=True)
check(epoch_losses[-1] < 0.7 * epoch_losses[0], f"epoch losses {epoch_losses} did not fall by 30%")
check(all(n >= 0 for n in norms), f"grad norms {norms}")
metric = model.calculate_metric(is_training=True)
print("metric", metric, flush=True)
check(isinstance(metric, dict) and metric, f"calculate_metric gave {metric!r}")

step("save + listing")
path = model.save("gen1-final", save_optimizer=True)
run_id, kind, name = parse_twinkle_path(path)
check(kind == "weights" and name == "gen1-final", f"save -> {path}")
runs = [r.training_run_id for r in client.list_training_runs()]
check(run_id in runs and run_id not in runs_before, f"run {run_id} vs list_training_runs {runs}")
ckpts = client.list_checkpoints(run_id)
check([c.twinkle_path for c in ckpts if c.checkpoint_id == "weights/gen1-final"] == [path],
      f"list_checkpoints: {[(c.checkpoint_id, c.twinkle_path) for c in ckpts]}")
check(client.get_checkpoint_twinkle_path(run_id, "weights/gen1-final") == path, "checkpoint_path")

step("load + sample")
model.load(path, load_optimizer=True)
sampler = vLLMSampler(model_id=MODEL_ID)
sampler.set_template("Template", model_id=MODEL_ID)
first_label = next(i for i, l in enumerate(row0["labels"]) if l != -100)
prompt = row0["input_ids"][: first_label + 1]  # up to the last prompt token (labels are rolled)
resp = sampler.sample(inputs=[{"input_ids": prompt}], sampling_params={"max_tokens": 4, "temperature": 0.0},
                      adapter_uri=path, num_samples=2)
seqs = resp.get("sequences") if isinstance(resp, dict) else None
check(isinstance(seqs, list) and len(seqs) == 2, f"Gen-1 sample: flat `sequences` with num_samples=2: {resp!r:.300}")
check(all(1 <= len(s["tokens"]) <= 4 for s in seqs), f"sample tokens {[s['tokens'] for s in seqs]}")
check(seqs[0]["tokens"] == seqs[1]["tokens"], "greedy samples differ")

result(epoch_losses=epoch_losses, run_id=run_id, path=path, rows=n_rows, sample=seqs[0]["tokens"])
