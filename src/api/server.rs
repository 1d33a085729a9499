//! The Unix-socket HTTP server: socket creation, peer credentials, timeouts, graceful stop.
//!
//! The socket is bound with a restrictive umask and then given `daemon.socket_mode`, inside a
//! directory that no other user can write (checked, not assumed), so nobody can swap it. A
//! stale socket file from a crashed daemon is replaced; a live daemon on the same path makes
//! this one refuse to start.

use super::Peer;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::future::Future;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::UnixListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tower::ServiceExt;

/// A client has this long to send its request headers; a stalled or slow-loris peer is
/// dropped instead of holding a connection forever.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Open connections accepted at once; more wait in the listen backlog. Bounds file
/// descriptors and memory under a flood of local clients.
pub const MAX_CONNECTIONS: usize = 1024;

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
    /// How long requests in progress may take to finish after the stop.
    pub grace: Duration,
}

/// Serves `router` on `listener` until `shutdown` resolves, then stops accepting, lets
/// requests in progress finish for up to `grace`, and returns.
pub async fn serve(
    listener: UnixListener,
    router: Router,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    serve_http(
        listener,
        router,
        shutdown,
        Limits {
            max_connections: MAX_CONNECTIONS,
            grace,
        },
    )
    .await
}

/// The HTTP/1.1 accept loop shared by the socket API and the metrics port: a header read
/// timeout, a connection limit, the peer's credentials as a request extension (when the
/// listener has them), and a graceful drain.
pub async fn serve_http<L: Accept>(
    listener: L,
    router: Router,
    shutdown: impl Future<Output = ()>,
    limits: Limits,
) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let limit = Arc::new(Semaphore::new(limits.max_connections));
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
        let router = router.clone();
        let mut stop = stop_rx.clone();
        while conns.try_join_next().is_some() {}
        conns.spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    if let Some(peer) = peer {
                        req.extensions_mut().insert(peer);
                    }
                    let router = router.clone();
                    async move {
                        let started = tokio::time::Instant::now();
                        let method = req.method().clone();
                        let path = req.uri().path().to_owned();
                        let resp = router.oneshot(req.map(axum::body::Body::new)).await;
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
                },
            );
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_buf_size(64 * 1024)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                }
                _ = async { let _ = stop.wait_for(|s| *s).await; } => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
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

#[cfg(test)]
mod tests {
    use super::*;

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
