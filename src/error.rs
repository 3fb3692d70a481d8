//! The one error type of the request path, and its mapping to HTTP.
//!
//! Every error the edge produces itself is an [`EdgeError`]. Each variant knows its status, its
//! OpenAI `code`, who caused it ([`Source`]) and the retry hints an SDK should see. Turning an error
//! into a response ([`EdgeError::into_response`]) or into the terminal SSE event of a broken stream
//! ([`EdgeError::sse_event`]) is a pure function over static bytes: no allocation, no formatting, and
//! no message that could echo a key or reveal whether a slug exists.

use bytes::Bytes;
use http::header::{ALLOW, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, Response, StatusCode};

use crate::headers;

/// Who caused an error: decides the log level and whether the edge could have done better.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The request itself was wrong (bad host, key, path, body).
    Client,
    /// The inference backend failed or was unreachable.
    Upstream,
}

/// Why a request body was refused with 400 `invalid_body`. The text is fixed, so it can never
/// echo client bytes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyProblem {
    /// Not a single, strictly valid JSON document.
    NotJson,
    /// Valid JSON, but the top level is not an object.
    NotObject,
    /// Nested deeper than the edge accepts.
    TooDeep,
    /// A top-level member spells an edge-owned name in another letter case (`"Model"`), which
    /// case-insensitive parsers would read as the owned member.
    AmbiguousMember,
}

impl BodyProblem {
    fn message(self) -> &'static str {
        match self {
            BodyProblem::NotJson => "The request body is not valid JSON.",
            BodyProblem::NotObject => "The request body must be a JSON object.",
            BodyProblem::TooDeep => "The request body is nested too deeply.",
            BodyProblem::AmbiguousMember => {
                "The request body has a member whose name differs from one the deployment sets itself (such as 'model') only in letter case or by an escaped NUL."
            }
        }
    }
}

/// Every failure the edge answers itself. Upstream error responses are not here: they are passed
/// through as the backend sent them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EdgeError {
    /// No usable Host, another domain, a bad or reserved slug, an unknown or disabled deployment.
    DeploymentNotFound,
    /// Over TLS, the SNI names another host than `Host` / `:authority`.
    MisdirectedRequest,
    /// `fixed_api_key` deployment, no `Authorization` header.
    MissingApiKey,
    /// Wrong scheme, malformed token, unknown, revoked or foreign key.
    InvalidApiKey,
    /// No route for this path.
    UnknownUrl,
    /// A known path with a method it does not take; carries the `allow` value.
    MethodNotAllowed(&'static str),
    /// The request body is not a JSON object the edge can pin.
    InvalidBody(BodyProblem),
    /// The request body is larger than `limits.max_body_bytes`.
    BodyTooLarge,
    /// The client did not finish sending its body within `timeouts.client_body`, or broke it off.
    BodyIncomplete,
    /// No pool serves the deployment's base model (a configuration gap, not transient).
    NoPool,
    /// Every attempt to reach a backend failed before any request byte was sent.
    UpstreamUnavailable,
    /// The backend took longer than `timeouts.upstream_first_byte` to send a response head.
    UpstreamTimeout,
    /// The backend connection broke after the request was sent, before a response head.
    UpstreamFailed,
    /// A stream went silent for longer than `timeouts.upstream_idle`.
    UpstreamIdle,
    /// The key's (or public deployment's) token bucket is empty.
    RateLimited(crate::limits::Quota),
    /// Too many failed key checks from this client address; blocked for the given time.
    AuthBlocked(std::time::Duration),
}

/// What one variant renders to; all static so the error path allocates nothing but the headers map.
struct Rendered {
    status: StatusCode,
    code: &'static str,
    body: &'static str,
}

/// Builds the OpenAI envelope at compile time, so the body is a `&'static str`.
macro_rules! envelope {
    ($message:expr, $type:literal, $code:literal) => {
        concat!(
            r#"{"error":{"message":""#,
            $message,
            r#"","type":""#,
            $type,
            r#"","param":null,"code":""#,
            $code,
            r#""}}"#
        )
    };
}

macro_rules! body_problem {
    ($message:literal) => {
        envelope!($message, "invalid_request_error", "invalid_body")
    };
}

