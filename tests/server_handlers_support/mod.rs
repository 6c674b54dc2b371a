//! Set-up of the in-process server handler tests: the REAL model application (CPU runtime on the
//! generated tiny Qwen3) on a loopback port, a stand-in head whose `/v1/status` lists it, and the
//! server application built from its public constructor; plus request and decoding helpers that
//! only speak the public Tinker protocol (`specs/tinker-protocol.md`).

#![allow(dead_code)]

use std::collections::HashSet;
use std::sync::{Arc, Once};
use std::time::Duration;

use actix_web::body::MessageBody;
use actix_web::dev::{ServerHandle, Service, ServiceResponse};
use actix_web::http::header::HeaderMap;
use actix_web::test::TestRequest;
use actix_web::{App, HttpResponse, HttpServer, test, web};
use anyhow::{Context, Result, bail, ensure};
use prost::Message;
use serde_json::{Value, json};
use twinkle::apps::model::http::{InternalToken, ModelApp, routes as model_routes};
use twinkle::apps::server::upstream::{INTERNAL_TOKEN_ENV, Upstreams};
use twinkle::apps::server::{ServerApp, routes};
use twinkle::config::ServerType;
use twinkle::protocol::tinker::codec::{
    DecodedForwardBackward, DecodedSample, decode_forward_backward_output, decode_sample_response,
};
use twinkle::protocol::tinker::proto;
use twinkle::protocol::tinker::tensor::TensorValues;
use twinkle::protocol::twinkle::Auth;
use twinkle::state::Store;
use twinkle::worker::identity::{self, Identity};

#[path = "../model_app_support/mod.rs"]
mod model_app_support;
pub use model_app_support::SEQ;

/// The caller's key (development mode accepts any `tml-` key).
pub const KEY: &str = "tml-handlers";
/// The loopback secret between the server and the model application (both read it from the
/// environment, as in a real serve).
const TOKEN: &str = "handlers-internal-token";
/// The tiny model's public name (what `/_internal/v1/info` reports as `model_name`).
pub const MODEL: &str = "qwen3-tiny";
/// Nothing listens there: tests that need no model application.
const NO_HEAD: &str = "127.0.0.1:9";

/// `Upstreams::new` reads the internal token from the environment; set it once, before any
/// test builds one, to the value the in-process model application checks.
fn set_token() {
    static ONCE: Once = Once::new();
    // SAFETY: set once, before any thread of this binary reads it (every test calls this first),
    // and the value never changes afterwards.
    ONCE.call_once(|| unsafe { std::env::set_var(INTERNAL_TOKEN_ENV, TOKEN) });
}

/// A server application and, when `with_model`, the model application and head behind it.
pub struct Stack {
    pub app: web::Data<ServerApp>,
    /// The checkpoint save root (also the Twinkle auth root).
    pub root: tempfile::TempDir,
    _spill: tempfile::TempDir,
    servers: Vec<ServerHandle>,
}

impl Stack {
    /// Stops the loopback servers (the model app's workers would otherwise outlive the test).
    pub async fn stop(self) {
        for s in &self.servers {
            s.stop(false).await;
        }
    }
}

async fn spawn(server: actix_web::dev::Server) -> ServerHandle {
    let h = server.handle();
    actix_web::rt::spawn(server);
    h
}

/// Builds the stack. `keys`: the accepted keys (`None`: development mode).
pub async fn stack(with_model: bool, keys: Option<&[&str]>) -> Result<Stack> {
    stack_with(with_model, keys, |_| {}).await
}

/// [`stack`], with `tune` applied to the server application's settings before it is shared.
pub async fn stack_with(
    with_model: bool,
    keys: Option<&[&str]>,
    tune: impl FnOnce(&mut ServerApp),
) -> Result<Stack> {
    set_token();
    let root = tempfile::tempdir()?;
    let spill = tempfile::tempdir()?;
    let mut servers = Vec::new();
    let head = if with_model {
        let svc: Arc<dyn ModelApp> = Arc::new(model_app_support::service(spill.path()));
        let tok = InternalToken(TOKEN.into());
        let model = HttpServer::new(move || {
            App::new().configure(|cfg| model_routes(cfg, svc.clone(), tok.clone()))
        })
        .workers(2)
        .bind("127.0.0.1:0")?;
        let model_addr = model.addrs()[0].to_string();
        servers.push(spawn(model.run()).await);
        // The head's status as `Upstreams::refresh` reads it: one running model application.
        let status = json!({"applications": [
            {"name": "server", "import_path": "server", "state": "running"},
            {"name": "model", "import_path": "model", "state": "running", "address": model_addr}]});
        let head = HttpServer::new(move || {
            let status = status.clone();
            App::new().route(
                "/v1/status",
                web::get().to(move || {
                    let s = status.clone();
                    async move { HttpResponse::Ok().json(s) }
                }),
            )
        })
        .workers(1)
        .bind("127.0.0.1:0")?;
        let head_addr = head.addrs()[0].to_string();
        servers.push(spawn(head.run()).await);
        head_addr
    } else {
        NO_HEAD.to_string()
    };
    let keys: Option<HashSet<String>> = keys.map(|k| k.iter().map(|s| s.to_string()).collect());
    let auth = Auth { keys: None, salt: b"handlers-salt".to_vec(), save_root: root.path().into() };
    let up = Upstreams::new(head).with_restart_wait(Duration::ZERO);
    let mut app = ServerApp::new(Store::open_memory()?, up, auth);
    app.keys = keys;
    tune(&mut app);
    Ok(Stack { app: web::Data::new(app), root, _spill: spill, servers })
}

