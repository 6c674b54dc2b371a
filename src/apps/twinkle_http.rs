//! The HTTP side shared by the Twinkle-native layers of the model and sampler applications:
//! `{prefix}/twinkle/{op}` (Gen-2 clients) always and `{prefix}/{op}` (Gen-1) with
//! `server_type: twinkle`; per request the caller's token, the JSON object body, the op on the
//! blocking pool with a panic turned into a 500 that says so, and the answer. Each layer only
//! says how it runs an op ([`Ops`]).

use std::sync::Arc;

use actix_web::{HttpRequest, HttpResponse, ResponseError as _, web};
use serde_json::{Map, Value};

use crate::apps::model::http::{JSON_LIMIT, unwind_safe};
use crate::protocol::twinkle::{Auth, Caller, Gen, TwinkleError};

/// What an op answers.
pub enum Reply {
    Json(Value),
    /// `application/x-ndjson` (the sampler's `sample_stream`).
    NdJson(String),
}

/// A Twinkle-native layer: its tenants and how it runs one op.
pub trait Ops: Send + Sync + 'static {
    fn auth(&self) -> &Auth;
    /// Runs `op` for `caller` (called on the blocking pool).
    fn call(
        &self,
        g: Gen,
        op: &str,
        caller: &Caller,
        body: Map<String, Value>,
    ) -> Result<Reply, TwinkleError>;
}

/// Mounts `ops` under `prefix`; `get_too`: the Gen-2 route answers GET as well (the model's
/// client reads some results with GET).
pub fn routes<T: Ops>(
    cfg: &mut web::ServiceConfig,
    ops: Arc<T>,
    prefix: &str,
    gen1: bool,
    get_too: bool,
) {
    let data = web::Data::new(ops);
    let p = prefix.trim_end_matches('/');
    let limit = web::PayloadConfig::new(JSON_LIMIT);
    let mut gen2 = web::resource(format!("{p}/twinkle/{{op}}"))
        .app_data(data.clone())
        .app_data(limit.clone())
        .route(web::post().to(op_gen2::<T>));
    if get_too {
        gen2 = gen2.route(web::get().to(op_gen2::<T>));
    }
    cfg.service(gen2);
    if gen1 {
        cfg.service(
            web::resource(format!("{p}/{{op}}"))
                .app_data(data)
                .app_data(limit)
                .route(web::post().to(op_gen1::<T>)),
        );
    }
}

async fn op_gen1<T: Ops>(
    req: HttpRequest,
    ops: web::Data<Arc<T>>,
    op: web::Path<String>,
    body: web::Bytes,
) -> HttpResponse {
    run(Gen::One, req, ops, op.into_inner(), body).await
}

async fn op_gen2<T: Ops>(
    req: HttpRequest,
    ops: web::Data<Arc<T>>,
    op: web::Path<String>,
    body: web::Bytes,
) -> HttpResponse {
    run(Gen::Two, req, ops, op.into_inner(), body).await
}

async fn run<T: Ops>(
    g: Gen,
    req: HttpRequest,
    ops: web::Data<Arc<T>>,
    op: String,
    body: web::Bytes,
) -> HttpResponse {
    let out = async {
        let caller = ops.auth().caller(&req)?;
        let body = crate::protocol::twinkle::wire::body_object(&body)?;
        let ops = ops.get_ref().clone();
        web::block(move || {
            unwind_safe(
                || ops.call(g, &op, &caller, body),
                |m| TwinkleError::Internal(format!("the `{op}` job panicked: {m}")),
            )
        })
        .await
        .map_err(|e| TwinkleError::Internal(format!("compute task failed: {e}")))?
    }
    .await;
    match out {
        Ok(Reply::Json(v)) => HttpResponse::Ok().json(v),
        Ok(Reply::NdJson(s)) => HttpResponse::Ok().content_type("application/x-ndjson").body(s),
        Err(e) => e.error_response(),
    }
}