impl EdgeError {
    /// Who caused this error.
    pub fn source(self) -> Source {
        match self {
            EdgeError::NoPool
            | EdgeError::UpstreamUnavailable
            | EdgeError::UpstreamTimeout
            | EdgeError::UpstreamFailed
            | EdgeError::UpstreamIdle => Source::Upstream,
            _ => Source::Client,
        }
    }

    /// The HTTP status of the error response.
    pub fn status(self) -> StatusCode {
        self.render().status
    }

    /// The OpenAI `code` member, as named in the SPEC.
    pub fn code(self) -> &'static str {
        self.render().code
    }

    fn render(self) -> Rendered {
        use EdgeError::*;
        let (status, code, body) = match self {
            DeploymentNotFound => (
                StatusCode::NOT_FOUND,
                "deployment_not_found",
                envelope!(
                    "No deployment is served at this address.",
                    "invalid_request_error",
                    "deployment_not_found"
                ),
            ),
            MisdirectedRequest => (
                StatusCode::MISDIRECTED_REQUEST,
                "misdirected_request",
                envelope!(
                    "This connection was opened for another host name.",
                    "invalid_request_error",
                    "misdirected_request"
                ),
            ),
            MissingApiKey => (
                StatusCode::UNAUTHORIZED,
                "missing_api_key",
                envelope!(
                    "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
                    "invalid_request_error",
                    "missing_api_key"
                ),
            ),
            InvalidApiKey => (
                StatusCode::UNAUTHORIZED,
                "invalid_api_key",
                envelope!(
                    "Incorrect API key provided.",
                    "invalid_request_error",
                    "invalid_api_key"
                ),
            ),
            UnknownUrl => (
                StatusCode::NOT_FOUND,
                "unknown_url",
                envelope!(
                    "Unknown request URL. Supported: POST /v1/chat/completions, GET /v1/models.",
                    "invalid_request_error",
                    "unknown_url"
                ),
            ),
            MethodNotAllowed(_) => (
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                envelope!(
                    "This method is not allowed for this URL.",
                    "invalid_request_error",
                    "method_not_allowed"
                ),
            ),
            InvalidBody(problem) => (
                StatusCode::BAD_REQUEST,
                "invalid_body",
                match problem {
                    BodyProblem::NotJson => body_problem!("The request body is not valid JSON."),
                    BodyProblem::NotObject => {
                        body_problem!("The request body must be a JSON object.")
                    }
                    BodyProblem::TooDeep => body_problem!("The request body is nested too deeply."),
                    BodyProblem::AmbiguousMember => body_problem!(
                        "The request body has a member whose name differs from one the deployment sets itself (such as 'model') only in letter case or by an escaped NUL."
                    ),
                },
            ),
            BodyTooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                envelope!(
                    "The request body is too large.",
                    "invalid_request_error",
                    "body_too_large"
                ),
            ),
            BodyIncomplete => (
                StatusCode::REQUEST_TIMEOUT,
                "body_incomplete",
                envelope!(
                    "The request body was not received completely in time.",
                    "invalid_request_error",
                    "body_incomplete"
                ),
            ),
            NoPool => (
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream_unavailable",
                envelope!(
                    "No backend serves this deployment's model.",
                    "server_error",
                    "upstream_unavailable"
                ),
            ),
            UpstreamUnavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream_unavailable",
                envelope!(
                    "The model backend is unavailable. Please retry.",
                    "server_error",
                    "upstream_unavailable"
                ),
            ),
            UpstreamTimeout => (
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_timeout",
                envelope!(
                    "The model backend did not answer in time.",
                    "server_error",
                    "upstream_timeout"
                ),
            ),
            UpstreamFailed => (
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                envelope!(
                    "The model backend closed the connection before answering.",
                    "server_error",
                    "upstream_error"
                ),
            ),
            RateLimited(_) => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_exceeded",
                envelope!(
                    "Rate limit reached for this key. Retry after the time in retry-after.",
                    "invalid_request_error",
                    "rate_limit_exceeded"
                ),
            ),
            AuthBlocked(_) => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_exceeded",
                envelope!(
                    "Too many requests with invalid API keys from this address. Retry later.",
                    "invalid_request_error",
                    "rate_limit_exceeded"
                ),
            ),
            UpstreamIdle => (
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_timeout",
                envelope!(
                    "The model backend stopped sending the stream.",
                    "server_error",
                    "upstream_timeout"
                ),
            ),
        };
        Rendered { status, code, body }
    }

    /// The human message, for logs. Never contains request data.
    pub fn message(self) -> &'static str {
        match self {
            EdgeError::InvalidBody(problem) => problem.message(),
            other => other.code(),
        }
    }

    /// The OpenAI error envelope for this error, as static bytes.
    pub fn body(self) -> Bytes {
        Bytes::from_static(self.render().body.as_bytes())
    }

    /// Whether a retry after a pause can succeed (503 with `retry-after`).
    fn transient(self) -> bool {
        matches!(self, EdgeError::UpstreamUnavailable)
    }

    /// Whether retrying the same request can never succeed (`x-should-retry: false`).
    fn final_for_client(self) -> bool {
        matches!(
            self,
            EdgeError::DeploymentNotFound
                | EdgeError::MissingApiKey
                | EdgeError::InvalidApiKey
                | EdgeError::UnknownUrl
                | EdgeError::MethodNotAllowed(_)
                | EdgeError::InvalidBody(_)
                | EdgeError::BodyTooLarge
                | EdgeError::NoPool
        )
    }

    /// The whole error response: status, JSON envelope and retry hints. The router adds what
    /// every response carries (request id, CORS).
    pub fn into_response<B: From<Bytes>>(self) -> Response<B> {
        let rendered = self.render();
        let mut response = Response::new(B::from(Bytes::from_static(rendered.body.as_bytes())));
        *response.status_mut() = rendered.status;
        let h = response.headers_mut();
        h.insert(CONTENT_TYPE, headers::APPLICATION_JSON.clone());
        if self.transient() {
            h.insert(RETRY_AFTER, HeaderValue::from_static("1"));
            h.insert(&headers::RETRY_AFTER_MS, HeaderValue::from_static("1000"));
        }
        if self.final_for_client() {
            h.insert(&headers::X_SHOULD_RETRY, HeaderValue::from_static("false"));
        }
        match self {
            EdgeError::MethodNotAllowed(allow) => {
                h.insert(ALLOW, HeaderValue::from_static(allow));
            }
            EdgeError::RateLimited(quota) => quota.apply(true, h),
            EdgeError::AuthBlocked(left) => {
                let ms = u64::try_from(left.as_millis()).unwrap_or(u64::MAX).max(1);
                h.insert(RETRY_AFTER, HeaderValue::from(ms.div_ceil(1000)));
                h.insert(&headers::RETRY_AFTER_MS, HeaderValue::from(ms));
            }
            _ => {}
        }
        response
    }

    /// The terminal SSE event for a stream that broke after its head was sent:
    /// `data: {envelope}\n\n`, no `event:` line.
    pub fn sse_event(self) -> Bytes {
        let body = self.render().body;
        let mut event = Vec::with_capacity(body.len() + 8);
        event.extend_from_slice(b"data: ");
        event.extend_from_slice(body.as_bytes());
        event.extend_from_slice(b"\n\n");
        Bytes::from(event)
    }
}

