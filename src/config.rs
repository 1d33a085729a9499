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
//! 1. **Parse**: TOML into private `Raw*` structs that mirror the file one to one, with
//!    `deny_unknown_fields` everywhere, every key optional, and durations, modes, addresses,
//!    URLs and cron expressions kept as strings. Errors carry the dotted key path (from
//!    `serde_path_to_error`) and the line (from the TOML error's span).
//! 2. **Validate**: defaults are applied and every string is turned into its real type. Each
//!    failure is a [`ConfigError`] naming the file, the dotted key and the line of that key
//!    (found by a small scan for the `[section]` header and then the `key =` line).
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

use std::fmt;
use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use url::Url;

use crate::secret::Secret;

/// Environment variable holding the Atlassian client secret when
/// `providers.atlassian.client_secret_file` is not set.
pub const CLIENT_SECRET_ENV: &str = "TOKEND_ATLASSIAN_CLIENT_SECRET";

// ---------------------------------------------------------------------------------------------
// Defaults (INTERFACE.md) and limits
// ---------------------------------------------------------------------------------------------

/// Default ledger directory, relative to the config file: the shipped config must run
/// without root, so nothing under `/var`.
const DEFAULT_STATE_DIR: &str = "state";
/// Default socket path, relative to the config file and outside the private `state_dir` so
/// that other users can reach it.
const DEFAULT_SOCKET_PATH: &str = "run/tokend.sock";
/// Default socket file mode: owner and group may connect, others may not.
const DEFAULT_SOCKET_MODE: &str = "0660";
/// Default metrics listener: loopback only, the conventional port range of exporters.
const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9464";
/// Default log filter: lifecycle events and warnings, without per-request noise.
const DEFAULT_LOG_LEVEL: &str = "info";
/// Renew an access token this long before it expires, so a caller never gets one that dies
/// in flight.
const DEFAULT_ACCESS_TOKEN_MARGIN: &str = "15m";
/// Rotate every refresh token at least this often, used or not, so that no chain comes
/// near the provider's inactivity expiry.
const DEFAULT_ROTATE_AFTER: &str = "7d";
/// Atlassian's documented inactivity expiry of a refresh token.
const DEFAULT_INACTIVITY_EXPIRY: &str = "90d";
/// Atlassian's documented absolute lifetime of a consent (re-consent deadline).
const DEFAULT_ABSOLUTE_EXPIRY: &str = "365d";
/// Refreshes in flight across all connections: enough to catch up quickly after downtime,
/// few enough not to trip the provider's rate limits.
const DEFAULT_MAX_CONCURRENT: i64 = 8;
/// Timeout of one HTTP request to the provider.
const DEFAULT_REQUEST_TIMEOUT: &str = "30s";
/// First retry delay after a transient failure.
const DEFAULT_BACKOFF_MIN: &str = "30s";
/// Longest retry delay: far below `rotate_after`, so a long outage is retried often enough.
const DEFAULT_BACKOFF_MAX: &str = "30m";
/// Re-resolve accessible sites hourly, on the hour.
const DEFAULT_RESOLVE_SITES_CRON: &str = "0 0 * * * *";
/// Ledger housekeeping daily at 03:30, a quiet hour.
const DEFAULT_MAINTENANCE_CRON: &str = "0 30 3 * * *";
/// A notify command that hangs is killed after this long, so events do not pile up.
const DEFAULT_NOTIFY_TIMEOUT: &str = "10s";
/// `offline_access` is what makes Atlassian issue a refresh token at all.
const DEFAULT_SCOPES: &[&str] = &["offline_access", "read:page:confluence"];
/// Loopback callback for `tokend connect`; must match the app's registered callback URL.
const DEFAULT_REDIRECT_URI: &str = "http://localhost:8976/callback";
/// Atlassian's authorization endpoint (3LO).
const DEFAULT_AUTHORIZE_URL: &str = "https://auth.atlassian.com/authorize";
/// Atlassian's token endpoint (code exchange and refresh).
const DEFAULT_TOKEN_URL: &str = "https://auth.atlassian.com/oauth/token";
/// Atlassian's API gateway: accessible-resources, `/me`, and the per-site API base URLs.
const DEFAULT_API_URL: &str = "https://api.atlassian.com";

/// The scope without which Atlassian issues no refresh token, and tokend has nothing to keep
/// alive.
const REQUIRED_SCOPE: &str = "offline_access";
/// Upper bound of `refresh.max_concurrent`: a typo such as `80000` should be an error, not
/// tens of thousands of simultaneous requests to the provider.
const MAX_CONCURRENT_CAP: i64 = 1024;
/// Upper bound of every duration (100 years): keeps `now + duration` far from overflow in
/// `Instant`, `SystemTime` and chrono arithmetic downstream.
const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);
/// Longest Unix socket path the kernel accepts: `sun_path` is 108 bytes on Linux including
/// the terminating NUL. Checking here turns a cryptic bind failure into a config error.
const MAX_SOCKET_PATH_BYTES: usize = 107;
/// Highest meaningful socket file mode: permission bits only, no setuid/setgid/sticky.
const MAX_SOCKET_MODE: u32 = 0o777;
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
#[derive(Clone, Debug)]
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
}

/// `[jobs]`: cron schedules.
#[derive(Clone, Debug)]
pub struct JobsConfig {
    pub resolve_sites: CronExpr,
    pub maintenance: CronExpr,
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
struct SecretReaders<'a> {
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

