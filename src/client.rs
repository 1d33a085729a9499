//! The client side of the socket API: a small HTTP/1.1 + JSON client over the daemon's Unix
//! socket, used by every CLI command except `run` and `check-config`.
//!
//! One request per connection (the CLI makes one or two calls per invocation, so keeping a
//! connection alive buys nothing). Non-2xx answers become [`ClientError::Api`] with the
//! `{"error":{"code","message"}}` body parsed and `Retry-After` read; the caller never has
//! to look at raw error bodies.
//!
//! Bodies are the typed structs of [`crate::wire`], the same ones the daemon serializes;
//! none of them refuses unknown fields, so a newer daemon's additions never break this client.
//!
//! A response body may hold an access token (`GET .../token`), so [`ApiResponse`]'s `Debug`
//! prints only the status and the body's length.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{ACCEPT, CONTENT_LENGTH, CONTENT_TYPE, HOST, LINK, RETRY_AFTER, USER_AGENT};
use hyper::{HeaderMap, Method, Request};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::wire::ErrorBody;
use tokio::net::UnixStream;

/// How long one request may take, connect to last body byte. Generous on purpose: a token
/// request may have to wait for a refresh against the provider (itself bounded by
/// `refresh.request_timeout`, 30 s by default, possibly retried), and a `POST
/// /v1/connections` exchanges a code and resolves sites before answering.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// Longest error message taken from a non-JSON error body, so that a misbehaving peer on
/// the socket cannot flood the terminal.
const MAX_RAW_ERROR_CHARS: usize = 200;

/// Why a request did not produce a successful answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be opened (daemon down, wrong path, no permission).
    #[error("cannot connect to tokend at {}: {source} (is the daemon running?)", path.display())]
    Connect {
        /// The socket path that was tried.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The daemon answered with a non-2xx status.
    #[error("{code}: {message}")]
    Api {
        /// The HTTP status.
        status: u16,
        /// `error.code` of the body (`not_found`, `needs_reauth`, ...), or `http_<status>`
        /// when the body was not the documented error shape (or had a code this build does
        /// not know; its text is then the message).
        code: String,
        /// `error.message` of the body.
        message: String,
        /// `Retry-After` in seconds, when the daemon sent one (503 `provider_unavailable`).
        retry_after: Option<u64>,
    },
    /// The peer did not speak the expected HTTP/JSON.
    #[error("unexpected answer from tokend: {0}")]
    Protocol(String),
    /// No complete answer within the client's timeout.
    #[error("tokend did not answer in time")]
    Timeout,
}

/// A complete answer from the daemon.
pub struct ApiResponse {
    /// The HTTP status code.
    pub status: u16,
    /// The response headers.
    pub headers: HeaderMap,
    /// The whole response body.
    pub body: Bytes,
}

impl fmt::Debug for ApiResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the body: it may be a `Token`.
        f.debug_struct("ApiResponse")
            .field("status", &self.status)
            .field("body_len", &self.body.len())
            .finish_non_exhaustive()
    }
}

impl ApiResponse {
    /// True for a 2xx status.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The body parsed as JSON into `T`.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, ClientError> {
        serde_json::from_slice(&self.body).map_err(|e| self.invalid_json(&e))
    }

    /// The error for a body that `e` found not to be the JSON expected.
    pub fn invalid_json(&self, e: &serde_json::Error) -> ClientError {
        // By category and position only: serde's own text can quote the offending value.
        ClientError::Protocol(format!(
            "invalid JSON body (HTTP {}): {} at line {} column {}",
            self.status,
            json_category(e),
            e.line(),
            e.column()
        ))
    }

    /// `Retry-After` as seconds, when present in the delta-seconds form (the form the
    /// daemon sends; an HTTP-date is ignored).
    pub fn retry_after(&self) -> Option<u64> {
        self.headers
            .get(RETRY_AFTER)?
            .to_str()
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// The path of the next page of a paged listing: the target of a
    /// `Link: <PATH>; rel="next"` header, when it is a path on this socket (starts with `/`).
    pub fn next_link(&self) -> Option<String> {
        self.headers
            .get_all(LINK)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .find_map(|link| {
                let (target, params) = link.trim().strip_prefix('<')?.split_once('>')?;
                let next = params.split(';').any(|p| {
                    p.trim()
                        .strip_prefix("rel=")
                        .is_some_and(|rel| rel.trim_matches('"') == "next")
                });
                (next && target.starts_with('/')).then(|| target.to_owned())
            })
    }

    /// `Ok(self)` for a 2xx status, else the error body turned into [`ClientError::Api`].
    pub fn error_for_status(self) -> Result<ApiResponse, ClientError> {
        if self.is_success() {
            return Ok(self);
        }
        let retry_after = self.retry_after();
        // The typed body first; then the same shape with a code this build does not know (a
        // newer daemon's), kept as it is.
        let parsed = serde_json::from_slice::<ErrorBody>(&self.body)
            .map(|b| (b.error.code.as_str().to_owned(), b.error.message))
            .or_else(|_| {
                serde_json::from_slice::<LooseErrorBody>(&self.body)
                    .map(|b| (b.error.code, b.error.message))
            })
            .ok();
        let (code, message) = match parsed {
            Some(pair) => pair,
            None => {
                let raw = String::from_utf8_lossy(&self.body);
                let raw = raw.trim();
                let message = if raw.is_empty() {
                    "no error details in the answer".to_string()
                } else {
                    raw.chars().take(MAX_RAW_ERROR_CHARS).collect()
                };
                (format!("http_{}", self.status), message)
            }
        };
        Err(ClientError::Api {
            status: self.status,
            code,
            message,
            retry_after,
        })
    }
}

