//! Continuous batching of generation in the model and sampler applications: requests of
//! several tenants (their own adapters, the base model, a saved sampler checkpoint), each with
//! its own sampling parameters, seed and stop rule, decoded together give exactly the tokens
//! they give alone, their logprobs within 1e-5; the passes were really shared; a bad request
//! fails alone.

mod model_app_support;

use std::sync::{Arc, Barrier};

use model_app_support::*;
use twinkle::apps::model::{BaseModel, ModelService};
use twinkle::apps::sampler::SamplerService;
use twinkle::protocol::internal::*;

fn request(prompt: &[u32], n: usize, max_tokens: usize) -> SampleRequest {
    let mut r = SampleRequest::new(prompt.to_vec(), n);
    r.max_tokens = max_tokens;
    r
}

/// Six requests over three adapters, the base model and a sampler checkpoint: greedy and
/// seeded, top-k / top-p, several samples, EOS ignored or a stop token, prompt logprobs.
fn requests(dir: &std::path::Path) -> Vec<SampleRequest> {
    let mut out = Vec::new();
    let mut r = request(&SEQ[..5], 1, 24);
    r.model_id = Some("a".into());
    r.temperature = 0.0;
    r.stop = Some(serde_json::json!([]));
    out.push(r);
    let mut r = request(&SEQ[2..9], 3, 20);
    r.model_id = Some("b".into());
    r.temperature = 0.8;
    r.top_p = 0.9;
    r.seed = Some(11);
    r.stop = Some(serde_json::json!([]));
    out.push(r);
    let mut r = request(&SEQ[..3], 2, 18);
    r.temperature = 1.0;
    r.top_k = 5;
    r.seed = Some(12);
    r.stop = Some(serde_json::json!([]));
    out.push(r);
    let mut r = request(&SEQ[4..], 1, 30);
    r.model_id = Some("c".into());
    r.temperature = 1.2;
    r.seed = Some(13);
    r.stop = Some(serde_json::json!([SEQ[0], SEQ[1], SEQ[2], SEQ[5]]));
    out.push(r);
    let mut r = request(&SEQ[1..4], 2, 22);
    r.adapter_dir = Some(dir.to_path_buf());
    r.temperature = 0.7;
    r.seed = Some(14);
    r.prompt_logprobs = true;
    r.stop = Some(serde_json::json!([]));
    out.push(r);
    let mut r = request(&SEQ[..6], 1, 16);
    r.model_id = Some("a".into());
    r.temperature = 0.9;
    r.seed = Some(15);
    r.prompt_logprobs = true;
    out.push(r);
    out
}

/// Three trained adapters (a fresh adapter's B is 0 and would not change the logits) and a
/// sampler checkpoint of the first.
fn trained_service(tmp: &std::path::Path) -> (ModelService, std::path::PathBuf) {
    let svc = service(tmp);
    for (i, id) in ["a", "b", "c"].into_iter().enumerate() {
        svc.create_adapter(&create(id, 4 + 2 * i, i as u64)).unwrap();
        for _ in 0..2 {
            loss(&svc, id, false);
            svc.optim_step(&adam(id, 3e-2)).unwrap();
        }
    }
    let dir = tmp.join("sampler_weights/a1");
    svc.save(&SaveRequest { model_id: "a".into(), dir: dir.clone(), kind: SaveKind::Sampler })
        .unwrap();
    (svc, dir)
}

fn assert_same(together: &SampleResponse, alone: &SampleResponse, what: &str) {
    assert_eq!(together.sequences.len(), alone.sequences.len(), "{what}");
    for (t, a) in together.sequences.iter().zip(&alone.sequences) {
        assert_eq!(t.tokens, a.tokens, "{what}: tokens differ");
        assert_eq!(t.stop_reason, a.stop_reason, "{what}");
        for (x, y) in t.logprobs.iter().zip(&a.logprobs) {
            assert!((x - y).abs() <= 1e-5 * y.abs().max(1.0), "{what}: logprob {x} vs {y}");
        }
    }
    assert_eq!(together.prompt_logprobs, alone.prompt_logprobs, "{what}: prompt logprobs");
}

