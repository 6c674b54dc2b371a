//! In-process handler tests of the server application's Tinker routes (issue #13, item 7): the
//! app is built from its public constructor and mounted with `test::init_service`; behind it runs
//! the REAL model application (CPU, generated tiny Qwen3) on loopback, found through a stand-in
//! head. Every route is driven through its public HTTP form only, for its success answer (shape
//! and values, cross-checked against a second, independent call) and its refusals (401, 404,
//! 400 naming the field, wrong content type, oversize and invalid values).

mod server_handlers_support;

// The other routes' tests, one file per group (tests/server_handlers/).
#[path = "server_handlers/refusals.rs"]
mod refusals;
#[path = "server_handlers/rest.rs"]
mod rest;
#[path = "server_handlers/sampling.rs"]
mod sampling;

use actix_http::Request;
use actix_web::body::MessageBody;
use actix_web::dev::{Service, ServiceResponse};
use actix_web::test;
use anyhow::{Result, ensure};
use serde_json::json;
use server_handlers_support::*;

/// A new session and its first model (`{session}:train:0`): the ids.
async fn session_with_model<S, B>(svc: &S) -> Result<(String, String)>
where
    S: Service<Request, Response = ServiceResponse<B>, Error = actix_web::Error>,
    B: MessageBody,
{
    let s = session(svc).await?;
    let m = model(svc, &s, 0).await?;
    Ok((s, m))
}

/// Every Tinker route (method, path under `/api/v1`) the server mounts, in the spec's order.
const ROUTES: &[(&str, &str)] = &[
    ("POST", "client/config"),
    ("POST", "client/dynamic_config"),
    ("GET", "get_server_capabilities"),
    ("POST", "create_session"),
    ("POST", "session_heartbeat"),
    ("POST", "telemetry"),
    ("POST", "sessions/s-1/finish"),
    ("POST", "create_model"),
    ("POST", "get_info"),
    ("POST", "forward_backward"),
    ("POST", "optim_step"),
    ("POST", "save_weights"),
    ("POST", "save_weights_for_sampler"),
    ("POST", "load_weights"),
    ("POST", "create_sampling_session"),
    ("GET", "samplers/s-1:sample:0"),
    ("POST", "asample"),
    ("POST", "retrieve_future"),
    ("GET", "training_runs"),
    ("GET", "training_runs/s-1:train:0"),
    ("GET", "training_runs/s-1:train:0/checkpoints"),
    ("DELETE", "training_runs/s-1:train:0/checkpoints/weights/c1"),
    ("GET", "checkpoints"),
    ("POST", "weights_info"),
];

/// The key check comes before anything else on every route: no key, a key that is not `tml-`
/// in development mode, and a `tml-` key outside the configured list are each a JSON 401 (the
/// SDK raises AuthenticationError without retrying); the configured key gets through.
#[actix_web::test]
async fn every_route_refuses_a_missing_or_unaccepted_key() -> Result<()> {
    for keys in [None, Some(&["tml-good"][..])] {
        let st = stack(false, keys).await?;
        let svc = test::init_service(app_config(st.app.clone())).await;
        let mut bad = vec![None, Some("sk-not-tinker")];
        if keys.is_some() {
            bad.push(Some("tml-unlisted"));
        }
        for &(method, path) in ROUTES {
            for key in &bad {
                let mut req = match method {
                    "GET" => test::TestRequest::get(),
                    "DELETE" => test::TestRequest::delete(),
                    _ => test::TestRequest::post().set_json(json!({})),
                }
                .uri(&format!("/api/v1/{path}"));
                if let Some(k) = key {
                    req = req.insert_header(("x-api-key", *k));
                }
                let r = call(&svc, req).await;
                let word = if key.is_none() { "X-API-Key" } else { "not accepted" };
                r.refused(401, &[word]).map_err(|e| e.context(format!("{method} {path}")))?;
            }
        }
        let good = keys.map_or(KEY, |k| k[0]);
        let r = call(&svc, post_as(good, "client/config", json!({"sdk_version": "0.38.0"}))).await;
        ensure!(r.status == 200 && r.json().is_object(), "{}", r.detail());
    }
    Ok(())
}

