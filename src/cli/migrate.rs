//! `tokend migrate-ledger --to URL | --to-file PATH`: with the daemon stopped, copies the
//! SQLite ledger of `daemon.state_dir` into an empty PostgreSQL ledger (`ledger::migrate`
//! does the copy and its checks), then prints the `daemon.toml` lines to use.
//!
//! The URL may hold a password: it is a [`Secret`] from the command line on, never printed
//! (the `daemon.toml` lines show [`PASSWORD_PLACEHOLDER`] in its place), and `--to-file`
//! reads it from a file, so that it is not on the command line (visible to other users in
//! the process list) at all. Exit codes: 0 copied and checked, 1 refused or failed
//! (nothing committed), 2 the URL is unusable, 64 a bad `--config`.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::{Failure, output};
use crate::config::Config;
use crate::ledger::migrate::{Copied, copy_to_postgres};
use crate::ledger::pg::{PASSWORD_PLACEHOLDER, with_password_placeholder};
use crate::secret::Secret;

/// Largest `--to-file` accepted: a URL is a line; anything near this is the wrong file.
const MAX_URL_FILE_BYTES: u64 = 16 * 1024;

/// A PostgreSQL URL from the command line: it may hold a password, so its `Debug` is
/// redacted. (Equality, for the command line's tests, compares the values.)
#[derive(Clone)]
pub struct LedgerUrl(Secret);

impl LedgerUrl {
    /// Wraps a URL as given.
    pub fn new(url: impl Into<String>) -> LedgerUrl {
        LedgerUrl(Secret::new(url.into()))
    }
}

impl std::fmt::Debug for LedgerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LedgerUrl([redacted])")
    }
}

impl PartialEq for LedgerUrl {
    fn eq(&self, other: &LedgerUrl) -> bool {
        self.0.expose() == other.0.expose()
    }
}

impl Eq for LedgerUrl {}

/// Where the target's URL comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MigrateTarget {
    /// `--to URL`.
    Url(LedgerUrl),
    /// `--to-file PATH`: a file holding the URL (surrounding whitespace ignored).
    File(PathBuf),
}

