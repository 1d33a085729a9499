//! The HTTP/1.1 accept loop both of tokend's servers share (the socket API in
//! `api::server`, the probe port in `metrics`), with its defences against hostile peers.
//!
//! No peer can starve the others: request headers and bodies must arrive within
//! [`HEADER_READ_TIMEOUT`] and [`BODY_READ_TIMEOUT`], a response write that makes no progress
//! for [`WRITE_TIMEOUT`] ends its connection, and each peer uid may hold at most
//! [`MAX_CONNECTIONS_PER_UID`] of the [`MAX_CONNECTIONS`] open connections (more are answered
//! 503 and closed at once, before anything is read), so a fresh connection from another uid
//! is always accepted at once.
//!
//! This module sits below both servers: it knows HTTP and sockets, not JSON, routes or
//! metrics. What it observes (connections opened and closed, refusals, timeouts) it reports
//! to an [`Observer`], which `metrics::Metrics` implements.

use axum::BoxError;
use axum::Router;
use axum::body::Bytes;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep};
use tower::ServiceExt;

/// The credentials of the process on the other end of the socket (SO_PEERCRED), captured
/// when it connected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    /// Effective uid of the peer.
    pub uid: u32,
    /// Effective (primary) gid of the peer. Supplementary groups are not visible through
    /// SO_PEERCRED.
    pub gid: u32,
    /// The peer's pid at connect time, for the audit trail.
    pub pid: Option<u32>,
}

/// Where a connection ran out of time (`tokend_api_timeouts_total{phase}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TimeoutPhase {
    /// The request headers did not arrive within the header read timeout (a connection that
    /// never completed a request; an idle keep-alive connection closed after its answers is
    /// not counted).
    Headers,
    /// A request body did not arrive in full within the body read timeout.
    Body,
    /// A response write made no progress within the write timeout (a peer that does not
    /// read its answers).
    Write,
}

impl TimeoutPhase {
    /// Every phase, for pre-initialisation.
    pub const ALL: [TimeoutPhase; 3] = [
        TimeoutPhase::Headers,
        TimeoutPhase::Body,
        TimeoutPhase::Write,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            TimeoutPhase::Headers => "headers",
            TimeoutPhase::Body => "body",
            TimeoutPhase::Write => "write",
        }
    }
}

/// What the accept loop tells about its connections (implemented by `metrics::Metrics`):
/// the loop stays below the metrics, and a server without metrics passes none.
pub trait Observer: Send + Sync {
    /// A connection was accepted and is being served.
    fn opened(&self);
    /// A connection [`Observer::opened`] ended.
    fn closed(&self);
    /// A connection was answered 503 and closed at once: its uid held its share.
    fn refused(&self);
    /// A connection was closed because the peer was too slow.
    fn timed_out(&self, phase: TimeoutPhase);
}

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

/// Open connections one peer uid may hold at once: a quarter of `MAX_CONNECTIONS`, so one
/// uid (a runaway script, a hostile local user) can never take the whole daemon: at least
/// three quarters stay for everyone else, and it takes four uids working together to fill
/// it (and then only until the timeouts above close what they do not use). 256 is far above
/// what a real client needs (the CLI uses one connection per command; a service, a handful).
/// A connection over the share is answered 503 at once and closed, without reading it.
/// Root and the daemon's own uid get the same share: a runaway admin script is as likely
/// as any other, and admins need only a few connections.
pub const MAX_CONNECTIONS_PER_UID: usize = MAX_CONNECTIONS / 4;

/// Refusals at the per-uid limit are logged at most this often (they are all counted in
/// `tokend_api_connections_refused_total`): a flood must not flood the journal too.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// What answers the requests of one server: the accept loop hands it each request with the
/// peer's credentials. A plain [`Router`] gets the credentials as a [`Peer`] request
/// extension; the socket API (`api::Api`) answers its hot token routes itself first and hands
/// the rest to its router the same way.
pub trait App: Clone + Send + Sync + 'static {
    /// The answer to `req` from `peer`.
    fn answer(
        &self,
        req: axum::extract::Request,
        peer: Option<Peer>,
    ) -> impl Future<Output = axum::response::Response> + Send + 'static + use<Self>;
}

impl App for Router {
    fn answer(
        &self,
        mut req: axum::extract::Request,
        peer: Option<Peer>,
    ) -> impl Future<Output = axum::response::Response> + Send + 'static + use<> {
        if let Some(peer) = peer {
            req.extensions_mut().insert(peer);
        }
        let answer = self.clone().oneshot(req);
        async move {
            match answer.await {
                Ok(resp) => resp,
                Err(never) => match never {},
            }
        }
    }
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
    /// The answer written to a connection over its uid's share before it is closed: the
    /// server's own error shape (the socket API's is JSON, which only `api` knows).
    pub refusal: fn(uid: u32, share: usize) -> Vec<u8>,
}