    /// Human multi-line summary for `tokend check-config`: every key with its effective
    /// value. The client secret is shown only as where it came from, never its value.
    pub fn summary(&self) -> String {
        use std::fmt::Write as _;

        let dur = format_duration;
        fn list<T: fmt::Display>(items: &[T]) -> String {
            let items: Vec<String> = items.iter().map(ToString::to_string).collect();
            format!("[{}]", items.join(", "))
        }
        fn strings(items: &[String]) -> String {
            let items: Vec<String> = items.iter().map(|i| format!("{i:?}")).collect();
            format!("[{}]", items.join(", "))
        }

        let mut s = String::new();
        let d = &self.daemon;
        let r = &self.refresh;
        let a = &self.providers.atlassian;
        // Writing to a String cannot fail.
        let _ = writeln!(s, "config: {}", self.path.display());
        let _ = writeln!(s);
        let _ = writeln!(s, "[daemon]");
        let _ = writeln!(s, "state_dir = {}", d.state_dir.display());
        let _ = writeln!(
            s,
            "key_file = {}",
            d.keys.key_file.as_ref().map_or_else(
                || format!(
                    "{} (created on first start)",
                    d.state_dir
                        .join(crate::ledger::seal::DEFAULT_KEY_FILE)
                        .display()
                ),
                |k| k.display().to_string()
            )
        );
        if !d.keys.old_key_files.is_empty() {
            let old: Vec<String> = d
                .keys
                .old_key_files
                .iter()
                .map(|p| p.display().to_string())
                .collect();
            let _ = writeln!(s, "old_key_files = {}", old.join(", "));
        }
        let _ = writeln!(s, "socket_path = {}", d.socket_path.display());
        let _ = writeln!(s, "socket_mode = {:04o}", d.socket_mode);
        let _ = writeln!(
            s,
            "metrics_listen = {}",
            d.metrics_listen
                .map_or_else(|| "disabled".to_owned(), |a| a.to_string())
        );
        let _ = writeln!(
            s,
            "log_format = {}",
            match d.log_format {
                LogFormat::Text => "text",
                LogFormat::Json => "json",
            }
        );
        let _ = writeln!(s, "log_level = {:?}", d.log_level);
        let _ = writeln!(s, "metrics_per_connection = {}", d.metrics_per_connection);
        let _ = writeln!(s);
        let _ = writeln!(s, "[refresh]");
        let _ = writeln!(s, "access_token_margin = {}", dur(r.access_token_margin));
        let _ = writeln!(s, "rotate_after = {}", dur(r.rotate_after));
        let _ = writeln!(s, "inactivity_expiry = {}", dur(r.inactivity_expiry));
        let _ = writeln!(
            s,
            "absolute_expiry = {}",
            r.absolute_expiry.map_or_else(|| "none".to_owned(), dur)
        );
        let _ = writeln!(s, "max_concurrent = {}", r.max_concurrent);
        let _ = writeln!(s, "request_timeout = {}", dur(r.request_timeout));
        let _ = writeln!(s, "backoff_min = {}", dur(r.backoff_min));
        let _ = writeln!(s, "backoff_max = {}", dur(r.backoff_max));
        let _ = writeln!(s);
        let _ = writeln!(s, "[jobs]");
        let _ = writeln!(s, "resolve_sites = {}", self.jobs.resolve_sites);
        let _ = writeln!(s, "maintenance = {}", self.jobs.maintenance);
        let _ = writeln!(s);
        let _ = writeln!(s, "[notify]");
        let _ = writeln!(
            s,
            "command = {}",
            self.notify
                .command
                .as_deref()
                .map_or_else(|| "none".to_owned(), |c| format!("{c:?}"))
        );
        let _ = writeln!(s, "timeout = {}", dur(self.notify.timeout));
        let _ = writeln!(s);
        let _ = writeln!(s, "[access]");
        let _ = writeln!(
            s,
            "admin_uids = {} (plus root and the daemon's own uid)",
            list(&self.access.admin_uids)
        );
        let _ = writeln!(s, "admin_gids = {}", list(&self.access.admin_gids));
        if self.access.clients.is_empty() {
            let _ = writeln!(
                s,
                "clients = none (any peer that can open the socket may read tokens)"
            );
        }
        for c in &self.access.clients {
            let who = match (c.uid, c.gid) {
                (Some(u), Some(g)) => format!("uid {u}, gid {g}"),
                (Some(u), None) => format!("uid {u}"),
                (None, Some(g)) => format!("gid {g}"),
                (None, None) => "nobody".to_owned(),
            };
            let _ = writeln!(s, "client {who}: connections = {}", strings(&c.connections));
        }
        let _ = writeln!(s);
        let _ = writeln!(s, "[providers.atlassian]");
        let _ = writeln!(
            s,
            "client_id = {}",
            if a.client_id.is_empty() {
                "not set".to_owned()
            } else {
                format!("{:?}", a.client_id)
            }
        );
        let secret = match (&a.client_secret, &a.client_secret_source) {
            (Some(_), SecretSource::File(p)) => format!("set (from file {})", p.display()),
            (Some(_), SecretSource::Env) => format!("set (from env {CLIENT_SECRET_ENV})"),
            (None, SecretSource::File(p)) => format!("not read (file {})", p.display()),
            _ => "not set".to_owned(),
        };
        let _ = writeln!(s, "client_secret = {secret}");
        let _ = writeln!(s, "scopes = {}", strings(&a.scopes));
        let _ = writeln!(s, "redirect_uri = {}", a.redirect_uri);
        let _ = writeln!(s, "authorize_url = {}", a.authorize_url);
        let _ = writeln!(s, "token_url = {}", a.token_url);
        let _ = writeln!(s, "api_url = {}", a.api_url);
        if let Some(missing) = a.missing_credentials() {
            let _ = writeln!(s);
            let _ = writeln!(s, "note: {missing}");
        }
        s
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
    let raw = parse_raw(text, path)?;
    let abs = absolute(path);
    let dir = abs.parent().map(Path::to_path_buf).unwrap_or_default();
    let v = Validator {
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
fn normalize(path: &Path) -> PathBuf {
    path.components()
        .filter(|c| !matches!(c, Component::CurDir))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Pass 1: TOML into raw structs
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawConfig {
    daemon: RawDaemon,
    refresh: RawRefresh,
    jobs: RawJobs,
    notify: RawNotify,
    access: RawAccess,
    providers: RawProviders,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawDaemon {
    state_dir: Option<String>,
    socket_path: Option<String>,
    socket_mode: Option<String>,
    metrics_listen: Option<String>,
    log_format: Option<String>,
    log_level: Option<String>,
    metrics_per_connection: Option<bool>,
    key_file: Option<String>,
    old_key_files: Option<Vec<String>>,
    node_name: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawRefresh {
    access_token_margin: Option<String>,
    rotate_after: Option<String>,
    inactivity_expiry: Option<String>,
    absolute_expiry: Option<String>,
    max_concurrent: Option<i64>,
    request_timeout: Option<String>,
    backoff_min: Option<String>,
    backoff_max: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawJobs {
    resolve_sites: Option<String>,
    maintenance: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawNotify {
    command: Option<String>,
    timeout: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawAccess {
    admin_uids: Vec<u32>,
    admin_gids: Vec<u32>,
    clients: Vec<RawClient>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawClient {
    uid: Option<u32>,
    gid: Option<u32>,
    connections: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawProviders {
    atlassian: RawAtlassian,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawAtlassian {
    client_id: Option<String>,
    client_secret_file: Option<String>,
    scopes: Option<Vec<String>>,
    redirect_uri: Option<String>,
    authorize_url: Option<String>,
    token_url: Option<String>,
    api_url: Option<String>,
}

fn parse_raw(text: &str, file: &Path) -> Result<RawConfig, ConfigError> {
    let de = toml::Deserializer::parse(text).map_err(|e| toml_error(text, file, &e, None))?;
    serde_path_to_error::deserialize::<_, RawConfig>(de).map_err(|e| {
        let path = e.path().to_string();
        let key = (path != ".").then_some(path);
        toml_error(text, file, e.inner(), key)
    })
}

fn toml_error(text: &str, file: &Path, e: &toml::de::Error, key: Option<String>) -> ConfigError {
    let line = e
        .span()
        .map(|span| line_of_offset(text, span.start))
        .or_else(|| key.as_deref().and_then(|k| locate_dotted(text, k)));
    let mut message = humane_serde_message(e.message().trim_end());
    if key
        .as_deref()
        .is_some_and(|k| k.ends_with("atlassian.client_secret") && message.contains("unknown"))
    {
        message.push_str(&format!(
            " (the secret never sits in the file: use client_secret_file or the environment \
             variable {CLIENT_SECRET_ENV})"
        ));
    }
    ConfigError {
        file: file.to_owned(),
        key,
        line,
        message,
    }
}

/// serde's messages name Rust types (`expected struct RawDaemon`, `expected u32`); say it in
/// TOML words instead.
fn humane_serde_message(message: &str) -> String {
    let mut out = message.to_owned();
    if let Some(at) = out.find("expected struct Raw") {
        out.replace_range(at.., "expected a table");
    }
    for (rust, toml) in [
        ("expected i64", "expected an integer"),
        (
            "expected u32",
            "expected an integer between 0 and 4294967295",
        ),
        ("expected a sequence", "expected an array"),
    ] {
        out = out.replace(rust, toml);
    }
    out
}

/// 1-based line of a byte offset.
fn line_of_offset(text: &str, offset: usize) -> usize {
    let offset = offset.min(text.len());
    text.as_bytes()[..offset]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

// ---------------------------------------------------------------------------------------------
// Line lookup for validation errors
// ---------------------------------------------------------------------------------------------

/// Line of a dotted key such as `refresh.rotate_after` or `access.clients[1].uid`.
fn locate_dotted(text: &str, dotted: &str) -> Option<usize> {
    // Split "access.clients[1].uid" into section "access.clients", index 1, key "uid".
    let (table, key) = match dotted.rsplit_once('.') {
        Some((t, k)) if !k.contains('[') => (t, Some(k)),
        _ => (dotted, None),
    };
    let (section, index) = match table.split_once('[') {
        Some((s, rest)) => (s, rest.trim_end_matches(']').parse().unwrap_or(0)),
        None => (table, 0),
    };
    locate(text, section, index, key)
}

/// Line (1-based) of `key =` inside the `index`-th `[section]` / `[[section]]` of `text`, or
/// of the header itself when `key` is `None` or not found there. Falls back to the first line
/// anywhere that sets `key` (dotted or inline forms). Good enough for the hand-written files
/// tokend expects; it is only used to point at a line, never to read values.
fn locate(text: &str, section: &str, index: usize, key: Option<&str>) -> Option<usize> {
    let mut inside = false;
    let mut seen = 0usize;
    let mut header = None;
    for (i, line) in text.lines().enumerate() {
        let t = line.trim_start();
        if let Some(name) = header_name(t) {
            if inside {
                break;
            }
            if name == section {
                if seen == index {
                    inside = true;
                    header = Some(i + 1);
                    if key.is_none() {
                        return header;
                    }
                }
                seen += 1;
            }
            continue;
        }
        if inside && key.is_some_and(|k| sets_key(t, k)) {
            return Some(i + 1);
        }
    }
    if header.is_some() {
        return header;
    }
    let key = key?;
    text.lines()
        .position(|l| {
            let t = l.trim_start();
            sets_key(t, key)
                || t.split_once('=')
                    .is_some_and(|(lhs, _)| lhs.trim_end().ends_with(&format!(".{key}")))
        })
        .map(|i| i + 1)
}

/// `[a.b]` or `[[a.b]]` (with optional spaces, quotes and trailing comment) → `a.b`.
fn header_name(t: &str) -> Option<String> {
    let rest = t.strip_prefix('[')?;
    let rest = rest.strip_prefix('[').unwrap_or(rest);
    let end = rest.find(']')?;
    Some(
        rest[..end]
            .chars()
            .filter(|c| !c.is_whitespace() && *c != '"' && *c != '\'')
            .collect(),
    )
}

/// Whether a (left-trimmed) line assigns `key` (bare or quoted).
fn sets_key(t: &str, key: &str) -> bool {
    let t = t
        .strip_prefix('"')
        .and_then(|r| r.strip_prefix(key)?.strip_prefix('"'))
        .or_else(|| t.strip_prefix(key));
    t.is_some_and(|rest| rest.trim_start().starts_with('='))
}

// ---------------------------------------------------------------------------------------------
// Pass 2: validation
// ---------------------------------------------------------------------------------------------

struct Validator<'a> {
    text: &'a str,
    file: &'a Path,
    /// Directory of the config file (absolute); base of relative paths.
    dir: &'a Path,
}

impl Validator<'_> {
    fn err(&self, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.to_owned(),
            key: Some(key.to_owned()),
            line: locate_dotted(self.text, key),
            message: message.into(),
        }
    }

    fn validate(
        &self,
        raw: RawConfig,
        path: PathBuf,
        secrets: Option<SecretReaders<'_>>,
    ) -> Result<Config, ConfigError> {
        Ok(Config {
            path,
            daemon: self.daemon(raw.daemon)?,
            refresh: self.refresh(raw.refresh)?,
            jobs: self.jobs(raw.jobs)?,
            notify: self.notify(raw.notify)?,
            access: self.access(raw.access)?,
            providers: ProvidersConfig {
                atlassian: self.atlassian(raw.providers.atlassian, secrets)?,
            },
        })
    }

    fn daemon(&self, raw: RawDaemon) -> Result<DaemonConfig, ConfigError> {
        let state_dir = self.path(
            "daemon.state_dir",
            raw.state_dir.as_deref().unwrap_or(DEFAULT_STATE_DIR),
        )?;
        let socket_path = self.path(
            "daemon.socket_path",
            raw.socket_path.as_deref().unwrap_or(DEFAULT_SOCKET_PATH),
        )?;
        let len = socket_path.as_os_str().len();
        if len > MAX_SOCKET_PATH_BYTES {
            return Err(self.err(
                "daemon.socket_path",
                format!(
                    "socket path {} is {len} bytes long; Unix sockets allow at most \
                     {MAX_SOCKET_PATH_BYTES}",
                    socket_path.display()
                ),
            ));
        }

        let mode_text = raw.socket_mode.as_deref().unwrap_or(DEFAULT_SOCKET_MODE);
        let socket_mode = parse_mode(mode_text).ok_or_else(|| {
            self.err(
                "daemon.socket_mode",
                format!(
                    "invalid socket mode {mode_text:?}: expected an octal string such as \
                         \"0660\", at most \"0777\""
                ),
            )
        })?;

        let listen = raw
            .metrics_listen
            .as_deref()
            .unwrap_or(DEFAULT_METRICS_LISTEN)
            .trim();
        let metrics_listen = if listen.is_empty() {
            None
        } else {
            Some(listen.parse::<SocketAddr>().map_err(|e| {
                self.err(
                    "daemon.metrics_listen",
                    format!(
                        "invalid listen address {listen:?}: {e}; expected IP:PORT such as \
                         \"127.0.0.1:9464\" or \"[::1]:9464\", or \"\" to disable metrics"
                    ),
                )
            })?)
        };

        let log_format = match raw.log_format.as_deref().unwrap_or("text") {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(self.err(
                    "daemon.log_format",
                    format!("invalid log format {other:?}: expected \"text\" or \"json\""),
                ));
            }
        };

        let log_level = raw
            .log_level
            .unwrap_or_else(|| DEFAULT_LOG_LEVEL.to_owned());
        if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&log_level) {
            return Err(self.err(
                "daemon.log_level",
                format!(
                    "invalid log level {log_level:?}: {e}; expected e.g. \"info\", \"debug\" or \"info,tokend=debug\""
                ),
            ));
        }

        let key_file = match raw.key_file.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(p) => Some(self.path("daemon.key_file", p)?),
        };
        let old_key_files = raw
            .old_key_files
            .unwrap_or_default()
            .iter()
            .map(|p| self.path("daemon.old_key_files", p))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(k) = &key_file
            && old_key_files.contains(k)
        {
            return Err(self.err(
                "daemon.old_key_files",
                format!(
                    "{} is daemon.key_file itself; list only the keys it replaces",
                    k.display()
                ),
            ));
        }

        Ok(DaemonConfig {
            state_dir,
            socket_path,
            socket_mode,
            metrics_listen,
            log_format,
            log_level,
            metrics_per_connection: raw.metrics_per_connection.unwrap_or(true),
            keys: crate::ledger::seal::KeySource {
                key_file,
                old_key_files,
            },
            node_name: match raw.node_name.as_deref().map(str::trim) {
                None | Some("") => None,
                Some(n) if n.len() > 64 || n.chars().any(|c| c.is_control()) => {
                    return Err(self.err(
                        "daemon.node_name",
                        "a node name is at most 64 printable characters",
                    ));
                }
                Some(n) => Some(n.to_owned()),
            },
        })
    }

    fn refresh(&self, raw: RawRefresh) -> Result<RefreshConfig, ConfigError> {
        let access_token_margin = self.duration(
            "refresh.access_token_margin",
            raw.access_token_margin.as_deref(),
            DEFAULT_ACCESS_TOKEN_MARGIN,
        )?;
        let rotate_after = self.duration(
            "refresh.rotate_after",
            raw.rotate_after.as_deref(),
            DEFAULT_ROTATE_AFTER,
        )?;
        let inactivity_expiry = self.duration(
            "refresh.inactivity_expiry",
            raw.inactivity_expiry.as_deref(),
            DEFAULT_INACTIVITY_EXPIRY,
        )?;
        let absolute_expiry = self.duration_or_zero(
            "refresh.absolute_expiry",
            raw.absolute_expiry.as_deref(),
            DEFAULT_ABSOLUTE_EXPIRY,
        )?;
        let request_timeout = self.duration(
            "refresh.request_timeout",
            raw.request_timeout.as_deref(),
            DEFAULT_REQUEST_TIMEOUT,
        )?;
        let backoff_min = self.duration(
            "refresh.backoff_min",
            raw.backoff_min.as_deref(),
            DEFAULT_BACKOFF_MIN,
        )?;
        let backoff_max = self.duration(
            "refresh.backoff_max",
            raw.backoff_max.as_deref(),
            DEFAULT_BACKOFF_MAX,
        )?;

        let max = raw.max_concurrent.unwrap_or(DEFAULT_MAX_CONCURRENT);
        if !(1..=MAX_CONCURRENT_CAP).contains(&max) {
            return Err(self.err(
                "refresh.max_concurrent",
                format!("must be between 1 and {MAX_CONCURRENT_CAP}, got {max}"),
            ));
        }
        // In range 1..=1024, so the conversion cannot fail.
        let max_concurrent = usize::try_from(max).unwrap_or(1);

        if backoff_min > backoff_max {
            // Point at whichever of the two the user wrote.
            let key = if raw.backoff_min.is_some() || raw.backoff_max.is_none() {
                "refresh.backoff_min"
            } else {
                "refresh.backoff_max"
            };
            return Err(self.err(
                key,
                format!(
                    "backoff_min ({}) must not exceed backoff_max ({})",
                    format_duration(backoff_min),
                    format_duration(backoff_max)
                ),
            ));
        }
        if rotate_after >= inactivity_expiry {
            let key = if raw.rotate_after.is_some() || raw.inactivity_expiry.is_none() {
                "refresh.rotate_after"
            } else {
                "refresh.inactivity_expiry"
            };
            return Err(self.err(
                key,
                format!(
                    "rotate_after ({}) must be shorter than inactivity_expiry ({}), otherwise \
                     unused refresh tokens expire before they are rotated",
                    format_duration(rotate_after),
                    format_duration(inactivity_expiry)
                ),
            ));
        }

        Ok(RefreshConfig {
            access_token_margin,
            rotate_after,
            inactivity_expiry,
            absolute_expiry,
            max_concurrent,
            request_timeout,
            backoff_min,
            backoff_max,
        })
    }

    fn jobs(&self, raw: RawJobs) -> Result<JobsConfig, ConfigError> {
        let cron = |key: &str, value: Option<&str>, default: &str| {
            CronExpr::parse(value.unwrap_or(default)).map_err(|m| self.err(key, m))
        };
        Ok(JobsConfig {
            resolve_sites: cron(
                "jobs.resolve_sites",
                raw.resolve_sites.as_deref(),
                DEFAULT_RESOLVE_SITES_CRON,
            )?,
            maintenance: cron(
                "jobs.maintenance",
                raw.maintenance.as_deref(),
                DEFAULT_MAINTENANCE_CRON,
            )?,
        })
    }

    fn notify(&self, raw: RawNotify) -> Result<NotifyConfig, ConfigError> {
        let command = raw.command.filter(|c| !c.trim().is_empty());
        let timeout = self.duration(
            "notify.timeout",
            raw.timeout.as_deref(),
            DEFAULT_NOTIFY_TIMEOUT,
        )?;
        Ok(NotifyConfig { command, timeout })
    }

    fn access(&self, raw: RawAccess) -> Result<AccessConfig, ConfigError> {
        let mut clients = Vec::with_capacity(raw.clients.len());
        for (i, c) in raw.clients.into_iter().enumerate() {
            if c.uid.is_none() && c.gid.is_none() {
                return Err(self.err(
                    &format!("access.clients[{i}]"),
                    "an [[access.clients]] entry needs a uid or a gid (or both)",
                ));
            }
            if let Some(j) = c.connections.iter().position(|n| n.trim().is_empty()) {
                return Err(self.err(
                    &format!("access.clients[{i}].connections"),
                    format!("entry {j} is empty: expected a connection id or label"),
                ));
            }
            clients.push(ClientAccess {
                uid: c.uid,
                gid: c.gid,
                connections: c.connections,
            });
        }
        Ok(AccessConfig {
            admin_uids: raw.admin_uids,
            admin_gids: raw.admin_gids,
            clients,
        })
    }

    fn atlassian(
        &self,
        raw: RawAtlassian,
        secrets: Option<SecretReaders<'_>>,
    ) -> Result<AtlassianConfig, ConfigError> {
        const P: &str = "providers.atlassian";
        let client_id = raw.client_id.unwrap_or_default();
        if client_id.chars().any(char::is_whitespace) {
            return Err(self.err(
                &format!("{P}.client_id"),
                "must not contain whitespace (check for a stray space or newline when pasting)",
            ));
        }

        let scopes = match raw.scopes {
            Some(s) => s,
            None => DEFAULT_SCOPES.iter().map(|s| (*s).to_owned()).collect(),
        };
        if let Some(bad) = scopes
            .iter()
            .find(|s| s.is_empty() || s.chars().any(char::is_whitespace))
        {
            return Err(self.err(
                &format!("{P}.scopes"),
                format!("invalid scope {bad:?}: scopes are non-empty and contain no whitespace"),
            ));
        }
        if !scopes.iter().any(|s| s == REQUIRED_SCOPE) {
            return Err(self.err(
                &format!("{P}.scopes"),
                format!(
                    "must contain {REQUIRED_SCOPE:?}: without it Atlassian issues no refresh \
                     token"
                ),
            ));
        }

        let url = |key: &str, value: Option<String>, default: &str| {
            let key = format!("{P}.{key}");
            let text = value.unwrap_or_else(|| default.to_owned());
            let url = Url::parse(text.trim())
                .map_err(|e| self.err(&key, format!("invalid URL {text:?}: {e}")))?;
            if !matches!(url.scheme(), "http" | "https") {
                return Err(self.err(
                    &key,
                    format!("invalid URL {text:?}: scheme must be http or https"),
                ));
            }
            Ok(url)
        };
        let redirect_uri = url("redirect_uri", raw.redirect_uri, DEFAULT_REDIRECT_URI)?;
        let authorize_url = url("authorize_url", raw.authorize_url, DEFAULT_AUTHORIZE_URL)?;
        let token_url = url("token_url", raw.token_url, DEFAULT_TOKEN_URL)?;
        let api_url = url("api_url", raw.api_url, DEFAULT_API_URL)?;

        let file_key = format!("{P}.client_secret_file");
        let secret_file = match raw.client_secret_file.as_deref() {
            None | Some("") => None,
            Some(p) => Some(self.path(&file_key, p)?),
        };
        let (client_secret, client_secret_source) = match (secret_file, secrets) {
            (Some(file), Some(readers)) => {
                let content = (readers.read_file)(&file).map_err(|e| {
                    self.err(
                        &file_key,
                        format!("cannot read client secret file {}: {e}", file.display()),
                    )
                })?;
                let value = content.trim_end();
                if value.is_empty() {
                    return Err(self.err(
                        &file_key,
                        format!("client secret file {} is empty", file.display()),
                    ));
                }
                (Some(Secret::new(value)), SecretSource::File(file))
            }
            (Some(file), None) => (None, SecretSource::File(file)),
            (None, Some(readers)) => match (readers.env)(CLIENT_SECRET_ENV) {
                Some(v) if !v.trim_end().is_empty() => {
                    (Some(Secret::new(v.trim_end())), SecretSource::Env)
                }
                _ => (None, SecretSource::None),
            },
            (None, None) => (None, SecretSource::None),
        };

        Ok(AtlassianConfig {
            client_id,
            client_secret,
            client_secret_source,
            scopes,
            redirect_uri,
            authorize_url,
            token_url,
            api_url,
        })
    }

    /// A path from the file: non-empty, no `~`, relative ones joined to the config directory.
    fn path(&self, key: &str, value: &str) -> Result<PathBuf, ConfigError> {
        if value.trim().is_empty() {
            return Err(self.err(key, "must not be empty"));
        }
        if value.starts_with('~') {
            return Err(self.err(
                key,
                format!("{value:?}: `~` is not expanded; write an absolute path"),
            ));
        }
        Ok(normalize(&self.dir.join(value)))
    }

    /// A duration > 0 and ≤ [`MAX_DURATION`].
    fn duration(
        &self,
        key: &str,
        value: Option<&str>,
        default: &str,
    ) -> Result<Duration, ConfigError> {
        match self.duration_or_zero(key, value, default)? {
            Some(d) => Ok(d),
            None => Err(self.err(key, "must be greater than zero")),
        }
    }

    /// A duration ≤ [`MAX_DURATION`]; `None` for zero.
    fn duration_or_zero(
        &self,
        key: &str,
        value: Option<&str>,
        default: &str,
    ) -> Result<Option<Duration>, ConfigError> {
        let text = value.unwrap_or(default);
        let d = humantime::parse_duration(text.trim()).map_err(|e| {
            self.err(
                key,
                format!("invalid duration {text:?}: {e} (examples: \"90s\", \"15m\", \"7d\")"),
            )
        })?;
        if d > MAX_DURATION {
            return Err(self.err(
                key,
                format!("duration {text:?} is too long (at most 100 years)"),
            ));
        }
        Ok((!d.is_zero()).then_some(d))
    }
}

/// A duration the way a user writes it: in its largest exact unit (`"90d"`, `"15m"`,
/// `"500ms"`), falling back to humantime's mixed form (`"1h 30m 5s"`).
/// (`humantime::format_duration` alone renders `90d` as `2months 29days 2h 52m 48s`.)
fn format_duration(d: Duration) -> String {
    const UNITS: [(u64, &str); 4] = [(86_400, "d"), (3_600, "h"), (60, "m"), (1, "s")];
    if d.subsec_nanos() == 0 && !d.is_zero() {
        let secs = d.as_secs();
        for (size, unit) in UNITS {
            if secs.is_multiple_of(size) {
                return format!("{}{unit}", secs / size);
            }
        }
    }
    if d.subsec_nanos().is_multiple_of(1_000_000) && d.as_secs() == 0 && !d.is_zero() {
        return format!("{}ms", d.subsec_millis());
    }
    humantime::format_duration(d).to_string()
}

/// `"0660"` (or `"660"`, `"0o660"`) → `0o660`; `None` when not octal or above `0o777`.
fn parse_mode(text: &str) -> Option<u32> {
    let t = text.trim();
    let digits = t.strip_prefix("0o").unwrap_or(t);
    if digits.is_empty() || !digits.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
        return None;
    }
    u32::from_str_radix(digits, 8)
        .ok()
        .filter(|m| *m <= MAX_SOCKET_MODE)
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::io;

    const SECRET: &str = "s3cr3t-value-XYZ";

    /// The example from INTERFACE.md, verbatim.
    const FULL_EXAMPLE: &str = r#"[daemon]
state_dir = "state"                   # ledger: <state_dir>/ledger.db (+ WAL files); created 0700
socket_path = "run/tokend.sock"       # outside the private state_dir, so that other users can
                                      # reach it; a missing parent is created 0755
socket_mode = "0660"
metrics_listen = "127.0.0.1:9464"     # /metrics, /healthz, /readyz; empty string disables
log_format = "text"                   # or "json"

[refresh]
access_token_margin = "15m"           # renew an access token this long before it expires
rotate_after = "7d"                   # rotate any refresh token older than this, used or not
inactivity_expiry = "90d"             # the provider's inactivity expiry
absolute_expiry = "365d"              # re-consent deadline counted from consent; "0s" = none
max_concurrent = 8                    # refreshes in flight across all connections
request_timeout = "30s"
backoff_min = "30s"
backoff_max = "30m"

[jobs]                                # cron schedules (tokio-cron-scheduler)
resolve_sites = "0 0 * * * *"         # re-resolve accessible sites of every connection
maintenance = "0 30 3 * * *"          # ledger housekeeping

[notify]
command = ""                          # run on lifecycle events (needs_reauth, recovered,
                                      # absolute_expiry_soon) with env TOKEND_EVENT,
                                      # TOKEND_CONNECTION, TOKEND_MESSAGE; never a secret
timeout = "10s"

[access]
admin_uids = []                       # in addition to root and the daemon's own uid
admin_gids = []
# [[access.clients]]  uid = 1001, connections = ["confluence-prod"]

[providers.atlassian]
client_id = "..."
client_secret_file = "/run/credentials/tokend.service/atlassian_client_secret"
# or env TOKEND_ATLASSIAN_CLIENT_SECRET
scopes = ["offline_access", "read:page:confluence"]
redirect_uri = "http://localhost:8976/callback"
authorize_url = "https://auth.atlassian.com/authorize"
token_url = "https://auth.atlassian.com/oauth/token"
api_url = "https://api.atlassian.com"  # accessible-resources, /me, and api_base_urls
"#;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn no_file(p: &Path) -> io::Result<String> {
        panic!("unexpected read of {}", p.display())
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(
            text,
            Path::new("/etc/tokend/daemon.toml"),
            &no_env,
            &no_file,
        )
    }

    fn parse_err(text: &str) -> ConfigError {
        match parse(text) {
            Ok(_) => panic!("expected an error for:\n{text}"),
            Err(e) => e,
        }
    }

    fn d(s: &str) -> Duration {
        humantime::parse_duration(s).unwrap()
    }

    #[test]
    fn empty_text_gives_interface_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.path, PathBuf::from("/etc/tokend/daemon.toml"));
        assert_eq!(c.daemon.state_dir, PathBuf::from("/etc/tokend/state"));
        assert_eq!(
            c.daemon.socket_path,
            PathBuf::from("/etc/tokend/run/tokend.sock")
        );
        assert_eq!(c.daemon.socket_mode, 0o660);
        assert_eq!(
            c.daemon.metrics_listen,
            Some("127.0.0.1:9464".parse().unwrap())
        );
        assert_eq!(c.daemon.log_format, LogFormat::Text);
        let r = &c.refresh;
        assert_eq!(r.access_token_margin, Duration::from_secs(15 * 60));
        assert_eq!(r.rotate_after, Duration::from_secs(7 * 86400));
        assert_eq!(r.inactivity_expiry, Duration::from_secs(90 * 86400));
        assert_eq!(r.absolute_expiry, Some(Duration::from_secs(365 * 86400)));
        assert_eq!(r.max_concurrent, 8);
        assert_eq!(r.request_timeout, Duration::from_secs(30));
        assert_eq!(r.backoff_min, Duration::from_secs(30));
        assert_eq!(r.backoff_max, Duration::from_secs(30 * 60));
        assert_eq!(c.jobs.resolve_sites.as_str(), "0 0 * * * *");
        assert_eq!(c.jobs.maintenance.as_str(), "0 30 3 * * *");
        assert_eq!(c.notify.command, None);
        assert_eq!(c.notify.timeout, Duration::from_secs(10));
        assert!(c.access.admin_uids.is_empty());
        assert!(c.access.admin_gids.is_empty());
        assert!(c.access.clients.is_empty());
        let a = &c.providers.atlassian;
        assert_eq!(a.client_id, "");
        assert!(a.client_secret.is_none());
        assert_eq!(a.client_secret_source, SecretSource::None);
        assert_eq!(a.scopes, vec!["offline_access", "read:page:confluence"]);
        assert_eq!(a.redirect_uri.as_str(), "http://localhost:8976/callback");
        assert_eq!(
            a.authorize_url.as_str(),
            "https://auth.atlassian.com/authorize"
        );
        assert_eq!(
            a.token_url.as_str(),
            "https://auth.atlassian.com/oauth/token"
        );
        assert_eq!(a.api_url.as_str(), "https://api.atlassian.com/");
        let missing = a.missing_credentials().unwrap();
        assert!(
            missing.contains("providers.atlassian.client_id"),
            "{missing}"
        );
        assert!(missing.contains("client_secret_file"), "{missing}");
        assert!(missing.contains(CLIENT_SECRET_ENV), "{missing}");
    }

    #[test]
    fn full_interface_example_parses_with_secret_file() {
        let reads = RefCell::new(Vec::new());
        let read = |p: &Path| {
            reads.borrow_mut().push(p.to_path_buf());
            Ok(format!("{SECRET}\n"))
        };
        let env = |_: &str| Some("from-env-must-not-win".to_owned());
        let c = Config::parse(FULL_EXAMPLE, Path::new("/srv/t/daemon.toml"), &env, &read).unwrap();
        let secret_path = PathBuf::from("/run/credentials/tokend.service/atlassian_client_secret");
        assert_eq!(*reads.borrow(), vec![secret_path.clone()]);
        let a = &c.providers.atlassian;
        assert_eq!(a.client_id, "...");
        assert_eq!(a.client_secret.as_ref().unwrap().expose(), SECRET);
        assert_eq!(a.client_secret_source, SecretSource::File(secret_path));
        assert_eq!(a.missing_credentials(), None);
        assert_eq!(c.daemon.state_dir, PathBuf::from("/srv/t/state"));
        assert_eq!(c.refresh.rotate_after, d("7d"));
        assert_eq!(c.jobs.maintenance.as_str(), "0 30 3 * * *");
        assert_eq!(c.notify.command, None);
        // Debug output of the whole config never shows the secret.
        let dbg = format!("{c:?}");
        assert!(!dbg.contains(SECRET), "{dbg}");
    }

    #[test]
    fn short_rotate_after_is_accepted() {
        let c = parse("[refresh]\nrotate_after = \"2s\"\nbackoff_min = \"500ms\"\n").unwrap();
        assert_eq!(c.refresh.rotate_after, Duration::from_secs(2));
        assert_eq!(c.refresh.backoff_min, Duration::from_millis(500));
    }

    #[test]
    fn unknown_top_level_section_is_an_error_with_line() {
        let e = parse_err("[daemon]\nlog_format = \"json\"\n\n[metrics]\nport = 9\n");
        assert_eq!(e.line, Some(4), "{e}");
        assert!(e.message.contains("unknown field `metrics`"), "{e}");
        assert!(
            e.to_string().starts_with("/etc/tokend/daemon.toml:4: "),
            "{e}"
        );
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let e = parse_err("# comment\n[daemon]\nlog_format = \"json\"\nsocket_perms = \"0600\"\n");
        assert_eq!(e.line, Some(4), "{e}");
        assert_eq!(e.key.as_deref(), Some("daemon.socket_perms"), "{e}");
        assert!(e.message.contains("socket_perms"), "{e}");
    }

    #[test]
    fn client_secret_in_file_is_refused_with_hint() {
        let e = parse_err("[providers.atlassian]\nclient_secret = \"oops\"\n");
        assert_eq!(e.line, Some(2), "{e}");
        assert!(e.message.contains("client_secret_file"), "{e}");
        assert!(!e.to_string().contains("oops"), "{e}");
    }

    #[test]
    fn bad_duration_names_key_and_line() {
        let e = parse_err(
            "[daemon]\n\n[refresh]\naccess_token_margin = \"1m\"\nrotate_after = \"7 dayz\"\n",
        );
        assert_eq!(e.key.as_deref(), Some("refresh.rotate_after"));
        assert_eq!(e.line, Some(5));
        let shown = e.to_string();
        assert!(
            shown.starts_with(
                "/etc/tokend/daemon.toml:5: refresh.rotate_after: invalid duration \"7 dayz\""
            ),
            "{shown}"
        );
    }

    #[test]
    fn zero_durations_are_refused_except_absolute_expiry() {
        let e = parse_err("[notify]\ntimeout = \"0s\"\n");
        assert_eq!(e.key.as_deref(), Some("notify.timeout"));
        assert_eq!(e.line, Some(2));
        let e = parse_err("[refresh]\naccess_token_margin = \"0s\"\n");
        assert_eq!(e.key.as_deref(), Some("refresh.access_token_margin"));
        let c = parse("[refresh]\nabsolute_expiry = \"0s\"\n").unwrap();
        assert_eq!(c.refresh.absolute_expiry, None);
    }

    #[test]
    fn wrong_type_names_key_and_line() {
        let e = parse_err("[refresh]\n\nmax_concurrent = \"8\"\n");
        assert_eq!(e.key.as_deref(), Some("refresh.max_concurrent"), "{e}");
        assert_eq!(e.line, Some(3), "{e}");
        assert!(e.message.contains("expected an integer"), "{e}");
        let e = parse_err("daemon = 5\n");
        assert_eq!(e.key.as_deref(), Some("daemon"), "{e}");
        assert!(e.message.ends_with("expected a table"), "{e}");
        assert!(!e.message.contains("Raw"), "{e}");
    }

    #[test]
    fn max_concurrent_bounds() {
        assert_eq!(
            parse_err("[refresh]\nmax_concurrent = 0\n").key.as_deref(),
            Some("refresh.max_concurrent")
        );
        assert!(parse("[refresh]\nmax_concurrent = 100000\n").is_err());
        assert_eq!(
            parse("[refresh]\nmax_concurrent = 1\n")
                .unwrap()
                .refresh
                .max_concurrent,
            1
        );
    }

    #[test]
    fn bad_cron_five_fields_and_garbage() {
        let e = parse_err("[jobs]\nresolve_sites = \"0 * * * *\"\n");
        assert_eq!(e.key.as_deref(), Some("jobs.resolve_sites"));
        assert_eq!(e.line, Some(2));
        assert!(e.message.contains("6 fields"), "{e}");
        let e =
            parse_err("[jobs]\nresolve_sites = \"0 0 * * * *\"\nmaintenance = \"a b c d e f\"\n");
        assert_eq!(e.key.as_deref(), Some("jobs.maintenance"));
        assert_eq!(e.line, Some(3));
        let e = parse_err("[jobs]\nmaintenance = \"61 0 * * * *\"\n");
        assert_eq!(e.key.as_deref(), Some("jobs.maintenance"));
        let c = parse("[jobs]\nmaintenance = \"*/10 * * * * *\"\n").unwrap();
        assert_eq!(c.jobs.maintenance.as_str(), "*/10 * * * * *");
    }

    #[test]
    fn bad_socket_mode() {
        for bad in ["\"0668\"", "\"1777\"", "\"rw-rw----\"", "\"\""] {
            let e = parse_err(&format!("[daemon]\nsocket_mode = {bad}\n"));
            assert_eq!(e.key.as_deref(), Some("daemon.socket_mode"), "{bad}: {e}");
            assert_eq!(e.line, Some(2), "{bad}: {e}");
        }
        let c = parse("[daemon]\nsocket_mode = \"0600\"\n").unwrap();
        assert_eq!(c.daemon.socket_mode, 0o600);
    }

    #[test]
    fn bad_metrics_listen_and_disabled() {
        let e = parse_err("[daemon]\nmetrics_listen = \"localhost\"\n");
        assert_eq!(e.key.as_deref(), Some("daemon.metrics_listen"));
        assert_eq!(e.line, Some(2));
        let c = parse("[daemon]\nmetrics_listen = \"\"\n").unwrap();
        assert_eq!(c.daemon.metrics_listen, None);
        let c = parse("[daemon]\nmetrics_listen = \"[::1]:9000\"\n").unwrap();
        assert_eq!(c.daemon.metrics_listen, Some("[::1]:9000".parse().unwrap()));
    }

    #[test]
    fn log_level_and_per_connection_metrics() {
        let c = parse("").unwrap();
        assert_eq!(c.daemon.log_level, "info");
        assert!(c.daemon.metrics_per_connection);
        let c =
            parse("[daemon]\nlog_level = \"info,tokend=debug\"\nmetrics_per_connection = false\n")
                .unwrap();
        assert_eq!(c.daemon.log_level, "info,tokend=debug");
        assert!(!c.daemon.metrics_per_connection);
        let e = parse_err("[daemon]\nlog_level = \"loud[\"\n");
        assert_eq!(e.key.as_deref(), Some("daemon.log_level"));
        assert_eq!(e.line, Some(2));
    }

    #[test]
    fn bad_log_format_and_json() {
        let e = parse_err("[daemon]\nlog_format = \"yaml\"\n");
        assert_eq!(e.key.as_deref(), Some("daemon.log_format"));
        assert_eq!(e.line, Some(2));
        assert!(e.message.contains("\"text\" or \"json\""), "{e}");
        let c = parse("[daemon]\nlog_format = \"json\"\n").unwrap();
        assert_eq!(c.daemon.log_format, LogFormat::Json);
    }

    #[test]
    fn backoff_min_above_max() {
        let e = parse_err("[refresh]\nbackoff_min = \"1h\"\nbackoff_max = \"30m\"\n");
        assert_eq!(e.key.as_deref(), Some("refresh.backoff_min"));
        assert_eq!(e.line, Some(2));
        // Only backoff_max written: point at it.
        let e = parse_err("[refresh]\nbackoff_max = \"10s\"\n");
        assert_eq!(e.key.as_deref(), Some("refresh.backoff_max"));
        assert_eq!(e.line, Some(2));
    }

    #[test]
    fn rotate_after_must_be_below_inactivity_expiry() {
        let e = parse_err("[refresh]\nrotate_after = \"90d\"\n");
        assert_eq!(e.key.as_deref(), Some("refresh.rotate_after"));
        assert_eq!(e.line, Some(2));
        assert!(e.message.contains("inactivity"), "{e}");
        let e = parse_err("[refresh]\ninactivity_expiry = \"5d\"\n");
        assert_eq!(e.key.as_deref(), Some("refresh.inactivity_expiry"));
    }

    #[test]
    fn scopes_need_offline_access() {
        let e = parse_err("[providers.atlassian]\nclient_id = \"x\"\nscopes = [\"read:me\"]\n");
        assert_eq!(e.key.as_deref(), Some("providers.atlassian.scopes"));
        assert_eq!(e.line, Some(3));
        assert!(e.message.contains("offline_access"), "{e}");
    }

    #[test]
    fn urls_must_be_http() {
        let e = parse_err("[providers.atlassian]\ntoken_url = \"ftp://x/token\"\n");
        assert_eq!(e.key.as_deref(), Some("providers.atlassian.token_url"));
        assert_eq!(e.line, Some(2));
        let e = parse_err("[providers.atlassian]\napi_url = \"not a url\"\n");
        assert_eq!(e.key.as_deref(), Some("providers.atlassian.api_url"));
        let c = parse("[providers.atlassian]\ntoken_url = \"http://127.0.0.1:1234/t\"\n").unwrap();
        assert_eq!(
            c.providers.atlassian.token_url.as_str(),
            "http://127.0.0.1:1234/t"
        );
    }

    #[test]
    fn unreadable_secret_file_names_the_file() {
        let text =
            "[providers.atlassian]\nclient_id = \"abc\"\nclient_secret_file = \"creds/secret\"\n";
        let read = |_: &Path| -> io::Result<String> {
            Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "permission denied",
            ))
        };
        let env = |_: &str| Some(SECRET.to_owned());
        let e = Config::parse(text, Path::new("/srv/t/daemon.toml"), &env, &read).unwrap_err();
        assert_eq!(
            e.key.as_deref(),
            Some("providers.atlassian.client_secret_file")
        );
        assert_eq!(e.line, Some(3));
        let shown = e.to_string();
        assert!(shown.contains("/srv/t/creds/secret"), "{shown}");
        assert!(shown.contains("permission denied"), "{shown}");
        assert!(!shown.contains(SECRET), "{shown}");
    }

    #[test]
    fn empty_secret_file_is_an_error() {
        let text = "[providers.atlassian]\nclient_secret_file = \"/s\"\n";
        let read = |_: &Path| Ok(" \n".to_owned());
        let e = Config::parse(text, Path::new("/d.toml"), &no_env, &read).unwrap_err();
        assert_eq!(
            e.key.as_deref(),
            Some("providers.atlassian.client_secret_file")
        );
        assert!(e.message.contains("empty"), "{e}");
    }

    #[test]
    fn env_secret_used_when_no_file() {
        let asked = RefCell::new(Vec::new());
        let env = |name: &str| {
            asked.borrow_mut().push(name.to_owned());
            Some(format!("{SECRET}\n"))
        };
        let c = Config::parse(
            "[providers.atlassian]\nclient_id = \"abc\"\n",
            Path::new("/d.toml"),
            &env,
            &no_file,
        )
        .unwrap();
        assert_eq!(*asked.borrow(), vec![CLIENT_SECRET_ENV.to_owned()]);
        let a = &c.providers.atlassian;
        assert_eq!(a.client_secret.as_ref().unwrap().expose(), SECRET);
        assert_eq!(a.client_secret_source, SecretSource::Env);
        assert_eq!(a.missing_credentials(), None);
        // An empty variable counts as unset.
        let env = |_: &str| Some(String::new());
        let c = Config::parse("", Path::new("/d.toml"), &env, &no_file).unwrap();
        assert_eq!(
            c.providers.atlassian.client_secret_source,
            SecretSource::None
        );
        let missing = c.providers.atlassian.missing_credentials().unwrap();
        assert!(missing.contains("client_id"), "{missing}");
    }

    #[test]
    fn summary_never_contains_the_secret() {
        let read = |_: &Path| Ok(SECRET.to_owned());
        let text =
            "[providers.atlassian]\nclient_id = \"my-client\"\nclient_secret_file = \"/run/s\"\n";
        let c = Config::parse(text, Path::new("/d/daemon.toml"), &no_env, &read).unwrap();
        let s = c.summary();
        assert!(!s.contains(SECRET), "{s}");
        assert!(s.contains("client_secret = set (from file /run/s)"), "{s}");
        assert!(s.contains("client_id = \"my-client\""), "{s}");
        assert!(s.contains("rotate_after = 7d\n"), "{s}");
        assert!(s.contains("inactivity_expiry = 90d\n"), "{s}");
        assert!(s.contains("socket_mode = 0660"), "{s}");
        assert!(s.contains("state_dir = /d/state"), "{s}");
        assert!(s.contains("maintenance = 0 30 3 * * *"), "{s}");

        let env = |_: &str| Some(SECRET.to_owned());
        let c = Config::parse(
            "[providers.atlassian]\nclient_id = \"x\"\n",
            Path::new("/d.toml"),
            &env,
            &no_file,
        )
        .unwrap();
        let s = c.summary();
        assert!(!s.contains(SECRET), "{s}");
        assert!(s.contains("client_secret = set (from env"), "{s}");
        let s = parse("").unwrap().summary();
        assert!(s.contains("client_secret = not set"), "{s}");
    }

    #[test]
    fn relative_paths_resolve_against_config_dir() {
        let read_paths = RefCell::new(Vec::new());
        let read = |p: &Path| {
            read_paths.borrow_mut().push(p.to_path_buf());
            Ok("x".to_owned())
        };
        let text = "[daemon]\nstate_dir = \"./var/state\"\nsocket_path = \"/run/tokend/api.sock\"\n\
                    [providers.atlassian]\nclient_secret_file = \"secrets/atl\"\n";
        let c = Config::parse(
            text,
            Path::new("/opt/tokend/conf/daemon.toml"),
            &no_env,
            &read,
        )
        .unwrap();
        assert_eq!(
            c.daemon.state_dir,
            PathBuf::from("/opt/tokend/conf/var/state")
        );
        assert_eq!(c.daemon.socket_path, PathBuf::from("/run/tokend/api.sock"));
        assert_eq!(
            *read_paths.borrow(),
            vec![PathBuf::from("/opt/tokend/conf/secrets/atl")]
        );

        // A relative config path is made absolute against the current directory.
        let c = Config::parse("", Path::new("conf/daemon.toml"), &no_env, &no_file).unwrap();
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(c.path, cwd.join("conf/daemon.toml"));
        assert_eq!(c.daemon.state_dir, cwd.join("conf/state"));

        let e = parse_err("[daemon]\nstate_dir = \"~/state\"\n");
        assert_eq!(e.key.as_deref(), Some("daemon.state_dir"));
    }

    #[test]
    fn socket_path_too_long() {
        let long = "s".repeat(120);
        let e = parse_err(&format!("[daemon]\nsocket_path = \"{long}\"\n"));
        assert_eq!(e.key.as_deref(), Some("daemon.socket_path"));
        assert_eq!(e.line, Some(2));
    }

    #[test]
    fn access_clients_parse() {
        let text = r#"
[access]
admin_uids = [1000]
admin_gids = [27, 999]

[[access.clients]]
uid = 1001
connections = ["confluence-prod"]

[[access.clients]]
gid = 2000
connections = ["a", "b"]
"#;
        let c = parse(text).unwrap();
        assert_eq!(c.access.admin_uids, vec![1000]);
        assert_eq!(c.access.admin_gids, vec![27, 999]);
        assert_eq!(c.access.clients.len(), 2);
        assert_eq!(c.access.clients[0].uid, Some(1001));
        assert_eq!(c.access.clients[0].gid, None);
        assert_eq!(c.access.clients[0].connections, vec!["confluence-prod"]);
        assert_eq!(c.access.clients[1].uid, None);
        assert_eq!(c.access.clients[1].gid, Some(2000));
        assert_eq!(c.access.clients[1].connections, vec!["a", "b"]);
        let s = c.summary();
        assert!(
            s.contains("client uid 1001: connections = [\"confluence-prod\"]"),
            "{s}"
        );
    }

    #[test]
    fn access_client_without_uid_or_gid_points_at_its_entry() {
        let text = "[[access.clients]]\nuid = 1\nconnections = []\n\n[[access.clients]]\nconnections = [\"x\"]\n";
        let e = parse_err(text);
        assert_eq!(e.key.as_deref(), Some("access.clients[1]"));
        assert_eq!(e.line, Some(5));
    }

    #[test]
    fn unknown_key_in_access_client_names_index_and_line() {
        let text = "[[access.clients]]\nuid = 1\n\n[[access.clients]]\nuid = 2\nuser = \"bob\"\n";
        let e = parse_err(text);
        assert_eq!(e.key.as_deref(), Some("access.clients[1].user"), "{e}");
        assert_eq!(e.line, Some(6), "{e}");
    }

    #[test]
    fn negative_uid_is_an_error() {
        let e = parse_err("[access]\nadmin_uids = [-1]\n");
        assert_eq!(e.line, Some(2), "{e}");
        assert!(
            e.key.as_deref().unwrap().starts_with("access.admin_uids"),
            "{e}"
        );
    }

    #[test]
    fn toml_syntax_error_has_line() {
        let e = parse_err("[daemon]\nlog_format = \"text\"\nstate_dir = \n");
        assert_eq!(e.line, Some(3), "{e}");
        assert_eq!(e.key, None);
    }

    #[test]
    fn load_for_client_never_reads_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("daemon.toml");
        // The secret file does not exist: `load` fails on it, `load_for_client` never looks.
        std::fs::write(
            &cfg,
            "[daemon]\nsocket_path = \"api.sock\"\n[providers.atlassian]\nclient_id = \"x\"\n\
             client_secret_file = \"missing-secret\"\n",
        )
        .unwrap();
        let e = Config::load(&cfg).unwrap_err();
        assert_eq!(
            e.key.as_deref(),
            Some("providers.atlassian.client_secret_file")
        );
        let c = Config::load_for_client(&cfg).unwrap();
        assert_eq!(c.daemon.socket_path, dir.path().join("api.sock"));
        let a = &c.providers.atlassian;
        assert!(a.client_secret.is_none());
        assert_eq!(
            a.client_secret_source,
            SecretSource::File(dir.path().join("missing-secret"))
        );
        // Once the file exists, `load` reads it.
        std::fs::write(dir.path().join("missing-secret"), format!("{SECRET}\n")).unwrap();
        let c = Config::load(&cfg).unwrap();
        assert_eq!(
            c.providers
                .atlassian
                .client_secret
                .as_ref()
                .unwrap()
                .expose(),
            SECRET
        );
    }

