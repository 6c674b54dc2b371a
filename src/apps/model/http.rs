//! HTTP routes of the model application under `/_internal/v1/` (no route prefix), each checking
//! the `X-Twinkle-Internal` token, and each running its compute on actix's blocking pool so the
//! HTTP workers keep answering `/healthz` during a long step. Bodies are the shared types of
//! [`crate::protocol::internal`], in MessagePack or JSON (the answer in the request's encoding).

use std::sync::Arc;

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use serde::Serialize;

use super::ModelService;
use super::error::AppError;
use crate::engine::ModelRuntime;
pub use crate::protocol::internal::TOKEN_HEADER;
use crate::protocol::internal::*;
use crate::protocol::internal::{Call, Encoding};

/// Largest body accepted (a forward_backward batch can be large).
pub const JSON_LIMIT: usize = 256 << 20;

/// The internal token every request must present.
#[derive(Debug, Clone)]
pub struct InternalToken(pub Arc<str>);

/// 403 unless the request carries the token. An empty configured token is refused too: the
/// routes must never be open by accident.
pub fn check_token(req: &HttpRequest, token: &InternalToken) -> Result<(), AppError> {
    let got = req.headers().get(TOKEN_HEADER).and_then(|v| v.to_str().ok());
    match got {
        Some(g) if !token.0.is_empty() && g == &*token.0 => Ok(()),
        Some(_) => Err(AppError::Forbidden(format!("wrong {TOKEN_HEADER} token"))),
        None => Err(AppError::Forbidden(format!("missing {TOKEN_HEADER} header"))),
    }
}

/// Runs `f`, turning a panic into `Err(panic)` built from its message: a job that panics fails
/// as a server error instead of unwinding through (and killing) a blocking-pool thread. The
/// state a job touches is made safe where it is changed (the engine rolls back a failed
/// forward_backward; the service's locks tolerate poisoning).
pub fn unwind_safe<T, E>(
    f: impl FnOnce() -> Result<T, E>,
    panic: impl FnOnce(String) -> E,
) -> Result<T, E> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let msg = crate::engine::parallel::panic_message(&*p);
        tracing::error!(panic = %msg, "a compute job panicked");
        Err(panic(msg))
    })
}

/// Runs `f` on the blocking pool and answers its value in `encoding`.
async fn blocking_encoded<T, F>(encoding: Encoding, f: F) -> Result<HttpResponse, AppError>
where
    T: Serialize + Send + 'static,
    F: FnOnce() -> Result<T, AppError> + Send + 'static,
{
    let job = move || unwind_safe(f, |m| AppError::Internal(format!("the job panicked: {m}")));
    let value = web::block(job)
        .await
        .map_err(|e| AppError::Internal(format!("compute task failed: {e}")))??;
    let body = encoding.encode(&value).map_err(|e| AppError::Internal(e.to_string()))?;
    Ok(HttpResponse::Ok().content_type(encoding.content_type()).body(body))
}

/// Serves one internal call: checks the token, decodes the body as the request's
/// `Content-Type` says (a malformed one is a 400 naming the field), runs `f` on the blocking
/// pool and answers in the encoding `Accept` asks for (else the request's own).
pub async fn serve_call<C, F>(
    req: &HttpRequest,
    token: &InternalToken,
    body: &[u8],
    f: F,
) -> Result<HttpResponse, AppError>
where
    C: Call + Send + 'static,
    C::Answer: Tokens + Send + 'static,
    F: FnOnce(C) -> Result<C::Answer, AppError> + Send + 'static,
{
    check_token(req, token)?;
    let header = |name| req.headers().get(name).and_then(|v| v.to_str().ok());
    let sent = Encoding::of(header(header::CONTENT_TYPE));
    let answer = header(header::ACCEPT).map_or(sent, |a| Encoding::of(Some(a)));
    let call: C =
        sent.decode(body).map_err(|e| AppError::BadRequest(format!("{}: {e}", C::ROUTE)))?;
    let route = C::ROUTE;
    let metrics = crate::metrics::global();
    metrics.serves(crate::metrics::Role::Model);
    let accepted = std::time::Instant::now();
    // The blocking pool does not inherit the request's span: carry it, so the job's log lines
    // name the request id too.
    let span = tracing::Span::current();
    let mut queued = crate::metrics::GaugeSlot::enter(&metrics.model_queue_depth);
    blocking_encoded(answer, move || {
        let _in_request = span.enter();
        queued.leave();
        let running = crate::metrics::GaugeSlot::enter(&metrics.model_jobs_running);
        // The compute alone (no HTTP, no decoding): scripts/bench_api.py subtracts it.
        let started = std::time::Instant::now();
        let out = f(call);
        let compute = started.elapsed();
        drop(running);
        let tokens = out.as_ref().map_or(0, Tokens::tokens);
        metrics.record_job(route, out.is_ok(), accepted.elapsed(), compute, tokens);
        let ms = compute.as_secs_f64() * 1e3;
        tracing::debug!(route, ms, tokens, "compute done");
        out
    })
    .await
}

