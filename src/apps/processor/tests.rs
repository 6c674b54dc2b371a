//! Unit tests of the processor registry: datasets from each file format and hub-cache layout,
//! slicing, preprocessing, encoding, the data loader, heartbeats, expiry and tenancy.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};

use super::data::{locate_with, parse_csv, pick_file};
use super::dataloader::permutation;
use super::registry::{Limits, Registry};
use crate::hub::HubEnv;
use crate::protocol::twinkle::TwinkleError;

const A: &str = "owner-a";
const B: &str = "owner-b";

fn obj(v: Value) -> Map<String, Value> {
    v.as_object().cloned().unwrap()
}

fn meta(path: &Path, slice: Option<Value>) -> String {
    json!({"dataset_id": path.to_str().unwrap(), "data_slice": slice, "split": "train",
        "_TWINKLE_TYPE_": "DatasetMeta"})
    .to_string()
}

fn tiny_model() -> PathBuf {
    let env = HubEnv {
        twinkle_home: Some(std::env::temp_dir().join("twinkle-test-home")),
        ..HubEnv::default()
    };
    crate::hub::resolve_with("generate://qwen3-tiny", &env).unwrap()
}

/// Ten self-cognition rows as JSON lines.
fn cognition_file(dir: &Path) -> PathBuf {
    let p = dir.join("cog.jsonl");
    let lines: Vec<String> = (0..10)
        .map(|i| {
            json!({"query": format!("q{i}: who are you?"),
                "response": format!("I am {{{{NAME}}}} by {{{{AUTHOR}}}} #{i}"), "tag": "en"})
            .to_string()
        })
        .collect();
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p
}

fn dataset(reg: &Registry, owner: &str, path: &Path, slice: Option<Value>) -> String {
    reg.create(
        owner,
        &obj(json!({"processor_type": "dataset", "class_type": "Dataset",
        "dataset_meta": meta(path, slice)})),
    )
    .unwrap()
}

/// A registry holding [`cognition_file`] as a dataset of owner `A`: the temporary directory
/// (kept alive for the test), the registry and the dataset id.
fn cognition_dataset() -> (tempfile::TempDir, Registry, String) {
    let t = tempfile::tempdir().unwrap();
    let reg = Registry::new(Limits::default());
    let id = dataset(&reg, A, &cognition_file(t.path()), None);
    (t, reg, id)
}

fn call(reg: &Registry, owner: &str, id: &str, f: &str, kw: Value) -> Result<Value, TwinkleError> {
    let mut body = obj(kw);
    body.insert("processor_id".into(), json!(id));
    body.insert("function".into(), json!(f));
    reg.call(owner, &body)
}