impl Limits {
    /// The standard limits (the constants of this module), draining for `grace`, with
    /// `refusal` as the answer over a uid's share: each server names its own error shape
    /// (the socket API's is JSON), so that none gets another's by default.
    pub fn standard(grace: Duration, refusal: fn(uid: u32, share: usize) -> Vec<u8>) -> Limits {
        Limits {
            max_connections: MAX_CONNECTIONS,
            max_connections_per_uid: MAX_CONNECTIONS_PER_UID,
            header_read_timeout: HEADER_READ_TIMEOUT,
            body_read_timeout: BODY_READ_TIMEOUT,
            write_timeout: WRITE_TIMEOUT,
            grace,
            refusal,
        }
    }
}

/// A bare 503 for a connection over its uid's share (`Retry-After: 1`, then closed), for
/// servers without an error shape of their own (the metrics port).
pub fn plain_refusal(uid: u32, share: usize) -> Vec<u8> {
    let body = format!("uid {uid} already holds {share} connections, the most one uid may hold\n");
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n\
         retry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The HTTP/1.1 accept loop shared by the socket API and the metrics port: header and body
/// read timeouts and a write timeout, a connection limit in total and per peer uid, the
/// peer's credentials handed to `app` with each request (when the listener has them), and a
/// graceful drain. `metrics`, if given, is told of open connections, refusals and timeouts.
pub async fn serve_http<L: Accept, A: App>(
    listener: L,
    app: A,
    shutdown: impl Future<Output = ()>,
    limits: Limits,
    metrics: Option<Arc<dyn Observer>>,
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
                    L::refuse(
                        stream,
                        &(limits.refusal)(p.uid, limits.max_connections_per_uid),
                    );
                    if let Some(m) = &metrics {
                        m.refused();
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
        let app = app.clone();
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
                hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                    had_request.store(true, Ordering::Relaxed);
                    // A body that has already ended (every GET) is not waited for: no timer,
                    // no clock read, and no boxed copy of hyper's empty body.
                    let req = req.map(|body| {
                        if hyper::body::Body::is_end_stream(&body) {
                            axum::body::Body::empty()
                        } else {
                            axum::body::Body::new(DeadlineBody::new(
                                body,
                                Instant::now() + limits.body_read_timeout,
                                limits.body_read_timeout,
                                metrics.clone(),
                            ))
                        }
                    });
                    // What the request's log line needs, kept only when it is logged: an
                    // answer that is not logged costs no copy of its path.
                    let logged = tracing::enabled!(tracing::Level::DEBUG).then(|| {
                        let path: String = req.uri().path().chars().take(200).collect();
                        (Instant::now(), req.method().clone(), path)
                    });
                    let answer = app.answer(req, peer);
                    async move {
                        let resp = answer.await;
                        if let Some((started, method, path)) = logged {
                            tracing::debug!(
                                %method,
                                %path,
                                status = resp.status().as_u16(),
                                uid = peer.map(|p| p.uid),
                                micros = started.elapsed().as_micros() as u64,
                                "http request"
                            );
                        }
                        Ok::<_, Infallible>(resp)
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
                    m.timed_out(TimeoutPhase::Headers);
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
        let mut held = self.held.lock();
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
        let mut held = self.shares.held.lock();
        if let Some(n) = held.get_mut(&self.uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                held.remove(&self.uid);
            }
        }
    }
}

/// What an open connection holds: its place in the total and in its uid's share, and its
/// count of open connections (`tokend_api_connections_open`); all given back when the connection ends.
struct Held {
    _permit: OwnedSemaphorePermit,
    _share: Option<UidShare>,
    metrics: Option<Arc<dyn Observer>>,
}

impl Held {
    fn new(
        permit: OwnedSemaphorePermit,
        share: Option<UidShare>,
        metrics: Option<Arc<dyn Observer>>,
    ) -> Held {
        if let Some(m) = &metrics {
            m.opened();
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
            m.closed();
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
pub(crate) struct DeadlineBody<B> {
    inner: B,
    deadline: Instant,
    timeout: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    expired: bool,
    metrics: Option<Arc<dyn Observer>>,
}

impl<B> DeadlineBody<B> {
    pub(crate) fn new(
        inner: B,
        deadline: Instant,
        timeout: Duration,
        metrics: Option<Arc<dyn Observer>>,
    ) -> Self {
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
            m.timed_out(TimeoutPhase::Body);
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
    metrics: Option<Arc<dyn Observer>>,
}

impl<T> WriteTimeout<T> {
    fn new(io: T, limit: Duration, metrics: Option<Arc<dyn Observer>>) -> Self {
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
            m.timed_out(TimeoutPhase::Write);
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

    #[test]
    fn the_plain_refusal_is_a_whole_http_answer() {
        let answer = String::from_utf8(plain_refusal(7, 2)).unwrap();
        assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{answer}"
        );
        assert!(
            body.contains("uid 7") && body.contains("2 connections"),
            "{body}"
        );
    }
}
