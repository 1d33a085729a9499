//! The markers [`TestDaemon`] writes into the daemon's output files before each start, and
//! the sections of output between them.

use super::TestDaemon;

/// The prefix of every marker line, so that a section ends at the next one.
const MARKER_PREFIX: &str = "===== tokend-it";

/// Written before the output of a [`TestDaemon::spawn_raw`] instance.
pub const EXTRA_MARKER: &str = "===== tokend-it: extra instance =====";

/// Written before the output of start number `n` (see [`TestDaemon::restart`]).
pub fn start_marker(n: usize) -> String {
    format!("{MARKER_PREFIX}: start #{n} =====")
}

/// Everything the last [`TestDaemon::spawn_raw`] instance printed (stdout, then stderr).
pub fn last_extra_output(d: &TestDaemon) -> String {
    let tail = |log: String| {
        log.rfind(EXTRA_MARKER)
            .map(|i| log[i + EXTRA_MARKER.len()..].to_string())
            .unwrap_or_default()
    };
    format!("{}{}", tail(d.stdout_log()), tail(d.stderr_log()))
}

/// What start number `n` printed, stdout then stderr.
pub fn start_output(d: &TestDaemon, n: usize) -> String {
    let marker = start_marker(n);
    let section = |log: String| {
        let Some(i) = log.find(&marker) else {
            return String::new();
        };
        let rest = &log[i + marker.len()..];
        let end = rest.find(MARKER_PREFIX).unwrap_or(rest.len());
        rest[..end].to_string()
    };
    format!("{}{}", section(d.stdout_log()), section(d.stderr_log()))
}

/// The daemon's stderr after the last marker.
pub fn last_run_stderr(d: &TestDaemon) -> String {
    let all = d.stderr_log();
    let start = all.rfind(MARKER_PREFIX).unwrap_or(0);
    all[start..].lines().skip(1).collect::<Vec<_>>().join("\n")
}