#[test]
fn datasets_load_from_json_jsonl_and_csv_with_slices() {
    let t = tempfile::tempdir().unwrap();
    let reg = Registry::new(Limits::default());
    let json_file = t.path().join("a.json");
    std::fs::write(&json_file, r#"[{"x": 1}, {"x": 2}, {"x": 3}]"#).unwrap();
    let csv_file = t.path().join("b.csv");
    std::fs::write(&csv_file, "instruction,output\r\n\"Say \"\"hi\"\"\",\"hi,\nthere\"\nx,y\n")
        .unwrap();
    let jl = cognition_file(t.path());

    let id = dataset(&reg, A, &json_file, None);
    assert!(id.starts_with("pid:") && id.len() == 36, "{id}");
    assert_eq!(call(&reg, A, &id, "__len__", json!({})).unwrap(), json!(3));
    assert_eq!(call(&reg, A, &id, "__getitem__", json!({"idx": -1})).unwrap(), json!({"x": 3}));
    assert!(call(&reg, A, &id, "__getitem__", json!({"idx": 3})).is_err());
    let sl = call(&reg, A, &id, "__getitem__", json!({"idx": {"start": 1, "stop": 3}})).unwrap();
    assert_eq!(sl, json!([{"x": 2}, {"x": 3}]));

    let id = dataset(&reg, A, &csv_file, None);
    let row = call(&reg, A, &id, "__getitem__", json!({"idx": 0})).unwrap();
    assert_eq!(row, json!({"instruction": "Say \"hi\"", "output": "hi,\nthere"}));
    assert_eq!(call(&reg, A, &id, "__len__", json!({})).unwrap(), json!(2));

    let range = json!({"_slice_type_": "range", "start": 2, "stop": 9, "step": 3});
    let id = dataset(&reg, A, &jl, Some(range));
    assert_eq!(call(&reg, A, &id, "__len__", json!({})).unwrap(), json!(3));
    let r = call(&reg, A, &id, "__getitem__", json!({"idx": 1})).unwrap();
    assert_eq!(r["query"], "q5: who are you?");
    let list = json!({"_slice_type_": "list", "values": [9, 0]});
    let id = dataset(&reg, A, &jl, Some(list));
    assert_eq!(
        call(&reg, A, &id, "__getitem__", json!({"idx": 0})).unwrap()["query"],
        "q9: who are you?"
    );

    // Inline rows (`DatasetMeta.data`): a list of rows or a dict of columns, sliced too.
    let inline = |data: Value| {
        let m = json!({"dataset_id": "", "data": data, "data_slice": [1],
            "_TWINKLE_TYPE_": "DatasetMeta"});
        reg.create(
            A,
            &obj(json!({"processor_type": "dataset", "class_type": "Dataset",
            "dataset_meta": m.to_string()})),
        )
    };
    let id = inline(json!([{"x": 1}, {"x": 2}])).unwrap();
    assert_eq!(call(&reg, A, &id, "__getitem__", json!({"idx": 0})).unwrap(), json!({"x": 2}));
    let id = inline(json!({"x": [1, 2], "y": ["a", "b"]})).unwrap();
    assert_eq!(
        call(&reg, A, &id, "__getitem__", json!({"idx": 0})).unwrap(),
        json!({"x": 2, "y": "b"})
    );
    assert!(inline(json!({"x": [1], "y": []})).is_err());
    assert!(inline(json!([1, 2])).is_err());

    // Row limit and malformed files are 400s.
    let small = Registry::new(Limits { max_rows: 5, ..Limits::default() });
    let body = obj(json!({"processor_type": "dataset", "class_type": "Dataset",
        "dataset_meta": meta(&jl, None)}));
    let e = small.create(A, &body).unwrap_err();
    assert!(matches!(e, TwinkleError::BadRequest(_)) && e.to_string().contains("more than 5 rows"));
    assert!(parse_csv("a,b\n1\n", 10).is_err());
    let missing = t.path().join("nope.jsonl");
    let body = obj(json!({"processor_type": "dataset", "class_type": "Dataset",
        "dataset_meta": meta(&missing, None)}));
    assert!(matches!(reg.create(A, &body), Err(TwinkleError::BadRequest(_))));
}

#[test]
fn hub_ids_resolve_only_against_local_caches() {
    let t = tempfile::tempdir().unwrap();
    let ms = t.path().join("ms");
    let hf = t.path().join("hf");
    let mut env = HubEnv::default();
    env.ms.cache = Some(ms.clone());
    env.hf.hub_cache = Some(hf.clone());
    let repo = ms.join("datasets/swift/self-cognition");
    std::fs::create_dir_all(repo.join("data")).unwrap();
    std::fs::write(repo.join("dataset_infos.json"), "{}").unwrap();
    std::fs::write(repo.join("data/test.jsonl"), "{}\n").unwrap();
    std::fs::write(repo.join("data/train-00000.jsonl"), "{}\n").unwrap();
    let got = locate_with("ms://swift/self-cognition", None, Some("train"), &env, None).unwrap();
    assert!(got.ends_with("data/train-00000.jsonl"), "{}", got.display());
    let got = locate_with("ms://swift/self-cognition", None, Some("test"), &env, None).unwrap();
    assert!(got.ends_with("data/test.jsonl"), "{}", got.display());

    let snap = hf.join("datasets--org--ds/snapshots/abc");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::write(snap.join("train.csv"), "a\n1\n").unwrap();
    let got = locate_with("hf://org/ds", None, None, &env, None).unwrap();
    assert_eq!(got, snap.join("train.csv"));

    let e = locate_with("ms://nobody/nothing", None, None, &env, None).unwrap_err().to_string();
    assert!(e.contains("not in the local cache") && e.contains("never downloads"), "{e}");
    assert!(locate_with("https://x/y", None, None, &env, None).is_err());
    // Relative ids resolve against the data root and may not leave it.
    let root = t.path().join("data");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("d.jsonl"), "{}\n").unwrap();
    assert!(locate_with("d.jsonl", None, None, &env, Some(&root)).is_ok());
    let e = locate_with(
        "../ms/datasets/swift/self-cognition/data/test.jsonl",
        None,
        None,
        &env,
        Some(&root),
    );
    assert!(e.unwrap_err().to_string().contains("outside"));
    assert!(pick_file(t.path().join("data").as_path(), None, "train").unwrap().is_some());
}