/// The error body's shape with any code string: what a newer daemon may send.
#[derive(serde::Deserialize)]
struct LooseErrorBody {
    error: LooseErrorDetail,
}

#[derive(serde::Deserialize)]
struct LooseErrorDetail {
    code: String,
    message: String,
}

/// A JSON error's category, for messages that must not quote the input.
fn json_category(e: &serde_json::Error) -> &'static str {
    match e.classify() {
        serde_json::error::Category::Io => "an I/O error",
        serde_json::error::Category::Syntax => "a syntax error",
        serde_json::error::Category::Data => "an unexpected value",
        serde_json::error::Category::Eof => "an early end",
    }
}

/// A client of one daemon socket.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
    timeout: Duration,
}

impl Client {
    /// A client of the daemon listening on `socket`, with [`DEFAULT_TIMEOUT`].
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Client {
            socket: socket.into(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// The same client with another overall per-request timeout.
    #[cfg(test)]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sends one request and returns the answer whatever its status (use
    /// [`Client::request`] to have non-2xx answers turned into errors). `path` includes the
    /// query string and must already be percent-encoded; `body` is JSON ([`json_body`]).
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<ApiResponse, ClientError> {
        tokio::time::timeout(self.timeout, self.send_inner(method, path, body))
            .await
            .map_err(|_| ClientError::Timeout)?
    }

    /// Sends one request; a non-2xx answer becomes [`ClientError::Api`].
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<ApiResponse, ClientError> {
        self.send(method, path, body).await?.error_for_status()
    }

    async fn send_inner(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<ApiResponse, ClientError> {
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| ClientError::Connect {
                    path: self.socket.clone(),
                    source,
                })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ClientError::Protocol(format!("HTTP handshake failed: {e}")))?;
        // The connection future drives the socket; it ends when the answer is complete or
        // the request is dropped (timeout), and its error, if any, surfaces through
        // `send_request` below.
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });

        let has_body = body.is_some();
        let payload = body.unwrap_or_default();
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, "localhost")
            .header(ACCEPT, "application/json")
            .header(
                USER_AGENT,
                concat!("tokend-cli/", env!("CARGO_PKG_VERSION")),
            );
        if has_body {
            builder = builder
                .header(CONTENT_TYPE, "application/json")
                .header(CONTENT_LENGTH, payload.len());
        }
        let request = builder
            .body(Full::new(payload))
            .map_err(|e| ClientError::Protocol(format!("invalid request {path:?}: {e}")))?;

        let result = async {
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| ClientError::Protocol(e.to_string()))?;
            let (parts, body) = response.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|e| ClientError::Protocol(format!("reading the body: {e}")))?
                .to_bytes();
            Ok(ApiResponse {
                status: parts.status.as_u16(),
                headers: parts.headers,
                body,
            })
        }
        .await;
        driver.abort();
        result
    }
}

/// Encodes a request body (one of [`crate::wire`]'s request types) for [`Client::send`].
pub fn json_body(body: &impl Serialize) -> Result<Bytes, ClientError> {
    serde_json::to_vec(body)
        .map(Bytes::from)
        .map_err(|e| ClientError::Protocol(format!("cannot encode the request body: {e}")))
}

