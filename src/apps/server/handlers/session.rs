//! Bootstrap and session endpoints: client config, capabilities, sessions, heartbeat, telemetry.

use actix_web::{HttpResponse, web};

use super::super::error::Reply;
use super::super::{Owner, Shared, parse_json};
use crate::protocol::tinker::types::{
    ClientConfigResponse, CreateSessionRequest, CreateSessionResponse, DynamicConfigResponse,
    FinishSessionRequest, ServerCapabilitiesResponse, SessionHeartbeatRequest, SupportedModel,
    TelemetryResponse,
};
use crate::state::NewSession;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/client/config", web::post().to(client_config))
        .route("/client/dynamic_config", web::post().to(dynamic_config))
        .route("/get_server_capabilities", web::get().to(capabilities))
        .route("/create_session", web::post().to(create_session))
        .route("/session_heartbeat", web::post().to(heartbeat))
        .route("/telemetry", web::post().to(telemetry))
        .route("/sessions/{id}/finish", web::post().to(finish));
}

async fn client_config(_owner: Owner) -> Reply {
    Ok(HttpResponse::Ok().json(ClientConfigResponse::default()))
}

async fn dynamic_config(_owner: Owner) -> Reply {
    Ok(HttpResponse::Ok().json(DynamicConfigResponse::default()))
}

/// The configured `supported_models`, each completed from the model app that serves it; a
/// served model that is not listed is advertised too. 503 while a configured model application
/// is starting (see [`Upstreams::ready_models`](crate::apps::server::upstream::Upstreams)).
async fn capabilities(app: Shared, _owner: Owner) -> Reply {
    // While a configured model application is still coming up the list would be incomplete:
    // 503 + Retry-After, so a script started right after `twinkle serve` waits for it.
    let ups = app.disp.up.ready_models().await?;
    let mut out: Vec<SupportedModel> = Vec::new();
    let entry = |name: &str, ctx: Option<u64>, sampleable: bool| SupportedModel {
        model_name: Some(name.to_string()),
        max_context_length: ctx,
        trainable: Some(true),
        sampleable: Some(sampleable),
    };
    for name in &app.supported_models {
        let up = ups.iter().find(|u| u.kind == "model" && u.info.answers_to(name));
        out.push(entry(name, up.map(|u| u.info.max_length as u64), true));
    }
    for u in ups.iter().filter(|u| u.kind == "model") {
        if !app.supported_models.iter().any(|n| u.info.answers_to(n)) {
            out.push(entry(u.info.public_name(), Some(u.info.max_length as u64), true));
        }
    }
    Ok(HttpResponse::Ok().json(ServerCapabilitiesResponse { supported_models: out }))
}

async fn create_session(app: Shared, Owner(owner): Owner, body: web::Bytes) -> Reply {
    let r: CreateSessionRequest = parse_json(&body)?;
    let metadata = serde_json::Value::Object(r.user_metadata);
    crate::apps::server::limits::check_session(&r.tags, &metadata)?;
    // No `:` or `/` in the id: model ids and tinker paths embed it.
    let id = crate::ids::hex_id("sess-");
    let rec = NewSession {
        id: id.clone(),
        owner,
        tags: r.tags,
        user_metadata: metadata,
        sdk_version: r.sdk_version,
        project_id: r.project_id,
        display_name: r.display_name,
    };
    app.disp.db(move |s| s.create_session(&rec)).await?;
    Ok(HttpResponse::Ok().json(CreateSessionResponse::new(id)))
}

async fn heartbeat(app: Shared, Owner(owner): Owner, body: web::Bytes) -> Reply {
    let r: SessionHeartbeatRequest = parse_json(&body)?;
    app.disp.db(move |s| s.heartbeat(&owner, &r.session_id)).await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({})))
}

async fn telemetry(_owner: Owner) -> Reply {
    Ok(HttpResponse::Ok().json(TelemetryResponse::default()))
}

async fn finish(
    app: Shared,
    Owner(owner): Owner,
    path: web::Path<String>,
    body: web::Bytes,
) -> Reply {
    let r: FinishSessionRequest =
        if body.is_empty() { FinishSessionRequest::default() } else { parse_json(&body)? };
    r.validate()?;
    let reason = r.reason.map(|r| r.kind).unwrap_or_else(|| "unknown".into());
    let id = path.into_inner();
    let a = app.clone();
    app.disp
        .db(move |s| {
            s.finish_session(&owner, &id, &reason)?;
            // The session's `save_weights_and_get_sampling_client` snapshots go with it.
            crate::apps::server::sweeper::remove_snapshots(&a, s, &owner, &id);
            Ok(())
        })
        .await?;
    Ok(HttpResponse::NoContent().finish())
}
