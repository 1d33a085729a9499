//! The baseline of the token scenario: a bare hyper 1 server on a Unix socket, run as a child
//! process (the bench re-executes itself with [`CHILD_ARG`]), answering every request with
//! a fixed JSON body of the same byte size as tokend's token answer and the same kind of
//! headers (`content-type: application/json`, `cache-control: no-store`; hyper adds
//! `content-length` and `date`, as under tokend).
//!
//! The ratio tokend / bare is then what tokend adds over the transport alone: its router,
//! access check (SO_PEERCRED), engine lookup, audit fold and JSON encoding. The child has
//! its own multi-threaded tokio runtime, as tokend does, and competes for the same cores.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::Full;
use hyper::Response;
use hyper::header::{CACHE_CONTROL, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

use crate::client::Conn;

/// The hidden first argument that makes the bench binary the baseline server:
/// `outside __bare-server SOCKET BODY_BYTES`.
pub const CHILD_ARG: &str = "__bare-server";

/// How long the parent waits for the child's socket to answer.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// The running baseline server; dropping it kills the child.
pub struct BareServer {
    child: Child,
    pub socket: PathBuf,
}

impl BareServer {
    /// Starts the child on `socket` with a body of exactly `body_bytes` bytes, and waits
    /// until it answers.
    pub async fn start(socket: &Path, body_bytes: usize) -> Result<BareServer> {
        let exe = std::env::current_exe().context("locate the bench's own executable")?;
        let child = Command::new(&exe)
            .arg(CHILD_ARG)
            .arg(socket)
            .arg(body_bytes.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("start the baseline server {}", exe.display()))?;
        let mut server = BareServer {
            child,
            socket: socket.to_path_buf(),
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = server.child.try_wait()? {
                bail!("the baseline server exited at start with {status}");
            }
            if let Ok(mut c) = Conn::unix(socket).await
                && let Ok(a) = c.get_ok("/").await
            {
                if a.body.len() != body_bytes {
                    bail!(
                        "the baseline answers {} bytes, not {body_bytes}",
                        a.body.len()
                    );
                }
                return Ok(server);
            }
            if Instant::now() > deadline {
                bail!("the baseline server did not answer within {READY_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for BareServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A JSON object of exactly `n` bytes (for `n` of at least 20): `{"access_token":"xx..."}`.
fn body_of(n: usize) -> Bytes {
    let head = "{\"access_token\":\"";
    let tail = "\"}";
    let fill = n.saturating_sub(head.len() + tail.len());
    let mut s = String::with_capacity(n);
    if n >= head.len() + tail.len() {
        s.push_str(head);
        s.extend(std::iter::repeat_n('x', fill));
        s.push_str(tail);
    } else {
        s.extend(std::iter::repeat_n(' ', n));
    }
    Bytes::from(s)
}

/// The child's `main`: `args` are what follows [`CHILD_ARG`].
pub fn child_main(args: &[String]) -> ExitCode {
    // Dies with the bench, even when the bench is killed without running its destructors.
    let _ = rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL));
    let result = (|| -> Result<()> {
        let [socket, bytes] = args else {
            bail!("usage: {CHILD_ARG} SOCKET BODY_BYTES");
        };
        let bytes: usize = bytes.parse().context("BODY_BYTES")?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        rt.block_on(serve(PathBuf::from(socket), body_of(bytes)))
    })();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("baseline server: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(socket: PathBuf, body: Bytes) -> Result<()> {
    let listener = tokio::net::UnixListener::bind(&socket)
        .with_context(|| format!("bind {}", socket.display()))?;
    loop {
        let (stream, _) = listener.accept().await?;
        let body = body.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |_req| {
                let body = body.clone();
                async move {
                    let mut resp = Response::new(Full::new(body));
                    let h = resp.headers_mut();
                    h.insert(CONTENT_TYPE, "application/json".parse().expect("header"));
                    h.insert(CACHE_CONTROL, "no-store".parse().expect("header"));
                    Ok::<_, Infallible>(resp)
                }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
