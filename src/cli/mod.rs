//! The `tokend` command line's library half: exit codes, and what every command does. The
//! argument parsing (clap) lives in the binary (`src/main.rs`), which turns the command line
//! into an [`Action`] and calls [`run`].
//!
//! `run` and `check-config` load the full configuration, `migrate-ledger` all but the
//! secrets; every other command is a client of the running daemon's socket API (see `crate::client`) and only needs the socket path,
//! taken from `TOKEND_SOCKET` when set, else from `daemon.socket_path` of `--config`.
//!
//! - `commands`: the client commands, one request each;
//! - `output`: their human output (tables, `show`, events);
//! - `connect`: the consent flow of `tokend connect`;
//! - `migrate`: `tokend migrate-ledger`, which reads the configuration (state directory,
//!   keys) like `run` but never the daemon's secrets, and talks to no daemon (it refuses a
//!   running one).
//!
//! Exit codes: 0 ok, 1 runtime failure, 2 usage error (clap's own, and an unusable
//! `migrate-ledger` URL), 64 bad configuration
//! (`EX_CONFIG` from sysexits.h). Errors go to stderr as `tokend: ...`. stdout carries only
//! the command's answer, so that `tokend token ID` prints the access token and nothing else;
//! no other command ever prints a token.
//!
//! Public outside the library, for the binary alone: [`Action`] and the types it carries,
//! [`DEFAULT_LABEL`] (clap's default), [`run`], [`exit`], [`env_socket`] and
//! [`daemon_toml_page`]; [`Failure`] is public only as their result type (its fields are
//! not). Everything else is `pub(crate)`.

pub(crate) mod commands;
mod connect;
pub(crate) mod migrate;
mod output;

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

pub use commands::{ClientCommand, TokenTarget};
pub use migrate::{LedgerUrl, MigrateTarget};

/// `daemon.toml(5)` in roff, for the binary's hidden `man-pages` command (`src/main.rs`
/// writes it beside the section-1 pages it renders from its clap definition): public so that
/// the binary needs no other module than this one.
pub use crate::config::manual::page as daemon_toml_page;

use crate::client::{Client, ClientError};
use crate::config::Config;

/// Runtime failure: the daemon refused, was unreachable, or the input was unusable.
pub(crate) const EXIT_RUNTIME: u8 = 1;
/// Usage error: what clap exits with for a bad command line; also a value clap cannot judge
/// (a `migrate-ledger` URL that is not a PostgreSQL URL).
pub(crate) const EXIT_USAGE: u8 = 2;
/// Bad configuration: `EX_CONFIG` from sysexits.h, what service managers and scripts expect.
pub(crate) const EXIT_CONFIG: u8 = 64;

/// The label `connect` uses when none is given.
pub const DEFAULT_LABEL: &str = "atlassian";

/// Largest input accepted on stdin (a refresh token, a pasted URL). Atlassian refresh tokens
/// are a few hundred bytes; anything near this size is a mistake (e.g. a file piped in).
const MAX_STDIN_BYTES: u64 = 64 * 1024;

/// What the command line asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// `run`: the daemon, in the foreground.
    Run,
    /// `check-config`: validate and summarize the configuration.
    CheckConfig,
    /// `migrate-ledger`: copy the SQLite ledger into an empty PostgreSQL ledger (with the
    /// daemon stopped).
    MigrateLedger(MigrateTarget),
    /// Any other command: a client of the running daemon.
    Client(ClientCommand),
}

/// A command's failure: the exit code and the message for stderr (without the `tokend: `).
#[derive(Debug)]
pub struct Failure {
    /// The process exit code ([`EXIT_RUNTIME`], [`EXIT_USAGE`] or [`EXIT_CONFIG`]).
    pub(crate) code: u8,
    /// What went wrong, for a human.
    pub(crate) message: String,
}

impl Failure {
    fn runtime(message: impl Into<String>) -> Self {
        Failure {
            code: EXIT_RUNTIME,
            message: message.into(),
        }
    }

