//! HTTP routes of the model application under `/_internal/v1/` (no route prefix), each checking
//! the `X-Twinkle-Internal` token, and each running its compute on actix's blocking pool so the
//! HTTP workers keep answering `/healthz` during a long step.

use std::sync::Arc;

use actix_web::{HttpRequest, HttpResponse, web};
use serde::Serialize;

use super::ModelService;
use super::error::AppError;
use super::types::*;
use crate::engine::ModelRuntime;

/// Header that carries the internal token.
pub const TOKEN_HEADER: &str = "X-Twinkle-Internal";
/// Largest JSON body accepted (a forward_backward batch can be large).
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

/// Runs `f` on the blocking pool and answers its value as JSON.
pub async fn blocking_json<T, F>(f: F) -> Result<HttpResponse, AppError>
where
    T: Serialize + Send + 'static,
    F: FnOnce() -> Result<T, AppError> + Send + 'static,
{
    let job = move || unwind_safe(f, |m| AppError::Internal(format!("the job panicked: {m}")));
    let value = web::block(job)
        .await
        .map_err(|e| AppError::Internal(format!("compute task failed: {e}")))??;
    Ok(HttpResponse::Ok().json(value))
}

/// JSON extractor settings: a large limit, and malformed bodies as 400 `user` errors.
pub fn json_config() -> web::JsonConfig {
    web::JsonConfig::default()
        .limit(JSON_LIMIT)
        .error_handler(|err, _| AppError::BadRequest(format!("bad JSON body: {err}")).into())
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
}

type Svc = web::Data<Arc<dyn ModelApp>>;
type Tok = web::Data<InternalToken>;

async fn info(req: HttpRequest, svc: Svc, tok: Tok) -> Result<HttpResponse, AppError> {
    check_token(&req, &tok)?;
    Ok(HttpResponse::Ok().json(svc.info()))
}

macro_rules! op {
    ($name:ident, $body:ty, $method:ident, $wrap:expr) => {
        async fn $name(
            req: HttpRequest,
            svc: Svc,
            tok: Tok,
            body: web::Json<$body>,
        ) -> Result<HttpResponse, AppError> {
            check_token(&req, &tok)?;
            let svc = svc.get_ref().clone();
            let body = body.into_inner();
            blocking_json(move || {
                // The compute alone (no HTTP, no JSON): scripts/bench_api.py subtracts it.
                let started = std::time::Instant::now();
                let out = svc.$method(&body).map($wrap);
                let ms = started.elapsed().as_secs_f64() * 1e3;
                tracing::debug!(route = stringify!($name), ms, "compute done");
                out
            })
            .await
        }
    };
}

fn empty(_: ()) -> serde_json::Value {
    serde_json::json!({})
}

fn same<T>(t: T) -> T {
    t
}

op!(create_adapter, CreateAdapterRequest, create_adapter, empty);
op!(forward_backward, ForwardBackwardRequest, forward_backward, same);
op!(optim_step, OptimStepRequest, optim_step, same);
op!(save, SaveRequest, save, same);
op!(load, LoadRequest, load, empty);
op!(unload, UnloadRequest, unload, empty);
op!(sample, SampleRequest, sample, same);

/// Registers the model application's internal routes.
pub fn routes(cfg: &mut web::ServiceConfig, svc: Arc<dyn ModelApp>, token: InternalToken) {
    cfg.app_data(web::Data::new(svc))
        .app_data(web::Data::new(token))
        .app_data(json_config())
        .route("/_internal/v1/info", web::get().to(info))
        .route("/_internal/v1/create_adapter", web::post().to(create_adapter))
        .route("/_internal/v1/forward_backward", web::post().to(forward_backward))
        .route("/_internal/v1/optim_step", web::post().to(optim_step))
        .route("/_internal/v1/save", web::post().to(save))
        .route("/_internal/v1/load", web::post().to(load))
        .route("/_internal/v1/unload", web::post().to(unload))
        .route("/_internal/v1/sample", web::post().to(sample));
}
