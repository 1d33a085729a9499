//! Pass 2: the raw structs into a [`Config`]: defaults applied, every string turned into
//! its real type, and every bad value a [`ConfigError`] naming the file, the key and its line.

use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use url::Url;

use toml::Spanned;

use super::raw::{
    At, RawAccess, RawAtlassian, RawConfig, RawDaemon, RawJobs, RawLedger, RawNotify, RawRefresh,
    line_of_offset,
};
use super::summary::format_duration;
use super::{
    AccessConfig, AtlassianConfig, CLIENT_SECRET_ENV, ClientAccess, Config, ConfigError, CronExpr,
    DaemonConfig, JobsConfig, LedgerBackend, LedgerConfig, LedgerUrlSource, LogFormat,
    NotifyConfig, ProvidersConfig, RefreshConfig, SecretReaders, SecretSource, normalize,
};
use crate::model::JobKind;
use crate::secret::Secret;

// ---------------------------------------------------------------------------------------------
// Defaults (INTERFACE.md) and limits
// ---------------------------------------------------------------------------------------------

/// Default ledger directory, relative to the config file: the shipped config must run
/// without root, so nothing under `/var`.
pub(super) const DEFAULT_STATE_DIR: &str = "state";
/// Default socket path, relative to the config file and outside the private `state_dir` so
/// that other users can reach it.
pub(super) const DEFAULT_SOCKET_PATH: &str = "run/tokend.sock";
/// Default socket file mode: owner and group may connect, others may not.
pub(super) const DEFAULT_SOCKET_MODE: &str = "0660";
/// Default metrics listener: loopback only, the conventional port range of exporters.
pub(super) const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9464";
/// Default log format: journald and terminals read plain lines.
pub(super) const DEFAULT_LOG_FORMAT: &str = "text";
/// Per-connection series by default: a few hundred connections are cheap for Prometheus.
pub(super) const DEFAULT_METRICS_PER_CONNECTION: bool = true;
/// Default log filter: lifecycle events and warnings, without per-request noise.
pub(super) const DEFAULT_LOG_LEVEL: &str = "info";
/// Renew an access token this long before it expires, so a caller never gets one that dies
/// in flight.
pub(super) const DEFAULT_ACCESS_TOKEN_MARGIN: &str = "15m";
/// Rotate every refresh token at least this often, used or not, so that no chain comes
/// near the provider's inactivity expiry.
pub(super) const DEFAULT_ROTATE_AFTER: &str = "7d";
/// Atlassian's documented inactivity expiry of a refresh token.
pub(super) const DEFAULT_INACTIVITY_EXPIRY: &str = "90d";
/// Atlassian's documented absolute lifetime of a consent (re-consent deadline).
pub(super) const DEFAULT_ABSOLUTE_EXPIRY: &str = "365d";
/// Refreshes in flight across all connections: enough to catch up quickly after downtime,
/// few enough not to trip the provider's rate limits.
pub(super) const DEFAULT_MAX_CONCURRENT: i64 = 8;
/// Timeout of one HTTP request to the provider.
pub(super) const DEFAULT_REQUEST_TIMEOUT: &str = "30s";
/// First retry delay after a transient failure.
pub(super) const DEFAULT_BACKOFF_MIN: &str = "30s";
/// Longest retry delay: far below `rotate_after`, so a long outage is retried often enough.
pub(super) const DEFAULT_BACKOFF_MAX: &str = "30m";
/// Re-resolve accessible sites hourly, on the hour.
pub(super) const DEFAULT_RESOLVE_SITES_CRON: &str = "0 0 * * * *";
/// Ledger housekeeping daily at 03:30, a quiet hour.
pub(super) const DEFAULT_MAINTENANCE_CRON: &str = "0 30 3 * * *";
/// The URL schemes of a PostgreSQL ledger (both spellings libpq accepts).
const POSTGRES_SCHEMES: &[&str] = &["postgres", "postgresql"];
/// `ledger.lease`'s default as written in `daemon.toml` ([`super::DEFAULT_LEASE`]).
pub(super) const DEFAULT_LEASE_TEXT: &str = "60s";
/// A notify command that hangs is killed after this long, so events do not pile up.
pub(super) const DEFAULT_NOTIFY_TIMEOUT: &str = "10s";
/// `offline_access` is what makes Atlassian issue a refresh token at all.
pub(super) const DEFAULT_SCOPES: &[&str] = &["offline_access", "read:page:confluence"];
/// Loopback callback for `tokend connect`; must match the app's registered callback URL.
pub(super) const DEFAULT_REDIRECT_URI: &str = "http://localhost:8976/callback";
/// Atlassian's authorization endpoint (3LO).
pub(super) const DEFAULT_AUTHORIZE_URL: &str = "https://auth.atlassian.com/authorize";
/// Atlassian's token endpoint (code exchange and refresh).
pub(super) const DEFAULT_TOKEN_URL: &str = "https://auth.atlassian.com/oauth/token";
/// Atlassian's API gateway: accessible-resources, `/me`, and the per-site API base URLs.
pub(super) const DEFAULT_API_URL: &str = "https://api.atlassian.com";

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