#[test]
fn self_cognition_map_then_encode_gives_rolled_assistant_labels() {
    let (t, reg, id) = cognition_dataset();
    let model = tiny_model();
    let e = call(&reg, A, &id, "encode", json!({})).unwrap_err().to_string();
    assert!(e.contains("set_template"), "{e}");
    let tpl = json!({"template_func": "Template", "model_id": model.to_str().unwrap(), "max_length": 512});
    assert_eq!(call(&reg, A, &id, "set_template", tpl).unwrap(), Value::Null);
    let bad = json!({"template_func": "ms://evil/plugin", "model_id": model.to_str().unwrap()});
    assert!(
        call(&reg, A, &id, "set_template", bad).unwrap_err().to_string().contains("not available")
    );
    let e = call(&reg, A, &id, "encode", json!({})).unwrap_err().to_string();
    assert!(e.contains("map it first"), "{e}");
    let m = json!({"preprocess_func": "SelfCognitionProcessor", "dataset_meta": null,
        "init_args": {"model_name": "Twinkly", "model_author": "Lab"}});
    call(&reg, A, &id, "map", m).unwrap();
    let row = call(&reg, A, &id, "__getitem__", json!({"idx": 3})).unwrap();
    assert_eq!(row["messages"][2]["content"], "I am Twinkly by Lab #3");
    call(&reg, A, &id, "encode", json!({"batched": true, "add_generation_prompt": false})).unwrap();
    let f = call(&reg, A, &id, "__getitem__", json!({"idx": 3})).unwrap();
    let ids: Vec<i64> = serde_json::from_value(f["input_ids"].clone()).unwrap();
    let labels: Vec<i64> = serde_json::from_value(f["labels"].clone()).unwrap();
    assert_eq!(ids.len(), labels.len());
    assert_eq!(f["length"], json!(ids.len()));
    assert_eq!(f["position_ids"][ids.len() - 1], json!(ids.len() - 1));
    assert_eq!(f["attention_mask"].as_array().unwrap().len(), ids.len());
    assert_eq!(f["messages"][2]["content"], "I am Twinkly by Lab #3", "other columns stay");
    // Rolled: a trained label is the next input token; the prompt and last position are ignored.
    let trained: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] != -100).collect();
    assert!(!trained.is_empty() && trained[0] > 5);
    for &i in &trained {
        assert_eq!(labels[i], ids[i + 1]);
    }
    assert_eq!(*labels.last().unwrap(), -100);

    // The length filter drops rows longer than its limit.
    let keep = ids.len() - 1;
    call(
        &reg,
        A,
        &id,
        "filter",
        json!({"filter_func": "LengthFilter", "init_args": {"max_length": keep}}),
    )
    .unwrap();
    let n = call(&reg, A, &id, "__len__", json!({})).unwrap().as_u64().unwrap();
    assert!(n < 10, "{n}");
    assert!(call(&reg, A, &id, "filter", json!({"filter_func": "lambda x: True"})).is_err());
    // Generation prompts: no labels, the prompt ends with the assistant header.
    let gen_ds = dataset(&reg, A, &cognition_file(t.path()), None);
    let tpl = json!({"template_cls": "Qwen3Template", "model_id": model.to_str().unwrap()});
    call(&reg, A, &gen_ds, "set_template", tpl).unwrap();
    call(&reg, A, &gen_ds, "map", json!({"preprocess_func": "SelfCognitionProcessor"})).unwrap();
    call(&reg, A, &gen_ds, "encode", json!({"add_generation_prompt": true})).unwrap();
    let g = call(&reg, A, &gen_ds, "__getitem__", json!({"idx": 0})).unwrap();
    assert!(g.get("labels").is_none());
    assert!(g["length"].as_u64().unwrap() > 5);
    assert!(call(&reg, A, &id, "mix_dataset", json!({"interleave": true})).is_err());
    assert!(
        call(&reg, A, &id, "save_as", json!({})).unwrap_err().to_string().contains("not available")
    );
}