/// The server application's routes as `apps::server::run` mounts them (identity first, JSON
/// errors around everything), for `test::init_service`.
pub fn app_config(
    app: web::Data<ServerApp>,
) -> App<
    impl actix_web::dev::ServiceFactory<
        actix_web::dev::ServiceRequest,
        Config = (),
        Response = ServiceResponse<impl MessageBody>,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    let id = Identity {
        app: "server".into(),
        import_path: "server".into(),
        route_prefix: "/api/v1".into(),
        server_type: "tinker".into(),
        cuda_visible_devices: None,
        token: Arc::from(""),
    };
    App::new().wrap(twinkle::worker::json_errors::middleware()).configure(move |cfg| {
        identity::routes(cfg, id.clone());
        routes(cfg, app.clone(), "/api/v1", ServerType::Tinker);
    })
}

/// A read answer.
pub struct Resp {
    pub status: u16,
    pub content_type: String,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    /// The `detail` of a JSON error answer.
    pub fn detail(&self) -> String {
        self.json()["detail"].as_str().unwrap_or_default().to_string()
    }

    /// Asserts a JSON error answer with `status` whose detail mentions every word of `words`.
    pub fn refused(&self, status: u16, words: &[&str]) -> Result<()> {
        let d = self.detail();
        ensure!(
            self.status == status && self.content_type.starts_with("application/json"),
            "expected {status} JSON, got {} {}: {}",
            self.status,
            self.content_type,
            String::from_utf8_lossy(&self.body)
        );
        for w in words {
            ensure!(d.contains(w), "detail {d:?} does not mention {w:?}");
        }
        Ok(())
    }
}

/// Sends `req` through the in-process service and reads the whole answer.
pub async fn call<S, B>(svc: &S, req: TestRequest) -> Resp
where
    S: Service<actix_http::Request, Response = ServiceResponse<B>, Error = actix_web::Error>,
    B: MessageBody,
{
    let r = test::call_service(svc, req.to_request()).await;
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let content_type =
        headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    let body = test::read_body(r).await.to_vec();
    Resp { status, content_type, headers, body }
}

pub fn post(path: &str, body: Value) -> TestRequest {
    post_as(KEY, path, body)
}

pub fn post_as(key: &str, path: &str, body: Value) -> TestRequest {
    TestRequest::post()
        .uri(&format!("/api/v1/{path}"))
        .insert_header(("x-api-key", key))
        .set_json(body)
}

pub fn get(path: &str) -> TestRequest {
    get_as(KEY, path)
}

pub fn get_as(key: &str, path: &str) -> TestRequest {
    TestRequest::get().uri(&format!("/api/v1/{path}")).insert_header(("x-api-key", key))
}

/// A `forward_backward` request with a protobuf body, as the SDK sends it.
pub fn proto_post(path: &str, body: Vec<u8>) -> TestRequest {
    TestRequest::post()
        .uri(&format!("/api/v1/{path}"))
        .insert_header(("x-api-key", KEY))
        .insert_header(("content-type", "application/x-protobuf"))
        .set_payload(body)
}

/// Polls `request_id` until it is no longer pending (408 `try_again`), at most four long polls
/// (~100 s; the tiny model's work takes well under a second), so a stuck future fails the test
/// instead of hanging it.
pub async fn retrieve<S, B>(svc: &S, key: &str, request_id: &str) -> Resp
where
    S: Service<actix_http::Request, Response = ServiceResponse<B>, Error = actix_web::Error>,
    B: MessageBody,
{
    let mut polls = 0;
    loop {
        let body = json!({"request_id": request_id, "allow_metadata_only": true});
        let r = call(svc, post_as(key, "retrieve_future", body)).await;
        polls += 1;
        if r.status != 408 || polls == 4 {
            return r;
        }
    }
}

