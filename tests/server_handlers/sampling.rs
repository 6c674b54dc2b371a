//! Sampling routes: create_sampling_session, samplers/{id}, asample, and their refusals.

use actix_web::test;
use anyhow::{Result, ensure};
use serde_json::{Value, json};
use twinkle::protocol::tinker::proto::StopReason;

use crate::server_handlers_support::*;

/// Sampling routes: create_sampling_session (base model, or a sampler checkpoint path),
/// samplers/{id}, asample (future with one sequence id per sample, protobuf result); refusals.
/// The sampled logprobs are cross-checked against a second call that scores the same tokens as a
/// prompt (incremental decoding and teacher forcing must agree).
#[actix_web::test]
async fn sampling_routes_and_their_refusals() -> Result<()> {
    let st = stack(true, None).await?;
    let svc = test::init_service(app_config(st.app.clone())).await;
    let s = session(&svc).await?;

    let b = json!({"session_id": s, "sampling_session_seq_id": 0, "base_model": MODEL,
        "type": "create_sampling_session"});
    let r = call(&svc, post("create_sampling_session", b)).await;
    let sid = format!("{s}:sample:0");
    ensure!(r.status == 200 && r.json()["sampling_session_id"] == sid.as_str(), "{}", r.json());
    let g = call(&svc, get(&format!("samplers/{sid}"))).await;
    ensure!(g.status == 200, "{}", g.detail());
    let gj = g.json();
    ensure!(gj["sampler_id"] == sid.as_str() && gj["base_model"] == MODEL, "{gj}");
    ensure!(gj.get("model_path").is_none_or(Value::is_null), "{gj}");

    // Two greedy samples of 5 tokens, EOS disabled (`stop: []`): both run to max_tokens, agree,
    // and carry one finite logprob per token; the future lists two distinct sequence ids.
    let prompt = &SEQ[..6];
    let (ids, out) = sample(&svc, sample_body(&sid, prompt, 2, 5, false)).await?;
    ensure!(ids.len() == 2 && ids[0] != ids[1], "{ids:?}");
    ensure!(out.sequences.len() == 2 && out.prompt_logprobs.is_none(), "{out:?}");
    for q in &out.sequences {
        ensure!(q.stop_reason == StopReason::Length && q.tokens.len() == 5, "{q:?}");
        ensure!(q.logprobs.len() == 5, "{q:?}");
        ensure!(q.logprobs.iter().all(|x| x.is_finite() && *x <= 0.0), "{q:?}");
    }
    ensure!(out.sequences[0].tokens == out.sequences[1].tokens, "greedy samples differ");
    // Scoring prompt + generated tokens gives the generated tokens' logprobs back.
    let q = &out.sequences[0];
    let full: Vec<u32> = prompt.iter().copied().chain(q.tokens.iter().map(|&t| t as u32)).collect();
    let (_, scored) = sample(&svc, sample_body(&sid, &full, 1, 1, true)).await?;
    let p = scored.prompt_logprobs.unwrap_or_default();
    ensure!(p.len() == full.len() && p[0].is_none(), "{p:?}");
    let tail: Vec<f32> = p[prompt.len()..].iter().map(|x| x.unwrap_or(f32::NAN)).collect();
    ensure!(close(&tail, &q.logprobs, 1e-4), "scored {tail:?} vs sampled {:?}", q.logprobs);

    // A sampling session on a sampler checkpoint: found by its path, and it samples.
    let m = model(&svc, &s, 0).await?;
    let save = json!({"model_id": m, "path": "s1", "kind": "snapshot"});
    let path = done_json(&svc, post("save_weights_for_sampler", save)).await?["path"].clone();
    let b = json!({"session_id": s, "sampling_session_seq_id": 1, "model_path": path});
    let r = call(&svc, post("create_sampling_session", b)).await;
    let sid1 = format!("{s}:sample:1");
    ensure!(r.status == 200 && r.json()["sampling_session_id"] == sid1.as_str(), "{}", r.json());
    let gj = call(&svc, get(&format!("samplers/{sid1}"))).await.json();
    ensure!(gj["model_path"] == path && gj["base_model"] == MODEL, "{gj}");
    let (_, o1) = sample(&svc, sample_body(&sid1, prompt, 1, 3, false)).await?;
    ensure!(o1.sequences.len() == 1 && o1.sequences[0].tokens.len() == 3, "{o1:?}");

    // Refusals of create_sampling_session and samplers/{id}.
    let refusals: [(Value, u16, &[&str]); 6] = [
        (
            json!({"session_id": "sess-nope", "sampling_session_seq_id": 2, "base_model": MODEL}),
            404,
            &["not found"],
        ),
        (
            json!({"session_id": s, "sampling_session_seq_id": 2}),
            400,
            &["base_model", "model_path"],
        ),
        (
            json!({"session_id": s, "sampling_session_seq_id": 2, "base_model": "no/such-model"}),
            404,
            &["no/such-model"],
        ),
        (
            json!({"session_id": s, "sampling_session_seq_id": 2, "model_path": "file:///etc"}),
            400,
            &["tinker://"],
        ),
        (
            json!({"session_id": s, "sampling_session_seq_id": 2,
                "model_path": format!("tinker://{m}/sampler_weights/none")}),
            404,
            &["not found"],
        ),
        (
            json!({"session_id": s, "sampling_session_seq_id": "x", "base_model": MODEL}),
            400,
            &["sampling_session_seq_id"],
        ),
    ];
    for (body, status, words) in refusals {
        call(&svc, post("create_sampling_session", body)).await.refused(status, words)?;
    }
    call(&svc, get("samplers/sess-nope:sample:0")).await.refused(404, &["not found"])?;
    call(&svc, get_as("tml-other", &format!("samplers/{sid}")))
        .await
        .refused(404, &["not found"])?;

    // Refusals of asample, each naming what is wrong.
    let with = |f: &dyn Fn(&mut Value)| {
        let mut b = sample_body(&sid, prompt, 1, 2, false);
        f(&mut b);
        post("asample", b)
    };
    call(&svc, with(&|b| b["sampling_session_id"] = json!(format!("{s}:sample:9"))))
        .await
        .refused(404, &["not found"])?;
    call(
        &svc,
        with(&|b| {
            b.as_object_mut().unwrap().remove("sampling_session_id");
        }),
    )
    .await
    .refused(400, &["sampling_session_id"])?;
    call(&svc, with(&|b| b["num_samples"] = json!(0))).await.refused(400, &["num_samples"])?;
    call(&svc, with(&|b| b["num_samples"] = json!(100_000)))
        .await
        .refused(400, &["num_samples"])?;
    call(&svc, with(&|b| b["sampling_params"]["temperature"] = json!(-1.0)))
        .await
        .refused(400, &["sampling_params.temperature"])?;
    call(&svc, with(&|b| b["sampling_params"]["top_p"] = json!(0.0)))
        .await
        .refused(400, &["sampling_params.top_p"])?;
    call(&svc, with(&|b| b["topk_prompt_logprobs"] = json!(3)))
        .await
        .refused(400, &["topk_prompt_logprobs"])?;
    call(&svc, with(&|b| b["prompt"]["chunks"][0]["tokens"] = json!([])))
        .await
        .refused(400, &["prompt"])?;
    call(&svc, with(&|b| b["prompt"]["chunks"][0]["tokens"] = json!([1, 10_000_000])))
        .await
        .refused(400, &["prompt", "out of range"])?;
    call(&svc, with(&|b| b["prompt"] = json!("hello"))).await.refused(400, &["prompt"])?;
    st.stop().await;
    Ok(())
}