/// Runs every request at once from its own thread.
fn concurrently<F>(reqs: &[SampleRequest], sample: F) -> Vec<Result<SampleResponse, String>>
where
    F: Fn(&SampleRequest) -> Result<SampleResponse, String> + Sync,
{
    let start = Barrier::new(reqs.len());
    std::thread::scope(|s| {
        let handles: Vec<_> = reqs
            .iter()
            .map(|r| {
                let (start, sample) = (&start, &sample);
                s.spawn(move || {
                    start.wait();
                    sample(r)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn model_app_requests_decoded_together_equal_each_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let (svc, dir) = trained_service(tmp.path());
    let reqs = requests(&dir);
    let alone: Vec<SampleResponse> = reqs.iter().map(|r| svc.sample(r).unwrap()).collect();
    let before = svc.decode_stats();
    assert_eq!(before.shared, 0, "requests sent one at a time shared a pass");
    // Tenants' outputs differ (the adapters are live), so equality below is not vacuous.
    assert_ne!(alone[0].sequences[0].tokens, alone[5].sequences[0].tokens);
    let mut shared = 0;
    for round in 0..3 {
        let stats = svc.decode_stats();
        let together = concurrently(&reqs, |r| svc.sample(r).map_err(|e| e.to_string()));
        for (i, (t, a)) in together.iter().zip(&alone).enumerate() {
            assert_same(t.as_ref().unwrap(), a, &format!("round {round}, request {i}"));
        }
        let after = svc.decode_stats();
        shared += after.shared - stats.shared;
        // Batching shows as fewer passes than the requests need one after another.
        assert!(after.passes - stats.passes <= before.passes, "{stats:?} -> {after:?}");
    }
    assert!(shared > 0, "no pass ever served two requests");
}

#[test]
fn a_bad_request_fails_alone_among_running_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let (svc, dir) = trained_service(tmp.path());
    let mut reqs = requests(&dir);
    let alone: Vec<SampleResponse> = reqs.iter().map(|r| svc.sample(r).unwrap()).collect();
    let mut bad = request(&[1, 2, 1_000_000], 1, 4);
    bad.model_id = Some("b".into());
    let mut unknown = request(&SEQ[..3], 1, 4);
    unknown.model_id = Some("nobody".into());
    reqs.insert(2, bad);
    reqs.insert(4, unknown);
    let out = concurrently(&reqs, |r| svc.sample(r).map_err(|e| e.to_string()));
    let err = out[2].as_ref().unwrap_err();
    assert!(err.contains("vocabulary"), "{err}");
    let err = out[4].as_ref().unwrap_err();
    assert!(err.contains("nobody"), "{err}");
    let good: Vec<_> = out.iter().enumerate().filter(|(i, _)| *i != 2 && *i != 4).collect();
    for ((i, t), a) in good.into_iter().zip(&alone) {
        assert_same(t.as_ref().unwrap(), a, &format!("request {i}"));
    }
}

#[test]
fn sampler_app_decodes_checkpoints_and_base_together() {
    let tmp = tempfile::tempdir().unwrap();
    let (svc, dir) = trained_service(tmp.path());
    let second = tmp.path().join("sampler_weights/b1");
    svc.save(&SaveRequest { model_id: "b".into(), dir: second.clone(), kind: SaveKind::Sampler })
        .unwrap();
    let base = BaseModel::load("generate://qwen3-tiny", &tiny_model_dir(), None).unwrap();
    let sampler = Arc::new(SamplerService::new(base).with_max_seqs(4));
    // Only sampler-style requests: adapter_dir or the base model.
    let mut reqs: Vec<SampleRequest> = requests(&dir)
        .into_iter()
        .map(|mut r| {
            if r.model_id.take().is_some() {
                r.adapter_dir = Some(if r.seed == Some(13) { second.clone() } else { dir.clone() });
            }
            r
        })
        .collect();
    reqs.truncate(5);
    let alone: Vec<SampleResponse> = reqs.iter().map(|r| sampler.sample(r).unwrap()).collect();
    let stats = sampler.decode_stats();
    let together = concurrently(&reqs, |r| sampler.sample(r).map_err(|e| e.to_string()));
    for (i, (t, a)) in together.iter().zip(&alone).enumerate() {
        assert_same(t.as_ref().unwrap(), a, &format!("request {i}"));
    }
    // With at most 4 sequences a pass, the 3-sample and 2-sample requests never shared one
    // pass beyond that bound; passes still happened.
    let after = sampler.decode_stats();
    assert!(after.passes > stats.passes);
    assert!((after.rows - stats.rows) <= 4 * (after.passes - stats.passes));
}