/// The validation of one file: where errors point, and the base of relative paths.
pub(super) struct Validator<'a> {
    /// The text as parsed, to turn a value's span into its line.
    pub(super) text: &'a str,
    /// The config file as given by the caller, named in every error.
    pub(super) file: &'a Path,
    /// Directory of the config file (absolute); base of relative paths.
    pub(super) dir: &'a Path,
}

/// The span of a value as written; `None` when the key is absent (its default is used).
fn span<T>(value: &At<T>) -> Option<Range<usize>> {
    value.as_ref().map(Spanned::span)
}

/// The text of a value as written, or the default when the key is absent.
fn text_or<'v>(value: &'v At<String>, default: &'v str) -> &'v str {
    value.as_ref().map_or(default, |v| v.get_ref().as_str())
}

/// A duration key with its value as written and its default.
type DurationKey<'r> = (&'static str, &'r At<String>, &'static str);

/// The first error of `results` in order, or all their values.
fn all<T: Copy + Default, const N: usize>(
    results: [Result<T, ConfigError>; N],
) -> Result<[T; N], ConfigError> {
    let mut out = [T::default(); N];
    for (slot, result) in out.iter_mut().zip(results) {
        *slot = result?;
    }
    Ok(out)
}

impl Validator<'_> {
    /// An error at `key`, pointing at the line of the value `at` (from the parser's span),
    /// or at no line when the key was not written.
    fn err(&self, key: &str, at: Option<Range<usize>>, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.to_owned(),
            key: Some(key.to_owned()),
            line: at.map(|span| line_of_offset(self.text, span.start)),
            message: message.into(),
        }
    }

    pub(super) fn validate(
        &self,
        raw: RawConfig,
        path: PathBuf,
        secrets: Option<SecretReaders<'_>>,
    ) -> Result<Config, ConfigError> {
        let request_timeout_at = span(&raw.refresh.request_timeout);
        let key_file_written = raw
            .daemon
            .key_file
            .as_ref()
            .is_some_and(|k| !k.get_ref().trim().is_empty());
        let daemon = self.daemon(raw.daemon)?;
        let mut refresh = self.refresh(raw.refresh)?;
        let ledger = self.ledger(
            raw.ledger,
            secrets,
            &refresh,
            request_timeout_at,
            key_file_written,
        )?;
        // The engine claims chains for `ledger.lease` (a SQLite ledger grants every claim).
        refresh.lease = ledger.lease;
        Ok(Config {
            path,
            daemon,
            refresh,
            ledger,
            jobs: self.jobs(raw.jobs)?,
            notify: self.notify(raw.notify)?,
            access: self.access(raw.access)?,
            providers: ProvidersConfig {
                atlassian: self.atlassian(raw.providers.atlassian, secrets)?,
            },
        })
    }

    fn daemon(&self, raw: RawDaemon) -> Result<DaemonConfig, ConfigError> {
        let state_dir = self.path_or("daemon.state_dir", &raw.state_dir, DEFAULT_STATE_DIR)?;
        let socket_path =
            self.path_or("daemon.socket_path", &raw.socket_path, DEFAULT_SOCKET_PATH)?;
        let len = socket_path.as_os_str().len();
        if len > MAX_SOCKET_PATH_BYTES {
            return Err(self.err(
                "daemon.socket_path",
                span(&raw.socket_path),
                format!(
                    "socket path {} is {len} bytes long; Unix sockets allow at most \
                     {MAX_SOCKET_PATH_BYTES}",
                    socket_path.display()
                ),
            ));
        }

        let mode_text = text_or(&raw.socket_mode, DEFAULT_SOCKET_MODE);
        let socket_mode = parse_mode(mode_text).ok_or_else(|| {
            self.err(
                "daemon.socket_mode",
                span(&raw.socket_mode),
                format!(
                    "invalid socket mode {mode_text:?}: expected an octal string such as \
                         \"0660\", at most \"0777\""
                ),
            )
        })?;

        let listen = text_or(&raw.metrics_listen, DEFAULT_METRICS_LISTEN).trim();
        let metrics_listen = if listen.is_empty() {
            None
        } else {
            Some(listen.parse::<SocketAddr>().map_err(|e| {
                self.err(
                    "daemon.metrics_listen",
                    span(&raw.metrics_listen),
                    format!(
                        "invalid listen address {listen:?}: {e}; expected IP:PORT such as \
                         \"127.0.0.1:9464\" or \"[::1]:9464\", or \"\" to disable metrics"
                    ),
                )
            })?)
        };

        let log_format = match text_or(&raw.log_format, DEFAULT_LOG_FORMAT) {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(self.err(
                    "daemon.log_format",
                    span(&raw.log_format),
                    format!("invalid log format {other:?}: expected \"text\" or \"json\""),
                ));
            }
        };

        let log_level = text_or(&raw.log_level, DEFAULT_LOG_LEVEL).to_owned();
        if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&log_level) {
            return Err(self.err(
                "daemon.log_level",
                span(&raw.log_level),
                format!(
                    "invalid log level {log_level:?}: {e}; expected e.g. \"info\", \"debug\" or \"info,tokend=debug\""
                ),
            ));
        }

        let key_file = match raw.key_file.as_ref() {
            Some(p) if !p.get_ref().trim().is_empty() => {
                Some(self.path("daemon.key_file", p.get_ref().trim(), Some(p.span()))?)
            }
            _ => None,
        };
        let old_key_files = raw
            .old_key_files
            .as_ref()
            .map_or(&[][..], |list| list.get_ref().as_slice())
            .iter()
            .map(|p| self.path("daemon.old_key_files", p.get_ref(), Some(p.span())))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(k) = &key_file
            && let Some(at) = old_key_files.iter().position(|old| old == k)
        {
            let at = raw
                .old_key_files
                .as_ref()
                .and_then(|list| list.get_ref().get(at))
                .map(Spanned::span);
            return Err(self.err(
                "daemon.old_key_files",
                at,
                format!(
                    "{} is daemon.key_file itself; list only the keys it replaces",
                    k.display()
                ),
            ));
        }

        let node_name = match raw.node_name.as_ref() {
            None => None,
            Some(n) => match n.get_ref().trim() {
                "" => None,
                t if t.len() > 64 || t.chars().any(char::is_control) => {
                    return Err(self.err(
                        "daemon.node_name",
                        Some(n.span()),
                        "a node name is at most 64 printable characters",
                    ));
                }
                t => Some(t.to_owned()),
            },
        };

        Ok(DaemonConfig {
            state_dir,
            socket_path,
            socket_mode,
            metrics_listen,
            log_format,
            log_level,
            metrics_per_connection: raw
                .metrics_per_connection
                .unwrap_or(DEFAULT_METRICS_PER_CONNECTION),
            keys: crate::ledger::seal::KeySource {
                key_file,
                old_key_files,
            },
            node_name,
        })
    }

    fn refresh(&self, raw: RawRefresh) -> Result<RefreshConfig, ConfigError> {
        // Every duration of `[refresh]` that must be > 0, validated the same way.
        let keys: [DurationKey<'_>; 6] = [
            (
                "refresh.access_token_margin",
                &raw.access_token_margin,
                DEFAULT_ACCESS_TOKEN_MARGIN,
            ),
            (
                "refresh.rotate_after",
                &raw.rotate_after,
                DEFAULT_ROTATE_AFTER,
            ),
            (
                "refresh.inactivity_expiry",
                &raw.inactivity_expiry,
                DEFAULT_INACTIVITY_EXPIRY,
            ),
            (
                "refresh.request_timeout",
                &raw.request_timeout,
                DEFAULT_REQUEST_TIMEOUT,
            ),
            ("refresh.backoff_min", &raw.backoff_min, DEFAULT_BACKOFF_MIN),
            ("refresh.backoff_max", &raw.backoff_max, DEFAULT_BACKOFF_MAX),
        ];
        let [
            access_token_margin,
            rotate_after,
            inactivity_expiry,
            request_timeout,
            backoff_min,
            backoff_max,
        ] = all(keys.map(|(key, value, default)| self.duration(key, value, default)))?;
        let absolute_expiry = self.duration_or_zero(
            "refresh.absolute_expiry",
            &raw.absolute_expiry,
            DEFAULT_ABSOLUTE_EXPIRY,
        )?;

        let max = raw
            .max_concurrent
            .as_ref()
            .map_or(DEFAULT_MAX_CONCURRENT, |m| *m.get_ref());
        if !(1..=MAX_CONCURRENT_CAP).contains(&max) {
            return Err(self.err(
                "refresh.max_concurrent",
                span(&raw.max_concurrent),
                format!("must be between 1 and {MAX_CONCURRENT_CAP}, got {max}"),
            ));
        }
        // In range 1..=1024, so the conversion cannot fail.
        let max_concurrent = usize::try_from(max).unwrap_or(1);

        if backoff_min > backoff_max {
            // Point at whichever of the two the user wrote.
            let (key, at) = if raw.backoff_min.is_some() || raw.backoff_max.is_none() {
                ("refresh.backoff_min", span(&raw.backoff_min))
            } else {
                ("refresh.backoff_max", span(&raw.backoff_max))
            };
            return Err(self.err(
                key,
                at,
                format!(
                    "backoff_min ({}) must not exceed backoff_max ({})",
                    format_duration(backoff_min),
                    format_duration(backoff_max)
                ),
            ));
        }
        if rotate_after >= inactivity_expiry {
            let (key, at) = if raw.rotate_after.is_some() || raw.inactivity_expiry.is_none() {
                ("refresh.rotate_after", span(&raw.rotate_after))
            } else {
                ("refresh.inactivity_expiry", span(&raw.inactivity_expiry))
            };
            return Err(self.err(
                key,
                at,
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
            lease: super::DEFAULT_LEASE,
        })
    }

    /// `[ledger]`: SQLite unless a PostgreSQL URL is given (in the file or in `url_file`);
    /// a PostgreSQL ledger needs an explicit `daemon.key_file` (every daemon on it must
    /// seal with the same key) and a lease longer than `refresh.request_timeout`.
    fn ledger(
        &self,
        raw: RawLedger,
        secrets: Option<SecretReaders<'_>>,
        refresh: &RefreshConfig,
        request_timeout_at: Option<Range<usize>>,
        key_file_written: bool,
    ) -> Result<LedgerConfig, ConfigError> {
        let lease = self.duration("ledger.lease", &raw.lease, DEFAULT_LEASE_TEXT)?;
        let url_at = span(&raw.url);
        let url_text = text_or(&raw.url, "").trim();
        let file_at = span(&raw.url_file);
        let file_text = text_or(&raw.url_file, "").trim();
        let backend = match (url_text.is_empty(), file_text.is_empty()) {
            (true, true) => LedgerBackend::Sqlite,
            (false, false) => {
                return Err(self.err(
                    "ledger.url_file",
                    file_at,
                    "set either ledger.url or ledger.url_file, not both",
                ));
            }
            (false, true) => {
                self.postgres_url("ledger.url", url_at.clone(), url_text)?;
                LedgerBackend::Postgres {
                    url: Some(Secret::new(url_text)),
                    source: LedgerUrlSource::Inline,
                }
            }
            (true, false) => {
                let file = self.path("ledger.url_file", file_text, file_at.clone())?;
                let url = match secrets {
                    None => None,
                    Some(readers) => {
                        let content = (readers.read_file)(&file).map_err(|e| {
                            self.err(
                                "ledger.url_file",
                                file_at.clone(),
                                format!("cannot read ledger URL file {}: {e}", file.display()),
                            )
                        })?;
                        let url = content.trim();
                        if url.is_empty() {
                            return Err(self.err(
                                "ledger.url_file",
                                file_at,
                                format!("ledger URL file {} is empty", file.display()),
                            ));
                        }
                        self.postgres_url("ledger.url_file", file_at.clone(), url)?;
                        Some(Secret::new(url))
                    }
                };
                LedgerBackend::Postgres {
                    url,
                    source: LedgerUrlSource::File(file),
                }
            }
        };
        if matches!(backend, LedgerBackend::Postgres { .. }) {
            if !key_file_written {
                let (key, at) = if url_at.is_some() {
                    ("ledger.url", url_at)
                } else {
                    ("ledger.url_file", file_at)
                };
                return Err(self.err(
                    key,
                    at,
                    "a PostgreSQL ledger needs daemon.key_file: every daemon on one ledger                      seals tokens with the same key, so give each of them a copy of one key                      file (64 hex digits; a SQLite daemon's is <state_dir>/ledger.key)",
                ));
            }
            if lease <= refresh.request_timeout {
                let (key, at) = if raw.lease.is_some() || request_timeout_at.is_none() {
                    ("ledger.lease", span(&raw.lease))
                } else {
                    ("refresh.request_timeout", request_timeout_at)
                };
                return Err(self.err(
                    key,
                    at,
                    format!(
                        "ledger.lease ({}) must exceed refresh.request_timeout ({}): a claim \
                         must outlive a refresh request in flight",
                        format_duration(lease),
                        format_duration(refresh.request_timeout)
                    ),
                ));
            }
        }
        Ok(LedgerConfig { backend, lease })
    }

    /// Checks that `text` is a PostgreSQL URL; the error never quotes it (it may hold a
    /// password).
    fn postgres_url(
        &self,
        key: &str,
        at: Option<Range<usize>>,
        text: &str,
    ) -> Result<(), ConfigError> {
        match Url::parse(text) {
            Ok(u) if POSTGRES_SCHEMES.contains(&u.scheme()) => Ok(()),
            Ok(u) => Err(self.err(
                key,
                at,
                format!(
                    "the ledger URL's scheme is {:?}: expected postgres:// or postgresql:// \
                     (or \"\" for the SQLite ledger in state_dir)",
                    u.scheme()
                ),
            )),
            Err(e) => Err(self.err(
                key,
                at,
                format!(
                    "not a URL ({e}): expected e.g. \
                     \"postgres://tokend@db.example:5432/tokend?sslmode=verify-full\""
                ),
            )),
        }
    }

    fn jobs(&self, raw: RawJobs) -> Result<JobsConfig, ConfigError> {
        let cron = |kind: JobKind, value: &At<String>, default: &str| {
            CronExpr::parse(text_or(value, default))
                .map_err(|m| self.err(&format!("jobs.{}", kind.name()), span(value), m))
        };
        Ok(JobsConfig {
            resolve_sites: cron(
                JobKind::ResolveSites,
                &raw.resolve_sites,
                DEFAULT_RESOLVE_SITES_CRON,
            )?,
            maintenance: cron(
                JobKind::Maintenance,
                &raw.maintenance,
                DEFAULT_MAINTENANCE_CRON,
            )?,
        })
    }

    fn notify(&self, raw: RawNotify) -> Result<NotifyConfig, ConfigError> {
        let command = raw.command.filter(|c| !c.trim().is_empty());
        let timeout = self.duration("notify.timeout", &raw.timeout, DEFAULT_NOTIFY_TIMEOUT)?;
        Ok(NotifyConfig { command, timeout })
    }

    fn access(&self, raw: RawAccess) -> Result<AccessConfig, ConfigError> {
        let mut clients = Vec::with_capacity(raw.clients.len());
        for (i, entry) in raw.clients.into_iter().enumerate() {
            let entry_at = entry.span();
            let c = entry.into_inner();
            if c.uid.is_none() && c.gid.is_none() {
                return Err(self.err(
                    &format!("access.clients[{i}]"),
                    Some(entry_at),
                    "an [[access.clients]] entry needs a uid or a gid (or both)",
                ));
            }
            let connections_at = span(&c.connections);
            let connections = c.connections.map(Spanned::into_inner).unwrap_or_default();
            if let Some(j) = connections.iter().position(|n| n.trim().is_empty()) {
                return Err(self.err(
                    &format!("access.clients[{i}].connections"),
                    connections_at,
                    format!("entry {j} is empty: expected a connection id or label"),
                ));
            }
            clients.push(ClientAccess {
                uid: c.uid,
                gid: c.gid,
                connections,
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
        let client_id = text_or(&raw.client_id, "").to_owned();
        if client_id.chars().any(char::is_whitespace) {
            return Err(self.err(
                &format!("{P}.client_id"),
                span(&raw.client_id),
                "must not contain whitespace (check for a stray space or newline when pasting)",
            ));
        }

        let scopes_at = span(&raw.scopes);
        let scopes = match raw.scopes {
            Some(s) => s.into_inner(),
            None => DEFAULT_SCOPES.iter().map(|s| (*s).to_owned()).collect(),
        };
        if let Some(bad) = scopes
            .iter()
            .find(|s| s.is_empty() || s.chars().any(char::is_whitespace))
        {
            return Err(self.err(
                &format!("{P}.scopes"),
                scopes_at,
                format!("invalid scope {bad:?}: scopes are non-empty and contain no whitespace"),
            ));
        }
        if !scopes.iter().any(|s| s == REQUIRED_SCOPE) {
            return Err(self.err(
                &format!("{P}.scopes"),
                scopes_at,
                format!(
                    "must contain {REQUIRED_SCOPE:?}: without it Atlassian issues no refresh \
                     token"
                ),
            ));
        }

        let url = |key: &str, value: &At<String>, default: &str| {
            let key = format!("{P}.{key}");
            let text = text_or(value, default);
            let url = Url::parse(text.trim())
                .map_err(|e| self.err(&key, span(value), format!("invalid URL {text:?}: {e}")))?;
            if !matches!(url.scheme(), "http" | "https") {
                return Err(self.err(
                    &key,
                    span(value),
                    format!("invalid URL {text:?}: scheme must be http or https"),
                ));
            }
            Ok(url)
        };
        let redirect_uri = url("redirect_uri", &raw.redirect_uri, DEFAULT_REDIRECT_URI)?;
        let authorize_url = url("authorize_url", &raw.authorize_url, DEFAULT_AUTHORIZE_URL)?;
        let token_url = url("token_url", &raw.token_url, DEFAULT_TOKEN_URL)?;
        let api_url = url("api_url", &raw.api_url, DEFAULT_API_URL)?;

        let file_key = format!("{P}.client_secret_file");
        let file_at = span(&raw.client_secret_file);
        let secret_file = match text_or(&raw.client_secret_file, "") {
            "" => None,
            p => Some(self.path(&file_key, p, file_at.clone())?),
        };
        let (client_secret, client_secret_source) = match (secret_file, secrets) {
            (Some(file), Some(readers)) => {
                let content = (readers.read_file)(&file).map_err(|e| {
                    self.err(
                        &file_key,
                        file_at.clone(),
                        format!("cannot read client secret file {}: {e}", file.display()),
                    )
                })?;
                let value = content.trim_end();
                if value.is_empty() {
                    return Err(self.err(
                        &file_key,
                        file_at,
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

    /// A path key as written, or its default.
    fn path_or(
        &self,
        key: &str,
        value: &At<String>,
        default: &str,
    ) -> Result<PathBuf, ConfigError> {
        self.path(key, text_or(value, default), span(value))
    }

    /// A path from the file: non-empty, no `~`, relative ones joined to the config directory.
    fn path(
        &self,
        key: &str,
        value: &str,
        at: Option<Range<usize>>,
    ) -> Result<PathBuf, ConfigError> {
        if value.trim().is_empty() {
            return Err(self.err(key, at, "must not be empty"));
        }
        if value.starts_with('~') {
            return Err(self.err(
                key,
                at,
                format!("{value:?}: `~` is not expanded; write an absolute path"),
            ));
        }
        Ok(normalize(&self.dir.join(value)))
    }

    /// A duration > 0 and ≤ [`MAX_DURATION`].
    fn duration(
        &self,
        key: &str,
        value: &At<String>,
        default: &str,
    ) -> Result<Duration, ConfigError> {
        match self.duration_or_zero(key, value, default)? {
            Some(d) => Ok(d),
            None => Err(self.err(key, span(value), "must be greater than zero")),
        }
    }

    /// A duration ≤ [`MAX_DURATION`]; `None` for zero.
    fn duration_or_zero(
        &self,
        key: &str,
        value: &At<String>,
        default: &str,
    ) -> Result<Option<Duration>, ConfigError> {
        let text = text_or(value, default);
        let d = humantime::parse_duration(text.trim()).map_err(|e| {
            self.err(
                key,
                span(value),
                format!("invalid duration {text:?}: {e} (examples: \"90s\", \"15m\", \"7d\")"),
            )
        })?;
        if d > MAX_DURATION {
            return Err(self.err(
                key,
                span(value),
                format!("duration {text:?} is too long (at most 100 years)"),
            ));
        }
        Ok((!d.is_zero()).then_some(d))
    }
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