fn loader(reg: &Registry, ds: &str, kw: Value) -> String {
    let mut body = obj(kw);
    body.insert("processor_type".into(), json!("dataloader"));
    body.insert("class_type".into(), json!("DataLoader"));
    body.insert("dataset".into(), json!(ds));
    reg.create(A, &body).unwrap()
}

fn drain(reg: &Registry, dl: &str) -> Vec<Vec<Value>> {
    assert_eq!(call(reg, A, dl, "__iter__", json!({})).unwrap(), json!("ok"));
    let mut out = Vec::new();
    loop {
        match call(reg, A, dl, "__next__", json!({})) {
            Ok(Value::Array(b)) => out.push(b),
            Err(TwinkleError::Gone(_)) => return out,
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn dataloader_batches_shuffles_deterministically_and_resumes() {
    let (_t, reg, ds) = cognition_dataset();
    let bare = ds.strip_prefix("pid:").unwrap().to_string();

    let dl = loader(&reg, &bare, json!({"batch_size": 4}));
    assert_eq!(call(&reg, A, &dl, "__len__", json!({})).unwrap(), json!(3));
    let batches = drain(&reg, &dl);
    assert_eq!(batches.iter().map(Vec::len).collect::<Vec<_>>(), vec![4, 4, 2]);
    assert_eq!(batches[0][0]["query"], "q0: who are you?");
    let st = call(&reg, A, &dl, "get_state", json!({})).unwrap();
    assert_eq!(st["consumed_train_samples"], 10);
    assert_eq!(st["epoch"], 0);
    assert_eq!(drain(&reg, &dl).len(), 3);
    assert_eq!(call(&reg, A, &dl, "get_state", json!({})).unwrap()["epoch"], 1);

    let dl =
        loader(&reg, &ds, json!({"batch_size": 4, "drop_last": true, "shuffle": true, "seed": 7}));
    assert_eq!(call(&reg, A, &dl, "__len__", json!({})).unwrap(), json!(2));
    let e0 = drain(&reg, &dl);
    assert_eq!(e0.len(), 2);
    let e1 = drain(&reg, &dl);
    let again =
        loader(&reg, &ds, json!({"batch_size": 4, "drop_last": true, "shuffle": true, "seed": 7}));
    assert_eq!(drain(&reg, &again), e0);
    assert_ne!(e0, e1, "each epoch draws a new order");
    assert_eq!(permutation(10, 7, 0), permutation(10, 7, 0));
    let mut p = permutation(100, 1, 3);
    p.sort();
    assert_eq!(p, (0..100).collect::<Vec<_>>());

    // Resume after 6 consumed samples: the next epoch starts at row 6.
    let dl = loader(&reg, &ds, json!({"batch_size": 4}));
    call(&reg, A, &dl, "resume_from_checkpoint", json!({"consumed_train_samples": 6})).unwrap();
    let b = drain(&reg, &dl);
    assert_eq!(b.len(), 1);
    assert_eq!(b[0][0]["query"], "q6: who are you?");
    assert_eq!(call(&reg, A, &dl, "get_state", json!({})).unwrap()["consumed_train_samples"], 10);
    assert_eq!(
        call(&reg, A, &dl, "set_processor", json!({"processor_cls": "InputProcessor"})).unwrap(),
        Value::Null
    );

    // A data loader needs a dataset of the same owner.
    let body =
        obj(json!({"processor_type": "dataloader", "class_type": "DataLoader", "dataset": ds}));
    assert!(matches!(reg.create(B, &body), Err(TwinkleError::NotFound(_))));
    let body =
        obj(json!({"processor_type": "dataloader", "class_type": "DataLoader", "dataset": dl}));
    assert!(matches!(reg.create(A, &body), Err(TwinkleError::BadRequest(_))));
}

#[test]
fn registry_rejects_unknown_classes_and_other_owners() {
    let t = tempfile::tempdir().unwrap();
    let reg = Registry::new(Limits { max_per_owner: 2, ..Limits::default() });
    let body = obj(json!({"processor_type": "reward", "class_type": "MathReward"}));
    let e = reg.create(A, &body).unwrap_err();
    assert!(matches!(e, TwinkleError::BadRequest(_)));
    assert_eq!(
        e.to_string(),
        "reward.MathReward is not available on this server; available: dataset.Dataset, \
         dataloader.DataLoader, processor.InputProcessor"
    );
    let ds = dataset(&reg, A, &cognition_file(t.path()), None);
    assert!(matches!(call(&reg, B, &ds, "__len__", json!({})), Err(TwinkleError::NotFound(_))));
    let e = call(&reg, A, "pid:00", "__len__", json!({})).unwrap_err();
    assert!(matches!(&e, TwinkleError::NotFound(m) if m.contains("pid:00")));
    let ip = reg
        .create(
            A,
            &obj(json!({"processor_type": "processor", "class_type": "InputProcessor",
            "padding_side": "right"})),
        )
        .unwrap();
    let inputs = json!([{"input_ids": [1, 2], "labels": [2, -100]}]);
    assert_eq!(call(&reg, A, &ip, "__call__", json!({"inputs": inputs})).unwrap(), inputs);
    // Per-owner limit: a third processor of A is refused, B still has room.
    let body = obj(json!({"processor_type": "processor", "class_type": "InputProcessor"}));
    assert!(matches!(reg.create(A, &body), Err(TwinkleError::Conflict(_))));
    assert!(reg.create(B, &body).is_ok());
}

#[test]
fn heartbeats_renew_both_id_forms_and_expired_processors_go() {
    let reg = Registry::new(Limits { timeout: Duration::from_millis(1000), ..Limits::default() });
    let body = obj(json!({"processor_type": "processor", "class_type": "InputProcessor"}));
    let a = reg.create(A, &body).unwrap();
    let b = reg.create(A, &body).unwrap();
    let bare_b = b.strip_prefix("pid:").unwrap();
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(300));
        let hb = obj(json!({"processor_id": format!("{a}, {bare_b}")}));
        assert_eq!(reg.heartbeat(A, &hb).unwrap(), json!({"status": "ok"}));
    }
    // 1.2 s after creation both live thanks to the heartbeats.
    assert_eq!(reg.sweep(Instant::now()), 0);
    assert!(call(&reg, A, &a, "__call__", json!({"inputs": []})).is_ok());
    // Another owner's heartbeat neither renews nor finds them.
    let hb = obj(json!({"processor_id": a.clone()}));
    assert!(matches!(reg.heartbeat(B, &hb), Err(TwinkleError::NotFound(_))));
    std::thread::sleep(Duration::from_millis(1100));
    let e = call(&reg, A, &a, "__call__", json!({"inputs": []})).unwrap_err();
    assert!(matches!(&e, TwinkleError::NotFound(m) if m.contains(&a)));
    assert_eq!(reg.sweep(Instant::now()), 2);
    assert!(reg.is_empty());
    let hb = obj(json!({"processor_id": b.clone()}));
    assert!(matches!(reg.heartbeat(A, &hb), Err(TwinkleError::NotFound(m)) if m.contains(&b)));
}