/// Body size limit of the internal routes.
pub fn payload_config() -> web::PayloadConfig {
    web::PayloadConfig::new(JSON_LIMIT)
}

/// What the HTTP layer needs of a model service, whatever its device (the routes hold a
/// `dyn ModelApp`, so the device type is chosen once, at start-up, not per route).
pub trait ModelApp: Send + Sync + 'static {
    fn info(&self) -> InfoResponse;
    fn create_adapter(&self, req: &CreateAdapterRequest) -> Result<(), AppError>;
    fn forward_backward(
        &self,
        req: &ForwardBackwardRequest,
    ) -> Result<ForwardBackwardResponse, AppError>;
    fn optim_step(&self, req: &OptimStepRequest) -> Result<MetricsResponse, AppError>;
    fn save(&self, req: &SaveRequest) -> Result<SaveResponse, AppError>;
    fn load(&self, req: &LoadRequest) -> Result<(), AppError>;
    fn unload(&self, req: &UnloadRequest) -> Result<(), AppError>;
    fn sample(&self, req: &SampleRequest) -> Result<SampleResponse, AppError>;
    /// The base model's configuration, tokenizer and served length.
    fn served(&self) -> &super::Served;
    fn grad_norm(&self, id: &str) -> Result<f64, AppError>;
    fn zero_grad(&self, id: &str) -> Result<(), AppError>;
    fn download(&self, id: &str) -> Result<crate::engine::Adapter, AppError>;
    /// Adapters (in memory, spilled to disk), for the metrics.
    fn adapter_places(&self) -> (usize, usize);
}

impl<R: ModelRuntime> ModelApp for ModelService<R> {
    fn info(&self) -> InfoResponse {
        ModelService::info(self)
    }
    fn create_adapter(&self, req: &CreateAdapterRequest) -> Result<(), AppError> {
        ModelService::create_adapter(self, req)
    }
    fn forward_backward(
        &self,
        req: &ForwardBackwardRequest,
    ) -> Result<ForwardBackwardResponse, AppError> {
        ModelService::forward_backward(self, req)
    }
    fn optim_step(&self, req: &OptimStepRequest) -> Result<MetricsResponse, AppError> {
        ModelService::optim_step(self, req)
    }
    fn save(&self, req: &SaveRequest) -> Result<SaveResponse, AppError> {
        ModelService::save(self, req)
    }
    fn load(&self, req: &LoadRequest) -> Result<(), AppError> {
        ModelService::load(self, req)
    }
    fn unload(&self, req: &UnloadRequest) -> Result<(), AppError> {
        ModelService::unload(self, req)
    }
    fn sample(&self, req: &SampleRequest) -> Result<SampleResponse, AppError> {
        ModelService::sample(self, req)
    }
    fn served(&self) -> &super::Served {
        self.base()
    }
    fn grad_norm(&self, id: &str) -> Result<f64, AppError> {
        ModelService::grad_norm(self, id)
    }
    fn zero_grad(&self, id: &str) -> Result<(), AppError> {
        ModelService::zero_grad(self, id)
    }
    fn download(&self, id: &str) -> Result<crate::engine::Adapter, AppError> {
        ModelService::download(self, id)
    }
    fn adapter_places(&self) -> (usize, usize) {
        ModelService::adapter_places(self)
    }
}

