//! HTTP routes of the processor application, under its `route_prefix` (both client generations
//! are always mounted; they share bodies and replies):
//!
//! | Gen-1 (0.1.x)          | Gen-2 (0.2–0.5.x)              | reply                        |
//! |------------------------|--------------------------------|------------------------------|
//! | `POST {p}/create`      | `POST {p}/twinkle/create`      | `{processor_id: "pid:<hex>"}`|
//! | `POST {p}/call`        | `POST {p}/twinkle/call`        | `{result: …}` (410 at end)   |
//! | `POST {p}/heartbeat`   | `POST {p}/twinkle/heartbeat`   | `{status: "ok"}`             |
//!
//! Every request authenticates with its bearer token ([`Auth::caller`]); processors are scoped to
//! the token's owner hash. Errors are `{detail}` with a typed 4xx ([`TwinkleError`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::{HttpRequest, HttpResponse, web};
use serde_json::{Map, Value, json};

use super::registry::{Limits, Registry};
use crate::protocol::twinkle::{Auth, TwinkleError, TwinkleReply};
use crate::worker::identity::{self, Identity};
use crate::worker::{AppContext, WorkerError, serve_and_register};

/// Largest request body (a `__call__` of an InputProcessor carries whole batches).
const JSON_LIMIT: usize = 256 << 20;

/// The application state shared by the routes.
pub struct ProcessorApp {
    pub auth: Auth,
    pub registry: Arc<Registry>,
}

type Body = web::Json<Map<String, Value>>;

/// The handler of the three ops (`create`, `call`, `heartbeat`): the caller's owner hash, then
/// the op on the blocking pool (a `call` may tokenize whole batches).
async fn op(
    app: web::Data<ProcessorApp>,
    req: HttpRequest,
    op: web::Path<String>,
    body: Body,
) -> TwinkleReply {
    let owner = app.auth.caller(&req)?.owner;
    let reg = app.registry.clone();
    let reply = web::block(move || match op.as_str() {
        "create" => Ok(json!({ "processor_id": reg.create(&owner, &body)? })),
        "call" => Ok(json!({ "result": reg.call(&owner, &body)? })),
        _ => reg.heartbeat(&owner, &body),
    })
    .await
    .map_err(|e| TwinkleError::Internal(format!("processor task failed: {e}")))??;
    Ok(HttpResponse::Ok().json(reply))
}

fn json_config() -> web::JsonConfig {
    web::JsonConfig::default()
        .limit(JSON_LIMIT)
        .content_type_required(false)
        .error_handler(|err, _| TwinkleError::bad(format!("bad JSON body: {err}")).into())
}

/// Mounts the processor routes under `prefix` (`"/"` or `""` for the root).
pub fn routes(cfg: &mut web::ServiceConfig, app: Arc<ProcessorApp>, prefix: &str) {
    let p = prefix.trim_end_matches('/');
    let data = web::Data::from(app);
    for base in [p.to_string(), format!("{p}/twinkle")] {
        cfg.service(
            web::resource(format!("{base}/{{op:create|call|heartbeat}}"))
                .app_data(json_config())
                .app_data(data.clone())
                .route(web::post().to(op)),
        );
    }
}

/// Drops expired processors every `every` until the process ends.
pub fn spawn_sweeper(registry: Arc<Registry>, every: Duration) {
    actix_web::rt::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let n = registry.sweep(Instant::now());
            if n > 0 {
                tracing::info!(expired = n, live = registry.len(), "processors expired");
            }
        }
    });
}

/// Runs the processor application of `ctx`: identity routes plus the processor routes.
pub async fn run(ctx: &AppContext) -> Result<(), WorkerError> {
    let id = Identity::from_context(ctx);
    let save_root = crate::apps::server::default_save_root();
    let auth = Auth::load(ctx.opts.config.as_deref(), &save_root)
        .map_err(|e| WorkerError::Startup(format!("application `{}`: {e}", ctx.opts.app)))?;
    let limits = Limits::from_env();
    let every = (limits.timeout / 4).clamp(Duration::from_secs(1), Duration::from_secs(30));
    let registry = Arc::new(Registry::new(limits));
    spawn_sweeper(registry.clone(), every);
    let app = Arc::new(ProcessorApp { auth, registry });
    let prefix = id.route_prefix.clone();
    serve_and_register(ctx, move |cfg| {
        identity::routes(cfg, id.clone());
        routes(cfg, app.clone(), &prefix);
    })
    .await
}