/// Bootstrap and session routes: healthz, client config, capabilities (completed from the model
/// application), sessions with heartbeat and finish, telemetry; unknown sessions are 404 and a
/// malformed body is a 400 naming the field.
#[actix_web::test]
async fn bootstrap_and_session_routes() -> Result<()> {
    let st = stack(true, None).await?;
    let svc = test::init_service(app_config(st.app.clone())).await;

    // healthz needs no key (liveness).
    let r = call(&svc, test::TestRequest::get().uri("/api/v1/healthz")).await;
    ensure!(r.status == 200 && r.json()["status"] == "ok", "{}", r.json());
    for path in ["client/config", "client/dynamic_config"] {
        let r = call(&svc, post(path, json!({"sdk_version": "0.38.0"}))).await;
        ensure!(r.status == 200 && r.json().is_object(), "{path}: {}", r.json());
    }
    // JWT mode must stay off (spec §1.2): absent or false.
    let cfg = call(&svc, post("client/config", json!({}))).await.json();
    ensure!(cfg.get("pjwt_auth_enabled").is_none_or(|v| v == false), "{cfg}");

    // The served model is advertised with the context the application itself reports.
    let caps = call(&svc, get("get_server_capabilities")).await;
    ensure!(caps.status == 200, "{}", caps.detail());
    let models = caps.json()["supported_models"].as_array().cloned().unwrap_or_default();
    ensure!(models.len() == 1, "{}", caps.json());
    let m = &models[0];
    ensure!(m["model_name"] == MODEL && m["trainable"] == true && m["sampleable"] == true, "{m}");
    let info = st.app.disp.up.find("model", MODEL).await;
    let ctx = info.map(|u| u.info.max_length as u64);
    ensure!(ctx.is_some() && m["max_context_length"] == json!(ctx), "{m} vs {ctx:?}");

    // Sessions: ids embed in model ids and tinker paths, so no `:` or `/`.
    let s = session(&svc).await?;
    ensure!(!s.is_empty() && !s.contains(['/', ':']), "{s}");
    let other = session(&svc).await?;
    ensure!(other != s, "two sessions share an id");
    let hb = json!({"session_id": s, "type": "session_heartbeat"});
    let r = call(&svc, post("session_heartbeat", hb)).await;
    ensure!(r.status == 200 && r.json().is_object(), "{}", r.detail());
    call(&svc, post("session_heartbeat", json!({"session_id": "sess-nope"})))
        .await
        .refused(404, &["not found"])?;
    call(&svc, post("session_heartbeat", json!({"session": s})))
        .await
        .refused(400, &["session_id"])?;
    // Another key does not see this session.
    let r = call(&svc, post_as("tml-other", "session_heartbeat", json!({"session_id": s}))).await;
    r.refused(404, &["not found"])?;
    // create_session: a wrongly typed field is named.
    call(&svc, post("create_session", json!({"tags": "a,b"}))).await.refused(400, &["tags"])?;
    // A JSON body under a non-JSON content type is tolerated (spec §1.4).
    let req = test::TestRequest::post()
        .uri("/api/v1/create_session")
        .insert_header(("x-api-key", KEY))
        .insert_header(("content-type", "text/plain"))
        .set_payload(json!({"tags": []}).to_string());
    let r = call(&svc, req).await;
    ensure!(r.status == 200 && r.json()["session_id"].is_string(), "{}", r.detail());

    // Telemetry answers exactly {"status": "accepted"}.
    let t = json!({"events": [], "platform": "linux", "sdk_version": "0.38.0", "session_id": s,
        "process_uuid": "u"});
    let r = call(&svc, post("telemetry", t)).await;
    ensure!(r.status == 200 && r.json() == json!({"status": "accepted"}), "{}", r.json());

    // finish: 2xx once; the finished session is gone for heartbeats; unknown ids are 404.
    let fin = json!({"reason": {"type": "success"}, "detail": null});
    let r = call(&svc, post(&format!("sessions/{s}/finish"), fin.clone())).await;
    ensure!((200..300).contains(&r.status), "{} {}", r.status, r.detail());
    call(&svc, post("sessions/sess-nope/finish", fin.clone()))
        .await
        .refused(404, &["not found"])?;
    call(&svc, post(&format!("sessions/{other}/finish"), json!({"reason": {"type": "nope"}})))
        .await
        .refused(400, &["reason"])?;
    st.stop().await;
    Ok(())
}

