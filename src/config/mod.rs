//! `daemon.toml`: the daemon's configuration, parsed and validated.
//!
//! This module owns the file format described in `INTERFACE.md` ("Configuration:
//! daemon.toml"): key names, defaults, and what counts as a bad value. **Config is a pure
//! function of text: parse, then validate.** [`Config::parse`] takes the text, the file's
//! path, and two injected look-ups (environment and file reader, used only for the client
//! secret), so every rule is testable on string literals. [`Config::load`] and
//! [`Config::load_for_client`] are the thin shells that read the real file, environment and
//! filesystem.
//!
//! Two passes:
//!
//! 1. **Parse** (`raw`): TOML into private `Raw*` structs that mirror the file one to one,
//!    with `deny_unknown_fields` everywhere, every key optional, and durations, modes,
//!    addresses, URLs and cron expressions kept as strings, each wrapped in
//!    [`toml::Spanned`] so that it carries its place in the text. Errors carry the dotted key
//!    path (from `serde_path_to_error`) and the line (from the TOML error's span).
//! 2. **Validate** (`validate`): defaults are applied and every string is turned into its
//!    real type. Each failure is a [`ConfigError`] naming the file, the dotted key and the
//!    line of that key's value, from the parser's span: right for inline tables, dotted keys
//!    and any layout. A key left at its default has no line.
//!
//! Conventions a user can rely on:
//!
//! * Every section and key is optional; an empty file is a valid configuration.
//! * Relative paths (`daemon.state_dir`, `daemon.socket_path`,
//!   `providers.atlassian.client_secret_file`) are resolved against the **directory of the
//!   config file**, not the working directory, so `tokend --config /etc/tokend/daemon.toml`
//!   means the same thing from anywhere. A relative config path is first made absolute
//!   against the current directory. `~` is not expanded (and rejected, to avoid a directory
//!   literally named `~`).
//! * An empty string means "off" for `daemon.metrics_listen`, `notify.command` and
//!   `providers.atlassian.client_secret_file`; `refresh.absolute_expiry = "0s"` means none.
//! * The client secret is never in the file: it comes from `client_secret_file` (trailing
//!   whitespace trimmed) or, when that is not set, from the environment variable
//!   [`CLIENT_SECRET_ENV`]. Its value never appears in an error, in `Debug` output, or in
//!   [`Config::summary`].
//!
//! Files: `raw` (the serde structs as parsed, and TOML errors), `validate` (raw structs to
//! [`Config`], defaults, limits, every [`ConfigError`] of a bad value), `summary` (the
//! `tokend check-config` output), `keys` (the documentation of every key: meaning, default,
//! reload; the one source of `daemon.toml(5)`), `manual` (that page, in roff); this file holds the public types and the entry points;
//! `tests` and `props` test them all on string literals.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use url::Url;

use crate::model::JobKind;
use crate::secret::Secret;

pub mod keys;
pub mod manual;
mod raw;
mod summary;
mod validate;

#[cfg(test)]
mod props;
#[cfg(test)]
mod tests;

/// Environment variable holding the Atlassian client secret when
/// `providers.atlassian.client_secret_file` is not set.
pub const CLIENT_SECRET_ENV: &str = "TOKEND_ATLASSIAN_CLIENT_SECRET";

/// Number of fields of a cron expression: seconds, minutes, hours, day of month, month, day
/// of week (no year, no `@nicknames`).
const CRON_FIELDS: usize = 6;

// ---------------------------------------------------------------------------------------------
// Public types
// ---------------------------------------------------------------------------------------------

/// The validated configuration. Every field holds its effective value (defaults applied,
/// paths absolute).
#[derive(Clone, Debug)]
pub struct Config {
    /// Absolute path of the config file.
    pub path: PathBuf,
    pub daemon: DaemonConfig,
    pub refresh: RefreshConfig,
    pub jobs: JobsConfig,
    pub notify: NotifyConfig,
    pub ledger: LedgerConfig,
    pub access: AccessConfig,
    pub providers: ProvidersConfig,
}

