//! The Unix-socket HTTP server: socket creation, peer credentials, timeouts, graceful stop.
//!
//! The socket is bound with a restrictive umask and then given `daemon.socket_mode`, inside a
//! directory that no other user can write (checked, not assumed), so nobody can swap it. A
//! stale socket file from a crashed daemon is replaced; a live daemon on the same path makes
//! this one refuse to start.
//!
//! No peer can starve the others: request headers and bodies must arrive within
//! [`HEADER_READ_TIMEOUT`] and [`BODY_READ_TIMEOUT`], a response write that makes no progress
//! for [`WRITE_TIMEOUT`] ends its connection, and each peer uid may hold at most
//! [`MAX_CONNECTIONS_PER_UID`] of the [`MAX_CONNECTIONS`] open connections (more are answered
//! 503 and closed at once, before anything is read), so a fresh connection from another uid
//! is always accepted at once. Admin routes check the peer before they read a body (see
//! `api::Admin`).

use super::Peer;
use crate::metrics::{Metrics, TimeoutPhase};
use axum::BoxError;
use axum::Router;
use axum::body::Bytes;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep};
use tower::ServiceExt;

/// A client has this long to send its request headers (timed from the connection's start,
/// or from the end of its previous answer on a keep-alive connection); a stalled or
/// slow-loris peer is dropped instead of holding a connection forever.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A request body must arrive in full within this long after its headers. Real bodies are a
/// label and a token, a few hundred bytes written at once, so 10 s (the header timeout)
/// only ever stops a peer that sends a `Content-Length` and then trickles or withholds the
/// body to hold a connection. The request is answered 400 `bad_request` and the connection
/// closed; `tokend_api_timeouts_total{phase="body"}` counts it.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A response write that makes no progress for this long ends the connection: a peer that
/// never reads its answers cannot pin a connection and the answer's buffers. Answers are a
/// few KiB and fit in the socket buffer, so only a peer that also queues up requests (or asks
/// for a very long listing) and never reads ever waits here.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Open connections accepted at once; more wait in the listen backlog. Bounds file
/// descriptors and memory under a flood of local clients.
pub const MAX_CONNECTIONS: usize = 1024;

/// Open connections one peer uid may hold at once: a quarter of [`MAX_CONNECTIONS`], so one
/// uid (a runaway script, a hostile local user) can never take the whole daemon: at least
/// three quarters stay for everyone else, and it takes four uids working together to fill
/// it (and then only until the timeouts above close what they do not use). 256 is far above
/// what a real client needs (the CLI uses one connection per command; a service, a handful).
/// A connection over the share is answered 503 at once and closed, without reading it.
/// Root and the daemon's own uid get the same share: a runaway admin script is as likely
/// as any other, and admins need only a few connections.
pub const MAX_CONNECTIONS_PER_UID: usize = MAX_CONNECTIONS / 4;

/// The soft limit on open files the daemon asks for at start (never above the hard limit):
/// [`MAX_CONNECTIONS`] sockets, the metrics port's 64, the ledger's files, the provider's
/// HTTPS connections and the notify command's pipes, with room to spare for connections
/// accepted only to be refused. The common default soft limit, 1024, would run out before
/// [`MAX_CONNECTIONS`]; raising the soft limit up to the hard one is what a server is
/// expected to do itself. The systemd unit sets `LimitNOFILE=` to this value.
pub const OPEN_FILES_WANTED: u64 = 4096;