/// The training flow of the SDK, route by route: create_model (idempotent on its id), get_info,
/// forward / forward_backward (protobuf), optim_step, save_weights (refusing an existing name
/// unless overwrite), save_weights_for_sampler (named and ephemeral), load_weights (legacy and
/// create-via-load). Expected values come from the loss definition and from other calls: a
/// forward is repeatable and equals forward_backward's logprobs, an optimizer step lowers the
/// loss of the sequence it trained on, a loaded state reproduces the loss it was saved with, and
/// a sampler snapshot scores the prompt exactly as the training forward did.
#[actix_web::test]
async fn training_routes_run_against_the_model_application() -> Result<()> {
    let st = stack(true, None).await?;
    let svc = test::init_service(app_config(st.app.clone())).await;
    let s = session(&svc).await?;

    // create_model: the future carries the model id `{session}:train:{seq}` (spec §5.2).
    let sub = call(&svc, post("create_model", create_model_body(&s, 0))).await;
    let want = format!("{s}:train:0");
    ensure!(sub.json()["model_id"] == want.as_str(), "{}", sub.json());
    let id = request_id(&sub)?;
    let res = retrieve(&svc, KEY, &id).await.json();
    ensure!(res["model_id"] == want.as_str(), "{res}");
    // The same create again (a retried submission) answers the same model, not a failure.
    let m = model(&svc, &s, 0).await?;
    ensure!(m == want, "{m}");

    let info = call(&svc, post("get_info", json!({"model_id": m, "type": "get_info"}))).await;
    let i = info.json();
    ensure!(info.status == 200, "{}", info.detail());
    ensure!(i["model_id"] == m.as_str() && i["model_data"]["model_name"] == MODEL, "{i}");
    ensure!(i["model_data"]["tokenizer_id"].is_string(), "the SDK's get_tokenizer needs it: {i}");
    ensure!(i["is_lora"] == true && i["lora_rank"] == 4, "{i}");
    ensure!(i["optimizer_config"]["type"] == "adamw", "{i}");

    // forward: one logprob per target, finite and <= 0; loss:sum = -Σ weights·logprobs and a
    // zero weight contributes no loss (spec §6.4).
    let n = SEQ.len() - 1;
    let mut w = vec![1.0f32; n];
    w[0] = 0.0;
    let f0 = fwdbwd(&svc, &fb_request(&m, 1, &SEQ, Some(&w), true)).await?;
    ensure!(f0.logprobs.len() == n && f0.elementwise_loss.len() == n, "{:?}", f0.logprobs);
    ensure!(f0.logprobs.iter().all(|x| x.is_finite() && *x <= 0.0), "{:?}", f0.logprobs);
    ensure!(f0.elementwise_loss[0] == 0.0, "{:?}", f0.elementwise_loss);
    let expect: f64 = -w.iter().zip(&f0.logprobs).map(|(a, b)| (a * b) as f64).sum::<f64>();
    ensure!((f0.loss_sum - expect).abs() <= 1e-3 * expect.abs().max(1.0), "{:?}", f0.raw);
    ensure!(!f0.raw.loss_fn_output_type.is_empty(), "{:?}", f0.raw);
    for k in f0.raw.metrics.keys() {
        ensure!(k.split(':').count() == 2, "metric key {k} is not name:reduction");
    }
    // Forward accumulates nothing: a second one is identical; forward_backward scores the same.
    let f1 = fwdbwd(&svc, &fb_request(&m, 2, &SEQ, Some(&w), true)).await?;
    ensure!(f1.logprobs == f0.logprobs, "{:?} vs {:?}", f1.logprobs, f0.logprobs);
    let fb = fwdbwd(&svc, &fb_request(&m, 3, &SEQ, Some(&w), false)).await?;
    ensure!(close(&fb.logprobs, &f0.logprobs, 1e-5), "{:?} vs {:?}", fb.logprobs, f0.logprobs);

    // optim_step: JSON metrics; the next forward's loss on the trained sequence is lower.
    let step = json!({"model_id": m, "seq_id": 4, "type": "optim_step",
        "adam_params": {"learning_rate": 0.01, "beta1": 0.9, "beta2": 0.95, "eps": 1e-12,
            "weight_decay": 0.0, "grad_clip_norm": 0.0}});
    let r = done_json(&svc, post("optim_step", step.clone())).await?;
    ensure!(r["metrics"].is_object(), "{r}");
    let f2 = fwdbwd(&svc, &fb_request(&m, 5, &SEQ, Some(&w), true)).await?;
    ensure!(f2.loss_sum < f0.loss_sum, "step: {} -> {}", f0.loss_sum, f2.loss_sum);

    // save_weights: tinker://{run}/weights/{name}; the same name again fails the future (user),
    // unless overwrite.
    let save = json!({"model_id": m, "path": "w1", "seq_id": 6, "overwrite": false,
        "type": "save_weights"});
    let v = done_json(&svc, post("save_weights", save.clone())).await?;
    let w1 = format!("tinker://{m}/weights/w1");
    ensure!(v["path"] == w1.as_str(), "{v}");
    let mut again = save.clone();
    again["seq_id"] = json!(7);
    let (err, category) = failed(&svc, post("save_weights", again.clone())).await?;
    ensure!(category == "user" && err.contains("already exists"), "{category}: {err}");
    again["seq_id"] = json!(8);
    again["overwrite"] = json!(true);
    ensure!(done_json(&svc, post("save_weights", again)).await?["path"] == w1.as_str());

    // save_weights_for_sampler: named → a sampler path; ephemeral → a sampling session.
    let named = json!({"model_id": m, "path": "s1", "kind": "snapshot", "seq_id": 9,
        "type": "save_weights_for_sampler"});
    let v = done_json(&svc, post("save_weights_for_sampler", named)).await?;
    ensure!(v["path"] == format!("tinker://{m}/sampler_weights/s1").as_str(), "{v}");
    let eph = json!({"model_id": m, "sampling_session_seq_id": 0, "kind": "snapshot",
        "seq_id": 10, "type": "save_weights_for_sampler"});
    let v = done_json(&svc, post("save_weights_for_sampler", eph)).await?;
    let sid = format!("{s}:sample:0");
    ensure!(v["sampling_session_id"] == sid.as_str() && v["path"].is_null(), "{v}");

    // The snapshot scores the prompt as the training forward did: prompt_logprobs[i] is the
    // logprob of token i given the ones before it, i.e. forward's logprobs[i - 1].
    let (ids, out) = sample(&svc, sample_body(&sid, &SEQ, 1, 1, true)).await?;
    ensure!(ids.len() == 1 && out.sequences.len() == 1, "{ids:?}");
    let p = out.prompt_logprobs.clone().unwrap_or_default();
    ensure!(p.len() == SEQ.len() && p[0].is_none(), "{p:?}");
    let p: Vec<f32> = p[1..].iter().map(|x| x.unwrap_or(f32::NAN)).collect();
    ensure!(close(&p, &f2.logprobs, 1e-4), "sampler {p:?}\ntraining {:?}", f2.logprobs);

    // Another step moves the weights away from w1; legacy load_weights brings w1 back.
    fwdbwd(&svc, &fb_request(&m, 11, &SEQ, Some(&w), false)).await?;
    let mut step2 = step.clone();
    step2["seq_id"] = json!(12);
    done_json(&svc, post("optim_step", step2)).await?;
    let f3 = fwdbwd(&svc, &fb_request(&m, 13, &SEQ, Some(&w), true)).await?;
    ensure!(f3.loss_sum < f2.loss_sum, "{} -> {}", f2.loss_sum, f3.loss_sum);
    let load = json!({"model_id": m, "path": w1, "seq_id": 14, "optimizer": true,
        "type": "load_weights"});
    let v = done_json(&svc, post("load_weights", load)).await?;
    ensure!(v["model_id"] == m.as_str() && v["path"] == w1.as_str(), "{v}");
    let f4 = fwdbwd(&svc, &fb_request(&m, 15, &SEQ, Some(&w), true)).await?;
    ensure!(close(&f4.logprobs, &f2.logprobs, 1e-5), "{:?} vs {:?}", f4.logprobs, f2.logprobs);

    // create-via-load: a new model `{session}:train:1` holding w1, described by get_info.
    let cvl = json!({"session_id": s, "model_seq_id": 1, "path": w1, "optimizer": false,
        "type": "load_weights"});
    let v = done_json(&svc, post("load_weights", cvl.clone())).await?;
    let m1 = format!("{s}:train:1");
    ensure!(v["model_id"] == m1.as_str(), "{v}");
    let i = call(&svc, post("get_info", json!({"model_id": m1}))).await.json();
    ensure!(i["model_id"] == m1.as_str() && i["lora_rank"] == 4, "{i}");
    let f5 = fwdbwd(&svc, &fb_request(&m1, 1, &SEQ, Some(&w), true)).await?;
    ensure!(close(&f5.logprobs, &f2.logprobs, 1e-5), "{:?} vs {:?}", f5.logprobs, f2.logprobs);
    // Loading onto an id that exists fails the future (user).
    let (err, category) = failed(&svc, post("load_weights", cvl)).await?;
    ensure!(category == "user" && err.contains("exists"), "{category}: {err}");
    st.stop().await;
    Ok(())
}

