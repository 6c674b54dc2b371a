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

/// One op call as a layer runs it: the client generation, the op, the caller and the body (its
/// keyword arguments). Borrowed, so a replayed call (the model's journal) needs no copies.
#[derive(Clone, Copy)]
pub struct Call<'a> {
    pub g: Gen,
    pub op: &'a str,
    pub caller: &'a Caller,
    pub body: &'a Map<String, Value>,
}

impl Call<'_> {
    /// Boolean keyword argument `k`; absent, `null` or not a boolean reads as `false` (the
    /// clients' defaults for every flag they send).
    pub fn flag(&self, k: &str) -> bool {
        self.body.get(k).and_then(Value::as_bool).unwrap_or(false)
    }
}

/// A Twinkle-native layer: its tenants and how it runs one op.
pub trait Ops: Send + Sync + 'static {
    /// Whether the Gen-2 route answers GET as well (the model's client reads some results with
    /// GET).
    const GET_TOO: bool;
    fn auth(&self) -> &Auth;
    /// Runs one op (called on the blocking pool).
    fn call(&self, c: Call<'_>) -> Result<Reply, TwinkleError>;
}

/// Mounts `ops` under `prefix`: `{prefix}/twinkle/{op}` always, `{prefix}/{op}` with `gen1`.
pub fn routes<T: Ops>(cfg: &mut web::ServiceConfig, ops: Arc<T>, prefix: &str, gen1: bool) {
    let data = web::Data::new(ops);
    let p = prefix.trim_end_matches('/');
    let limit = web::PayloadConfig::new(JSON_LIMIT);
    let mut gen2 = web::resource(format!("{p}/twinkle/{{op}}"))
        .app_data(data.clone())
        .app_data(limit.clone())
        .route(web::post().to(run::<T, false>));
    if T::GET_TOO {
        gen2 = gen2.route(web::get().to(run::<T, false>));
    }
    cfg.service(gen2);
    if gen1 {
        cfg.service(
            web::resource(format!("{p}/{{op}}"))
                .app_data(data)
                .app_data(limit)
                .route(web::post().to(run::<T, true>)),
        );
    }
}

/// The handler of both routes; `GEN1`: the Gen-1 route (`{prefix}/{op}`).
async fn run<T: Ops, const GEN1: bool>(
    req: HttpRequest,
    ops: web::Data<Arc<T>>,
    op: web::Path<String>,
    body: web::Bytes,
) -> HttpResponse {
    let g = if GEN1 { Gen::One } else { Gen::Two };
    let op = op.into_inner();
    let out = async {
        let caller = ops.auth().caller(&req)?;
        let body = crate::protocol::twinkle::wire::body_object(&body)?;
        let ops = ops.get_ref().clone();
        // The job's log lines keep the request's span (and id) on the blocking pool; it is
        // counted like the internal API's jobs, a failed one under `twinkle` (the op a client
        // named may not exist, and labels stay bounded).
        let span = tracing::Span::current();
        let metrics = crate::metrics::global();
        metrics.serves(crate::metrics::Role::Model);
        let accepted = std::time::Instant::now();
        let mut queued = crate::metrics::GaugeSlot::enter(&metrics.model_queue_depth);
        web::block(move || {
            let _in_request = span.enter();
            queued.leave();
            let running = crate::metrics::GaugeSlot::enter(&metrics.model_jobs_running);
            let started = std::time::Instant::now();
            let out = unwind_safe(
                || ops.call(Call { g, op: &op, caller: &caller, body: &body }),
                |m| TwinkleError::Internal(format!("the `{op}` job panicked: {m}")),
            );
            drop(running);
            let label = if out.is_ok() { op.as_str() } else { "twinkle" };
            metrics.record_job(label, out.is_ok(), accepted.elapsed(), started.elapsed(), 0);
            out
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
