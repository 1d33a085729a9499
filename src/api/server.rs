//! The Unix socket of the API: socket creation and permissions, the open-file limit, and
//! the socket API's limits and refusal answer for the shared accept loop (`crate::serve`).
//!
//! The socket is bound with a restrictive umask and then given `daemon.socket_mode`, inside a
//! directory that no other user can write (checked, not assumed), so nobody can swap it. A
//! stale socket file from a crashed daemon is replaced; a live daemon on the same path makes
//! this one refuse to start.
//!
//! No peer can starve the others: the timeouts and per-uid shares of `crate::serve` apply
//! (re-exported here). Admin routes check the peer before they read a body (see
//! `api::Admin`).

use crate::metrics::Metrics;
use std::future::Future;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::UnixListener;

/// Public for `tests/it/api.rs`, which floods the socket from one uid: its share of the
/// socket's connections, and how long a stalled body is waited for.
pub use crate::serve::{BODY_READ_TIMEOUT, MAX_CONNECTIONS_PER_UID};
pub(crate) use crate::serve::{BodyTimedOut, Limits, serve_http};

/// The soft limit on open files the daemon asks for at start (never above the hard limit):
/// [`crate::serve::MAX_CONNECTIONS`] sockets, the metrics port's 64, the ledger's files, the
/// provider's HTTPS connections and the notify command's pipes, with room to spare for
/// connections accepted only to be refused. The common default soft limit, 1024, would run out
/// before [`crate::serve::MAX_CONNECTIONS`]; raising the soft limit up to the hard one is what
/// a server is expected to do itself. The systemd unit sets `LimitNOFILE=` to this value.
pub(crate) const OPEN_FILES_WANTED: u64 = 4096;

/// Raises the soft `RLIMIT_NOFILE` to [`OPEN_FILES_WANTED`] if it is lower (never above the
/// hard limit, never lowering it) and returns the soft limit in force afterwards (`None`:
/// unlimited). A refusal (a sandbox that forbids it) leaves the limit as it was.
pub(crate) fn raise_open_file_limit() -> Option<u64> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let now = getrlimit(Resource::Nofile);
    let soft = now.current?;
    if soft >= OPEN_FILES_WANTED {
        return Some(soft);
    }
    let target = now
        .maximum
        .map_or(OPEN_FILES_WANTED, |hard| hard.min(OPEN_FILES_WANTED));
    if target <= soft {
        return Some(soft);
    }
    let raised = Rlimit {
        current: Some(target),
        maximum: now.maximum,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => Some(target),
        Err(e) => {
            tracing::debug!(error = %e, "cannot raise the open file limit");
            Some(soft)
        }
    }
}

/// What can stop the socket from being served.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BindError {
    /// Another process answers on the socket path.
    #[error("another tokend is already serving {0}; stop it first or use another socket_path")]
    InUse(PathBuf),
    /// Something that is not a socket sits at the path.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// The socket's directory can be written by other users.
    #[error(
        "the socket directory {0} is writable by other users (mode {1:o}); make it 0755 or tighter so nobody can replace the socket"
    )]
    UnsafeDirectory(PathBuf, u32),
    /// An OS error.
    #[error("cannot create the socket {path}: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Held while [`bind`] narrows the process-wide umask, and while it creates the socket's
/// directory: a directory created by one bind while another has the umask narrowed would get
/// the narrow mode (seen when tests bind in parallel). It orders binds only: a file or
/// directory another thread creates meanwhile without taking it (the daemon binds once, at
/// start, before anything else creates files) would still get the narrow mode.
static UMASK: parking_lot::Mutex<()> = parking_lot::Mutex::new(());

