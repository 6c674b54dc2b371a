//! Every error a child answers is JSON `{"detail": ...}`.
//!
//! Handlers answer their own errors as JSON, but actix's extractors do not: a bad query string,
//! a bad path segment or a body over the payload limit (413) come back as `text/plain`. The
//! Tinker SDK and scripts parse `detail`, so [`middleware`] rewrites any 4xx/5xx that is not
//! already JSON into `{"detail": <actix's message>}` with the same status.

use actix_web::HttpResponse;
use actix_web::body::{BoxBody, EitherBody, MessageBody};
use actix_web::dev::ServiceResponse;
use actix_web::http::header;
use actix_web::middleware::{ErrorHandlerResponse, ErrorHandlers};

/// The middleware to wrap every child's `App` in.
pub fn middleware<B: MessageBody + 'static>() -> ErrorHandlers<B> {
    ErrorHandlers::new().default_handler(to_json)
}

fn is_json(res: &ServiceResponse<impl MessageBody>) -> bool {
    res.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/json"))
}

fn to_json<B: MessageBody + 'static>(
    res: ServiceResponse<B>,
) -> actix_web::Result<ErrorHandlerResponse<B>> {
    if is_json(&res) {
        return Ok(ErrorHandlerResponse::Response(res.map_into_left_body()));
    }
    let status = res.status();
    let detail = match res.response().error() {
        Some(e) => e.to_string(),
        None => status.canonical_reason().unwrap_or("error").to_string(),
    };
    let (req, _) = res.into_parts();
    let body = HttpResponse::build(status).json(serde_json::json!({ "detail": detail }));
    let res: ServiceResponse<EitherBody<B, BoxBody>> =
        ServiceResponse::new(req, body).map_into_right_body();
    Ok(ErrorHandlerResponse::Response(res))
}

#[cfg(test)]
mod tests {
    use actix_web::{App, HttpResponse, test, web};
    use serde::Deserialize;

    use super::*;

    #[derive(Deserialize)]
    struct Q {
        #[allow(dead_code)]
        limit: u32,
    }

    async fn query(_q: web::Query<Q>) -> HttpResponse {
        HttpResponse::Ok().finish()
    }

    async fn path(_p: web::Path<u32>) -> HttpResponse {
        HttpResponse::Ok().finish()
    }

    async fn body(_b: web::Bytes) -> HttpResponse {
        HttpResponse::Ok().finish()
    }

    async fn own() -> HttpResponse {
        HttpResponse::BadRequest().json(serde_json::json!({"detail": "mine", "field": "x"}))
    }

    #[actix_web::test]
    async fn extractor_errors_become_json_and_json_errors_are_kept() {
        let app = test::init_service(
            App::new()
                .wrap(middleware())
                .app_data(web::PayloadConfig::new(8))
                .route("/q", web::get().to(query))
                .route("/p/{n}", web::get().to(path))
                .route("/b", web::post().to(body))
                .route("/own", web::get().to(own)),
        )
        .await;
        let cases = [
            (test::TestRequest::get().uri("/q?limit=x").to_request(), 400),
            (test::TestRequest::get().uri("/p/x").to_request(), 404),
            (test::TestRequest::post().uri("/b").set_payload(vec![0u8; 64]).to_request(), 413),
            (test::TestRequest::get().uri("/nowhere").to_request(), 404),
        ];
        for (req, status) in cases {
            let resp = test::call_service(&app, req).await;
            assert_eq!(resp.status().as_u16(), status);
            let v: serde_json::Value = test::read_body_json(resp).await;
            assert!(v["detail"].as_str().is_some_and(|d| !d.is_empty()), "{v}");
        }
        let req = test::TestRequest::get().uri("/own").to_request();
        let v: serde_json::Value = test::call_and_read_body_json(&app, req).await;
        assert_eq!(v, serde_json::json!({"detail": "mine", "field": "x"}));
    }
}
