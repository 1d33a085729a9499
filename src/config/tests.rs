//! Unit tests of `daemon.toml` on string literals: defaults, every refusal with its key and
//! line, paths, secrets, the summary.

use super::summary::format_duration;
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
    let e = parse_err("[jobs]\nresolve_sites = \"0 0 * * * *\"\nmaintenance = \"a b c d e f\"\n");
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
    let c = parse("[daemon]\nlog_level = \"info,tokend=debug\"\nmetrics_per_connection = false\n")
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

/// Every line comes from the parser's span of the value, whatever form the key is written
/// in: an inline table, a dotted key at top level, or text that only looks like a header.
#[test]
fn lines_come_from_the_parser_in_every_form() {
    // A bad value inside an inline table.
    let e = parse_err(
        "# tokend\n\nrefresh = { backoff_min = \"1s\", rotate_after = \"x\" }\n[daemon]\n",
    );
    assert_eq!(e.key.as_deref(), Some("refresh.rotate_after"), "{e}");
    assert_eq!(e.line, Some(3), "{e}");
    let e =
        parse_err("[providers]\natlassian = { client_id = \"a\",\n  token_url = \"ftp://x\" }\n");
    assert_eq!(
        e.key.as_deref(),
        Some("providers.atlassian.token_url"),
        "{e}"
    );
    assert_eq!(e.line, Some(3), "{e}");

    // A dotted key at top level, before any table.
    let e = parse_err("refresh.rotate_after = \"x\"\n[daemon]\nlog_format = \"text\"\n");
    assert_eq!(e.key.as_deref(), Some("refresh.rotate_after"), "{e}");
    assert_eq!(e.line, Some(1), "{e}");
    let e =
        parse_err("[providers]\natlassian.client_id = \"a\"\natlassian.token_url = \"ftp://x\"\n");
    assert_eq!(
        e.key.as_deref(),
        Some("providers.atlassian.token_url"),
        "{e}"
    );
    assert_eq!(e.line, Some(3), "{e}");

    // A header and the key repeated later for real: the first copies only sit inside a
    // multi-line string, which a scan of lines would take for the section.
    let text = "[notify]\ncommand = \"\"\"\n[refresh]\nrotate_after = \"bad\"\n\"\"\"\ntimeout = \"5s\"\n\n[refresh]\nbackoff_min = \"1s\"\nrotate_after = \"7 dayz\"\n";
    let e = parse_err(text);
    assert_eq!(e.key.as_deref(), Some("refresh.rotate_after"), "{e}");
    assert_eq!(e.line, Some(10), "{e}");

    // A key repeated under every `[[access.clients]]` header: the bad one is in the second.
    let text = "[[access.clients]]\nuid = 1\nconnections = [\"a\"]\n\n[[access.clients]]\nuid = 2\nconnections = [\"b\", \"\"]\n";
    let e = parse_err(text);
    assert_eq!(
        e.key.as_deref(),
        Some("access.clients[1].connections"),
        "{e}"
    );
    assert_eq!(e.line, Some(7), "{e}");

    // A value spread over lines points at where it starts, the line of its key.
    let e = parse_err("[providers.atlassian]\nscopes = [\n  \"read:me\",\n]\n");
    assert_eq!(e.key.as_deref(), Some("providers.atlassian.scopes"), "{e}");
    assert_eq!(e.line, Some(2), "{e}");

    // A key left at its default has no line to point at (the socket path is only too long
    // because of where the file is).
    let dir = format!("/{}", "d".repeat(100));
    let e = Config::parse("", &Path::new(&dir).join("daemon.toml"), &no_env, &no_file).unwrap_err();
    assert_eq!(e.key.as_deref(), Some("daemon.socket_path"), "{e}");
    assert_eq!(e.line, None, "{e}");
}

#[test]
fn ledger_defaults_to_sqlite_and_a_sixty_second_lease() {
    let c = parse("").unwrap();
    assert!(matches!(c.ledger.backend, LedgerBackend::Sqlite));
    assert!(!c.ledger.is_shared());
    assert_eq!(c.ledger.lease, Duration::from_secs(60));
    assert_eq!(c.refresh.lease, DEFAULT_LEASE);
    // A SQLite user's long request timeout is not measured against the (unused) lease.
    let c = parse("[refresh]\nrequest_timeout = \"2m\"\n").unwrap();
    assert!(matches!(c.ledger.backend, LedgerBackend::Sqlite));
    assert!(
        c.summary()
            .contains("url = SQLite at /etc/tokend/state/ledger.db")
    );
}

#[test]
fn postgres_url_inline_is_kept_secret_and_masked() {
    let text = "[daemon]\nkey_file = \"/etc/tokend/ledger.key\"\n[ledger]\n\
                url = \"postgres://tokend:hunter2@db.example:5432/tokend?sslmode=verify-full\"\n";
    let c = parse(text).unwrap();
    assert!(c.ledger.is_shared());
    assert_eq!(
        c.ledger.postgres_url().unwrap().expose(),
        "postgres://tokend:hunter2@db.example:5432/tokend?sslmode=verify-full"
    );
    assert!(!format!("{c:?}").contains("hunter2"));
    let summary = c.summary();
    assert!(!summary.contains("hunter2"), "{summary}");
    assert!(
        summary.contains("url = postgres://tokend:***@db.example:5432/tokend?sslmode=verify-full"),
        "{summary}"
    );
    assert!(summary.contains("lease = 1m"), "{summary}");
    // `postgresql://` is the other spelling.
    let text = "[daemon]\nkey_file = \"k\"\n[ledger]\nurl = \"postgresql://h/db\"\n";
    assert!(parse(text).unwrap().ledger.is_shared());
}