/// `[daemon]`.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    /// Absolute. The ledger lives at `<state_dir>/ledger.db`.
    pub state_dir: PathBuf,
    /// Absolute path of the API's Unix socket.
    pub socket_path: PathBuf,
    /// Permission bits of the socket file (≤ 0o777).
    pub socket_mode: u32,
    /// `None` when metrics are disabled (`metrics_listen = ""`).
    pub metrics_listen: Option<SocketAddr>,
    pub log_format: LogFormat,
    /// Log filter (tracing `EnvFilter` syntax, e.g. `"info"` or `"info,tokend=debug"`).
    /// `RUST_LOG`, when set, wins. Reloadable with SIGHUP.
    pub log_level: String,
    /// Export per-connection series (`connection` label). Off for very large ledgers, where
    /// one series per connection would burden Prometheus; the aggregate gauges stay.
    pub metrics_per_connection: bool,
    /// The key that seals every token in the ledger (`daemon.key_file`; absent: created as
    /// `<state_dir>/ledger.key`) and older keys that still open rows (`daemon.old_key_files`).
    pub keys: crate::ledger::seal::KeySource,
    /// This daemon's name in events (`daemon.node_name`); `None` for the host name.
    pub node_name: Option<String>,
}

/// `daemon.log_format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// `[refresh]`.
#[derive(Clone, Copy, Debug)]
pub struct RefreshConfig {
    /// Renew an access token this long before it expires (> 0).
    pub access_token_margin: Duration,
    /// Rotate any refresh token older than this (< `inactivity_expiry`).
    pub rotate_after: Duration,
    /// The provider's inactivity expiry of a refresh token.
    pub inactivity_expiry: Duration,
    /// Re-consent deadline counted from consent; `None` for `"0s"`.
    pub absolute_expiry: Option<Duration>,
    /// Refreshes in flight across all connections (1..=1024).
    pub max_concurrent: usize,
    pub request_timeout: Duration,
    /// Retry delays after transient failures; `backoff_min <= backoff_max`.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// How long a claim on one chain's refresh lasts (`ledger.lease`, [`DEFAULT_LEASE`] until
    /// that key is read): a shared ledger lets one daemon at a time refresh a chain, and a
    /// daemon that stopped (paused, partitioned) loses its claim after this. It must exceed
    /// `request_timeout`, since a refresh request is sent only while the claim has at least
    /// that long left. A SQLite ledger grants every claim, so it changes nothing there.
    pub lease: Duration,
}

/// `ledger.lease` by default (INTERFACE.md): twice the default `request_timeout`, so that a
/// claim renewed just before the request still covers it with room for the commit.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(60);

/// `[jobs]`: cron schedules.
#[derive(Clone, Debug)]
pub struct JobsConfig {
    pub resolve_sites: CronExpr,
    pub maintenance: CronExpr,
}

impl JobsConfig {
    /// The schedule of a job: its key in `[jobs]` is [`JobKind::name`].
    pub fn schedule(&self, kind: JobKind) -> &CronExpr {
        match kind {
            JobKind::ResolveSites => &self.resolve_sites,
            JobKind::Maintenance => &self.maintenance,
        }
    }
}

/// A validated six-field cron expression (seconds first), as accepted by croner with
/// seconds required.
#[derive(Clone, Debug, PartialEq)]
pub struct CronExpr {
    text: String,
    cron: croner::Cron,
}

impl CronExpr {
    /// The expression as written (surrounding whitespace trimmed).
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The parsed schedule, for computing occurrences.
    pub fn cron(&self) -> &croner::Cron {
        &self.cron
    }

    fn parse(text: &str) -> Result<CronExpr, String> {
        let text = text.trim();
        let fields = text.split_whitespace().count();
        if fields != CRON_FIELDS {
            return Err(format!(
                "invalid cron expression {text:?}: expected {CRON_FIELDS} fields \
                 (second minute hour day-of-month month day-of-week), found {fields}"
            ));
        }
        let parser = croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Required)
            .year(croner::parser::Year::Disallowed)
            .build();
        let cron = parser
            .parse(text)
            .map_err(|e| format!("invalid cron expression {text:?}: {e}"))?;
        Ok(CronExpr {
            text: text.to_owned(),
            cron,
        })
    }
}

impl fmt::Display for CronExpr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// `[notify]`.
#[derive(Clone, Debug)]
pub struct NotifyConfig {
    /// Command run on lifecycle events; `None` for `command = ""`.
    pub command: Option<String>,
    pub timeout: Duration,
}