/// Runs the migration with `config`'s state directory and keys; the report goes to `out`,
/// a warning (a password on the command line) to `err`.
pub(super) fn run(
    config: &Config,
    target: MigrateTarget,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<(), Failure> {
    let (url, url_file) = match target {
        MigrateTarget::Url(LedgerUrl(url)) => {
            if with_password_placeholder(url.expose()).1 {
                let _ = writeln!(
                    err,
                    "tokend: warning: a password on the command line is visible to other users in the process list while this runs; --to-file PATH reads the URL from a file instead"
                );
            }
            (url, None)
        }
        MigrateTarget::File(path) => (read_url_file(&path)?, Some(absolute(&path))),
    };
    if url.expose().trim().is_empty() {
        return Err(Failure::usage("the target URL is empty"));
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::runtime(format!("cannot start the async runtime: {e}")))?;
    let copied = runtime
        .block_on(copy_to_postgres(
            &config.daemon.state_dir,
            &config.daemon.keys,
            url.expose().trim(),
        ))
        .map_err(|e| {
            let message = format!("migrate-ledger: {e}");
            if e.is_usage() {
                Failure::usage(message)
            } else {
                Failure::runtime(message)
            }
        })?;
    let setting = match url_file {
        Some(path) => UrlSetting::File(path),
        None => UrlSetting::Url(with_password_placeholder(url.expose()).0),
    };
    let key_configured = config.daemon.keys.key_file.is_some();
    output::emit(out, &report(&copied, &setting, key_configured))
}

/// Reads `--to-file`: the URL, trimmed. Never quotes the file's content.
fn read_url_file(path: &Path) -> Result<Secret, Failure> {
    use std::io::Read;
    let file = std::fs::File::open(path)
        .map_err(|e| Failure::runtime(format!("cannot read --to-file {}: {e}", path.display())))?;
    let mut text = String::new();
    file.take(MAX_URL_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| Failure::runtime(format!("cannot read --to-file {}: {e}", path.display())))?;
    let text = Secret::new(text);
    if text.expose().len() as u64 > MAX_URL_FILE_BYTES {
        return Err(Failure::usage(format!(
            "--to-file {} is larger than {MAX_URL_FILE_BYTES} bytes: it should hold one URL",
            path.display()
        )));
    }
    Ok(Secret::new(text.expose().trim()))
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// How the printed `[ledger]` section names the database.
enum UrlSetting {
    /// `url = "…"`, the password (if any) replaced by the placeholder.
    Url(String),
    /// `url_file = "…"`: the file given with `--to-file`.
    File(PathBuf),
}

/// What `migrate-ledger` prints: what was copied and checked, the `daemon.toml` lines, and
/// what became of the SQLite file.
fn report(copied: &Copied, setting: &UrlSetting, key_configured: bool) -> String {
    let plural =
        |n: usize, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
    let mut s = format!(
        "Copied the SQLite ledger {} into the PostgreSQL ledger, and checked the copy:\n",
        copied.source.display()
    );
    s += &format!(
        "  {}, {} ({} no longer accessible, kept), {}.\n",
        plural(copied.connections, "connection", "connections"),
        plural(copied.sites, "site", "sites"),
        copied.removed_sites,
        plural(copied.events, "event", "events"),
    );
    if copied.markers > 0 {
        s += &format!(
            "  {} an unfinished refresh attempt; the first daemon on the new ledger retries it.\n",
            plural(copied.markers, "chain has", "chains have"),
        );
    }
    s += "  Every row equals its SQLite original and every chain version is the same.\n";
    s += &format!(
        "  Every sealed token opens on the new ledger with {} (copied sealed, as they are).\n",
        copied.key_file.display()
    );
    s += "\nPut these lines in daemon.toml (of every daemon that is to use this ledger):\n\n";
    let key = toml_string(&copied.key_file.display().to_string());
    if key_configured {
        s += &format!(
            "# Keep [daemon] key_file pointing at this key ({key}) on every daemon of this ledger.\n"
        );
    } else {
        s += &format!(
            "[daemon]\nkey_file = {key}  # every daemon on this ledger needs a copy of this key\n\n"
        );
    }
    s += "[ledger]\n";
    match setting {
        UrlSetting::File(path) => {
            s += &format!("url_file = {}\n", toml_string(&path.display().to_string()));
        }
        UrlSetting::Url(url) if url.contains(PASSWORD_PLACEHOLDER) => {
            s += &format!(
                "url = {}\n# {PASSWORD_PLACEHOLDER} stands for the password. Better, keep the whole URL in a file\n# only tokend can read (mode 0600) and set url_file = \"/that/file\" instead of url.\n",
                toml_string(url)
            );
        }
        UrlSetting::Url(url) => s += &format!("url = {}\n", toml_string(url)),
    }
    s += &format!(
        "\nThen start tokend. The SQLite ledger is left untouched, as a backup of this moment:\n  {}\nNever start a daemon on it again once the PostgreSQL ledger is in use: both would spend the\nsame refresh tokens, and a token spent twice can revoke its whole chain at Atlassian.\n",
        copied.source.display()
    );
    s
}

/// `s` as a TOML basic string.
fn toml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
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

#[cfg(test)]
mod tests {
    use super::*;

    fn copied() -> Copied {
        Copied {
            source: "/var/lib/tokend/ledger.db".into(),
            key_file: "/var/lib/tokend/ledger.key".into(),
            connections: 2,
            markers: 1,
            sites: 3,
            removed_sites: 1,
            events: 1,
        }
    }

    #[test]
    fn the_report_gives_the_lines_to_use_without_the_password() {
        let (shown, had) = with_password_placeholder("postgres://tokend:hunter2@db/tokend");
        assert!(had);
        let text = report(&copied(), &UrlSetting::Url(shown), false);
        assert!(!text.contains("hunter2"), "{text}");
        assert!(
            text.contains("[ledger]\nurl = \"postgres://tokend:PASSWORD@db/tokend\"\n"),
            "{text}"
        );
        assert!(text.contains("url_file"), "suggests url_file: {text}");
        assert!(
            text.contains("[daemon]\nkey_file = \"/var/lib/tokend/ledger.key\""),
            "{text}"
        );
        assert!(
            text.contains("2 connections, 3 sites (1 no longer accessible, kept), 1 event."),
            "{text}"
        );
        assert!(
            text.contains("1 chain has an unfinished refresh attempt"),
            "{text}"
        );
        assert!(text.contains("left untouched, as a backup"), "{text}");

        let text = report(
            &copied(),
            &UrlSetting::File("/etc/tokend/ledger-url".into()),
            true,
        );
        assert!(
            text.contains("[ledger]\nurl_file = \"/etc/tokend/ledger-url\"\n"),
            "{text}"
        );
        assert!(
            !text.contains("[daemon]\n"),
            "key_file is already set: {text}"
        );
    }

    #[test]
    fn toml_strings_are_escaped() {
        assert_eq!(toml_string(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(toml_string("x\ny"), r#""x\u000Ay""#);
    }

    #[test]
    fn a_url_file_is_read_trimmed_and_a_missing_one_is_exit_1() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("url");
        std::fs::write(&path, "  postgres://u:pw@h/db\n").unwrap();
        assert_eq!(
            read_url_file(&path).unwrap().expose(),
            "postgres://u:pw@h/db"
        );
        let failure = read_url_file(&dir.path().join("missing")).unwrap_err();
        assert_eq!(failure.code, super::super::EXIT_RUNTIME);
        assert!(failure.message.contains("missing"), "{}", failure.message);
        assert_eq!(
            format!("{:?}", LedgerUrl::new("postgres://u:pw@h/db")),
            "LedgerUrl([redacted])"
        );
    }
}