/// The future of a submission answer: its request id (checked to be a JSON string).
pub fn request_id(submitted: &Resp) -> Result<String> {
    ensure!(
        submitted.status == 200,
        "submission refused: {} {}",
        submitted.status,
        submitted.detail()
    );
    submitted.json()["request_id"]
        .as_str()
        .map(str::to_string)
        .context("the untyped future has no string request_id")
}

/// Submits `req` and waits for its result: the finished answer (status 200, not a failure).
pub async fn done<S, B>(svc: &S, req: TestRequest) -> Result<Resp>
where
    S: Service<actix_http::Request, Response = ServiceResponse<B>, Error = actix_web::Error>,
    B: MessageBody,
{
    let id = request_id(&call(svc, req).await)?;
    let r = retrieve(svc, KEY, &id).await;
    ensure!(r.status == 200, "future {id}: {} {}", r.status, String::from_utf8_lossy(&r.body));
    if r.content_type.starts_with("application/json") && r.json().get("error").is_some() {
        bail!("future {id} failed: {}", r.json());
    }
    Ok(r)
}

/// Submits `req` and waits for its JSON result.
pub async fn done_json<S, B>(svc: &S, req: TestRequest) -> Result<Value>
where
    S: Service<actix_http::Request, Response = ServiceResponse<B>, Error = actix_web::Error>,
    B: MessageBody,
{
    let r = done(svc, req).await?;
    ensure!(r.content_type.starts_with("application/json"), "{}", r.content_type);
    Ok(r.json())
}

/// Submits `req` and expects a failed future: its `{"error", "category"}`.
pub async fn failed<S, B>(svc: &S, req: TestRequest) -> Result<(String, String)>
where
    S: Service<actix_http::Request, Response = ServiceResponse<B>, Error = actix_web::Error>,
    B: MessageBody,
{
    let id = request_id(&call(svc, req).await)?;
    let v = retrieve(svc, KEY, &id).await.json();
    let err = v["error"].as_str().with_context(|| format!("not a failure: {v}"))?;
    Ok((err.to_string(), v["category"].as_str().unwrap_or_default().to_string()))
}

fn le<T: Copy, const N: usize>(v: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
    v.iter().flat_map(|&x| f(x)).collect()
}

/// A protobuf `ForwardBackwardRequest` for one next-token datum over `seq` (input `seq[..n-1]`,
/// targets `seq[1..]`) with cross-entropy `weights` (absent: the server's default).
pub fn fb_request(
    model_id: &str,
    seq_id: i32,
    seq: &[u32],
    weights: Option<&[f32]>,
    forward_only: bool,
) -> proto::ForwardBackwardRequest {
    let n = seq.len() - 1;
    let input: Vec<i32> = seq[..n].iter().map(|&t| t as i32).collect();
    let targets: Vec<i64> = seq[1..].iter().map(|&t| t as i64).collect();
    let tensor = |dtype: proto::DType, bytes: Vec<u8>, len: usize| proto::Tensor {
        dtype: dtype as i32,
        shape: vec![len as i64],
        encoding: Some(proto::tensor::Encoding::Dense(bytes)),
    };
    let mut inputs = std::collections::BTreeMap::new();
    inputs.insert(
        "target_tokens".to_string(),
        tensor(proto::DType::DtypeInt64, le(&targets, i64::to_le_bytes), n),
    );
    if let Some(w) = weights {
        inputs.insert(
            "weights".to_string(),
            tensor(proto::DType::DtypeFloat32, le(w, f32::to_le_bytes), w.len()),
        );
    }
    proto::ForwardBackwardRequest {
        model_id: model_id.into(),
        seq_id,
        data: vec![proto::Datum {
            model_input: vec![proto::Chunk {
                chunk: Some(proto::chunk::Chunk::EncodedText(proto::EncodedTextChunk {
                    tokens: le(&input, i32::to_le_bytes),
                })),
            }],
            loss_fn_inputs: inputs,
            ..Default::default()
        }],
        loss_fn: "cross_entropy".into(),
        forward_only,
        ..Default::default()
    }
}