/// `[ledger]`: where the ledger lives.
#[derive(Clone, Debug)]
pub struct LedgerConfig {
    /// SQLite in the state directory (the default), or a PostgreSQL server shared by
    /// several daemons.
    pub backend: LedgerBackend,
    /// How long a daemon's claim on one chain's refresh lasts (PostgreSQL); longer than
    /// `refresh.request_timeout`, so that a claim never lapses under a request in flight.
    pub lease: Duration,
}

/// Which ledger `[ledger]` names.
#[derive(Clone, Debug)]
pub enum LedgerBackend {
    /// `ledger.url = ""`: SQLite at `<state_dir>/ledger.db`.
    Sqlite,
    /// A `postgres://` or `postgresql://` URL.
    Postgres {
        /// The URL, which may hold a password: a [`Secret`], so that no `Debug` shows it.
        /// `None` when it sits in `url_file` and this process does not read secrets
        /// ([`Config::load_for_client`]).
        url: Option<Secret>,
        /// Where the URL was written: the config file itself, or `ledger.url_file`.
        source: LedgerUrlSource,
    },
}

/// Where a PostgreSQL URL comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LedgerUrlSource {
    /// `ledger.url` in the config file.
    Inline,
    /// `ledger.url_file` (absolute path).
    File(PathBuf),
}

impl LedgerConfig {
    /// The PostgreSQL URL when the ledger is PostgreSQL and the URL was read.
    pub fn postgres_url(&self) -> Option<&Secret> {
        match &self.backend {
            LedgerBackend::Postgres { url, .. } => url.as_ref(),
            LedgerBackend::Sqlite => None,
        }
    }

    /// Whether several daemons may share this ledger (PostgreSQL).
    pub fn is_shared(&self) -> bool {
        matches!(self.backend, LedgerBackend::Postgres { .. })
    }
}

/// A PostgreSQL URL with its password (if any) replaced by `***`, for `check-config` and
/// logs. A URL that does not parse is not shown at all (it might be all password).
pub fn masked_url(url: &str) -> String {
    match Url::parse(url.trim()) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            // A password can also sit in the query (`?password=`).
            let pairs: Vec<(String, String)> = u
                .query_pairs()
                .map(|(k, v)| {
                    let v = if k.eq_ignore_ascii_case("password") {
                        "***".to_owned()
                    } else {
                        v.into_owned()
                    };
                    (k.into_owned(), v)
                })
                .collect();
            if !pairs.is_empty() {
                u.query_pairs_mut().clear().extend_pairs(pairs);
            }
            u.to_string()
        }
        Err(_) => "(not a URL)".to_owned(),
    }
}

/// `[access]`.
#[derive(Clone, Debug)]
pub struct AccessConfig {
    /// Admin uids in addition to root and the daemon's own uid.
    pub admin_uids: Vec<u32>,
    pub admin_gids: Vec<u32>,
    /// `[[access.clients]]` entries, in file order.
    pub clients: Vec<ClientAccess>,
}

/// One `[[access.clients]]` entry: which connections a peer uid and/or gid may read tokens
/// of. At least one of `uid` and `gid` is set.
#[derive(Clone, Debug)]
pub struct ClientAccess {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// Connection ids or labels.
    pub connections: Vec<String>,
}

/// `[providers]`.
#[derive(Clone, Debug)]
pub struct ProvidersConfig {
    pub atlassian: AtlassianConfig,
}

/// `[providers.atlassian]`.
#[derive(Clone, Debug)]
pub struct AtlassianConfig {
    /// `""` when unconfigured.
    pub client_id: String,
    /// The secret (trailing whitespace trimmed). `None` when not configured, and always
    /// `None` from [`Config::load_for_client`].
    pub client_secret: Option<Secret>,
    /// Where the secret is configured to come from (`File` with an absolute path).
    pub client_secret_source: SecretSource,
    /// Always contains `offline_access`.
    pub scopes: Vec<String>,
    pub redirect_uri: Url,
    pub authorize_url: Url,
    pub token_url: Url,
    pub api_url: Url,
}

/// Where the client secret comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretSource {
    /// Not configured.
    None,
    /// `client_secret_file` (absolute path).
    File(PathBuf),
    /// The environment variable [`CLIENT_SECRET_ENV`].
    Env,
}