/// Creates the socket at `path` with `mode`.
pub(crate) fn bind(path: &Path, mode: u32) -> Result<UnixListener, BindError> {
    let io = |source| BindError::Io {
        path: path.to_path_buf(),
        source,
    };
    let _umask = UMASK.lock();
    let dir = path.parent().unwrap_or(Path::new("/"));
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(io)?;
    }
    let meta = std::fs::metadata(dir).map_err(io)?;
    let dir_mode = meta.permissions().mode() & 0o7777;
    let sticky = dir_mode & 0o1000 != 0;
    let others_write = dir_mode & 0o022 != 0;
    let owner_ok = meta.uid() == rustix::process::geteuid().as_raw() || meta.uid() == 0;
    if others_write && !sticky || !owner_ok {
        return Err(BindError::UnsafeDirectory(dir.to_path_buf(), dir_mode));
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => return Err(BindError::InUse(path.to_path_buf())),
            Err(_) => {
                tracing::info!(path = %path.display(), "replacing a stale socket file");
                std::fs::remove_file(path).map_err(io)?;
            }
        },
        Ok(_) => return Err(BindError::NotASocket(path.to_path_buf())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    // Bind with no permissions for anyone but the owner, then open up to socket_mode: the
    // socket is never reachable with a wider mode than asked for.
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
    let bound = std::os::unix::net::UnixListener::bind(path);
    rustix::process::umask(old);
    let listener = bound.map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io)?;
    listener.set_nonblocking(true).map_err(io)?;
    UnixListener::from_std(listener).map_err(io)
}

/// Serves `router` on `listener` until `shutdown` resolves, then stops accepting, lets
/// requests in progress finish for up to `grace`, and returns. Refusals and timeouts are
/// counted in `metrics`.
pub(crate) async fn serve(
    listener: UnixListener,
    app: super::Api,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    serve_http(listener, app, shutdown, limits(grace), Some(metrics)).await
}

/// The socket API's [`Limits`]: the constants of [`crate::serve`], draining for `grace`,
/// and the standard JSON error as the answer over a uid's share.
pub(crate) fn limits(grace: Duration) -> Limits {
    Limits::standard(grace, refusal)
}