/// `per_token_model_limit`: a key's model beyond the limit fails its create_model future with a
/// message naming the setting (an HTTP 409 would be retried by the SDK for minutes); finishing a
/// session frees its models.
#[actix_web::test]
async fn create_model_beyond_the_per_key_limit_fails_its_future() -> Result<()> {
    let st = stack_with(true, None, |a| a.per_token_model_limit = Some(1)).await?;
    let svc = test::init_service(app_config(st.app.clone())).await;
    let s = session(&svc).await?;
    model(&svc, &s, 0).await?;
    let (err, category) = failed(&svc, post("create_model", create_model_body(&s, 1))).await?;
    ensure!(category == "user" && err.contains("per_token_model_limit"), "{category}: {err}");
    // Another key has its own allowance.
    let b = json!({"tags": []});
    let other = call(&svc, post_as("tml-other", "create_session", b)).await.json();
    let body = create_model_body(other["session_id"].as_str().unwrap_or_default(), 0);
    let sub = call(&svc, post_as("tml-other", "create_model", body)).await;
    let v = retrieve(&svc, "tml-other", &request_id(&sub)?).await.json();
    ensure!(v["model_id"].is_string(), "{v}");
    let fin = json!({"reason": {"type": "success"}});
    let r = call(&svc, post(&format!("sessions/{s}/finish"), fin)).await;
    ensure!((200..300).contains(&r.status), "{}", r.detail());
    let s2 = session(&svc).await?;
    ensure!(model(&svc, &s2, 0).await? == format!("{s2}:train:0"));
    st.stop().await;
    Ok(())
}
