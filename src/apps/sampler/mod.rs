//! The `sampler` application: its own copy of the base model, serving only
//! `GET /_internal/v1/info` and `POST /_internal/v1/sample`. Adapters come by `adapter_dir`
//! (PEFT directories the model application saved) and stay cached, least recently used out.

use std::sync::Arc;

use actix_web::{HttpRequest, HttpResponse, web};

use super::model::checkpoint::AdapterCache;
use super::model::error::AppError;
use super::model::http::{InternalToken, blocking_json, check_token, json_config};
use super::model::types::{InfoResponse, SampleRequest, SampleResponse};
use super::model::{BaseModel, sample};

/// Adapters a sampler keeps loaded.
pub const ADAPTER_CACHE: usize = 4;

/// The sampler application's state.
#[derive(Debug)]
pub struct SamplerService {
    base: BaseModel,
    cache: AdapterCache,
}

impl SamplerService {
    pub fn new(base: BaseModel) -> Self {
        SamplerService { base, cache: AdapterCache::new(ADAPTER_CACHE) }
    }

    pub fn base(&self) -> &BaseModel {
        &self.base
    }

    /// `GET /_internal/v1/info`; `adapters` lists the cached adapter directories.
    pub fn info(&self) -> InfoResponse {
        let adapters = self.cache.dirs().iter().map(|p| p.display().to_string()).collect();
        InfoResponse { adapters, ..self.base.info.clone() }
    }

    /// `POST /_internal/v1/sample`: base model, or the adapter in `adapter_dir`.
    pub fn sample(&self, req: &SampleRequest) -> Result<SampleResponse, AppError> {
        if let Some(id) = &req.model_id {
            return Err(AppError::BadRequest(format!(
                "the sampler application holds no training adapters (model_id `{id}`); send adapter_dir"
            )));
        }
        let b = &self.base;
        let tok = b.tokenizer.as_deref();
        match &req.adapter_dir {
            Some(dir) => {
                let adapter = self.cache.get(dir, &b.model)?;
                sample::generate(&b.model, Some(&adapter), tok, b.max_length, req)
            }
            None => sample::generate(&b.model, None, tok, b.max_length, req),
        }
    }
}

type Svc = web::Data<Arc<SamplerService>>;
type Tok = web::Data<InternalToken>;

async fn info(req: HttpRequest, svc: Svc, tok: Tok) -> Result<HttpResponse, AppError> {
    check_token(&req, &tok)?;
    Ok(HttpResponse::Ok().json(svc.info()))
}

async fn sample_route(
    req: HttpRequest,
    svc: Svc,
    tok: Tok,
    body: web::Json<SampleRequest>,
) -> Result<HttpResponse, AppError> {
    check_token(&req, &tok)?;
    let svc = svc.get_ref().clone();
    let body = body.into_inner();
    blocking_json(move || svc.sample(&body)).await
}

/// Registers the sampler's internal routes.
pub fn routes(cfg: &mut web::ServiceConfig, svc: Arc<SamplerService>, token: InternalToken) {
    cfg.app_data(web::Data::new(svc))
        .app_data(web::Data::new(token))
        .app_data(json_config())
        .route("/_internal/v1/info", web::get().to(info))
        .route("/_internal/v1/sample", web::post().to(sample_route));
}
