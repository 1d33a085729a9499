//! The documentation of every `daemon.toml` key, in one table ([`KEYS`]): its meaning, its
//! default and whether `SIGHUP` (`systemctl reload tokend`) applies it.
//!
//! This table is the one source of `daemon.toml(5)` ([`super::manual`]). The defaults are the
//! validator's own constants, not copies; tests check that the table names exactly the keys
//! the parser accepts (asked of the parser itself), that writing every documented default
//! gives the same configuration as an empty file, and that every key is in the page. A new
//! key is documented by one entry here, and the tests fail until it is.

use super::validate::{
    DEFAULT_ABSOLUTE_EXPIRY, DEFAULT_ACCESS_TOKEN_MARGIN, DEFAULT_API_URL, DEFAULT_AUTHORIZE_URL,
    DEFAULT_BACKOFF_MAX, DEFAULT_BACKOFF_MIN, DEFAULT_INACTIVITY_EXPIRY, DEFAULT_LEASE_TEXT,
    DEFAULT_LOG_FORMAT, DEFAULT_LOG_LEVEL, DEFAULT_MAINTENANCE_CRON, DEFAULT_MAX_CONCURRENT,
    DEFAULT_METRICS_LISTEN, DEFAULT_METRICS_PER_CONNECTION, DEFAULT_NOTIFY_TIMEOUT,
    DEFAULT_REDIRECT_URI, DEFAULT_REQUEST_TIMEOUT, DEFAULT_RESOLVE_SITES_CRON,
    DEFAULT_ROTATE_AFTER, DEFAULT_SCOPES, DEFAULT_SOCKET_MODE, DEFAULT_SOCKET_PATH,
    DEFAULT_STATE_DIR, DEFAULT_TOKEN_URL,
};

/// One key of `daemon.toml`.
#[derive(Clone, Copy, Debug)]
pub struct Key {
    /// Dotted name as in the file: `daemon.state_dir`; a key of an array of tables has `[]`
    /// after the array (`access.clients[].uid`).
    pub name: &'static str,
    /// What an absent key means.
    pub default: Default,
    /// Whether a reload applies a change of this key.
    pub reload: Reload,
    /// What the key does and why one would change it, for a sysadmin (plain text, one
    /// paragraph).
    pub doc: &'static str,
}

/// A key's default, as the TOML value it is equivalent to.
#[derive(Clone, Copy, Debug)]
pub enum Default {
    Str(&'static str),
    Int(i64),
    Bool(bool),
    /// An array of strings (an empty one for lists that default to none).
    Strs(&'static [&'static str]),
    /// An empty array of integers.
    NoInts,
    /// No default: the key belongs to an entry that names it or not (`[[access.clients]]`).
    Unset,
}

impl Default {
    /// The default as TOML text (`"15m"`, `8`, `["offline_access"]`); `None` for
    /// [`Default::Unset`].
    pub fn toml(&self) -> Option<String> {
        let value = match *self {
            Default::Str(s) => toml::Value::String(s.to_owned()),
            Default::Int(i) => toml::Value::Integer(i),
            Default::Bool(b) => toml::Value::Boolean(b),
            Default::Strs(list) => toml::Value::Array(
                list.iter()
                    .map(|s| toml::Value::String((*s).to_owned()))
                    .collect(),
            ),
            Default::NoInts => toml::Value::Array(Vec::new()),
            Default::Unset => return None,
        };
        Some(value.to_string())
    }
}

/// What `SIGHUP` does with a changed key (`daemon`'s reload; it logs the keys that need a
/// restart).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reload {
    /// Applied at once, without dropping the socket.
    Sighup,
    /// Read at start only: `systemctl restart tokend`.
    Restart,
}

impl Reload {
    /// How `daemon.toml(5)` says it.
    pub fn phrase(self) -> &'static str {
        match self {
            Reload::Sighup => "applied by SIGHUP (systemctl reload tokend)",
            Reload::Restart => "needs a restart",
        }
    }
}