/// The answer to a connection over its uid's share: 503 with the standard error body and a
/// `Retry-After`, then the connection is closed. INTERFACE.md has no error code for an
/// overloaded daemon; `provider_unavailable` is its only 503, and what a client does with it
/// (retry after `Retry-After`) is what it should do here. The message says what happened.
pub(crate) fn refusal(uid: u32, share: usize) -> Vec<u8> {
    let body = serde_json::to_string(&crate::wire::ErrorBody {
        error: crate::wire::ErrorDetail {
            code: crate::wire::ErrorCode::ProviderUnavailable,
            message: format!(
                "uid {uid} already holds {share} connections to tokend, the most one uid may \
                 hold; close some, then retry"
            ),
        },
    })
    .expect("an error body always serializes");
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         retry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::DeadlineBody;
    use axum::Router;
    use axum::body::Bytes;
    use axum::http::StatusCode;
    use axum::routing::{get, post};
    use hyper::body::Frame;
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::time::Instant;

    /// Short limits, so that the timeouts can be watched in a unit test.
    fn short(max_connections_per_uid: usize) -> Limits {
        Limits {
            max_connections: 16,
            max_connections_per_uid,
            header_read_timeout: Duration::from_millis(300),
            body_read_timeout: Duration::from_millis(300),
            write_timeout: Duration::from_millis(300),
            grace: Duration::from_millis(100),
            refusal,
        }
    }

    fn test_router() -> Router {
        Router::new()
            .route("/ok", get(|| async { "ok" }))
            .route("/big", get(|| async { vec![b'x'; 8 << 20] }))
            .route(
                "/body",
                post(|body: axum::body::Body| async move {
                    match axum::body::to_bytes(body, 1 << 20).await {
                        Ok(b) => (StatusCode::OK, b.len().to_string()),
                        Err(e) => (
                            StatusCode::BAD_REQUEST,
                            super::super::body_error(&e).message,
                        ),
                    }
                }),
            )
    }

    /// A server on a fresh socket; dropping the sender stops it.
    async fn start(
        limits: Limits,
    ) -> (
        tempfile::TempDir,
        PathBuf,
        Arc<Metrics>,
        tokio::sync::oneshot::Sender<()>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.sock");
        let listener = bind(&path, 0o600).unwrap();
        let metrics = Arc::new(Metrics::new(false));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(serve_http(
            listener,
            test_router(),
            async move {
                let _ = rx.await;
            },
            limits,
            Some(metrics.clone() as Arc<dyn crate::serve::Observer>),
        ));
        (dir, path, metrics, tx)
    }

    /// Reads until EOF or an error (a reset after the answer counts as the end).
    async fn read_all(s: &mut tokio::net::UnixStream) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = [0u8; 16384];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return out,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    }

    /// Connects, writes `raw`, and reads the answer until the server closes.
    async fn exchange(path: &Path, raw: &[u8]) -> String {
        let mut s = tokio::net::UnixStream::connect(path).await.unwrap();
        s.write_all(raw).await.unwrap();
        String::from_utf8_lossy(&read_all(&mut s).await).into_owned()
    }

    async fn fetch(path: &Path, route: &str) -> String {
        let req = format!("GET {route} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        exchange(path, req.as_bytes()).await
    }

    /// Polls `done` every 20 ms until it holds; fails after 5 s, naming `what`.
    async fn wait_until<F: Future<Output = bool>>(what: &str, mut done: impl FnMut() -> F) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !done().await {
            assert!(Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn counted(m: &Metrics, series: &str) -> f64 {
        let text = m.render();
        text.lines()
            .find_map(|l| {
                l.strip_prefix(series)?
                    .strip_prefix(' ')?
                    .trim()
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("{series} not in\n{text}"))
    }

    #[tokio::test]
    async fn a_uid_over_its_share_is_answered_503_at_once_and_gets_room_back() {
        let (_dir, path, metrics, _stop) = start(short(2)).await;
        // Two connections that say nothing hold this uid's whole share...
        let mut first = tokio::net::UnixStream::connect(&path).await.unwrap();
        let _second = tokio::net::UnixStream::connect(&path).await.unwrap();
        // ...so the third is refused before it is read, with the standard error body.
        let started = Instant::now();
        let answer = fetch(&path, "/ok").await;
        assert!(started.elapsed() < Duration::from_millis(250), "{answer}");
        assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
        assert!(answer.contains("retry-after: 1\r\n"), "{answer}");
        let body = answer.split("\r\n\r\n").nth(1).unwrap();
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["code"], "provider_unavailable");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("2 connections")
        );
        assert_eq!(
            counted(
                &metrics,
                "tokend_api_connections_refused_total{reason=\"uid_limit\"}"
            ),
            1.0
        );
        assert_eq!(counted(&metrics, "tokend_api_connections_open"), 2.0);
        // A connection that ends gives its place back.
        first.shutdown().await.unwrap();
        let _ = read_all(&mut first).await;
        drop(first);
        wait_until("the place was not given back", || async {
            fetch(&path, "/ok").await.starts_with("HTTP/1.1 200 ")
        })
        .await;
    }

    #[tokio::test]
    async fn a_body_that_does_not_arrive_in_time_is_answered_and_closed() {
        let (_dir, path, metrics, _stop) = start(short(8)).await;
        let mut s = tokio::net::UnixStream::connect(&path).await.unwrap();
        s.write_all(b"POST /body HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
            .await
            .unwrap();
        let started = Instant::now();
        let answer = String::from_utf8_lossy(&read_all(&mut s).await).into_owned();
        let waited = started.elapsed();
        assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
        assert!(answer.contains("did not arrive within"), "{answer}");
        assert!(
            waited >= Duration::from_millis(250) && waited < Duration::from_secs(3),
            "{waited:?}"
        );
        assert_eq!(
            counted(&metrics, "tokend_api_timeouts_total{phase=\"body\"}"),
            1.0
        );
        // A body that arrives is read as usual.
        let answer = exchange(
            &path,
            b"POST /body HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello",
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
        assert!(answer.ends_with("\r\n\r\n5"), "{answer}");
    }

    #[tokio::test]
    async fn a_peer_that_never_reads_its_answer_is_dropped() {
        let (_dir, path, metrics, _stop) = start(short(8)).await;
        let mut s = tokio::net::UnixStream::connect(&path).await.unwrap();
        s.write_all(b"GET /big HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        wait_until("the stalled write was not ended", || async {
            counted(&metrics, "tokend_api_timeouts_total{phase=\"write\"}") >= 1.0
        })
        .await;
        let got = read_all(&mut s).await;
        assert!(got.len() < 8 << 20, "the whole answer arrived");
        wait_until("the connection is still open", || async {
            counted(&metrics, "tokend_api_connections_open") == 0.0
        })
        .await;
    }

    #[tokio::test]
    async fn silent_peers_time_out_but_idle_keep_alives_are_not_counted() {
        let (_dir, path, metrics, _stop) = start(short(8)).await;
        let mut silent = tokio::net::UnixStream::connect(&path).await.unwrap();
        assert!(read_all(&mut silent).await.is_empty());
        // Keep-alive: the server closes it at the header timeout, after the answer.
        let answer = exchange(&path, b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
        assert_eq!(
            counted(&metrics, "tokend_api_timeouts_total{phase=\"headers\"}"),
            1.0
        );
    }

    #[tokio::test]
    async fn body_errors_name_the_timeout_or_the_limit() {
        struct Never;
        impl hyper::body::Body for Never {
            type Data = Bytes;
            type Error = std::convert::Infallible;
            fn poll_frame(
                self: Pin<&mut Self>,
                _: &mut Context<'_>,
            ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
                Poll::Pending
            }
        }
        let slow = axum::body::Body::new(DeadlineBody::new(
            Never,
            Instant::now() + Duration::from_millis(20),
            Duration::from_secs(10),
            None,
        ));
        let err = axum::body::to_bytes(slow, 100).await.unwrap_err();
        let answer = super::super::body_error(&err);
        assert_eq!(answer.code.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            answer.message,
            "the request body did not arrive within 10 s"
        );
        let big = axum::body::Body::from(vec![0u8; 100]);
        let err = axum::body::to_bytes(big, 10).await.unwrap_err();
        assert_eq!(
            super::super::body_error(&err).code.status(),
            StatusCode::PAYLOAD_TOO_LARGE
        );
    }

    #[test]
    fn the_open_file_limit_is_raised_towards_what_the_socket_needs() {
        let before = rustix::process::getrlimit(rustix::process::Resource::Nofile);
        let after = raise_open_file_limit();
        match (before.current, before.maximum) {
            (None, _) => assert_eq!(after, None),
            (Some(soft), hard) => {
                let want = hard.map_or(OPEN_FILES_WANTED, |h| h.min(OPEN_FILES_WANTED));
                assert_eq!(after, Some(soft.max(want)));
            }
        }
    }

    #[tokio::test]
    async fn stale_socket_is_replaced_but_live_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run").join("t.sock");
        let first = bind(&path, 0o660).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        let dir_mode = std::fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dir_mode, 0o755);
        let err = bind(&path, 0o660).unwrap_err();
        assert!(matches!(err, BindError::InUse(_)), "{err}");
        drop(first);
        // The file is still there but nobody listens: stale.
        assert!(path.exists());
        bind(&path, 0o600).unwrap();
    }

    #[tokio::test]
    async fn world_writable_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        std::fs::create_dir(&run).unwrap();
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = bind(&run.join("t.sock"), 0o660).unwrap_err();
        assert!(matches!(err, BindError::UnsafeDirectory(..)), "{err}");
    }

    #[tokio::test]
    async fn a_regular_file_is_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.sock");
        std::fs::write(&path, "data").unwrap();
        assert!(matches!(
            bind(&path, 0o660).unwrap_err(),
            BindError::NotASocket(_)
        ));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "data");
    }
}