    #[test]
    fn unreadable_config_file_reports_os_error() {
        let e = Config::load(Path::new("/nonexistent/tokend/daemon.toml")).unwrap_err();
        assert_eq!(e.file, PathBuf::from("/nonexistent/tokend/daemon.toml"));
        assert!(e.message.contains("No such file"), "{e}");
        assert!(Config::load_for_client(Path::new("/nonexistent/x.toml")).is_err());
    }

    #[test]
    fn durations_are_shown_in_their_largest_exact_unit() {
        assert_eq!(format_duration(d("90d")), "90d");
        assert_eq!(format_duration(d("15m")), "15m");
        assert_eq!(format_duration(d("2h")), "2h");
        assert_eq!(format_duration(d("90s")), "90s");
        assert_eq!(format_duration(d("500ms")), "500ms");
        assert_eq!(format_duration(d("1s 500ms")), "1s 500ms");
    }

    #[test]
    fn display_format() {
        let e = ConfigError {
            file: PathBuf::from("daemon.toml"),
            key: Some("refresh.rotate_after".into()),
            line: Some(7),
            message: "invalid duration".into(),
        };
        assert_eq!(
            e.to_string(),
            "daemon.toml:7: refresh.rotate_after: invalid duration"
        );
        let e = ConfigError {
            file: PathBuf::from("daemon.toml"),
            key: None,
            line: None,
            message: "cannot read".into(),
        };
        assert_eq!(e.to_string(), "daemon.toml: cannot read");
    }

