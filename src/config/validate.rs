//! Pass 2: the raw structs into a [`Config`]: defaults applied, every string turned into
//! its real type, and every bad value a [`ConfigError`] naming the file, the key and its line.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use url::Url;

use super::raw::{RawAccess, RawAtlassian, RawConfig, RawDaemon, RawJobs, RawNotify, RawRefresh};
use super::summary::format_duration;
use super::{
    AccessConfig, AtlassianConfig, CLIENT_SECRET_ENV, ClientAccess, Config, ConfigError, CronExpr,
    DaemonConfig, JobsConfig, LogFormat, NotifyConfig, ProvidersConfig, RefreshConfig,
    SecretReaders, SecretSource, normalize,
};
use crate::secret::Secret;

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

// ---------------------------------------------------------------------------------------------
// Line lookup for validation errors
// ---------------------------------------------------------------------------------------------

/// Line of a dotted key such as `refresh.rotate_after` or `access.clients[1].uid`.
pub(super) fn locate_dotted(text: &str, dotted: &str) -> Option<usize> {
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
pub(super) fn header_name(t: &str) -> Option<String> {
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

pub(super) struct Validator<'a> {
    pub(super) text: &'a str,
    pub(super) file: &'a Path,
    /// Directory of the config file (absolute); base of relative paths.
    pub(super) dir: &'a Path,
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

    pub(super) fn validate(
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