/// Refusals at the per-uid limit are logged at most this often (they are all counted in
/// `tokend_api_connections_refused_total`): a flood must not flood the journal too.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// Raises the soft `RLIMIT_NOFILE` to [`OPEN_FILES_WANTED`] if it is lower (never above the
/// hard limit, never lowering it) and returns the soft limit in force afterwards (`None`:
/// unlimited). A refusal (a sandbox that forbids it) leaves the limit as it was.
pub fn raise_open_file_limit() -> Option<u64> {
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
pub enum BindError {
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

/// Creates the socket at `path` with `mode`.
pub fn bind(path: &Path, mode: u32) -> Result<UnixListener, BindError> {
    let io = |source| BindError::Io {
        path: path.to_path_buf(),
        source,
    };
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

/// A listener the HTTP loop can accept from: the API's Unix socket (with the peer's
/// credentials) or the metrics TCP port (no credentials).
pub trait Accept: Send {
    /// The connection type.
    type Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static;
    /// Accepts one connection; `Ok(None)` drops it (e.g. unreadable credentials).
    fn accept_peer(
        &self,
    ) -> impl Future<Output = std::io::Result<Option<(Self::Io, Option<Peer>)>>> + Send;

    /// Writes `answer` if the socket takes it at once (never waits), then closes it.
    fn refuse(io: Self::Io, answer: &[u8]) {
        let _ = answer;
        drop(io);
    }
}

impl Accept for UnixListener {
    type Io = tokio::net::UnixStream;
    async fn accept_peer(&self) -> std::io::Result<Option<(Self::Io, Option<Peer>)>> {
        let (stream, _) = self.accept().await?;
        match stream.peer_cred() {
            Ok(c) => Ok(Some((
                stream,
                Some(Peer {
                    uid: c.uid(),
                    gid: c.gid(),
                    pid: c.pid().and_then(|p| u32::try_from(p).ok()),
                }),
            ))),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read peer credentials; dropping connection");
                Ok(None)
            }
        }
    }

    fn refuse(io: Self::Io, answer: &[u8]) {
        use std::io::Write;
        // Out of the runtime: a non-blocking write straight into the socket buffer (which
        // an answer of a few hundred bytes always fits), no task, no timer.
        if let Ok(mut std) = io.into_std() {
            let _ = std.write(answer);
        }
    }
}

impl Accept for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;
    async fn accept_peer(&self) -> std::io::Result<Option<(Self::Io, Option<Peer>)>> {
        let (stream, _) = self.accept().await?;
        Ok(Some((stream, None)))
    }
}

/// Limits of one HTTP server.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections open at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// Connections one peer uid may hold open at once; one more is answered 503 and closed
    /// at once. Peers without credentials (the metrics port) are not counted per uid.
    pub max_connections_per_uid: usize,
    /// How long a client may take to send its request headers.
    pub header_read_timeout: Duration,
    /// How long a request body may take to arrive, from the end of its headers.
    pub body_read_timeout: Duration,
    /// How long a response write may make no progress.
    pub write_timeout: Duration,
    /// How long requests in progress may take to finish after the stop.
    pub grace: Duration,
}

impl Limits {
    /// The socket API's limits (the constants of this module), draining for `grace`.
    pub fn socket(grace: Duration) -> Limits {
        Limits {
            max_connections: MAX_CONNECTIONS,
            max_connections_per_uid: MAX_CONNECTIONS_PER_UID,
            header_read_timeout: HEADER_READ_TIMEOUT,
            body_read_timeout: BODY_READ_TIMEOUT,
            write_timeout: WRITE_TIMEOUT,
            grace,
        }
    }
}

/// Serves `router` on `listener` until `shutdown` resolves, then stops accepting, lets
/// requests in progress finish for up to `grace`, and returns. Refusals and timeouts are
/// counted in `metrics`.
pub async fn serve(
    listener: UnixListener,
    router: Router,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    serve_http(
        listener,
        router,
        shutdown,
        Limits::socket(grace),
        Some(metrics),
    )
    .await
}