/// Sends a `forward_backward` and decodes its protobuf result (the content type the SDK insists
/// on is checked).
pub async fn fwdbwd<S, B>(svc: &S, req: &proto::ForwardBackwardRequest) -> Result<FbOut>
where
    S: Service<actix_http::Request, Response = ServiceResponse<B>, Error = actix_web::Error>,
    B: MessageBody,
{
    let r = done(svc, proto_post("forward_backward", req.encode_to_vec())).await?;
    ensure!(r.content_type.contains("application/x-protobuf"), "{}", r.content_type);
    FbOut::new(decode_forward_backward_output(&r.body)?)
}

/// A decoded one-datum `ForwardBackwardOutput`.
pub struct FbOut {
    pub raw: DecodedForwardBackward,
    pub logprobs: Vec<f32>,
    pub elementwise_loss: Vec<f32>,
    pub loss_sum: f64,
}

impl FbOut {
    fn new(raw: DecodedForwardBackward) -> Result<Self> {
        ensure!(raw.outputs.len() == 1, "one datum sent, {} outputs", raw.outputs.len());
        let field = |name: &str| -> Result<Vec<f32>> {
            match raw.outputs[0].get(name).map(|t| &t.values) {
                Some(TensorValues::F32(v)) => Ok(v.clone()),
                other => bail!("{name}: {other:?}"),
            }
        };
        let loss_sum = *raw.metrics.get("loss:sum").context("no loss:sum metric")?;
        Ok(FbOut {
            logprobs: field("logprobs")?,
            elementwise_loss: field("elementwise_loss")?,
            loss_sum,
            raw,
        })
    }
}

/// Submits an `asample` and decodes its protobuf result; also returns the future's
/// `sample_sequence_ids`.
pub async fn sample<S, B>(svc: &S, body: Value) -> Result<(Vec<String>, DecodedSample)>
where
    S: Service<actix_http::Request, Response = ServiceResponse<B>, Error = actix_web::Error>,
    B: MessageBody,
{
    let sub = call(svc, post("asample", body)).await;
    let id = request_id(&sub)?;
    let ids: Vec<String> = serde_json::from_value(sub.json()["sample_sequence_ids"].clone())
        .context("asample futures carry sample_sequence_ids")?;
    let r = retrieve(svc, KEY, &id).await;
    ensure!(r.status == 200, "{} {}", r.status, String::from_utf8_lossy(&r.body));
    ensure!(
        r.content_type.contains("application/x-protobuf"),
        "{}: {}",
        r.content_type,
        String::from_utf8_lossy(&r.body)
    );
    Ok((ids, decode_sample_response(&r.body)?))
}

/// An `asample` body as the SDK sends it (greedy unless `temperature` says otherwise).
pub fn sample_body(sid: &str, prompt: &[u32], n: u32, max_tokens: u32, logprobs: bool) -> Value {
    json!({"num_samples": n, "sampling_session_id": sid, "seq_id": 0, "type": "sample",
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": prompt}]},
        "sampling_params": {"max_tokens": max_tokens, "temperature": 0.0, "top_k": -1,
            "top_p": 1.0, "stop": []},
        "prompt_logprobs": logprobs, "topk_prompt_logprobs": 0, "topk_sample_logprobs": 0})
}

/// Creates a session: its id.
pub async fn session<S, B>(svc: &S) -> Result<String>
where
    S: Service<actix_http::Request, Response = ServiceResponse<B>, Error = actix_web::Error>,
    B: MessageBody,
{
    let body = json!({"tags": [], "user_metadata": {}, "sdk_version": "0.38.0",
        "type": "create_session"});
    let r = call(svc, post("create_session", body)).await;
    ensure!(r.status == 200, "create_session: {} {}", r.status, r.detail());
    Ok(r.json()["session_id"].as_str().context("no session_id")?.to_string())
}

/// Creates model `{session}:train:{seq}` (LoRA rank 4, fixed seed): its id.
pub async fn model<S, B>(svc: &S, session: &str, seq: u64) -> Result<String>
where
    S: Service<actix_http::Request, Response = ServiceResponse<B>, Error = actix_web::Error>,
    B: MessageBody,
{
    let v = done_json(svc, post("create_model", create_model_body(session, seq))).await?;
    Ok(v["model_id"].as_str().context("no model_id")?.to_string())
}

pub fn create_model_body(session: &str, seq: u64) -> Value {
    json!({"session_id": session, "model_seq_id": seq, "base_model": MODEL,
        "lora_config": {"rank": 4, "seed": 7, "train_unembed": true, "train_mlp": true,
            "train_attn": true},
        "optimizer_config": {"type": "adamw"}, "type": "create_model"})
}

/// Whether two float slices agree within `tol` everywhere.
pub fn close(a: &[f32], b: &[f32], tol: f32) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol)
}