/// A key whose default is a string.
const fn s(name: &'static str, default: &'static str, reload: Reload, doc: &'static str) -> Key {
    Key {
        name,
        default: Default::Str(default),
        reload,
        doc,
    }
}

/// A key with any default.
const fn k(name: &'static str, default: Default, reload: Reload, doc: &'static str) -> Key {
    Key {
        name,
        default,
        reload,
        doc,
    }
}

use Reload::{Restart, Sighup};

/// Every key of `daemon.toml`, in the order of the page (and of the shipped examples). The
/// tables are the prefixes before the last dot; the page has one section per table, in the
/// order of their first key.
pub const KEYS: &[Key] = &[
    // [daemon]
    s(
        "daemon.state_dir",
        DEFAULT_STATE_DIR,
        Restart,
        "Directory of the ledger (<state_dir>/ledger.db and its WAL files), the lock that \
         keeps a second daemon off it, and the generated ledger.key when key_file is empty. \
         Created 0700. The package uses /var/lib/tokend (StateDirectory= of the unit).",
    ),
    s(
        "daemon.socket_path",
        DEFAULT_SOCKET_PATH,
        Restart,
        "The Unix socket of the HTTP/JSON API that services and the tokend commands use. \
         Outside the private state_dir so that other users can reach it; a missing parent \
         is created 0755, and a parent that others could write to is refused. Under systemd \
         it must be the ListenStream= of tokend.socket (/run/tokend/tokend.sock).",
    ),
    s(
        "daemon.socket_mode",
        DEFAULT_SOCKET_MODE,
        Restart,
        "Permission bits of the socket file, an octal string up to \"0777\": who may connect \
         at all. What each peer may then do is decided by [access] from its uid and gid.",
    ),
    s(
        "daemon.metrics_listen",
        DEFAULT_METRICS_LISTEN,
        Restart,
        "IP:PORT serving /metrics (Prometheus), /healthz and /readyz. Keep it on loopback \
         unless a firewall guards it. \"\" disables the listener.",
    ),
    s(
        "daemon.log_format",
        DEFAULT_LOG_FORMAT,
        Restart,
        "\"text\" (journald adds the timestamps) or \"json\", one object per line for log \
         shippers.",
    ),
    s(
        "daemon.log_level",
        DEFAULT_LOG_LEVEL,
        Sighup,
        "Log filter in tracing's EnvFilter syntax, e.g. \"debug\" or \"info,tokend=debug\". \
         The environment variable RUST_LOG, when set, wins, and a reload then leaves the \
         level alone.",
    ),
    k(
        "daemon.metrics_per_connection",
        Default::Bool(DEFAULT_METRICS_PER_CONNECTION),
        Restart,
        "Export one series per connection (the connection label) beside the aggregates. Set \
         false for very large ledgers, where one series per connection would burden \
         Prometheus.",
    ),
    s(
        "daemon.key_file",
        "",
        Restart,
        "File holding the 32-byte key (64 hex digits) that seals every token in the ledger. \
         \"\" means <state_dir>/ledger.key, created 0600 on first start: then a copy of the \
         state directory includes the key. The package's unit loads /etc/tokend/ledger_key \
         as a systemd credential. Required with a PostgreSQL ledger (every daemon on one \
         ledger needs the same key). Losing the key loses every chain: back it up, apart \
         from the ledger's backups.",
    ),
    k(
        "daemon.old_key_files",
        Default::Strs(&[]),
        Restart,
        "Keys that still open rows: at start every row is re-sealed under key_file and the \
         log says when the old keys are no longer needed (key rotation).",
    ),
    s(
        "daemon.node_name",
        "",
        Restart,
        "This daemon's name in events and metrics, at most 64 printable characters. \"\" \
         means the host name. On a PostgreSQL ledger each daemon process adds a suffix of \
         its own (name#1a2b3c4d), the holder of its claims.",
    ),
    // [ledger]
    s(
        "ledger.url",
        "",
        Restart,
        "\"\" means SQLite at <state_dir>/ledger.db. A postgres:// or postgresql:// URL \
         (postgres://user@host:5432/db?sslmode=verify-full) means a PostgreSQL ledger that \
         several daemons share; sslmode and sslrootcert are honoured. The URL may hold a \
         password: prefer url_file. check-config masks it.",
    ),
    s(
        "ledger.url_file",
        "",
        Restart,
        "Read the ledger URL from this file instead (it may hold a password; a systemd \
         credential works). Not both url and url_file.",
    ),
    s(
        "ledger.lease",
        DEFAULT_LEASE_TEXT,
        Restart,
        "PostgreSQL: how long a daemon's claim on one chain's refresh lasts, by the \
         database's clock; renewed while an attempt runs. Must exceed \
         refresh.request_timeout. The site job's claims of a few connections last as long.",
    ),
    // [refresh]
    s(
        "refresh.access_token_margin",
        DEFAULT_ACCESS_TOKEN_MARGIN,
        Sighup,
        "Renew an access token this long before it expires, so that no caller gets one that \
         dies in flight; also the default min_valid of the token routes.",
    ),
    s(
        "refresh.rotate_after",
        DEFAULT_ROTATE_AFTER,
        Sighup,
        "Rotate any refresh token older than this, used or not, so that no chain comes near \
         the inactivity expiry. Must be shorter than inactivity_expiry.",
    ),
    s(
        "refresh.inactivity_expiry",
        DEFAULT_INACTIVITY_EXPIRY,
        Sighup,
        "The provider's inactivity expiry of a refresh token (Atlassian: 90 days): the \
         deadline shown by tokend list and exported as a metric.",
    ),
    s(
        "refresh.absolute_expiry",
        DEFAULT_ABSOLUTE_EXPIRY,
        Sighup,
        "Re-consent deadline counted from consent (Atlassian: 365 days); \"0s\" means none.",
    ),
    k(
        "refresh.max_concurrent",
        Default::Int(DEFAULT_MAX_CONCURRENT),
        Sighup,
        "Refreshes in flight across all connections, 1 to 1024: enough to catch up quickly \
         after downtime, few enough not to trip the provider's rate limits.",
    ),
    s(
        "refresh.request_timeout",
        DEFAULT_REQUEST_TIMEOUT,
        Restart,
        "Timeout of one HTTP request to the provider. The unit's TimeoutStopSec= leaves room \
         for one in-flight refresh to commit at stop.",
    ),
    s(
        "refresh.backoff_min",
        DEFAULT_BACKOFF_MIN,
        Sighup,
        "First retry delay after a transient failure; it doubles (with jitter) up to \
         backoff_max, and never retries before the provider's Retry-After.",
    ),
    s(
        "refresh.backoff_max",
        DEFAULT_BACKOFF_MAX,
        Sighup,
        "Longest retry delay: far below rotate_after, so that a long outage is retried often \
         enough.",
    ),
    // [jobs]
    s(
        "jobs.resolve_sites",
        DEFAULT_RESOLVE_SITES_CRON,
        Sighup,
        "Six-field cron schedule (seconds first, UTC) of the job that re-resolves the \
         accessible sites of every connection.",
    ),
    s(
        "jobs.maintenance",
        DEFAULT_MAINTENANCE_CRON,
        Sighup,
        "Six-field cron schedule (seconds first, UTC) of ledger housekeeping.",
    ),
    // [notify]
    s(
        "notify.command",
        "",
        Sighup,
        "Shell command (/bin/sh -c) run on lifecycle events (needs_reauth, recovered, \
         absolute_expiry_soon) with TOKEND_EVENT, TOKEND_CONNECTION, TOKEND_LABEL and \
         TOKEND_MESSAGE in its environment, never a secret; one at a time, inside the unit's \
         sandbox. \"\" means none.",
    ),
    s(
        "notify.timeout",
        DEFAULT_NOTIFY_TIMEOUT,
        Sighup,
        "A notify command still running after this long is killed, so events do not pile \
         up.",
    ),
    // [access]
    k(
        "access.admin_uids",
        Default::NoInts,
        Sighup,
        "Uids that may use the admin routes (import, connect, remove, refresh, events), in \
         addition to root and the daemon's own uid.",
    ),
    k(
        "access.admin_gids",
        Default::NoInts,
        Sighup,
        "Gids whose members (by the peer's primary gid) may use the admin routes.",
    ),
    k(
        "access.clients[].uid",
        Default::Unset,
        Sighup,
        "In an [[access.clients]] entry: the peer uid it applies to. Once any entry exists, a \
         non-admin peer matching none may read no token.",
    ),
    k(
        "access.clients[].gid",
        Default::Unset,
        Sighup,
        "In an [[access.clients]] entry: the peer gid it applies to (an entry needs a uid, a \
         gid or both).",
    ),
    k(
        "access.clients[].connections",
        Default::Strs(&[]),
        Sighup,
        "In an [[access.clients]] entry: the connection ids or labels whose tokens that peer \
         may read.",
    ),
    // [providers.atlassian]
    s(
        "providers.atlassian.client_id",
        "",
        Restart,
        "The client id of your OAuth 2.0 (3LO) app in the Atlassian developer console. \"\" \
         leaves the provider unconfigured: the daemon serves, and adding a connection says \
         what is missing.",
    ),
    s(
        "providers.atlassian.client_secret_file",
        "",
        Restart,
        "File holding the client secret (trailing whitespace trimmed); the secret itself \
         never sits in this file. The package's unit loads /etc/tokend/atlassian_client_secret \
         as the credential /run/credentials/tokend.service/atlassian_client_secret. \"\" \
         means the environment variable TOKEND_ATLASSIAN_CLIENT_SECRET.",
    ),
    k(
        "providers.atlassian.scopes",
        Default::Strs(DEFAULT_SCOPES),
        Restart,
        "Scopes asked for at consent; must contain offline_access (without it Atlassian \
         issues no refresh token). Add read:me so that tokend can tell which account a chain \
         belongs to.",
    ),
    s(
        "providers.atlassian.redirect_uri",
        DEFAULT_REDIRECT_URI,
        Restart,
        "The loopback callback of tokend connect; must match the app's registered callback \
         URL.",
    ),
    s(
        "providers.atlassian.authorize_url",
        DEFAULT_AUTHORIZE_URL,
        Restart,
        "Atlassian's authorization endpoint.",
    ),
    s(
        "providers.atlassian.token_url",
        DEFAULT_TOKEN_URL,
        Restart,
        "Atlassian's token endpoint (code exchange and refresh).",
    ),
    s(
        "providers.atlassian.api_url",
        DEFAULT_API_URL,
        Restart,
        "Atlassian's API gateway: accessible-resources, /me, and the base of the per-site \
         api_base_urls.",
    ),
];