/// Percent-encodes `value` so that it is exactly one path segment (or one query value):
/// everything but RFC 3986 unreserved characters is encoded, and a segment made only of
/// dots is encoded too so that no router can read it as `.` or `..`.
pub fn encode_component(value: &str) -> String {
    let dots_only = !value.is_empty() && value.bytes().all(|b| b == b'.');
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        let keep = b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'_' | b'~')
            || (b == b'.' && !dots_only);
        if keep {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use parking_lot::Mutex;
    use std::convert::Infallible;
    use std::sync::Arc;

    use hyper::body::Incoming;
    use hyper::service::service_fn;
    use hyper::{Response, StatusCode};
    use tokio::net::UnixListener;

    /// What the fake daemon saw: method, path+query, Host header, content type, body.
    type Seen = Arc<Mutex<Vec<(String, String, String, String, String)>>>;

    /// A fake daemon on a Unix socket in a fresh tempdir, answering by path.
    async fn fake_daemon() -> (tempfile::TempDir, PathBuf, Seen) {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("tokend.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let seen: Seen = Arc::default();
        let seen2 = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let seen = seen2.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        let seen = seen.clone();
                        async move { Ok::<_, Infallible>(answer(req, &seen).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        (dir, socket, seen)
    }

    async fn answer(req: Request<Incoming>, seen: &Seen) -> Response<Full<Bytes>> {
        let method = req.method().to_string();
        let path = req.uri().to_string();
        let header = |name| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string()
        };
        let (host, ctype) = (header(HOST), header(CONTENT_TYPE));
        let body = req.into_body().collect().await.unwrap().to_bytes();
        let body_text = String::from_utf8_lossy(&body).to_string();
        seen.lock()
            .push((method, path.clone(), host, ctype, body_text.clone()));
        let json = |status: u16, text: String| {
            Response::builder()
                .status(status)
                .header(CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(text)))
                .unwrap()
        };
        match path.as_str() {
            "/v1/health" => json(200, r#"{"status":"ok"}"#.into()),
            "/v1/echo" => json(201, body_text),
            "/v1/connections/nope" => json(
                404,
                r#"{"error":{"code":"not_found","message":"no connection nope"}}"#.into(),
            ),
            "/v1/connections/c1/token" => {
                let mut r = json(
                    503,
                    r#"{"error":{"code":"provider_unavailable","message":"Atlassian is down"}}"#
                        .into(),
                );
                r.headers_mut().insert(RETRY_AFTER, "42".parse().unwrap());
                r
            }
            "/v1/plain" => Response::builder()
                .status(StatusCode::BAD_GATEWAY)
                .body(Full::new(Bytes::from("upstream broke")))
                .unwrap(),
            "/v1/slow" => {
                tokio::time::sleep(Duration::from_secs(5)).await;
                json(200, "{}".into())
            }
            _ => json(500, "not json at all {".into()),
        }
    }

    #[tokio::test]
    async fn success_returns_status_headers_and_json_body() {
        let (_dir, socket, seen) = fake_daemon().await;
        let client = Client::new(&socket);
        let resp = client
            .request(Method::GET, "/v1/health", None)
            .await
            .unwrap();
        assert_eq!(resp.status, 200);
        assert_eq!(resp.headers[CONTENT_TYPE], "application/json");
        let v: serde_json::Value = resp.json().unwrap();
        assert_eq!(v["status"], "ok");
        let seen = seen.lock();
        assert_eq!(seen[0].0, "GET");
        assert_eq!(seen[0].2, "localhost", "Host header");
    }

    #[tokio::test]
    async fn posts_json_bodies() {
        let (_dir, socket, seen) = fake_daemon().await;
        let client = Client::new(&socket);
        let body = serde_json::json!({"provider": "atlassian", "label": "x"});
        let resp = client
            .request(Method::POST, "/v1/echo", Some(json_body(&body).unwrap()))
            .await
            .unwrap();
        assert_eq!(resp.status, 201);
        assert_eq!(resp.json::<serde_json::Value>().unwrap(), body);
        assert_eq!(seen.lock()[0].3, "application/json");
    }

    /// `GET path` from the fake daemon through [`Client::request`], which must fail.
    async fn request_error(path: &str) -> ClientError {
        let (_dir, socket, _seen) = fake_daemon().await;
        Client::new(&socket)
            .request(Method::GET, path, None)
            .await
            .unwrap_err()
    }

    /// `GET path` from the fake daemon through [`Client::send`], whatever the status.
    async fn sent(path: &str) -> ApiResponse {
        let (_dir, socket, _seen) = fake_daemon().await;
        Client::new(&socket)
            .send(Method::GET, path, None)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn api_error_body_is_parsed() {
        let err = request_error("/v1/connections/nope").await;
        match &err {
            ClientError::Api {
                status,
                code,
                message,
                retry_after,
            } => {
                assert_eq!(*status, 404);
                assert_eq!(code, "not_found");
                assert_eq!(message, "no connection nope");
                assert_eq!(*retry_after, None);
            }
            other => panic!("expected Api, got {other:?}"),
        }
        assert_eq!(err.to_string(), "not_found: no connection nope");
    }

    #[tokio::test]
    async fn retry_after_is_read_from_a_503() {
        let err = request_error("/v1/connections/c1/token").await;
        assert!(
            matches!(&err, ClientError::Api { status: 503, code, retry_after: Some(42), .. } if code == "provider_unavailable"),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn send_returns_error_answers_unchanged() {
        let resp = sent("/v1/connections/nope").await;
        assert_eq!(resp.status, 404);
        assert!(!resp.is_success());
    }

    #[tokio::test]
    async fn non_json_error_bodies_still_make_an_api_error() {
        let err = request_error("/v1/plain").await;
        assert!(
            matches!(&err, ClientError::Api { status: 502, code, message, .. } if code == "http_502" && message == "upstream broke"),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn invalid_json_in_a_success_is_a_protocol_error() {
        let resp = sent("/v1/garbage").await;
        let err = resp.json::<serde_json::Value>().unwrap_err();
        assert!(matches!(err, ClientError::Protocol(_)), "{err:?}");
    }

    fn response(status: u16, body: &str) -> ApiResponse {
        ApiResponse {
            status,
            headers: HeaderMap::new(),
            body: Bytes::from(body.to_owned()),
        }
    }

    #[test]
    fn a_body_of_the_wrong_shape_is_reported_without_quoting_it() {
        // A token answer whose token is a number: serde's own message would quote it.
        let resp = response(
            200,
            r#"{"access_token": 12345678987654321, "expires_at": "x"}"#,
        );
        let err = resp.json::<crate::wire::Token>().unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("an unexpected value at line 1 column"),
            "{text}"
        );
        assert!(!text.contains("12345678987654321"), "{text}");
    }

    #[test]
    fn an_error_code_this_build_does_not_know_is_kept() {
        let resp = response(
            429,
            r#"{"error": {"code": "slow_down", "message": "too many requests"}}"#,
        );
        let err = resp.error_for_status().unwrap_err();
        assert!(
            matches!(&err, ClientError::Api { status: 429, code, message, .. } if code == "slow_down" && message == "too many requests"),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn connect_error_names_the_socket_path() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("missing.sock");
        let err = Client::new(&socket)
            .request(Method::GET, "/v1/health", None)
            .await
            .unwrap_err();
        assert!(matches!(err, ClientError::Connect { .. }), "{err:?}");
        let text = err.to_string();
        assert!(
            text.starts_with(&format!(
                "cannot connect to tokend at {}: ",
                socket.display()
            )),
            "{text}"
        );
        assert!(text.ends_with("(is the daemon running?)"), "{text}");
    }

    #[tokio::test]
    async fn slow_answers_time_out() {
        let (_dir, socket, _seen) = fake_daemon().await;
        let err = Client::new(&socket)
            .with_timeout(Duration::from_millis(100))
            .request(Method::GET, "/v1/slow", None)
            .await
            .unwrap_err();
        assert!(matches!(err, ClientError::Timeout), "{err:?}");
    }

    #[test]
    fn debug_of_a_response_never_shows_the_body() {
        let resp = ApiResponse {
            status: 200,
            headers: HeaderMap::new(),
            body: Bytes::from_static(br#"{"access_token":"at-secret"}"#),
        };
        let printed = format!("{resp:?}");
        assert!(!printed.contains("at-secret"), "{printed}");
        assert!(printed.contains("200"), "{printed}");
    }

    #[test]
    fn components_are_encoded_as_one_segment() {
        assert_eq!(encode_component("conf-prod_1.x~"), "conf-prod_1.x~");
        assert_eq!(encode_component("a/b c?d#e%"), "a%2Fb%20c%3Fd%23e%25");
        assert_eq!(encode_component(".."), "%2E%2E");
        assert_eq!(encode_component("é"), "%C3%A9");
    }
}