/// The HTTP/1.1 accept loop shared by the socket API and the metrics port: header and body
/// read timeouts and a write timeout, a connection limit in total and per peer uid, the
/// peer's credentials as a request extension (when the listener has them), and a graceful
/// drain. `metrics`, if given, counts open connections, refusals and timeouts.
pub async fn serve_http<L: Accept>(
    listener: L,
    router: Router,
    shutdown: impl Future<Output = ()>,
    limits: Limits,
    metrics: Option<Arc<Metrics>>,
) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let limit = Arc::new(Semaphore::new(limits.max_connections));
    let per_uid = Arc::new(UidShares::new(limits.max_connections_per_uid));
    let mut last_refusal_log: Option<Instant> = None;
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            p = limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            a = listener.accept_peer() => a,
        };
        let (stream, peer) = match accepted {
            Ok(Some(c)) => c,
            Ok(None) => continue,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // The per-uid share is checked before anything is read from the connection, so a
        // uid over its share costs one accept and one write, and holds nothing.
        let share = match peer {
            None => None,
            Some(p) => match per_uid.take(p.uid) {
                Some(share) => Some(share),
                None => {
                    L::refuse(stream, &refusal(p.uid, limits.max_connections_per_uid));
                    if let Some(m) = &metrics {
                        m.api_connection_refused();
                    }
                    if last_refusal_log.is_none_or(|t| t.elapsed() >= REFUSAL_LOG_INTERVAL) {
                        last_refusal_log = Some(Instant::now());
                        tracing::warn!(
                            uid = p.uid,
                            limit = limits.max_connections_per_uid,
                            "refusing connections: this uid holds its share of the socket's \
                             connections (logged once a minute; see \
                             tokend_api_connections_refused_total)"
                        );
                    }
                    continue;
                }
            },
        };
        let held = Held::new(permit, share, metrics.clone());
        let router = router.clone();
        let mut stop = stop_rx.clone();
        let metrics = metrics.clone();
        while conns.try_join_next().is_some() {}
        conns.spawn(async move {
            let _held = held;
            // Whether a request head arrived: a header timeout after one is an idle
            // keep-alive connection closing, not a slow peer.
            let had_request = Arc::new(AtomicBool::new(false));
            let service = {
                let had_request = had_request.clone();
                let metrics = metrics.clone();
                hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
                    had_request.store(true, Ordering::Relaxed);
                    if let Some(peer) = peer {
                        req.extensions_mut().insert(peer);
                    }
                    let deadline = Instant::now() + limits.body_read_timeout;
                    let req = req.map(|body| {
                        if hyper::body::Body::is_end_stream(&body) {
                            axum::body::Body::new(body)
                        } else {
                            axum::body::Body::new(DeadlineBody::new(
                                body,
                                deadline,
                                limits.body_read_timeout,
                                metrics.clone(),
                            ))
                        }
                    });
                    let router = router.clone();
                    async move {
                        let started = Instant::now();
                        let method = req.method().clone();
                        let path = req.uri().path().to_owned();
                        let resp = router.oneshot(req).await;
                        if let Ok(r) = &resp {
                            tracing::debug!(
                                %method,
                                path = %path.chars().take(200).collect::<String>(),
                                status = r.status().as_u16(),
                                uid = peer.map(|p| p.uid),
                                micros = started.elapsed().as_micros() as u64,
                                "http request"
                            );
                        }
                        resp
                    }
                })
            };
            let io = WriteTimeout::new(stream, limits.write_timeout, metrics.clone());
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .max_buf_size(64 * 1024)
                .serve_connection(TokioIo::new(io), service);
            tokio::pin!(conn);
            let ended = tokio::select! {
                r = conn.as_mut() => r,
                _ = async { let _ = stop.wait_for(|s| *s).await; } => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = ended {
                if e.is_timeout()
                    && !had_request.load(Ordering::Relaxed)
                    && let Some(m) = &metrics
                {
                    m.api_timeout(TimeoutPhase::Headers);
                }
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(limits.grace, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::debug!("dropping connections still open after the grace period");
    }
    conns.abort_all();
}

/// The answer to a connection over its uid's share: 503 with the standard error body and a
/// `Retry-After`, then the connection is closed. INTERFACE.md has no error code for an
/// overloaded daemon; `provider_unavailable` is its only 503, and what a client does with it
/// (retry after `Retry-After`) is what it should do here. The message says what happened.
fn refusal(uid: u32, share: usize) -> Vec<u8> {
    let body = serde_json::json!({"error": {
        "code": "provider_unavailable",
        "message": format!(
            "uid {uid} already holds {share} connections to tokend, the most one uid may \
             hold; close some, then retry"
        ),
    }})
    .to_string();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         retry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// How many connections each peer uid holds, and the most it may.
struct UidShares {
    max: usize,
    held: Mutex<HashMap<u32, usize>>,
}

impl UidShares {
    fn new(max: usize) -> UidShares {
        UidShares {
            max,
            held: Mutex::new(HashMap::new()),
        }
    }

    /// One more connection for `uid`, unless it holds its share already.
    fn take(self: &Arc<Self>, uid: u32) -> Option<UidShare> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let n = held.get(&uid).copied().unwrap_or(0);
        if n >= self.max {
            return None;
        }
        held.insert(uid, n + 1);
        Some(UidShare {
            shares: self.clone(),
            uid,
        })
    }
}

/// One connection of a uid's share, given back on drop.
struct UidShare {
    shares: Arc<UidShares>,
    uid: u32,
}

impl Drop for UidShare {
    fn drop(&mut self) {
        let mut held = self.shares.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = held.get_mut(&self.uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                held.remove(&self.uid);
            }
        }
    }
}

/// What an open connection holds: its place in the total and in its uid's share, and its
/// count in `tokend_api_connections_open`; all given back when the connection ends.
struct Held {
    _permit: OwnedSemaphorePermit,
    _share: Option<UidShare>,
    metrics: Option<Arc<Metrics>>,
}

impl Held {
    fn new(
        permit: OwnedSemaphorePermit,
        share: Option<UidShare>,
        metrics: Option<Arc<Metrics>>,
    ) -> Held {
        if let Some(m) = &metrics {
            m.api_connection_open(1);
        }
        Held {
            _permit: permit,
            _share: share,
            metrics,
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(m) = &self.metrics {
            m.api_connection_open(-1);
        }
    }
}

/// The error a request body yields when it did not arrive within the body read timeout.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {} s", .0.as_secs())]
pub struct BodyTimedOut(pub Duration);

/// A request body that must arrive in full by a deadline (measured from the end of the
/// headers, not per frame: a peer trickling a byte at a time gains nothing). The timer is
/// only created if the body is ever waited for.
struct DeadlineBody<B> {
    inner: B,
    deadline: Instant,
    timeout: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    expired: bool,
    metrics: Option<Arc<Metrics>>,
}

impl<B> DeadlineBody<B> {
    fn new(inner: B, deadline: Instant, timeout: Duration, metrics: Option<Arc<Metrics>>) -> Self {
        DeadlineBody {
            inner,
            deadline,
            timeout,
            sleep: None,
            expired: false,
            metrics,
        }
    }
}

impl<B> hyper::body::Body for DeadlineBody<B>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.expired {
            return Poll::Ready(Some(Err(Box::new(BodyTimedOut(this.timeout)))));
        }
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let deadline = this.deadline;
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        this.expired = true;
        if let Some(m) = &this.metrics {
            m.api_timeout(TimeoutPhase::Body);
        }
        tracing::debug!("a request body did not arrive in time; closing the connection");
        Poll::Ready(Some(Err(Box::new(BodyTimedOut(this.timeout)))))
    }

    fn is_end_stream(&self) -> bool {
        !self.expired && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A connection whose writes fail once one makes no progress for `limit`: hyper then ends
/// the connection, and the answer's buffers with it. Reads pass through (the header and body
/// timeouts bound them). The timer is created at the first write that has to wait.
struct WriteTimeout<T> {
    io: T,
    limit: Duration,
    stall: Option<Pin<Box<Sleep>>>,
    armed: bool,
    metrics: Option<Arc<Metrics>>,
}

impl<T> WriteTimeout<T> {
    fn new(io: T, limit: Duration, metrics: Option<Arc<Metrics>>) -> Self {
        WriteTimeout {
            io,
            limit,
            stall: None,
            armed: false,
            metrics,
        }
    }

    /// Passes a finished write through; arms (or checks) the stall timer on a waiting one.
    fn watch<R>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        if r.is_ready() {
            self.armed = false;
            return r;
        }
        let deadline = Instant::now() + self.limit;
        let sleep = match &mut self.stall {
            Some(s) => {
                if !self.armed {
                    s.as_mut().reset(deadline);
                }
                s
            }
            None => self
                .stall
                .insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        self.armed = true;
        if sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        self.armed = false;
        if let Some(m) = &self.metrics {
            m.api_timeout(TimeoutPhase::Write);
        }
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the peer has not read its answer for too long",
        )))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WriteTimeout<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WriteTimeout<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write(cx, buf);
        this.watch(cx, r)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.watch(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_flush(cx);
        this.watch(cx, r)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_shutdown(cx);
        this.watch(cx, r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;
    use axum::routing::{get, post};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Short limits, so that the timeouts can be watched in a unit test.
    fn short(max_connections_per_uid: usize) -> Limits {
        Limits {
            max_connections: 16,
            max_connections_per_uid,
            header_read_timeout: Duration::from_millis(300),
            body_read_timeout: Duration::from_millis(300),
            write_timeout: Duration::from_millis(300),
            grace: Duration::from_millis(100),
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
            Some(metrics.clone()),
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

    async fn fetch(path: &Path, route: &str) -> String {
        let mut s = tokio::net::UnixStream::connect(path).await.unwrap();
        let req = format!("GET {route} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        String::from_utf8_lossy(&read_all(&mut s).await).into_owned()
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
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let answer = fetch(&path, "/ok").await;
            if answer.starts_with("HTTP/1.1 200 ") {
                break;
            }
            assert!(Instant::now() < deadline, "{answer}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
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
        let mut s = tokio::net::UnixStream::connect(&path).await.unwrap();
        s.write_all(
            b"POST /body HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello",
        )
        .await
        .unwrap();
        let answer = String::from_utf8_lossy(&read_all(&mut s).await).into_owned();
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
        let deadline = Instant::now() + Duration::from_secs(5);
        while counted(&metrics, "tokend_api_timeouts_total{phase=\"write\"}") < 1.0 {
            assert!(Instant::now() < deadline, "the stalled write was not ended");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let got = read_all(&mut s).await;
        assert!(got.len() < 8 << 20, "the whole answer arrived");
        let deadline = Instant::now() + Duration::from_secs(5);
        while counted(&metrics, "tokend_api_connections_open") > 0.0 {
            assert!(Instant::now() < deadline, "the connection is still open");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn silent_peers_time_out_but_idle_keep_alives_are_not_counted() {
        let (_dir, path, metrics, _stop) = start(short(8)).await;
        let mut silent = tokio::net::UnixStream::connect(&path).await.unwrap();
        assert!(read_all(&mut silent).await.is_empty());
        let mut idle = tokio::net::UnixStream::connect(&path).await.unwrap();
        idle.write_all(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let answer = String::from_utf8_lossy(&read_all(&mut idle).await).into_owned();
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

    #[test]
    fn shares_leave_room_for_other_uids() {
        const _: () = assert!(MAX_CONNECTIONS_PER_UID * 2 <= MAX_CONNECTIONS);
        let shares = Arc::new(UidShares::new(2));
        let a1 = shares.take(1).unwrap();
        let _a2 = shares.take(1).unwrap();
        assert!(shares.take(1).is_none());
        let _b = shares.take(2).unwrap();
        drop(a1);
        assert!(shares.take(1).is_some());
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
