//! How a daemon learns that another daemon changed a connection: PostgreSQL `LISTEN/NOTIFY`
//! on [`CHANNEL`], on one dedicated connection outside the pool.
//!
//! Every write that moves a connection (insert, merge, delete) sends
//! `pg_notify(CHANNEL, '<id> <node>')` inside its own transaction, so the notification is
//! delivered exactly when the write commits, and never for a write that rolled back. A chain
//! write (marker, rotation) sends it right after its commit, in a transaction of its own that
//! waits for no WAL flush (`PgLedger::announce_after` says why): never for a write that
//! failed either, lost only if the daemon or its connection dies in between.
//! Notifications are not durable: one sent while this daemon was not listening is lost.
//! So the listener says [`Change::Resync`] whenever it (re)connects, and the daemon also
//! re-reads the whole ledger now and then.
//!
//! `LISTEN` is session state: this connection must reach the server directly (or through a
//! session-mode pooler), never through a transaction-mode pooler. It reconnects by itself.

use super::PgError;
use futures_util::StreamExt;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_postgres::AsyncMessage;

/// The notification channel of connection changes.
pub const CHANNEL: &str = "tokend_connections";

/// How long the listener waits before connecting again after losing its connection: short,
/// because missed notifications are made up by a full re-read on reconnect anyway.
const RECONNECT_DELAY: Duration = Duration::from_secs(1);

/// How often the idle listener proves its connection is alive. A connection cut without a
/// FIN (a partition) would otherwise look idle forever.
const KEEPALIVE_EVERY: Duration = Duration::from_secs(5);

/// How long one keepalive may take before the connection counts as lost.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Buffered changes: a burst larger than this waits (the listener blocks), nothing is lost.
const BUFFER: usize = 1024;

/// What the listener reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Another daemon committed a change of this connection.
    Connection(String),
    /// The listener (re)connected: notifications may have been missed meanwhile, re-read
    /// everything.
    Resync,
    /// The listener lost its connection to the server.
    Lost(String),
}

/// Where the listener connects: the pool's own settings.
#[derive(Clone)]
pub(super) struct ListenTarget {
    pub(super) config: tokio_postgres::Config,
    /// `None` under `sslmode=disable`.
    pub(super) tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
}

/// The payload of a notification: the connection's id and the node that wrote it.
pub(super) fn payload(id: &str, node: Option<&str>) -> String {
    format!("{id} {}", node.unwrap_or(""))
}

/// Starts the listener. Changes written by `own_node` itself are not reported (memory has
/// them already). The task ends when the receiver is dropped.
pub(super) fn start(target: ListenTarget, own_node: Option<String>) -> mpsc::Receiver<Change> {
    let (tx, rx) = mpsc::channel(BUFFER);
    tokio::spawn(async move {
        // Whether the last session was listening (or this is the first): only then is its
        // end news. Attempts that fail while the server stays unreachable are not repeated.
        let mut report = true;
        loop {
            let (lost, listened) = tokio::select! {
                _ = tx.closed() => return,
                ended = session(&target, own_node.as_deref(), &tx) => ended,
            };
            if (report || listened) && tx.send(Change::Lost(lost.to_string())).await.is_err() {
                return;
            }
            report = false;
            tokio::select! {
                _ = tx.closed() => return,
                _ = tokio::time::sleep(RECONNECT_DELAY) => {}
            }
        }
    });
    rx
}

/// One listening session, until its connection is lost: why, and whether `LISTEN` had
/// succeeded.
async fn session(
    target: &ListenTarget,
    own_node: Option<&str>,
    tx: &mpsc::Sender<Change>,
) -> (PgError, bool) {
    let (notes_tx, mut notes) = mpsc::unbounded_channel();
    let (client, driver) = match &target.tls {
        None => match target.config.connect(tokio_postgres::NoTls).await {
            Ok((client, conn)) => (client, tokio::spawn(drive(conn, notes_tx))),
            Err(e) => return (e.into(), false),
        },
        Some(tls) => match target.config.connect(tls.clone()).await {
            Ok((client, conn)) => (client, tokio::spawn(drive(conn, notes_tx))),
            Err(e) => return (e.into(), false),
        },
    };
    // Aborts the connection's driver however this session ends.
    let _driver = AbortOnDrop(driver);
    if let Err(e) = client.batch_execute(&format!("LISTEN {CHANNEL}")).await {
        return (e.into(), false);
    }
    if tx.send(Change::Resync).await.is_err() {
        return (
            PgError::Unavailable("the daemon stopped listening".into()),
            true,
        );
    }
    let mut keepalive = tokio::time::interval(KEEPALIVE_EVERY);
    keepalive.tick().await;
    loop {
        tokio::select! {
            note = notes.recv() => match note {
                Some(Ok(text)) => {
                    let (id, node) = split(&text);
                    if id.is_empty() || (own_node.is_some() && own_node == Some(node)) {
                        continue;
                    }
                    if tx.send(Change::Connection(id.to_owned())).await.is_err() {
                        return (PgError::Unavailable("the daemon stopped listening".into()), true);
                    }
                }
                Some(Err(e)) => return (e, true),
                None => return (PgError::Unavailable("the listening connection closed".into()), true),
            },
            _ = keepalive.tick() => {
                match tokio::time::timeout(KEEPALIVE_TIMEOUT, client.simple_query("")).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return (e.into(), true),
                    Err(_) => return (PgError::Unavailable("the listening connection stopped answering".into()), true),
                }
            }
        }
    }
}

/// Splits a payload into the id and the node.
fn split(text: &str) -> (&str, &str) {
    text.split_once(' ').unwrap_or((text, ""))
}

/// Drives a connection, forwarding its notifications' payloads; ends with the connection.
async fn drive<S, T>(
    mut conn: tokio_postgres::Connection<S, T>,
    out: mpsc::UnboundedSender<Result<String, PgError>>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
    while let Some(message) = messages.next().await {
        match message {
            Ok(AsyncMessage::Notification(n)) => {
                if out.send(Ok(n.payload().to_owned())).is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => {
                let _ = out.send(Err(e.into()));
                return;
            }
        }
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_round_trips_ids_and_nodes_with_spaces() {
        assert_eq!(split(&payload("c1", Some("node a"))), ("c1", "node a"));
        assert_eq!(split(&payload("c1", None)), ("c1", ""));
        assert_eq!(split("c1"), ("c1", ""));
    }
}
