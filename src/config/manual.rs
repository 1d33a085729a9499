//! `daemon.toml(5)`: the man page of the configuration file, rendered in roff from
//! [`super::keys::KEYS`] (every key, its default, whether SIGHUP applies it) and the
//! conventions this module's documentation states. `tokend man-pages DIR` writes it; the
//! Debian package installs it.

use super::keys::{KEYS, Key, leaf_of, table_of};
use super::{CLIENT_SECRET_ENV, CRON_FIELDS};

/// The page, for `version` (shown in the footer). No date: the same source renders the same
/// page (reproducible packages).
pub fn page(version: &str) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        ".TH DAEMON.TOML 5 \"\" \"tokend {}\" \"File Formats\"\n",
        escape(version)
    ));
    out.push_str(".SH NAME\ndaemon.toml \\- configuration file of tokend\n");
    out.push_str(".SH SYNOPSIS\n.B /etc/tokend/daemon.toml\n");
    section(
        &mut out,
        "DESCRIPTION",
        &[
            "tokend(1) reads its configuration from the TOML file named by --config (or the \
             environment variable TOKEND_CONFIG); the package installs /etc/tokend/daemon.toml \
             (0640 root:tokend), which its systemd unit passes.",
            "Every table and key is optional: an empty file is a valid configuration, and an \
             absent key takes the default shown below (the built-in one, made to run without root; the \
             package's file sets the paths its systemd units use). An unknown key is an error. tokend \
             check-config validates the file and prints the effective configuration with \
             secrets masked; a bad file exits 64 with the file, key and line.",
            &format!(
                "Durations are humane strings such as \"90s\", \"15m\" or \"7d\". Cron \
                 schedules have {CRON_FIELDS} fields (second minute hour day-of-month month \
                 day-of-week), in UTC."
            ),
            "Relative paths are resolved against the directory of this file, not the working \
             directory; ~ is not expanded.",
        ],
    );
    section(
        &mut out,
        "SECRETS",
        &[&format!(
            "No secret sits in this file. The Atlassian client secret comes from \
             providers.atlassian.client_secret_file or the environment variable \
             {CLIENT_SECRET_ENV}; the ledger key from daemon.key_file. Their values never \
             appear in logs, errors or check-config's output."
        )],
    );
    section(
        &mut out,
        "RELOADING",
        &[
            "systemctl reload tokend runs check-config, then sends SIGHUP: a valid file's keys \
             marked \"applied by SIGHUP\" take effect at once without dropping the socket; an \
             invalid file is logged and the running configuration kept. A changed key marked \
             \"needs a restart\" is named in a warning in the log and applies at the next \
             systemctl restart tokend.",
        ],
    );

    let mut tables: Vec<&str> = Vec::new();
    for key in KEYS {
        let table = table_of(key.name);
        if !tables.contains(&table) {
            tables.push(table);
        }
    }
    for table in tables {
        let heading = match table.split_once("[]") {
            Some((array, _)) => format!("[[{array}]]"),
            None => format!("[{table}]"),
        };
        out.push_str(&format!(".SH \"{}\"\n", escape(&heading)));
        for key in KEYS.iter().filter(|k| table_of(k.name) == table) {
            entry(&mut out, key);
        }
    }

    section(
        &mut out,
        "FILES",
        &[
            "/etc/tokend/daemon.toml: this file. /etc/tokend/atlassian_client_secret and \
             /etc/tokend/ledger_key: the credentials the unit loads (0600 root). \
             /var/lib/tokend: the ledger. /run/tokend/tokend.sock: the socket.",
        ],
    );
    out.push_str(".SH \"SEE ALSO\"\n\\fBtokend\\fR(1), \\fBsystemd.exec\\fR(5)\n");
    out
}

/// One key as a tagged paragraph: its name and default, then what it does and its reload.
fn entry(out: &mut String, key: &Key) {
    out.push_str(".TP\n");
    let leaf = leaf_of(key.name);
    match key.default.toml() {
        Some(default) => out.push_str(&format!(
            "\\fB{}\\fR = {}\n",
            escape(leaf),
            escape(&default)
        )),
        None => out.push_str(&format!("\\fB{}\\fR (no default)\n", escape(leaf))),
    }
    out.push_str(&format!("{}\n", text(key.doc)));
    out.push_str(&format!(
        ".br\n\\fI{}\\fR: {}.\n",
        escape(key.name),
        key.reload.phrase()
    ));
}

/// A section of plain paragraphs.
fn section(out: &mut String, title: &str, paragraphs: &[&str]) {
    out.push_str(&format!(".SH {title}\n"));
    for (i, p) in paragraphs.iter().enumerate() {
        if i > 0 {
            out.push_str(".PP\n");
        }
        out.push_str(&text(p));
        out.push('\n');
    }
}

/// Plain text as roff lines.
fn text(s: &str) -> String {
    escape(s)
}

/// Escapes text for roff: backslashes, and a `.` or `'` that would start a control line.
fn escape(s: &str) -> String {
    let s = s.replace('\\', "\\e").replace('-', "\\-");
    if s.starts_with('.') || s.starts_with('\'') {
        format!("\\&{s}")
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_is_in_the_page_with_its_default_and_its_reload() {
        let page = page("0.0.0");
        for key in KEYS {
            let name = format!("\\fI{}\\fR: {}.", escape(key.name), key.reload.phrase());
            assert!(
                page.contains(&name),
                "{} missing from daemon.toml(5)",
                key.name
            );
            let head = match key.default.toml() {
                Some(d) => format!("\\fB{}\\fR = {}\n", escape(leaf_of(key.name)), escape(&d)),
                None => format!("\\fB{}\\fR (no default)\n", escape(leaf_of(key.name))),
            };
            assert!(
                page.contains(&head),
                "{}: default missing: {head}",
                key.name
            );
        }
        assert!(page.contains(".SH \"[daemon]\""));
        assert!(page.contains(".SH \"[[access.clients]]\""));
        assert!(page.contains(".SH \"[providers.atlassian]\""));
        assert!(page.contains("have 6 fields"), "cron sentence");
        // No line a roff reader would take for a stray request.
        for line in page.lines() {
            if let Some(request) = line.strip_prefix('.') {
                let name = request.split_whitespace().next().unwrap_or("");
                assert!(
                    ["TH", "SH", "TP", "PP", "B", "br"].contains(&name),
                    "unexpected request: {line}"
                );
            }
        }
    }
}