    #[test]
    fn locate_finds_keys() {
        let text = "a = 1\n[daemon]\nx = 1\n[refresh]\n  \"rotate_after\" = \"1d\"\n[[access.clients]]\nuid=1\n[[access.clients]]\nuid = 2\n";
        assert_eq!(locate_dotted(text, "refresh.rotate_after"), Some(5));
        assert_eq!(locate_dotted(text, "access.clients[1].uid"), Some(9));
        assert_eq!(locate_dotted(text, "access.clients[0].uid"), Some(7));
        assert_eq!(locate_dotted(text, "refresh.backoff_min"), Some(4));
        assert_eq!(locate_dotted(text, "jobs.maintenance"), None);
    }
}

/// Property tests of [`Config::parse`]: arbitrary text and structured mutations of the
/// shipped `daemon.toml`. It never panics, every refusal is a [`ConfigError`] naming a key
/// or a line, and no outcome shows the client secret.
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    const SHIPPED: &str = include_str!("../daemon.toml");
    const FILE: &str = "/etc/tokend/daemon.toml";
    const SECRET: &str = "cs-prop-7hQk2VvN9xLm4RtZ8wYp";

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new(FILE), &|_| Some(SECRET.to_owned()), &|_| {
            Ok(format!("{SECRET}\n"))
        })
    }

    /// The invariants of any outcome.
    fn check(text: &str) -> Result<Result<Config, ConfigError>, TestCaseError> {
        let result = parse(text);
        match &result {
            Ok(c) => {
                let s = c.summary();
                prop_assert!(!s.contains(SECRET), "{s}");
                let debug = format!("{c:?}");
                prop_assert!(!debug.contains(SECRET));
            }
            Err(e) => {
                prop_assert!(e.key.is_some() || e.line.is_some(), "{e}");
                let lines = text.matches('\n').count() + 1;
                prop_assert!(e.line.is_none_or(|l| (1..=lines).contains(&l)), "{e}");
                prop_assert!(e.key.as_ref().is_none_or(|k| !k.is_empty()), "{e:?}");
                prop_assert!(!e.message.is_empty(), "{e:?}");
                let shown = format!("{e} {e:?}");
                prop_assert!(shown.starts_with(FILE), "{shown}");
                prop_assert!(!shown.contains(SECRET), "{shown}");
            }
        }
        // The client's parse (which never reads the secret) agrees.
        let client = parse_inner(text, Path::new(FILE), None);
        prop_assert_eq!(
            result.is_ok(),
            client.is_ok(),
            "{:?} vs {:?}",
            result.as_ref().err(),
            client.err()
        );
        Ok(result)
    }

    /// A TOML basic string holding `s`.
    fn quoted(s: &str) -> String {
        let mut out = String::from("\"");
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
                c => out.push(c),
            }
        }
        out.push('"');
        out
    }

    /// Values a user might write, right or wrong, for any key.
    fn value() -> impl Strategy<Value = String> {
        let words = prop::sample::select(vec![
            "",
            "0s",
            "1ms",
            "1s 500ms",
            "7d",
            "90d",
            "100years",
            "101y",
            "99999999999999999999d",
            "-1s",
            "1.5h",
            "0",
            "0777",
            "01777",
            "0o660",
            "8",
            "778",
            "text",
            "json",
            "JSON",
            "info",
            "info,tokend=debug",
            "tokend[{a=1}]=trace",
            "[{",
            "=",
            "tokend=verbose",
            "0 0 * * * *",
            "0 30 3 * * *",
            "* * * * * * *",
            "60 0 0 31 2 *",
            "*/0 * * * * *",
            "0 0 0 L * *",
            "0 0 0 ? * 7#5",
            "0 0 0 31 2 *",
            "@hourly",
            "1-0 * * * * *",
            "127.0.0.1:0",
            "[::1]:9464",
            "localhost:9464",
            "127.0.0.1",
            "http://x",
            "ftp://x/t",
            "https://",
            "http://[::1",
            "~/x",
            "/",
            "..",
            "a b",
            "offline_access",
            "read:me",
            "state",
            "k",
            "/run/secret",
        ]);
        prop_oneof![
            4 => words.prop_map(quoted),
            2 => "\\PC{0,30}".prop_map(|s| quoted(&s)),
            1 => any::<i64>().prop_map(|i| i.to_string()),
            1 => (0i64..2000).prop_map(|i| i.to_string()),
            1 => any::<bool>().prop_map(|b| b.to_string()),
            1 => any::<f64>().prop_map(|f| f.to_string()),
            2 => prop::collection::vec("[a-z:_ ]{0,16}", 0..4).prop_map(|v| {
                let items: Vec<String> = v.iter().map(|s| quoted(s)).collect();
                format!("[{}]", items.join(", "))
            }),
            1 => prop::collection::vec(any::<i64>(), 0..3).prop_map(|v| format!("{v:?}")),
            1 => prop::sample::select(vec![
                "{}", "{ x = 1 }", "1979-05-27T07:32:00Z", "[[]]", "'lit'", "'''multi\nline'''",
                "\"\"\"\n\"\"\"", "inf", "nan", "0x10", "1_000", "\"unterminated",
            ])
            .prop_map(str::to_owned),
            1 => "\\PC{0,12}",
        ]
    }

    /// Lines to insert: headers, assignments, garbage.
    fn line() -> impl Strategy<Value = String> {
        let key = prop_oneof![
            prop::sample::select(vec![
                "state_dir",
                "socket_path",
                "socket_mode",
                "log_level",
                "key_file",
                "old_key_files",
                "rotate_after",
                "max_concurrent",
                "backoff_min",
                "resolve_sites",
                "command",
                "admin_uids",
                "uid",
                "gid",
                "connections",
                "client_id",
                "client_secret",
                "client_secret_file",
                "scopes",
                "token_url",
                "a.b",
                "\"q\"",
            ])
            .prop_map(str::to_owned),
            "[a-z_]{1,12}",
        ];
        prop_oneof![
            2 => prop::sample::select(vec![
                "[daemon]", "[refresh]", "[jobs]", "[notify]", "[access]", "[[access.clients]]",
                "[providers]", "[providers.atlassian]", "[providers.github]", "[[daemon]]",
                "[access.clients]", "[ daemon ]", "[\"refresh\"]", "[", "]", "#", "",
            ])
            .prop_map(str::to_owned),
            4 => (key, value()).prop_map(|(k, v)| format!("{k} = {v}")),
            1 => "\\PC{0,40}",
        ]
    }

    #[derive(Clone, Debug)]
    enum Mutation {
        SetValue(usize, String),
        RenameKey(usize, String),
        Delete(usize),
        Duplicate(usize),
        Swap(usize, usize),
        Insert(usize, String),
        InsertChar(usize, usize, char),
        Uncomment(usize),
        Truncate(usize),
    }

    fn mutation() -> impl Strategy<Value = Mutation> {
        let i = any::<usize>();
        prop_oneof![
            6 => (i, value()).prop_map(|(i, v)| Mutation::SetValue(i, v)),
            2 => (i, "[a-z_]{1,14}").prop_map(|(i, k)| Mutation::RenameKey(i, k)),
            2 => i.prop_map(Mutation::Delete),
            1 => i.prop_map(Mutation::Duplicate),
            1 => (i, any::<usize>()).prop_map(|(i, j)| Mutation::Swap(i, j)),
            3 => (i, line()).prop_map(|(i, l)| Mutation::Insert(i, l)),
            2 => (i, any::<usize>(), any::<char>()).prop_map(|(i, p, c)| Mutation::InsertChar(i, p, c)),
            1 => i.prop_map(Mutation::Uncomment),
            1 => i.prop_map(Mutation::Truncate),
        ]
    }

    /// The byte offset of the `=` of an assignment line (`key = value  # comment`).
    fn assignment(line: &str) -> Option<usize> {
        let t = line.trim_start();
        if t.starts_with('#') || t.starts_with('[') {
            return None;
        }
        line.find('=')
    }

    fn apply(text: &str, mutations: &[Mutation]) -> String {
        let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
        for m in mutations {
            let n = lines.len().max(1);
            match m.clone() {
                Mutation::SetValue(i, v) => {
                    // A value-bearing line, found from a random start.
                    let found = (0..lines.len())
                        .map(|k| (i + k) % n)
                        .find(|&k| assignment(&lines[k]).is_some());
                    if let Some(k) = found {
                        let eq = assignment(&lines[k]).unwrap_or(0);
                        lines[k] = format!("{} {v}", &lines[k][..=eq]);
                    }
                }
                Mutation::RenameKey(i, key) => {
                    let found = (0..lines.len())
                        .map(|k| (i + k) % n)
                        .find(|&k| assignment(&lines[k]).is_some());
                    if let Some(k) = found {
                        let eq = assignment(&lines[k]).unwrap_or(0);
                        lines[k] = format!("{key} {}", &lines[k][eq..]);
                    }
                }
                Mutation::Delete(i) if !lines.is_empty() => {
                    lines.remove(i % n);
                }
                Mutation::Duplicate(i) if !lines.is_empty() => {
                    let l = lines[i % n].clone();
                    lines.insert(i % n, l);
                }
                Mutation::Swap(i, j) if !lines.is_empty() => lines.swap(i % n, j % n),
                Mutation::Insert(i, l) => lines.insert(i % (lines.len() + 1), l),
                Mutation::InsertChar(i, p, c) if !lines.is_empty() => {
                    let l = &mut lines[i % n];
                    let at = l
                        .char_indices()
                        .map(|(b, _)| b)
                        .chain([l.len()])
                        .nth(p % (l.chars().count() + 1))
                        .unwrap_or(0);
                    l.insert(at, c);
                }
                Mutation::Uncomment(i) => {
                    let found = (0..lines.len())
                        .map(|k| (i + k) % n)
                        .find(|&k| lines[k].trim_start().starts_with('#'));
                    if let Some(k) = found {
                        lines[k] = lines[k]
                            .trim_start()
                            .trim_start_matches('#')
                            .trim()
                            .to_owned();
                    }
                }
                Mutation::Truncate(i) => {
                    let joined = lines.join("\n");
                    let mut at = i % (joined.len() + 1);
                    while !joined.is_char_boundary(at) {
                        at -= 1;
                    }
                    lines = joined[..at].lines().map(str::to_owned).collect();
                }
                _ => {}
            }
        }
        let mut out = lines.join("\n");
        out.push('\n');
        out
    }

    /// The dotted key of the assignment on 0-based line `i` of `text`, from the last header
    /// above it (`access.clients[N]` for the N-th `[[access.clients]]`).
    fn dotted_key_at(text: &str, i: usize) -> Option<String> {
        let lines: Vec<&str> = text.lines().collect();
        let key = lines[i][..assignment(lines[i])?].trim().to_owned();
        let header = lines[..i]
            .iter()
            .rev()
            .find_map(|l| header_name(l.trim_start()))?;
        Some(format!("{header}.{key}"))
    }

    proptest! {
        #[test]
        fn arbitrary_text(text in "\\PC{0,300}") {
            let _ = check(&text)?;
        }

        #[test]
        fn arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
            let _ = check(&String::from_utf8_lossy(&bytes))?;
        }

        #[test]
        fn toml_ish_lines(lines in prop::collection::vec(line(), 0..16)) {
            let _ = check(&lines.join("\n"))?;
        }

        #[test]
        fn mutated_shipped_config(mutations in prop::collection::vec(mutation(), 1..5)) {
            let _ = check(&apply(SHIPPED, &mutations))?;
        }

        /// A value of a type no key takes is refused naming that key and its line.
        #[test]
        fn a_wrongly_typed_value_names_its_key_and_line(
            i in any::<usize>(),
            bad in prop::sample::select(vec!["{ x = 1 }", "1979-05-27T07:32:00Z", "[{}]"]),
        ) {
            let candidates: Vec<usize> = SHIPPED
                .lines()
                .enumerate()
                .filter(|(_, l)| assignment(l).is_some())
                .map(|(k, _)| k)
                .collect();
            let k = candidates[i % candidates.len()];
            let text = apply(SHIPPED, &[Mutation::SetValue(k, bad.to_owned())]);
            let key = dotted_key_at(&text, k).unwrap();
            let e = check(&text)?.err();
            prop_assert!(e.is_some(), "{key} = {bad} accepted");
            let e = e.unwrap();
            prop_assert!(
                e.key.as_deref().is_some_and(|got| got == key || got.starts_with(&format!("{key}["))),
                "{key}: {e}"
            );
            prop_assert_eq!(e.line, Some(k + 1), "{}", e);
        }

        /// An unknown key is refused naming itself and its line.
        #[test]
        fn an_unknown_key_names_itself_and_its_line(i in any::<usize>(), name in "[a-z]{1,6}_x") {
            let candidates: Vec<usize> = SHIPPED
                .lines()
                .enumerate()
                .filter(|(_, l)| assignment(l).is_some())
                .map(|(k, _)| k)
                .collect();
            let k = candidates[i % candidates.len()];
            let text = apply(SHIPPED, &[Mutation::RenameKey(k, name)]);
            let key = dotted_key_at(&text, k).unwrap();
            let e = check(&text)?.err();
            prop_assert!(e.is_some(), "{key} accepted");
            let e = e.unwrap();
            prop_assert_eq!(e.key.as_deref(), Some(key.as_str()), "{}", e);
            prop_assert_eq!(e.line, Some(k + 1), "{}", e);
        }

        /// Whatever parses, with the secret from the file or the environment, its summary
        /// never shows the secret.
        #[test]
        fn summary_never_shows_the_secret(
            mutations in prop::collection::vec(mutation(), 0..3),
            from_file in any::<bool>(),
        ) {
            let mut text = SHIPPED.to_owned();
            if from_file {
                text = text.replace("# client_secret_file = ", "client_secret_file = ");
            }
            let text = apply(&text, &mutations);
            if let Ok(c) = check(&text)? {
                let a = &c.providers.atlassian;
                if let Some(s) = &a.client_secret {
                    prop_assert_eq!(s.expose(), SECRET);
                }
                prop_assert!(!c.summary().contains(SECRET));
            }
        }
    }

    #[test]
    fn the_shipped_config_parses() {
        let c = parse(SHIPPED).unwrap();
        assert!(!c.summary().contains(SECRET));
        let text = SHIPPED.replace("# client_secret_file = ", "client_secret_file = ");
        let c = parse(&text).unwrap();
        assert!(matches!(
            c.providers.atlassian.client_secret_source,
            SecretSource::File(_)
        ));
        assert!(!c.summary().contains(SECRET));
    }
}
