//! Lifecycle notifications: runs `[notify] command` when a chain needs re-consent, recovers,
//! or nears its absolute expiry.
//!
//! The command runs through `/bin/sh -c`, one at a time (a queue and one worker), bounded by
//! `notify.timeout` (killed after it), with `TOKEND_EVENT`, `TOKEND_CONNECTION`,
//! `TOKEND_LABEL` and `TOKEND_MESSAGE` in its environment. Its failure is logged and changes
//! nothing else. It never receives a secret: the client-secret variable is removed from its
//! environment and messages never hold tokens.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Notifications waiting beyond this many are dropped (and logged): a stuck command must not
/// grow memory without bound.
pub const QUEUE_CAPACITY: usize = 1024;

/// A lifecycle event worth telling a person about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The provider rejected a chain: someone must consent again.
    NeedsReauth,
    /// A `needs_reauth` chain works again (re-imported or re-consented).
    Recovered,
    /// A chain's absolute (consent) expiry is near.
    AbsoluteExpirySoon,
}

impl Kind {
    /// The value of `TOKEND_EVENT`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::NeedsReauth => "needs_reauth",
            Kind::Recovered => "recovered",
            Kind::AbsoluteExpirySoon => "absolute_expiry_soon",
        }
    }
}

/// One notification.
#[derive(Clone, Debug)]
pub struct Notification {
    /// What happened.
    pub kind: Kind,
    /// The connection id.
    pub connection: String,
    /// The connection label.
    pub label: String,
    /// A sentence for a human (never a secret).
    pub message: String,
}

/// A handle to queue notifications. Cheap to clone; does nothing when no command is set.
#[derive(Clone, Default)]
pub struct Notifier {
    tx: Option<mpsc::Sender<Notification>>,
}

impl Notifier {
    /// A notifier that drops everything (no command configured).
    pub fn disabled() -> Notifier {
        Notifier { tx: None }
    }

    /// Starts the worker for `command` (if any) with `timeout` per run.
    pub fn start(command: Option<String>, timeout: Duration) -> Notifier {
        let Some(command) = command.filter(|c| !c.trim().is_empty()) else {
            return Notifier::disabled();
        };
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        tokio::spawn(worker(Arc::new(command), timeout, rx));
        Notifier { tx: Some(tx) }
    }

    /// Queues a notification; never blocks.
    pub fn send(&self, n: Notification) {
        let Some(tx) = &self.tx else {
            return;
        };
        if let Err(e) = tx.try_send(n) {
            tracing::warn!(error = %e, "notification queue full or closed; dropping a notification");
        }
    }
}

/// The daemon's environment variables a notify command inherits: what a shell script needs
/// to run and to format text, nothing that could hold or lead to a secret.
pub const NOTIFY_ENV_ALLOWED: &[&str] = &[
    "PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "HOME", "USER", "LOGNAME", "SHELL",
];

async fn worker(command: Arc<String>, timeout: Duration, mut rx: mpsc::Receiver<Notification>) {
    while let Some(n) = rx.recv().await {
        run_one(&command, timeout, &n).await;
    }
}

async fn run_one(command: &str, timeout: Duration, n: &Notification) {
    let mut cmd = tokio::process::Command::new("/bin/sh");
    // An allow-list, not a deny-list: the daemon's environment holds what the hook must not
    // see (the client secret, `CREDENTIALS_DIRECTORY`, systemd's sockets).
    cmd.env_clear();
    for (key, value) in std::env::vars_os() {
        if key
            .to_str()
            .is_some_and(|k| NOTIFY_ENV_ALLOWED.contains(&k))
        {
            cmd.env(key, value);
        }
    }
    cmd.arg("-c")
        .arg(command)
        .env("TOKEND_EVENT", n.kind.as_str())
        .env("TOKEND_CONNECTION", &n.connection)
        .env("TOKEND_LABEL", &n.label)
        .env("TOKEND_MESSAGE", &n.message)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(connection = %n.connection, event = n.kind.as_str(), error = %e, "cannot start the notify command");
            return;
        }
    };
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(out)) if out.status.success() => {
            tracing::info!(connection = %n.connection, event = n.kind.as_str(), "notify command ran");
        }
        Ok(Ok(out)) => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let stderr: String = stderr.trim().chars().take(300).collect();
            tracing::warn!(connection = %n.connection, event = n.kind.as_str(), status = %out.status, stderr = %stderr, "notify command failed");
        }
        Ok(Err(e)) => {
            tracing::warn!(connection = %n.connection, event = n.kind.as_str(), error = %e, "notify command failed");
        }
        Err(_) => {
            // kill_on_drop ends it.
            tracing::warn!(connection = %n.connection, event = n.kind.as_str(), timeout_secs = timeout.as_secs(), "notify command timed out and was killed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(kind: Kind, id: &str) -> Notification {
        Notification {
            kind,
            connection: id.into(),
            label: format!("label-{id}"),
            message: "hello world".into(),
        }
    }

    #[tokio::test]
    async fn runs_one_at_a_time_with_the_variables() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let cmd = format!(
            "echo \"start $TOKEND_EVENT $TOKEND_CONNECTION $TOKEND_LABEL $TOKEND_MESSAGE\" >> {0}; sleep 0.2; echo end >> {0}",
            out.display()
        );
        let n = Notifier::start(Some(cmd), Duration::from_secs(5));
        n.send(note(Kind::NeedsReauth, "c1"));
        n.send(note(Kind::Recovered, "c2"));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let text = std::fs::read_to_string(&out).unwrap();
        assert_eq!(
            text,
            "start needs_reauth c1 label-c1 hello world\nend\nstart recovered c2 label-c2 hello world\nend\n"
        );
    }

    #[tokio::test]
    async fn a_slow_command_is_killed_and_the_next_still_runs() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let cmd = format!(
            "if [ $TOKEND_CONNECTION = slow ]; then sleep 5; echo late >> {0}; else echo $TOKEND_CONNECTION >> {0}; fi",
            out.display()
        );
        let n = Notifier::start(Some(cmd), Duration::from_millis(300));
        n.send(note(Kind::NeedsReauth, "slow"));
        n.send(note(Kind::NeedsReauth, "fast"));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "fast\n");
    }

    #[tokio::test]
    async fn the_hook_sees_an_allow_listed_environment_only() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        // Whatever the daemon's environment holds, the hook gets only the allow-list and
        // its TOKEND_* variables: dump its whole environment and check every name.
        let cmd = format!("env >> {}", out.display());
        let n = Notifier::start(Some(cmd), Duration::from_secs(5));
        n.send(note(Kind::Recovered, "c1"));
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let text = std::fs::read_to_string(&out).unwrap();
        let names: Vec<&str> = text.lines().filter_map(|l| l.split('=').next()).collect();
        assert!(names.contains(&"TOKEND_CONNECTION"), "{names:?}");
        for name in names {
            assert!(
                NOTIFY_ENV_ALLOWED.contains(&name)
                    || name.starts_with("TOKEND_")
                    // The shell's own: not inherited from the daemon.
                    || ["PWD", "SHLVL", "_", "OLDPWD"].contains(&name),
                "the hook saw {name}"
            );
        }
    }
}