impl std::fmt::Display for EdgeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message(), self.status().as_u16())
    }
}

impl std::error::Error for EdgeError {}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;
    use serde_json::Value;

    const ALL: [EdgeError; 16] = [
        EdgeError::DeploymentNotFound,
        EdgeError::MisdirectedRequest,
        EdgeError::MissingApiKey,
        EdgeError::InvalidApiKey,
        EdgeError::UnknownUrl,
        EdgeError::MethodNotAllowed("POST, OPTIONS"),
        EdgeError::InvalidBody(BodyProblem::NotObject),
        EdgeError::BodyTooLarge,
        EdgeError::BodyIncomplete,
        EdgeError::NoPool,
        EdgeError::UpstreamUnavailable,
        EdgeError::UpstreamTimeout,
        EdgeError::UpstreamFailed,
        EdgeError::UpstreamIdle,
        EdgeError::RateLimited(crate::limits::Quota {
            limit: 10,
            remaining: 0,
            reset: std::time::Duration::from_millis(1500),
        }),
        EdgeError::AuthBlocked(std::time::Duration::from_secs(30)),
    ];

    fn envelope_of(err: EdgeError) -> Value {
        serde_json::from_slice(&err.body()).unwrap()
    }

    #[test]
    fn statuses_and_codes_follow_the_spec() {
        let expected: [(u16, &str); 16] = [
            (404, "deployment_not_found"),
            (421, "misdirected_request"),
            (401, "missing_api_key"),
            (401, "invalid_api_key"),
            (404, "unknown_url"),
            (405, "method_not_allowed"),
            (400, "invalid_body"),
            (413, "body_too_large"),
            (408, "body_incomplete"),
            (503, "upstream_unavailable"),
            (503, "upstream_unavailable"),
            (504, "upstream_timeout"),
            (502, "upstream_error"),
            (504, "upstream_timeout"),
            (429, "rate_limit_exceeded"),
            (429, "rate_limit_exceeded"),
        ];
        for (err, (status, code)) in ALL.iter().zip(expected) {
            assert_eq!(err.status().as_u16(), status, "{err:?}");
            assert_eq!(err.code(), code, "{err:?}");
            let v = envelope_of(*err);
            assert_eq!(v["error"]["code"], code, "{err:?}");
            assert_eq!(v["error"]["param"], Value::Null);
            let kind = if status >= 500 {
                "server_error"
            } else {
                "invalid_request_error"
            };
            assert_eq!(v["error"]["type"], kind, "{err:?}");
            assert!(
                v["error"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty())
            );
        }
    }

    #[test]
    fn every_body_problem_has_its_own_message() {
        let problems = [
            BodyProblem::NotJson,
            BodyProblem::NotObject,
            BodyProblem::TooDeep,
            BodyProblem::AmbiguousMember,
        ];
        for p in problems {
            let v = envelope_of(EdgeError::InvalidBody(p));
            assert_eq!(v["error"]["message"], p.message());
        }
    }

    #[test]
    fn retry_hints() {
        let r: Response<Full<Bytes>> = EdgeError::UpstreamUnavailable.into_response();
        assert_eq!(r.headers()["retry-after"], "1");
        assert_eq!(r.headers()["retry-after-ms"], "1000");
        assert!(r.headers().get("x-should-retry").is_none());
        for err in [
            EdgeError::InvalidApiKey,
            EdgeError::DeploymentNotFound,
            EdgeError::BodyTooLarge,
            EdgeError::InvalidBody(BodyProblem::NotJson),
        ] {
            let r: Response<Full<Bytes>> = err.into_response();
            assert_eq!(r.headers()["x-should-retry"], "false", "{err:?}");
            assert!(r.headers().get("retry-after").is_none());
        }
        let r: Response<Full<Bytes>> = ALL[14].into_response();
        assert_eq!(r.headers()["retry-after"], "2");
        assert_eq!(r.headers()["retry-after-ms"], "1500");
        assert_eq!(r.headers()["x-ratelimit-remaining-requests"], "0");
        let r: Response<Full<Bytes>> = ALL[15].into_response();
        assert_eq!(r.headers()["retry-after"], "30");
        let r: Response<Full<Bytes>> = EdgeError::UpstreamTimeout.into_response();
        assert!(r.headers().get("x-should-retry").is_none());
        let r: Response<Full<Bytes>> = EdgeError::MethodNotAllowed("GET, OPTIONS").into_response();
        assert_eq!(r.headers()["allow"], "GET, OPTIONS");
        assert_eq!(r.headers()["content-type"], "application/json");
    }

    #[test]
    fn sse_event_is_data_line_with_envelope() {
        let ev = EdgeError::UpstreamIdle.sse_event();
        let text = std::str::from_utf8(&ev).unwrap();
        assert!(text.starts_with("data: {\"error\":"));
        assert!(text.ends_with("}\n\n"));
        let v: Value = serde_json::from_str(&text[6..text.len() - 2]).unwrap();
        assert_eq!(v["error"]["code"], "upstream_timeout");
    }
}