    fn usage(message: impl Into<String>) -> Self {
        Failure {
            code: EXIT_USAGE,
            message: message.into(),
        }
    }

    fn config(message: impl Into<String>) -> Self {
        Failure {
            code: EXIT_CONFIG,
            message: message.into(),
        }
    }
}

impl From<ClientError> for Failure {
    fn from(err: ClientError) -> Self {
        Failure::runtime(err.to_string())
    }
}

/// `TOKEND_SOCKET`, when set and not empty: the socket path that replaces the configuration.
pub fn env_socket() -> Option<PathBuf> {
    std::env::var_os("TOKEND_SOCKET")
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
}

/// The exit code of a result, its failure written to stderr as `tokend: ...`.
pub fn exit(result: Result<(), Failure>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            let _ = writeln!(io::stderr(), "tokend: {}", failure.message);
            ExitCode::from(failure.code)
        }
    }
}

/// Runs `action` with the configuration file `config` (not read by a client command when
/// `env_socket` names the socket).
/// `activated` is a listening socket systemd passed (socket activation), adopted by the
/// binary before anything else runs: `tokend run` serves it instead of binding
/// `daemon.socket_path`.
pub fn run(
    config: &Path,
    action: Action,
    env_socket: Option<PathBuf>,
    activated: Option<std::os::unix::net::UnixListener>,
) -> Result<(), Failure> {
    match action {
        Action::Run => {
            let config = Config::load(config).map_err(|e| Failure::config(e.to_string()))?;
            crate::daemon::main(config, activated).map_err(|e| Failure::runtime(format!("{e:#}")))
        }
        Action::CheckConfig => {
            let config = Config::load(config).map_err(|e| Failure::config(e.to_string()))?;
            let summary = config.summary();
            output::emit(
                &mut io::stdout().lock(),
                &format!("{}\nconfiguration OK\n", summary.trim_end()),
            )
        }
        Action::MigrateLedger(target) => {
            // The state directory and keys only: never the Atlassian client secret.
            let config =
                Config::load_for_client(config).map_err(|e| Failure::config(e.to_string()))?;
            migrate::run(
                &config,
                target,
                &mut io::stdout().lock(),
                &mut io::stderr().lock(),
            )
        }
        Action::Client(command) => {
            let socket = match env_socket {
                Some(socket) => socket,
                None => {
                    Config::load_for_client(config)
                        .map_err(|e| {
                            Failure::config(format!(
                                "{e} (point --config at the daemon's configuration file, \
                                 or set TOKEND_SOCKET to its socket path)"
                            ))
                        })?
                        .daemon
                        .socket_path
                }
            };
            let client = Client::new(socket);
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| Failure::runtime(format!("cannot start the async runtime: {e}")))?;
            runtime.block_on(commands::client_command(
                command,
                &client,
                &mut io::stdout().lock(),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIST: Action = Action::Client(ClientCommand::List { json: false });

    #[test]
    fn client_config_errors_exit_64_and_suggest_the_way_out() {
        let dir = tempfile::tempdir().unwrap();
        let failure = run(&dir.path().join("missing.toml"), LIST, None, None).unwrap_err();
        assert_eq!(failure.code, EXIT_CONFIG);
        assert!(
            failure.message.contains("missing.toml"),
            "{}",
            failure.message
        );
        assert!(
            failure.message.contains("TOKEND_SOCKET"),
            "{}",
            failure.message
        );
    }

    #[test]
    fn tokend_socket_skips_the_config_and_an_absent_daemon_is_exit_1() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("nobody.sock");
        let config = Path::new("/nonexistent/daemon.toml");
        let failure = run(config, LIST, Some(socket.clone()), None).unwrap_err();
        assert_eq!(failure.code, EXIT_RUNTIME);
        assert!(
            failure.message.starts_with(&format!(
                "cannot connect to tokend at {}: ",
                socket.display()
            )),
            "{}",
            failure.message
        );
        assert!(failure.message.ends_with("(is the daemon running?)"));
    }
}