type Svc = web::Data<Arc<dyn ModelApp>>;
type Tok = web::Data<InternalToken>;

async fn info(req: HttpRequest, svc: Svc, tok: Tok) -> Result<HttpResponse, AppError> {
    check_token(&req, &tok)?;
    Ok(HttpResponse::Ok().json(svc.info()))
}

/// A route handler `$name` that decodes a `$body` and runs `svc.$method` on a blocking thread;
/// `Svc` and `Tok` are the calling module's service and token extractors (the sampler
/// application uses it too).
macro_rules! op {
    ($name:ident, $body:ty, $method:ident) => {
        async fn $name(
            req: actix_web::HttpRequest,
            svc: Svc,
            tok: Tok,
            body: actix_web::web::Bytes,
        ) -> Result<actix_web::HttpResponse, $crate::apps::model::error::AppError> {
            let svc = svc.get_ref().clone();
            $crate::apps::model::http::serve_call(&req, &tok, &body, move |r: $body| {
                svc.$method(&r)
            })
            .await
        }
    };
}
pub(crate) use op;

fn done(r: Result<(), AppError>) -> Result<Done, AppError> {
    r.map(|()| Done {})
}

op!(forward_backward, ForwardBackwardRequest, forward_backward);
op!(optim_step, OptimStepRequest, optim_step);
op!(save, SaveRequest, save);
op!(sample, SampleRequest, sample);

async fn create_adapter(req: HttpRequest, svc: Svc, tok: Tok, body: web::Bytes) -> Answer {
    let svc = svc.get_ref().clone();
    serve_call(&req, &tok, &body, move |r: CreateAdapterRequest| done(svc.create_adapter(&r))).await
}

async fn load(req: HttpRequest, svc: Svc, tok: Tok, body: web::Bytes) -> Answer {
    let svc = svc.get_ref().clone();
    serve_call(&req, &tok, &body, move |r: LoadRequest| done(svc.load(&r))).await
}

async fn unload(req: HttpRequest, svc: Svc, tok: Tok, body: web::Bytes) -> Answer {
    let svc = svc.get_ref().clone();
    serve_call(&req, &tok, &body, move |r: UnloadRequest| done(svc.unload(&r))).await
}

type Answer = Result<HttpResponse, AppError>;

/// The route of call `C`.
pub fn path<C: Call>() -> String {
    format!("/_internal/v1/{}", C::ROUTE)
}

/// Registers the model application's internal routes.
pub fn routes(cfg: &mut web::ServiceConfig, svc: Arc<dyn ModelApp>, token: InternalToken) {
    // Each HTTP worker configures the routes; the process's one service is counted once (a
    // weak handle: the metrics never keep the service alive).
    static ADAPTER_GAUGES: std::sync::Once = std::sync::Once::new();
    let counted = Arc::downgrade(&svc);
    crate::metrics::global().serves(crate::metrics::Role::Model);
    ADAPTER_GAUGES.call_once(move || {
        crate::metrics::on_scrape(Box::new(move |m| {
            let Some(svc) = counted.upgrade() else { return };
            let (resident, spilled) = svc.adapter_places();
            for (place, n) in [("resident", resident), ("spilled", spilled)] {
                let place = crate::metrics::PlaceLabels { place: place.into() };
                m.adapters.get_or_create(&place).set(i64::try_from(n).unwrap_or(i64::MAX));
            }
        }));
    });
    cfg.app_data(web::Data::new(svc))
        .app_data(web::Data::new(token))
        .app_data(payload_config())
        .route("/_internal/v1/info", web::get().to(info))
        .route(&path::<CreateAdapterRequest>(), web::post().to(create_adapter))
        .route(&path::<ForwardBackwardRequest>(), web::post().to(forward_backward))
        .route(&path::<OptimStepRequest>(), web::post().to(optim_step))
        .route(&path::<SaveRequest>(), web::post().to(save))
        .route(&path::<LoadRequest>(), web::post().to(load))
        .route(&path::<UnloadRequest>(), web::post().to(unload))
        .route(&path::<SampleRequest>(), web::post().to(sample));
}
