//! The HTTP/1.1 client side of the bench: one keep-alive hyper 1 connection ([`Conn`]) over a
//! Unix socket or TCP, and the closed-loop load generator ([`closed_loop`]) built on it.
//!
//! The load generator runs `clients` connections, each on its own tokio task, each sending
//! its next request as soon as the previous answer's body is read (closed loop). Requests
//! started during the warm-up are not counted; each task keeps its own latencies (µs) and
//! they are merged at the end for the percentiles, so no lock is shared while measuring.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper::header::{CONTENT_TYPE, HOST, HeaderMap};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

/// How long one request of [`Conn::request`] may take before the bench gives up (a daemon
/// that stopped answering must fail the bench, not hang it).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// One answer, read whole.
pub struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    /// The body as text, for error messages (the bench's own secrets are fake ones).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One keep-alive HTTP/1.1 connection.
pub struct Conn {
    sender: http1::SendRequest<Full<Bytes>>,
}

impl Conn {
    /// Connects to a Unix socket.
    pub async fn unix(path: &Path) -> Result<Conn> {
        let stream = tokio::net::UnixStream::connect(path)
            .await
            .with_context(|| format!("connect to {}", path.display()))?;
        Self::handshake(stream).await
    }

    /// Connects over TCP (the metrics listener).
    pub async fn tcp(addr: SocketAddr) -> Result<Conn> {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect to {addr}"))?;
        stream.set_nodelay(true)?;
        Self::handshake(stream).await
    }

    async fn handshake<T>(io: T) -> Result<Conn>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, conn) = http1::handshake(TokioIo::new(io))
            .await
            .context("HTTP/1.1 handshake")?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Conn { sender })
    }

    /// Sends one request (a JSON body if given) and reads the whole answer.
    pub async fn request(
        &mut self,
        method: Method,
        path: &str,
        json: Option<String>,
    ) -> Result<Answer> {
        tokio::time::timeout(
            REQUEST_TIMEOUT,
            self.request_inner(method.clone(), path, json),
        )
        .await
        .with_context(|| format!("{method} {path}: no answer within {REQUEST_TIMEOUT:?}"))?
        .with_context(|| format!("{method} {path}"))
    }

    async fn request_inner(
        &mut self,
        method: Method,
        path: &str,
        json: Option<String>,
    ) -> Result<Answer> {
        self.sender.ready().await?;
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, "localhost");
        if json.is_some() {
            builder = builder.header(CONTENT_TYPE, "application/json");
        }
        let req = builder.body(Full::new(Bytes::from(json.unwrap_or_default())))?;
        let resp = self.sender.send_request(req).await?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Answer {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        })
    }

    /// `GET path`, which must answer 200.
    pub async fn get_ok(&mut self, path: &str) -> Result<Answer> {
        let a = self.request(Method::GET, path, None).await?;
        if a.status != 200 {
            bail!("GET {path} answered {}: {}", a.status, a.text());
        }
        Ok(a)
    }
}

/// The shape of one load run.
#[derive(Clone, Copy, Debug)]
pub struct Load {
    /// Concurrent connections, one task each.
    pub clients: usize,
    /// Requests started before this much time has passed are not counted.
    pub warmup: Duration,
    /// The measured window after the warm-up.
    pub measure: Duration,
}

/// What one load run measured.
#[derive(Clone, Copy, Debug)]
pub struct Stats {
    /// Answers completed inside the measured window, per second of it.
    pub per_sec: f64,
    /// Percentiles of the requests both started and answered inside the window; `None`
    /// when none was (a route slower than the window).
    pub p50_us: Option<u32>,
    pub p99_us: Option<u32>,
}

/// Runs a closed loop of `GET`s against a Unix socket: client `k` asks for
/// `paths[k % paths.len()]`, every answer must be 200.
pub async fn closed_loop(socket: &Path, paths: &[String], load: Load) -> Result<Stats> {
    if paths.is_empty() || load.clients == 0 {
        bail!("a load run needs at least one path and one client");
    }
    let mut conns = Vec::with_capacity(load.clients);
    for _ in 0..load.clients {
        conns.push(Conn::unix(socket).await?);
    }
    let started = Instant::now();
    let measure_from = started + load.warmup;
    let until = measure_from + load.measure;
    let mut tasks = Vec::with_capacity(load.clients);
    for (k, mut conn) in conns.into_iter().enumerate() {
        let path = paths[k % paths.len()].clone();
        tasks.push(tokio::spawn(async move {
            // About what one client gets through at tens of µs a request; grows if needed.
            let mut latencies: Vec<u32> = Vec::with_capacity(1 << 16);
            let mut completed = 0usize;
            loop {
                let t0 = Instant::now();
                if t0 >= until {
                    break;
                }
                let a = conn.request(Method::GET, &path, None).await?;
                if a.status != 200 {
                    bail!("GET {path} answered {} under load: {}", a.status, a.text());
                }
                let t1 = Instant::now();
                if t1 >= measure_from && t1 <= until {
                    completed += 1;
                }
                if t0 >= measure_from && t1 <= until {
                    let us = (t1 - t0).as_micros();
                    latencies.push(u32::try_from(us).unwrap_or(u32::MAX));
                }
            }
            Ok::<_, anyhow::Error>((completed, latencies))
        }));
    }
    let mut all = Vec::new();
    let mut completed = 0;
    for t in tasks {
        let (n, latencies) = t.await.context("a load task panicked")??;
        completed += n;
        all.extend(latencies);
    }
    all.sort_unstable();
    let pick = |q: usize| (!all.is_empty()).then(|| all[(all.len() * q / 100).min(all.len() - 1)]);
    Ok(Stats {
        per_sec: completed as f64 / load.measure.as_secs_f64(),
        p50_us: pick(50),
        p99_us: pick(99),
    })
}

/// The run with the median throughput of several (rounds of the same target).
pub fn median(mut runs: Vec<Stats>) -> Stats {
    runs.sort_by(|a, b| a.per_sec.total_cmp(&b.per_sec));
    runs[runs.len() / 2]
}
