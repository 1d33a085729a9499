//! The `tokend check-config` output: every key with its effective value, the client secret
//! only as where it came from.

use std::fmt;
use std::time::Duration;

use super::{
    CLIENT_SECRET_ENV, Config, LedgerBackend, LedgerUrlSource, LogFormat, SecretSource, masked_url,
};
use crate::model::JobKind;

impl Config {
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
        let _ = writeln!(s, "[ledger]");
        match &self.ledger.backend {
            LedgerBackend::Sqlite => {
                let _ = writeln!(
                    s,
                    "url = SQLite at {}",
                    d.state_dir.join("ledger.db").display()
                );
            }
            LedgerBackend::Postgres { url, source } => {
                let shown = url
                    .as_ref()
                    .map_or_else(|| "not read".to_owned(), |u| masked_url(u.expose()));
                match source {
                    LedgerUrlSource::Inline => {
                        let _ = writeln!(s, "url = {shown}");
                    }
                    LedgerUrlSource::File(p) => {
                        let _ = writeln!(s, "url = {shown} (from file {})", p.display());
                    }
                }
                let _ = writeln!(s, "lease = {}", dur(self.ledger.lease));
            }
        }
        let _ = writeln!(s);
        let _ = writeln!(s, "[jobs]");
        for kind in JobKind::ALL {
            let _ = writeln!(s, "{} = {}", kind.name(), self.jobs.schedule(kind));
        }
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

/// A duration the way a user writes it: in its largest exact unit (`"90d"`, `"15m"`,
/// `"500ms"`), falling back to humantime's mixed form (`"1h 30m 5s"`).
/// (`humantime::format_duration` alone renders `90d` as `2months 29days 2h 52m 48s`.)
pub(super) fn format_duration(d: Duration) -> String {
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
