//! HTTP routes of the model application under `/_internal/v1/` (no route prefix), each checking
//! the `X-Twinkle-Internal` token, and each running its compute on actix's blocking pool so the
//! HTTP workers keep answering `/healthz` during a long step.

use std::sync::Arc;

use actix_web::{HttpRequest, HttpResponse, web};
use serde::Serialize;

use super::ModelService;
use super::error::AppError;
use super::types::*;

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

/// Runs `f` on the blocking pool and answers its value as JSON.
pub async fn blocking_json<T, F>(f: F) -> Result<HttpResponse, AppError>
where
    T: Serialize + Send + 'static,
    F: FnOnce() -> Result<T, AppError> + Send + 'static,
{
    let value = web::block(f)
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

type Svc = web::Data<Arc<ModelService>>;
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
pub fn routes(cfg: &mut web::ServiceConfig, svc: Arc<ModelService>, token: InternalToken) {
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
