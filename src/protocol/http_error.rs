//! The HTTP error enums of the served protocols, declared by one macro ([`http_error!`]): each
//! variant carries its message and names the status it is answered with, so an enum and its
//! status mapping cannot drift apart, and every enum answers JSON `{"detail": ...}` unless its
//! [`Answer`] adds to it.

use actix_web::{HttpResponse, HttpResponseBuilder};

/// How an error's answer is built once its status is set: `{"detail": message}` by default;
/// an enum overrides [`Answer::answer`] to add headers or fields.
pub trait Answer: std::fmt::Display {
    fn answer(&self, out: HttpResponseBuilder) -> HttpResponse {
        detail(out, self)
    }
}

/// `{"detail": message}` on `out`.
pub fn detail(
    mut out: HttpResponseBuilder,
    message: &(impl std::fmt::Display + ?Sized),
) -> HttpResponse {
    out.json(serde_json::json!({"detail": message.to_string()}))
}

/// Declares an error enum whose variants each carry a message and map to one
/// [`StatusCode`](actix_web::http::StatusCode) (`Variant => STATUS,`), and implements `Display`
/// (the message; `#[display("prefix: {0}")]` before a variant formats it), `std::error::Error`
/// and `ResponseError` (that status, the body of the enum's [`Answer`]).
macro_rules! http_error {
    (
        $(#[doc = $doc:expr])*
        $vis:vis enum $name:ident {
            $(
                $(#[doc = $vdoc:expr])*
                $(#[display($fmt:literal)])?
                $var:ident => $status:ident,
            )+
        }
    ) => {
        $(#[doc = $doc])*
        #[derive(Debug)]
        $vis enum $name {
            $(
                $(#[doc = $vdoc])*
                $var(String),
            )+
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                match self {
                    $(
                        $name::$var(m) => {
                            $crate::protocol::http_error::http_error!(@write f, m $(, $fmt)?)
                        }
                    )+
                }
            }
        }

        impl ::std::error::Error for $name {}

        impl ::actix_web::ResponseError for $name {
            fn status_code(&self) -> ::actix_web::http::StatusCode {
                match self {
                    $($name::$var(_) => ::actix_web::http::StatusCode::$status,)+
                }
            }

            fn error_response(&self) -> ::actix_web::HttpResponse {
                let out = ::actix_web::HttpResponse::build(self.status_code());
                $crate::protocol::http_error::Answer::answer(self, out)
            }
        }
    };
    (@write $f:ident, $m:ident) => {
        $f.write_str($m)
    };
    (@write $f:ident, $m:ident, $fmt:literal) => {
        write!($f, $fmt, $m)
    };
}

pub(crate) use http_error;
