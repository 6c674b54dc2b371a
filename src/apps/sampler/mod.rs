//! The `sampler` application: its own copy of the base model on its own devices, serving only
//! `GET /_internal/v1/info` and `POST /_internal/v1/sample`. Adapters come by `adapter_dir`
//! (PEFT directories the model application saved), are placed on every runtime and stay cached,
//! least recently used out. Requests go round-robin over the runtimes (one per card).

pub mod twinkle;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use actix_web::{HttpRequest, HttpResponse, web};

use super::model::checkpoint::AdapterCache;
use super::model::decode::{DEFAULT_MAX_SEQS, DecodeBatcher, DecodeStats};
use super::model::error::AppError;
use super::model::http::{InternalToken, check_token, op, path, payload_config};
use super::model::{BaseModel, Served};
use crate::engine::ModelRuntime;
use crate::engine::cpu::CpuRuntime;
use crate::engine::parallel::{DataParallel, Replicated};
use crate::protocol::internal::{InfoResponse, SampleRequest, SampleResponse};

/// Adapters a sampler keeps loaded.
pub const ADAPTER_CACHE: usize = 4;

/// What the HTTP layer needs of a sampler service, whatever its device.
pub trait SamplerApp: Send + Sync + 'static {
    fn info(&self) -> InfoResponse;
    fn sample(&self, req: &SampleRequest) -> Result<SampleResponse, AppError>;
    /// The base model's configuration, tokenizer and served length.
    fn served(&self) -> &Served;
}

/// The sampler application's state, computing on runtimes of type `R`.
pub struct SamplerService<R: ModelRuntime = CpuRuntime> {
    base: Served,
    engine: DataParallel<R>,
    cache: AdapterCache<Replicated<R>>,
    next_worker: AtomicUsize,
    /// Per runtime: the passes that decode every request's sequences together.
    decoders: Vec<DecodeBatcher<R>>,
}

impl<R: ModelRuntime> std::fmt::Debug for SamplerService<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SamplerService").field("engine", &self.engine).finish()
    }
}

impl SamplerService<CpuRuntime> {
    /// A sampler computing on the host CPUs (the process-wide pool).
    pub fn new(base: BaseModel) -> Self {
        Self::with_engine(base.served, DataParallel::single(CpuRuntime::new(base.model)))
    }
}

impl<R: ModelRuntime> SamplerService<R> {
    /// A sampler over an engine built by the caller (one runtime per device).
    pub fn with_engine(mut base: Served, engine: DataParallel<R>) -> Self {
        base.info.devices =
            (0..engine.num_workers()).map(|i| engine.worker(i).device_name()).collect();
        let decoders =
            (0..engine.num_workers()).map(|_| DecodeBatcher::new(DEFAULT_MAX_SEQS)).collect();
        SamplerService {
            base,
            engine,
            cache: AdapterCache::new(ADAPTER_CACHE),
            next_worker: AtomicUsize::new(0),
            decoders,
        }
    }

    /// Admits at most `max_seqs` running sequences to one decode pass (config
    /// `engine_args.max_num_seqs`; default [`DEFAULT_MAX_SEQS`](super::model::decode::DEFAULT_MAX_SEQS)).
    pub fn with_max_seqs(mut self, max_seqs: usize) -> Self {
        self.decoders = self.decoders.iter().map(|_| DecodeBatcher::new(max_seqs)).collect();
        self
    }

    /// What the decode passes have done so far, summed over the runtimes.
    pub fn decode_stats(&self) -> DecodeStats {
        self.decoders.iter().map(|d| d.stats()).sum()
    }

    pub fn base(&self) -> &Served {
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
        let w = self.next_worker.fetch_add(1, Ordering::Relaxed) % self.engine.num_workers();
        let (rt, decoder) = (self.engine.worker(w), &self.decoders[w]);
        match &req.adapter_dir {
            Some(dir) => {
                let adapter = self.cache.get(dir, &b.config, |h| Ok(self.engine.upload(h)?))?;
                decoder.generate(rt, adapter.replica(w), tok, b.max_length, req)
            }
            None => decoder.generate(rt, None, tok, b.max_length, req),
        }
    }
}

impl<R: ModelRuntime> SamplerApp for SamplerService<R> {
    fn info(&self) -> InfoResponse {
        SamplerService::info(self)
    }
    fn sample(&self, req: &SampleRequest) -> Result<SampleResponse, AppError> {
        SamplerService::sample(self, req)
    }
    fn served(&self) -> &Served {
        self.base()
    }
}

type Svc = web::Data<Arc<dyn SamplerApp>>;
type Tok = web::Data<InternalToken>;

async fn info(req: HttpRequest, svc: Svc, tok: Tok) -> Result<HttpResponse, AppError> {
    check_token(&req, &tok)?;
    Ok(HttpResponse::Ok().json(svc.info()))
}

op!(sample_route, SampleRequest, sample);

/// Registers the sampler's internal routes.
pub fn routes(cfg: &mut web::ServiceConfig, svc: Arc<dyn SamplerApp>, token: InternalToken) {
    cfg.app_data(web::Data::new(svc))
        .app_data(web::Data::new(token))
        .app_data(payload_config())
        .route("/_internal/v1/info", web::get().to(info))
        .route(&path::<SampleRequest>(), web::post().to(sample_route));
}
