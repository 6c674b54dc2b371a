//! RestClient routes: training runs, checkpoints, weights_info, delete, per key.

use actix_web::test;
use anyhow::{Result, ensure};
use serde_json::{Value, json};

use crate::server_handlers_support::*;

/// RestClient routes over what the training routes created: training_runs (with cursor),
/// training_runs/{id}, its checkpoints, the key's checkpoints, weights_info, and delete; another
/// key sees none of it (404 / empty lists, and 410 for its futures).
#[actix_web::test]
async fn rest_routes_list_get_and_delete_what_the_key_owns() -> Result<()> {
    let st = stack(true, None).await?;
    let svc = test::init_service(app_config(st.app.clone())).await;
    let (s, m) = crate::session_with_model(&svc).await?;
    let save = json!({"model_id": m, "path": "c1"});
    let c1 = done_json(&svc, post("save_weights", save)).await?["path"].clone();
    let save = json!({"model_id": m, "path": "c2", "kind": "snapshot"});
    let c2 = done_json(&svc, post("save_weights_for_sampler", save)).await?["path"].clone();

    let runs = call(&svc, get("training_runs?limit=10&offset=0&access_scope=owned")).await;
    ensure!(runs.status == 200, "{}", runs.detail());
    let rj = runs.json();
    ensure!(rj["cursor"]["total_count"] == 1 && rj["cursor"]["limit"] == 10, "{rj}");
    let run = &rj["training_runs"][0];
    ensure!(run["training_run_id"] == m.as_str() && run["base_model"] == MODEL, "{run}");
    ensure!(run["is_lora"] == true && run["lora_rank"] == 4, "{run}");
    ensure!(run["model_owner"].is_string() && run["last_request_time"].is_string(), "{run}");
    let one = call(&svc, get(&format!("training_runs/{m}"))).await;
    ensure!(one.status == 200 && &one.json() == run, "{}", one.json());
    ensure!(one.json()["last_checkpoint"]["tinker_path"] == c1, "{}", one.json());

    let cks = call(&svc, get(&format!("training_runs/{m}/checkpoints"))).await.json();
    let list = cks["checkpoints"].as_array().cloned().unwrap_or_default();
    ensure!(list.len() == 2, "{cks}");
    let by = |p: &Value| list.iter().find(|c| &c["tinker_path"] == p).cloned();
    let (k1, k2) = (by(&c1).unwrap_or_default(), by(&c2).unwrap_or_default());
    ensure!(k1["checkpoint_id"] == "weights/c1" && k1["checkpoint_type"] == "training", "{k1}");
    ensure!(k2["checkpoint_id"] == "sampler_weights/c2" && k2["checkpoint_type"] == "sampler");
    ensure!(k1["time"].is_string() && k1["size_bytes"].as_u64().is_some_and(|n| n > 0), "{k1}");
    let user = call(&svc, get("checkpoints?limit=1")).await.json();
    ensure!(user["checkpoints"].as_array().map(Vec::len) == Some(1), "{user}");
    ensure!(user["cursor"]["total_count"] == 2, "{user}");

    let wi = call(&svc, post("weights_info", json!({"tinker_path": c1}))).await;
    let wj = wi.json();
    ensure!(wi.status == 200 && wj["base_model"] == MODEL && wj["is_lora"] == true, "{wj}");
    ensure!(wj["lora_rank"] == 4, "{wj}");

    // Refusals: unknown ids, bad paths and queries.
    call(&svc, get(&format!("training_runs/{s}:train:9"))).await.refused(404, &["not found"])?;
    let r = call(&svc, get(&format!("training_runs/{s}:train:9/checkpoints"))).await;
    ensure!(r.status == 404 || r.json()["checkpoints"] == json!([]), "{}", r.json());
    call(&svc, get("training_runs?limit=lots")).await.refused(400, &[])?;
    call(&svc, post("weights_info", json!({"tinker_path": "s3://x"})))
        .await
        .refused(400, &["tinker://"])?;
    call(&svc, post("weights_info", json!({"path": c1}))).await.refused(400, &["tinker_path"])?;
    let none = json!({"tinker_path": format!("tinker://{m}/weights/none")});
    call(&svc, post("weights_info", none)).await.refused(404, &["not found"])?;

    // Another key: nothing of this one's is visible, and its futures are unknown (410).
    let other = "tml-other";
    let r = call(&svc, get_as(other, "training_runs")).await.json();
    ensure!(r["training_runs"] == json!([]) && r["cursor"]["total_count"] == 0, "{r}");
    call(&svc, get_as(other, &format!("training_runs/{m}"))).await.refused(404, &["not found"])?;
    let r = call(&svc, post_as(other, "weights_info", json!({"tinker_path": c1}))).await;
    r.refused(404, &["not found"])?;
    let del = format!("/api/v1/training_runs/{m}/checkpoints/weights/c1");
    let d = |key: &str| {
        test::TestRequest::delete().uri(&del).insert_header(("x-api-key", key.to_string()))
    };
    call(&svc, d(other)).await.refused(404, &["not found"])?;
    let sub = call(&svc, post("optim_step", json!({"model_id": m}))).await;
    let id = request_id(&sub)?;
    ensure!(retrieve(&svc, other, &id).await.status == 410, "another key's future");
    ensure!(retrieve(&svc, KEY, &id).await.status == 200);
    let r = call(&svc, post("retrieve_future", json!({"request_id": 5}))).await;
    r.refused(400, &["request_id"])?;

    // Delete (the checkpoint id holds a slash): gone from the lists and from weights_info.
    let r = call(&svc, d(KEY)).await;
    ensure!((200..300).contains(&r.status), "{} {}", r.status, r.detail());
    call(&svc, d(KEY)).await.refused(404, &["not found"])?;
    let cks = call(&svc, get(&format!("training_runs/{m}/checkpoints"))).await.json();
    ensure!(cks["checkpoints"].as_array().map(Vec::len) == Some(1), "{cks}");
    call(&svc, post("weights_info", json!({"tinker_path": c1})))
        .await
        .refused(404, &["not found"])?;
    let bad = test::TestRequest::delete()
        .uri(&format!("/api/v1/training_runs/{m}/checkpoints/bogus/c1"))
        .insert_header(("x-api-key", KEY));
    call(&svc, bad).await.refused(400, &["bogus"])?;
    st.stop().await;
    Ok(())
}