#[test]
fn masked_url_hides_a_password_in_the_query_too() {
    let m = masked_url("postgres://u@h/db?password=hunter2&sslmode=require");
    assert!(!m.contains("hunter2"), "{m}");
    assert!(m.contains("sslmode=require"), "{m}");
    assert_eq!(masked_url("postgres://u:p@h/db"), "postgres://u:***@h/db");
    assert_eq!(masked_url("hunter2"), "(not a URL)");
}

#[test]
fn postgres_url_from_file_is_read_and_never_printed() {
    let text = "[daemon]\nkey_file = \"/k\"\n[ledger]\nurl_file = \"pg.url\"\n";
    let read = |p: &Path| {
        assert_eq!(p, Path::new("/etc/tokend/pg.url"));
        Ok("postgres://u:hunter2@h/db\n".to_owned())
    };
    let c = Config::parse(text, Path::new("/etc/tokend/daemon.toml"), &no_env, &read).unwrap();
    assert_eq!(
        c.ledger.postgres_url().unwrap().expose(),
        "postgres://u:hunter2@h/db"
    );
    let summary = c.summary();
    assert!(!summary.contains("hunter2"), "{summary}");
    assert!(
        summary.contains("url = postgres://u:***@h/db (from file /etc/tokend/pg.url)"),
        "{summary}"
    );
    // A client never reads it.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("daemon.toml");
    std::fs::write(&path, text).unwrap();
    let c = Config::load_for_client(&path).unwrap();
    assert!(c.ledger.is_shared());
    assert!(c.ledger.postgres_url().is_none());
}

#[test]
fn bad_ledger_urls_name_key_and_line_without_quoting_the_url() {
    let e = parse("[daemon]\nkey_file = \"/k\"\n[ledger]\nurl = \"mysql://u:hunter2@h/db\"\n");
    let e = e.unwrap_err();
    assert_eq!(e.key.as_deref(), Some("ledger.url"));
    assert_eq!(e.line, Some(4));
    assert!(!e.to_string().contains("hunter2"), "{e}");
    assert!(e.message.contains("postgres://"), "{e}");

    let e = parse_err("[daemon]\nkey_file = \"/k\"\n[ledger]\nurl = \"hunter2\"\n");
    assert_eq!(e.key.as_deref(), Some("ledger.url"));
    assert!(!e.to_string().contains("hunter2"), "{e}");

    let read = |_: &Path| Ok("http://u:hunter2@h/db".to_owned());
    let text = "[daemon]\nkey_file = \"/k\"\n[ledger]\n\n url_file = \"/u\"\n";
    let e = Config::parse(text, Path::new("/etc/tokend/daemon.toml"), &no_env, &read).unwrap_err();
    assert_eq!(e.key.as_deref(), Some("ledger.url_file"));
    assert_eq!(e.line, Some(5));
    assert!(!e.to_string().contains("hunter2"), "{e}");

    let read = |_: &Path| Ok(" \n".to_owned());
    let e = Config::parse(text, Path::new("/etc/tokend/daemon.toml"), &no_env, &read).unwrap_err();
    assert!(e.message.contains("is empty"), "{e}");

    let read = |_: &Path| Err(io::Error::from(io::ErrorKind::PermissionDenied));
    let e = Config::parse(text, Path::new("/etc/tokend/daemon.toml"), &no_env, &read).unwrap_err();
    assert!(e.message.contains("cannot read ledger URL file /u"), "{e}");

    let e = parse_err("[ledger]\nurl = \"postgres://h/db\"\nurl_file = \"/u\"\n");
    assert_eq!(e.key.as_deref(), Some("ledger.url_file"));
    assert_eq!(e.line, Some(3));
}

#[test]
fn postgres_ledger_needs_an_explicit_key_file() {
    let e = parse_err("[ledger]\nurl = \"postgres://h/db\"\n");
    assert_eq!(e.key.as_deref(), Some("ledger.url"));
    assert_eq!(e.line, Some(2));
    assert!(e.message.contains("daemon.key_file"), "{e}");
    // An empty key_file is the default key file, not an explicit one.
    let e = parse_err("[daemon]\nkey_file = \"\"\n[ledger]\nurl = \"postgres://h/db\"\n");
    assert!(e.message.contains("daemon.key_file"), "{e}");
}

#[test]
fn lease_must_exceed_the_request_timeout() {
    let base = "[daemon]\nkey_file = \"/k\"\n[ledger]\nurl = \"postgres://h/db\"\n";
    let e = parse_err(&format!("{base}lease = \"30s\"\n"));
    assert_eq!(e.key.as_deref(), Some("ledger.lease"));
    assert_eq!(e.line, Some(5));
    assert!(e.message.contains("refresh.request_timeout (30s)"), "{e}");
    // Only the request timeout written: the error points at it.
    let e = parse_err(&format!("{base}[refresh]\nrequest_timeout = \"90s\"\n"));
    assert_eq!(e.key.as_deref(), Some("refresh.request_timeout"));
    assert_eq!(e.line, Some(6));
    let c = parse(&format!(
        "{base}lease = \"2s\"\n[refresh]\nrequest_timeout = \"1s\"\n"
    ))
    .unwrap();
    assert_eq!(c.ledger.lease, Duration::from_secs(2));
    assert_eq!(
        c.refresh.lease, c.ledger.lease,
        "the engine claims for ledger.lease"
    );
    let e = parse_err(&format!("{base}lease = \"0s\"\n"));
    assert_eq!(e.key.as_deref(), Some("ledger.lease"));
    let e = parse_err("[ledger]\nleases = \"1m\"\n");
    assert_eq!(e.key.as_deref(), Some("ledger.leases"));
}
