//! Refusals of the training routes (create_model, get_info, forward_backward, optim_step, the
//! checkpoint routes), each on the request with the field named, or as a failed future where
//! only the model application can tell.

use actix_web::test;
use anyhow::{Result, ensure};
use prost::Message;
use serde_json::json;

use crate::server_handlers_support::*;

/// Refusals of the training routes, each answered on the request (never a hung future): unknown
/// session / model / checkpoint / base model are 404, another key's model is 404 too, and bad
/// input is a 400 naming the field; a JSON body on the protobuf route, and a body over the
/// limit, are refused.
#[actix_web::test]
async fn training_routes_refuse_bad_input_by_field() -> Result<()> {
    let st = stack(true, None).await?;
    let svc = test::init_service(app_config(st.app.clone())).await;
    let (s, m) = crate::session_with_model(&svc).await?;
    let nope = format!("{s}:train:9");

    // create_model.
    let mut b = create_model_body("sess-nope", 0);
    call(&svc, post("create_model", b.clone())).await.refused(404, &["not found"])?;
    b = create_model_body(&s, 1);
    b["base_model"] = json!("no/such-model");
    call(&svc, post("create_model", b)).await.refused(404, &["no/such-model", MODEL])?;
    b = create_model_body(&s, 1);
    b["lora_config"]["rank"] = json!(100_000);
    call(&svc, post("create_model", b)).await.refused(400, &["lora_config.rank"])?;
    b = create_model_body(&s, 1);
    b["optimizer_config"] = json!({"type": "dimuon", "version": 1});
    call(&svc, post("create_model", b)).await.refused(400, &["optimizer_config", "adamw"])?;
    b = create_model_body(&s, 1);
    b.as_object_mut().unwrap().remove("session_id");
    call(&svc, post("create_model", b)).await.refused(400, &["session_id"])?;
    b = create_model_body(&s, 1);
    b["model_seq_id"] = json!("one");
    call(&svc, post("create_model", b)).await.refused(400, &["model_seq_id"])?;

    // get_info / optim_step / save_weights / save_weights_for_sampler on unknown or foreign ids.
    for (path, body) in [
        ("get_info", json!({"model_id": nope})),
        ("optim_step", json!({"model_id": nope, "seq_id": 1})),
        ("save_weights", json!({"model_id": nope, "path": "x"})),
        ("save_weights_for_sampler", json!({"model_id": nope, "path": "x"})),
    ] {
        let r = call(&svc, post(path, body)).await;
        r.refused(404, &["not found"]).map_err(|e| e.context(path))?;
    }
    let r = call(&svc, post_as("tml-other", "get_info", json!({"model_id": m}))).await;
    r.refused(404, &["not found"])?;
    call(&svc, post("get_info", json!({"model": m}))).await.refused(400, &["model_id"])?;

    // optim_step values.
    let bad_lr = json!({"model_id": m, "adam_params": {"learning_rate": -1.0}});
    call(&svc, post("optim_step", bad_lr)).await.refused(400, &["adam_params.learning_rate"])?;
    let other_opt = json!({"model_id": m, "optimizer_params": {"type": "dimuon"}});
    call(&svc, post("optim_step", other_opt)).await.refused(400, &["optimizer_params"])?;
    let typed = json!({"model_id": m, "adam_params": {"beta1": "high"}});
    call(&svc, post("optim_step", typed)).await.refused(400, &["adam_params.beta1"])?;

    // save_weights / save_weights_for_sampler / load_weights bodies.
    call(&svc, post("save_weights", json!({"model_id": m}))).await.refused(400, &["path"])?;
    let ttl = json!({"model_id": m, "path": "t", "ttl_seconds": -5});
    call(&svc, post("save_weights", ttl)).await.refused(400, &["ttl_seconds"])?;
    let slash = json!({"model_id": m, "path": "a/b"});
    call(&svc, post("save_weights", slash)).await.refused(400, &["a/b"])?;
    let neither = json!({"model_id": m, "kind": "snapshot"});
    call(&svc, post("save_weights_for_sampler", neither)).await.refused(400, &["path"])?;
    let not_tinker = json!({"model_id": m, "path": "/etc/passwd", "optimizer": false});
    call(&svc, post("load_weights", not_tinker)).await.refused(400, &["tinker://"])?;
    let missing = json!({"model_id": m, "path": format!("tinker://{m}/weights/none"),
        "optimizer": false});
    call(&svc, post("load_weights", missing)).await.refused(404, &["not found"])?;
    let no_target = json!({"path": format!("tinker://{m}/weights/none"), "optimizer": false});
    call(&svc, post("load_weights", no_target)).await.refused(400, &["model_id"])?;
    // The optimizer state is only in training checkpoints.
    let named = json!({"model_id": m, "path": "s1", "kind": "snapshot"});
    done_json(&svc, post("save_weights_for_sampler", named)).await?;
    let opt = json!({"model_id": m, "path": format!("tinker://{m}/sampler_weights/s1"),
        "optimizer": true});
    call(&svc, post("load_weights", opt)).await.refused(400, &["optimizer"])?;

    // forward_backward: the body is protobuf; JSON (the SDK's other bodies) is a 400.
    let r = call(&svc, post("forward_backward", json!({"model_id": m}))).await;
    r.refused(400, &["protobuf", "ForwardBackwardRequest"])?;
    let fb = |f: &dyn Fn(&mut twinkle::protocol::tinker::proto::ForwardBackwardRequest)| {
        let mut req = fb_request(&m, 1, &SEQ, None, true);
        f(&mut req);
        proto_post("forward_backward", req.encode_to_vec())
    };
    call(&svc, fb(&|r| r.model_id = nope.clone())).await.refused(404, &["not found"])?;
    call(&svc, fb(&|r| r.loss_fn = "hinge".into())).await.refused(400, &["loss_fn", "hinge"])?;
    call(&svc, fb(&|r| r.data.clear())).await.refused(400, &["data"])?;
    call(
        &svc,
        fb(&|r| {
            r.data[0].loss_fn_inputs.remove("target_tokens");
        }),
    )
    .await
    .refused(400, &["data[0].loss_fn_inputs.target_tokens"])?;
    // Targets one longer than the input.
    let long: Vec<u32> = SEQ.iter().copied().chain([5]).collect();
    let r = fb(&|r| {
        let other = fb_request(&m, 1, &long, None, true);
        r.data[0].loss_fn_inputs = other.data[0].loss_fn_inputs.clone();
    });
    call(&svc, r).await.refused(400, &["target_tokens", "shape"])?;
    // A token id past the vocabulary, in the input and in the targets.
    let big = [1u32, 10_000_000, 3];
    let r = call(
        &svc,
        proto_post("forward_backward", fb_request(&m, 1, &big, None, true).encode_to_vec()),
    )
    .await;
    r.refused(400, &["data[0]", "out of range"])?;
    // Weights: the wrong count, and NaN.
    let n = SEQ.len() - 1;
    let short = fb_request(&m, 1, &SEQ, Some(&vec![1.0; n - 1]), true);
    let r = call(&svc, proto_post("forward_backward", short.encode_to_vec())).await;
    r.refused(400, &["data[0].loss_fn_inputs.weights"])?;
    let nan = fb_request(&m, 1, &SEQ, Some(&vec![f32::NAN; n]), true);
    let r = call(&svc, proto_post("forward_backward", nan.encode_to_vec())).await;
    r.refused(400, &["weights", "NaN"])?;
    // RL losses name the inputs they need.
    call(&svc, fb(&|r| r.loss_fn = "ppo".into())).await.refused(400, &["logprobs", "ppo"])?;

    // A JSON route given a protobuf body: a 400 that says the body is not valid.
    let req = proto_post("create_model", fb_request(&m, 1, &SEQ, None, true).encode_to_vec());
    call(&svc, req).await.refused(400, &["request body is not valid"])?;
    // Refusals only the model application can make come back as failed futures (category user):
    // a step without gradients.
    let fresh = model(&svc, &s, 2).await?;
    let (err, category) = failed(&svc, post("optim_step", json!({"model_id": fresh}))).await?;
    ensure!(category == "user" && err.contains("forward_backward"), "{category}: {err}");

    // A body over the 64 MiB limit: 413, before any parsing.
    let huge = proto_post("forward_backward", vec![0u8; (64 << 20) + 1]);
    call(&svc, huge).await.refused(413, &[])?;
    st.stop().await;
    Ok(())
}