/// The table part of a key's name (`providers.atlassian` of
/// `providers.atlassian.client_id`).
pub fn table_of(name: &str) -> &str {
    name.rsplit_once('.').map_or("", |(table, _)| table)
}

/// The key's own name within its table (`client_id`).
pub fn leaf_of(name: &str) -> &str {
    name.rsplit_once('.').map_or(name, |(_, leaf)| leaf)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::Config;
    use super::*;

    /// The config's validation error for `text`, with no secret look-ups.
    fn parse(text: &str) -> Result<Config, super::super::ConfigError> {
        Config::parse(text, Path::new("/probe/daemon.toml"), &|_| None, &|_| {
            Err(std::io::Error::other("no secret files in this test"))
        })
    }

    /// The field names the parser lists when it refuses the unknown key `__probe` in
    /// `header`'s table; `None` when it refuses the header for another reason (not a table).
    fn fields_of(header: &str) -> Option<Vec<String>> {
        let err = parse(&format!("{header}\n__probe = 1\n")).unwrap_err();
        let rest = err.message.strip_prefix("unknown field `__probe`")?;
        Some(
            rest.split('`')
                .skip(1)
                .step_by(2)
                .map(str::to_owned)
                .collect(),
        )
    }

    /// Every key the parser accepts, found by asking the parser (serde's `unknown field`
    /// message lists the fields of a table): nothing here is a hand-kept list.
    fn parser_keys(table: &str, out: &mut Vec<String>) {
        let header = if table.is_empty() {
            String::new()
        } else {
            format!("[{table}]")
        };
        let fields = fields_of(&header).unwrap_or_else(|| panic!("{table} is not a table"));
        for field in fields {
            let key = if table.is_empty() {
                field
            } else {
                format!("{table}.{field}")
            };
            if fields_of(&format!("[{key}]")).is_some() {
                parser_keys(&key, out);
            } else if let Some(entry_fields) = fields_of(&format!("[[{key}]]")) {
                out.extend(entry_fields.into_iter().map(|f| format!("{key}[].{f}")));
            } else {
                out.push(key);
            }
        }
    }

    #[test]
    fn the_table_documents_exactly_the_keys_the_parser_accepts() {
        let mut accepted = Vec::new();
        parser_keys("", &mut accepted);
        assert!(
            accepted.len() > 20,
            "the probe found too few keys: {accepted:?}"
        );
        let documented: Vec<&str> = KEYS.iter().map(|k| k.name).collect();
        let undocumented: Vec<&String> = accepted
            .iter()
            .filter(|k| !documented.contains(&k.as_str()))
            .collect();
        assert!(
            undocumented.is_empty(),
            "keys the parser accepts but config::keys::KEYS does not document (add an \
             entry: it is daemon.toml(5)): {undocumented:?}"
        );
        let unknown: Vec<&&str> = documented
            .iter()
            .filter(|k| !accepted.iter().any(|a| a == *k))
            .collect();
        assert!(
            unknown.is_empty(),
            "documented keys the parser refuses: {unknown:?}"
        );
        let mut names = documented.clone();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), KEYS.len(), "a key is documented twice");
    }

    #[test]
    fn the_documented_defaults_are_the_defaults() {
        // Every documented default written out, table by table, in the page's order.
        let mut text = String::new();
        let mut table = "";
        for key in KEYS {
            let Some(value) = key.default.toml() else {
                continue;
            };
            if key.name.contains("[]") {
                continue;
            }
            if table_of(key.name) != table {
                table = table_of(key.name);
                text.push_str(&format!("[{table}]\n"));
            }
            text.push_str(&format!("{} = {value}\n", leaf_of(key.name)));
        }
        let written = parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let empty = parse("").unwrap();
        assert_eq!(format!("{written:?}"), format!("{empty:?}"), "{text}");
    }

    #[test]
    fn reload_marks_follow_the_daemon() {
        // Spot checks against what `daemon`'s reload applies: paths, listeners and the
        // provider need a restart; schedules, limits, access and notify apply at once.
        let reload = |name: &str| KEYS.iter().find(|k| k.name == name).unwrap().reload;
        assert_eq!(reload("daemon.state_dir"), Reload::Restart);
        assert_eq!(reload("daemon.log_level"), Reload::Sighup);
        assert_eq!(reload("refresh.request_timeout"), Reload::Restart);
        assert_eq!(reload("refresh.max_concurrent"), Reload::Sighup);
        assert_eq!(reload("jobs.maintenance"), Reload::Sighup);
        assert_eq!(reload("access.clients[].uid"), Reload::Sighup);
        assert_eq!(reload("providers.atlassian.token_url"), Reload::Restart);
    }
}