impl AtlassianConfig {
    /// `None` when both the client id and the client secret are set; otherwise one sentence
    /// for a human saying exactly what to set.
    pub fn missing_credentials(&self) -> Option<String> {
        let id_missing = self.client_id.is_empty();
        let secret_missing = self.client_secret.as_ref().is_none_or(Secret::is_empty);
        let how_secret = format!(
            "a client secret via providers.atlassian.client_secret_file (a file holding \
             the secret) or the environment variable {CLIENT_SECRET_ENV}"
        );
        match (id_missing, secret_missing) {
            (false, false) => None,
            (true, true) => Some(format!(
                "Atlassian OAuth credentials are not configured: set \
                 providers.atlassian.client_id in daemon.toml and {how_secret} \
                 (both from your app in the Atlassian developer console)."
            )),
            (true, false) => Some(
                "Atlassian OAuth client id is not configured: set providers.atlassian.client_id \
                 in daemon.toml (from your app in the Atlassian developer console)."
                    .to_owned(),
            ),
            (false, true) => Some(match &self.client_secret_source {
                SecretSource::File(path) => format!(
                    "Atlassian OAuth client secret was not loaded from {} (this process \
                     does not read secrets); the daemon reads it from \
                     providers.atlassian.client_secret_file.",
                    path.display()
                ),
                _ => format!("Atlassian OAuth client secret is not configured: set {how_secret}."),
            }),
        }
    }
}

/// A bad configuration: names the file, the line and the dotted key when known.
///
/// `Display`: `daemon.toml:7: refresh.rotate_after: invalid duration "7 dayz": ...`.
#[derive(Clone, Debug)]
pub struct ConfigError {
    /// The config file, as given by the caller.
    pub file: PathBuf,
    /// Dotted key, e.g. `refresh.rotate_after` or `access.clients[0].uid`.
    pub key: Option<String>,
    /// 1-based line number.
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ": {key}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

// ---------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------

/// The injected secret look-ups; `None` in client mode, where secrets are never read.
#[derive(Clone, Copy)]
pub(super) struct SecretReaders<'a> {
    env: &'a dyn Fn(&str) -> Option<String>,
    read_file: &'a dyn Fn(&Path) -> std::io::Result<String>,
}

impl Config {
    /// Pure: text in, config out. `env` looks up environment variables, `read_file` reads
    /// the secret file; both are used only for the Atlassian client secret.
    pub fn parse(
        text: &str,
        path: &Path,
        env: &dyn Fn(&str) -> Option<String>,
        read_file: &dyn Fn(&Path) -> std::io::Result<String>,
    ) -> Result<Config, ConfigError> {
        parse_inner(text, path, Some(SecretReaders { env, read_file }))
    }

    /// Reads and validates the file, with the real environment and filesystem.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = read_config_file(path)?;
        Config::parse(&text, path, &|name| std::env::var(name).ok(), &|p| {
            std::fs::read_to_string(p)
        })
    }

    /// Like [`Config::load`], but never reads the secret file or the secret environment
    /// variable (`client_secret` is `None`): CLI clients only need `daemon.socket_path`, and
    /// usually may not read the daemon's credentials.
    pub fn load_for_client(path: &Path) -> Result<Config, ConfigError> {
        let text = read_config_file(path)?;
        parse_inner(&text, path, None)
    }
}

fn read_config_file(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.to_owned(),
        key: None,
        line: None,
        message: format!("cannot read config file: {e}"),
    })
}

fn parse_inner(
    text: &str,
    path: &Path,
    secrets: Option<SecretReaders<'_>>,
) -> Result<Config, ConfigError> {
    let raw = raw::parse(text, path)?;
    let abs = absolute(path);
    let dir = abs.parent().map(Path::to_path_buf).unwrap_or_default();
    let v = validate::Validator {
        text,
        file: path,
        dir: &dir,
    };
    v.validate(raw, abs, secrets)
}

/// `path` made absolute against the current directory, with `.` components removed.
fn absolute(path: &Path) -> PathBuf {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    normalize(&abs)
}

/// Drops `.` components (`/etc/./x` → `/etc/x`). `..` is kept: resolving it lexically is
/// wrong across symlinks.
pub(super) fn normalize(path: &Path) -> PathBuf {
    path.components()
        .filter(|c| !matches!(c, Component::CurDir))
        .collect()
}
