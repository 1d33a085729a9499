//! The `tokend` command line: argument parsing (clap), exit codes, and every command.
//!
//! `run` and `check-config` load the full configuration; every other command is a client of
//! the running daemon's socket API (see [`crate::client`]) and only needs the socket path,
//! taken from `TOKEND_SOCKET` when set, else from `daemon.socket_path` of `--config`.
//!
//! Exit codes: 0 ok, 1 runtime failure, 2 usage error (clap's own), 64 bad configuration
//! (`EX_CONFIG` from sysexits.h). Errors go to stderr as `tokend: ...`. stdout carries only
//! the command's answer, so that `tokend token ID` prints the access token and nothing else;
//! no other command ever prints a token.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, BufRead, IsTerminal, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat};
use clap::builder::NonEmptyStringValueParser;
use clap::{ArgGroup, Parser, Subcommand};
use hyper::Method;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use url::{Host, Url};

use crate::client::{Client, ClientError, encode_component};
use crate::config::Config;
use crate::secret::Secret;

/// Runtime failure: the daemon refused, was unreachable, or the input was unusable.
const EXIT_RUNTIME: u8 = 1;
/// Bad configuration: `EX_CONFIG` from sysexits.h, what service managers and scripts expect.
const EXIT_CONFIG: u8 = 64;

/// The only provider tokend knows today; every `POST` names it explicitly so that the API
/// can grow others without changing meaning.
const PROVIDER: &str = "atlassian";
/// The label `connect` uses when none is given.
const DEFAULT_LABEL: &str = "atlassian";
/// How long `connect` waits for the browser's redirect (or a pasted URL). Consent may need a
/// login and a second factor, so minutes, not seconds; the daemon's `state` expires anyway.
const CALLBACK_TIMEOUT: Duration = Duration::from_secs(10 * 60);
/// How long one connection to the loopback callback listener may take to send its request
/// head, so that a stuck local client cannot hold it.
const CALLBACK_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest callback request head read. Atlassian's redirect is well under 2 KiB; the cap only
/// stops a local process from making us buffer without bound.
const MAX_CALLBACK_HEAD: usize = 16 * 1024;
/// Largest input accepted on stdin (a refresh token, a pasted URL). Atlassian refresh tokens
/// are a few hundred bytes; anything near this size is a mistake (e.g. a file piped in).
const MAX_STDIN_BYTES: u64 = 64 * 1024;

/// Help text shared by the client commands.
const SOCKET_HELP: &str = "\
This command talks to the running daemon over its Unix socket: `daemon.socket_path` from \
--config. If the environment variable TOKEND_SOCKET is set (and not empty), it names the \
socket instead and no configuration file is read.";

const AFTER_HELP: &str = "\
Every command but `run` and `check-config` is a client of the running daemon's socket: its \
path is `daemon.socket_path` from --config, unless the environment variable TOKEND_SOCKET \
is set (and not empty), which names the socket directly; then no configuration is read.

Exit codes: 0 ok, 1 runtime failure, 2 usage error, 64 bad configuration.";

/// The command line.
#[derive(Debug, Parser)]
#[command(
    name = "tokend",
    version,
    about = "Keeps Atlassian OAuth refresh-token chains alive and serves fresh access tokens over a Unix socket",
    after_help = AFTER_HELP
)]
pub struct Cli {
    /// The daemon's configuration file.
    #[arg(
        long,
        global = true,
        value_name = "PATH",
        env = "TOKEND_CONFIG",
        hide_env_values = true,
        default_value = "daemon.toml"
    )]
    pub config: PathBuf,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands, exactly those of INTERFACE.md.
#[derive(Debug, PartialEq, Eq, Subcommand)]
pub enum Command {
    /// Run the daemon in the foreground (what systemd starts).
    Run,
    /// Load and validate the configuration, print a summary with secrets masked, and exit.
    CheckConfig,
    /// Add a connection through browser consent: prints the authorize URL, takes the
    /// redirect on the loopback redirect_uri (or the pasted redirect URL on stdin), and has
    /// the daemon exchange the code.
    #[command(after_help = SOCKET_HELP)]
    Connect {
        /// A name for the connection, usable wherever an ID is expected.
        #[arg(long, value_name = "LABEL", default_value = DEFAULT_LABEL, value_parser = NonEmptyStringValueParser::new())]
        label: String,
        /// Do not open a browser nor listen for the redirect: read the redirect URL,
        /// pasted from the browser's address bar, on stdin.
        #[arg(long)]
        no_browser: bool,
    },
    /// Add a connection from an existing refresh token, read from stdin (never argv).
    #[command(after_help = SOCKET_HELP)]
    Import {
        /// A name for the connection, usable wherever an ID is expected.
        #[arg(long, value_name = "LABEL", value_parser = NonEmptyStringValueParser::new())]
        label: String,
    },
    /// List connections: status, account, sites, next rotation, inactivity deadline.
    #[command(after_help = SOCKET_HELP)]
    List {
        /// Print the API's JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one connection in full (never its tokens).
    #[command(after_help = SOCKET_HELP)]
    Show {
        /// Connection id or label.
        #[arg(value_name = "ID", value_parser = NonEmptyStringValueParser::new())]
        id: String,
        /// Print the API's JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Print a fresh access token on stdout, nothing else.
    #[command(
        after_help = SOCKET_HELP,
        group(ArgGroup::new("target").required(true).args(["id", "site"]))
    )]
    Token {
        /// Connection id or label.
        #[arg(value_name = "ID", value_parser = NonEmptyStringValueParser::new())]
        id: Option<String>,
        /// Instead of an ID: the site's host (e.g. example.atlassian.net) or cloud id; the
        /// active connection that reaches it is used.
        #[arg(long, value_name = "HOST", value_parser = NonEmptyStringValueParser::new())]
        site: Option<String>,
    },
    /// Rotate the connection's refresh token now.
    #[command(after_help = SOCKET_HELP)]
    Refresh {
        /// Connection id or label.
        #[arg(value_name = "ID", value_parser = NonEmptyStringValueParser::new())]
        id: String,
    },
    /// Forget the connection.
    #[command(after_help = SOCKET_HELP)]
    Remove {
        /// Connection id or label.
        #[arg(value_name = "ID", value_parser = NonEmptyStringValueParser::new())]
        id: String,
    },
    /// A connection's history, newest first, token reads included (admin).
    #[command(after_help = SOCKET_HELP)]
    Events {
        /// Connection id or label.
        #[arg(value_name = "ID", value_parser = NonEmptyStringValueParser::new())]
        id: String,
        /// Only events at or after this RFC 3339 time (e.g. 2026-01-02T03:04:05Z).
        #[arg(long, value_name = "T", value_parser = NonEmptyStringValueParser::new())]
        since: Option<String>,
        /// Print the API's JSON array.
        #[arg(long)]
        json: bool,
    },
}

/// Entry point of the binary.
/// `activated` is a listening socket systemd passed (socket activation), adopted by
/// `main.rs`: `tokend run` serves it instead of binding `daemon.socket_path`.
pub fn main(activated: Option<std::os::unix::net::UnixListener>) -> ExitCode {
    // Usage errors exit 2 (clap's default); --help and --version exit 0.
    let cli = Cli::parse();
    let env_socket = std::env::var_os("TOKEND_SOCKET")
        .filter(|s| !s.is_empty())
        .map(PathBuf::from);
    match run(cli, env_socket, activated) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            let _ = writeln!(io::stderr(), "tokend: {}", failure.message);
            ExitCode::from(failure.code)
        }
    }
}

/// A command's failure: the exit code and the message for stderr (without the `tokend: `).
#[derive(Debug)]
struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    fn runtime(message: impl Into<String>) -> Self {
        Failure {
            code: EXIT_RUNTIME,
            message: message.into(),
        }
    }

    fn config(message: impl Into<String>) -> Self {
        Failure {
            code: EXIT_CONFIG,
            message: message.into(),
        }
    }
}

impl From<ClientError> for Failure {
    fn from(err: ClientError) -> Self {
        Failure::runtime(err.to_string())
    }
}

fn run(
    cli: Cli,
    env_socket: Option<PathBuf>,
    activated: Option<std::os::unix::net::UnixListener>,
) -> Result<(), Failure> {
    match cli.command {
        Command::Run => {
            let config = Config::load(&cli.config).map_err(|e| Failure::config(e.to_string()))?;
            crate::daemon::main(config, activated).map_err(|e| Failure::runtime(format!("{e:#}")))
        }
        Command::CheckConfig => {
            let config = Config::load(&cli.config).map_err(|e| Failure::config(e.to_string()))?;
            let summary = config.summary();
            emit(
                &mut io::stdout().lock(),
                &format!("{}\nconfiguration OK\n", summary.trim_end()),
            )
        }
        command => {
            let socket = match env_socket {
                Some(socket) => socket,
                None => {
                    Config::load_for_client(&cli.config)
                        .map_err(|e| {
                            Failure::config(format!(
                                "{e} (point --config at the daemon's configuration file, \
                                 or set TOKEND_SOCKET to its socket path)"
                            ))
                        })?
                        .daemon
                        .socket_path
                }
            };
            let client = Client::new(socket);
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| Failure::runtime(format!("cannot start the async runtime: {e}")))?;
            runtime.block_on(client_command(command, &client, &mut io::stdout().lock()))
        }
    }
}

/// Writes `text` to the command's output; a closed stdout is a runtime failure, not a panic.
fn emit(out: &mut dyn Write, text: &str) -> Result<(), Failure> {
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| Failure::runtime(format!("cannot write to stdout: {e}")))
}

/// Runs one client command against the daemon, writing its answer to `out`.
async fn client_command(
    command: Command,
    client: &Client,
    out: &mut dyn Write,
) -> Result<(), Failure> {
    match command {
        Command::Run | Command::CheckConfig => unreachable!("not a client command"),
        Command::Connect { label, no_browser } => connect(client, &label, no_browser, out).await,
        Command::Import { label } => {
            let stdin = io::stdin();
            let interactive = stdin.is_terminal();
            if interactive {
                eprint!("Paste the refresh token for {label:?} and press Enter: ");
            }
            let token = read_refresh_token(&mut stdin.lock(), interactive)?;
            let body = json!({
                "provider": PROVIDER,
                "label": label,
                "refresh_token": token.expose(),
            });
            let resp = client
                .request(Method::POST, "/v1/connections", Some(body))
                .await?;
            let conn: ConnectionView = resp.json()?;
            emit(
                out,
                &format!("{}\n", added_summary("imported", resp.status, &conn)),
            )
        }
        Command::List { json } => {
            let resp = client.request(Method::GET, "/v1/connections", None).await?;
            if json {
                let value: Value = resp.json()?;
                return emit(out, &format!("{}\n", pretty(&value)));
            }
            let conns: Vec<ConnectionView> = resp.json()?;
            emit(out, &format_table(&conns))
        }
        Command::Show { id, json } => {
            let path = format!("/v1/connections/{}", encode_component(&id));
            let resp = client.request(Method::GET, &path, None).await?;
            if json {
                let value: Value = resp.json()?;
                return emit(out, &format!("{}\n", pretty(&value)));
            }
            let conn: ConnectionView = resp.json()?;
            emit(out, &format_show(&conn))
        }
        Command::Token { id, site } => {
            let path = match (id, site) {
                (Some(id), None) => format!("/v1/connections/{}/token", encode_component(&id)),
                (None, Some(site)) => format!("/v1/token?site={}", encode_component(&site)),
                _ => unreachable!("clap requires exactly one of ID and --site"),
            };
            let resp = match client.request(Method::GET, &path, None).await {
                Ok(resp) => resp,
                Err(
                    err @ ClientError::Api {
                        retry_after: Some(secs),
                        ..
                    },
                ) => return Err(Failure::runtime(format!("{err} (retry after {secs}s)"))),
                Err(err) => return Err(err.into()),
            };
            let token: Value = resp.json()?;
            let access_token = token
                .get("access_token")
                .and_then(Value::as_str)
                .filter(|t| !t.is_empty())
                .ok_or_else(|| {
                    Failure::from(ClientError::Protocol(
                        "the answer has no access_token".into(),
                    ))
                })?;
            emit(out, &format!("{access_token}\n"))
        }
        Command::Refresh { id } => {
            let path = format!("/v1/connections/{}/refresh", encode_component(&id));
            let conn: ConnectionView = client.request(Method::POST, &path, None).await?.json()?;
            emit(
                out,
                &format!(
                    "refreshed {} ({}): status {}, next rotation {}\n",
                    conn.id,
                    conn.label,
                    conn.status,
                    time(conn.next_rotation_at.as_deref())
                ),
            )
        }
        Command::Remove { id } => {
            let path = format!("/v1/connections/{}", encode_component(&id));
            client.request(Method::DELETE, &path, None).await?;
            emit(out, &format!("removed {id}\n"))
        }
        Command::Events { id, since, json } => {
            let mut path = format!(
                "/v1/connections/{}/events?limit=1000",
                encode_component(&id)
            );
            if let Some(since) = since {
                path.push_str(&format!("&since={}", encode_component(&since)));
            }
            let resp = client.request(Method::GET, &path, None).await?;
            let value: Value = resp.json()?;
            if json {
                return emit(out, &format!("{}\n", pretty(&value)));
            }
            emit(out, &format_events(&value))
        }
    }
}

/// `tokend events`: one line per event, newest first.
fn format_events(value: &Value) -> String {
    let mut s = String::new();
    for e in value.as_array().map(Vec::as_slice).unwrap_or_default() {
        let text = |k: &str| e[k].as_str().unwrap_or("-").to_owned();
        let peer = match (e["peer"]["uid"].as_u64(), e["peer"]["pid"].as_u64()) {
            (Some(uid), Some(pid)) => format!("uid {uid} pid {pid}"),
            (Some(uid), None) => format!("uid {uid}"),
            _ => "-".to_owned(),
        };
        let count = e["count"].as_u64().unwrap_or(1);
        s.push_str(&format!(
            "{}  {:<22} {:>6}  {:<20} {}\n",
            text("at"),
            text("kind"),
            count,
            peer,
            text("message")
        ));
    }
    if s.is_empty() {
        s.push_str("no events\n");
    }
    s
}

fn pretty(value: &Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
}

/// Reads a refresh token from `input`: one line when typed at a terminal, else everything
/// up to end of file; trimmed. Empty input is refused.
fn read_refresh_token(input: &mut dyn BufRead, interactive: bool) -> Result<Secret, Failure> {
    let mut raw = String::new();
    let mut limited = Read::take(input, MAX_STDIN_BYTES + 1);
    let read = if interactive {
        limited.read_line(&mut raw)
    } else {
        limited.read_to_string(&mut raw)
    };
    read.map_err(|e| Failure::runtime(format!("cannot read the refresh token from stdin: {e}")))?;
    if raw.len() as u64 > MAX_STDIN_BYTES {
        return Err(Failure::runtime(format!(
            "more than {MAX_STDIN_BYTES} bytes on stdin: that is not a refresh token"
        )));
    }
    let token = raw.trim();
    if token.is_empty() {
        return Err(Failure::runtime(
            "no refresh token on stdin (pipe it in, e.g. `tokend import --label L < rt.txt`)",
        ));
    }
    Ok(Secret::new(token))
}

// ---------------------------------------------------------------------------------------
// JSON views: only the fields the CLI prints. `--json` prints the daemon's own JSON instead,
// so a field the daemon adds later is never lost there.

/// The fields of a `Connection` the human output shows. Lenient: missing fields default.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ConnectionView {
    id: String,
    label: String,
    provider: String,
    account_id: Option<String>,
    status: String,
    /// An array of scopes (or, leniently, a space-separated string).
    scopes: Value,
    sites: Vec<SiteView>,
    access_token_expires_at: Option<String>,
    refresh_token_rotated_at: Option<String>,
    next_rotation_at: Option<String>,
    inactivity_expires_at: Option<String>,
    absolute_expires_at: Option<String>,
    last_refresh_at: Option<String>,
    last_error: Option<LastErrorView>,
    consecutive_failures: u64,
    created_at: Option<String>,
    updated_at: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct SiteView {
    cloud_id: String,
    url: String,
    name: String,
    scopes: Value,
    api_base_urls: BTreeMap<String, String>,
    last_seen_at: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct LastErrorView {
    code: String,
    message: String,
    at: Option<String>,
}

/// `POST /v1/authorizations`' answer.
#[derive(Debug, Deserialize)]
struct AuthorizationView {
    authorize_url: String,
    state: String,
    redirect_uri: String,
}

impl SiteView {
    /// The site's host (`example.atlassian.net`), else its raw url, else its cloud id.
    fn host(&self) -> String {
        match Url::parse(&self.url) {
            Ok(url) if url.host_str().is_some() => url.host_str().unwrap_or_default().to_string(),
            _ if !self.url.is_empty() => self.url.clone(),
            _ => self.cloud_id.clone(),
        }
    }
}

fn site_hosts(sites: &[SiteView]) -> Vec<String> {
    sites.iter().map(SiteView::host).collect()
}

fn scopes_text(scopes: &Value) -> String {
    match scopes {
        Value::Array(items) => items
            .iter()
            .map(|s| s.as_str().map_or_else(|| s.to_string(), str::to_string))
            .collect::<Vec<_>>()
            .join(" "),
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// A time for humans: RFC 3339 UTC to the second, `-` when absent, the raw text when the
/// daemon sent something that does not parse.
fn time(value: Option<&str>) -> String {
    match value {
        None | Some("") => "-".to_string(),
        Some(raw) => DateTime::parse_from_rfc3339(raw).map_or_else(
            |_| raw.to_string(),
            |t| t.to_utc().to_rfc3339_opts(SecondsFormat::Secs, true),
        ),
    }
}

fn or_dash(value: &str) -> &str {
    if value.is_empty() { "-" } else { value }
}

/// The one-line answer of `import` and `connect`: 201 created, 200 an existing connection
/// for the same account took the new chain.
fn added_summary(verb: &str, status: u16, conn: &ConnectionView) -> String {
    if status == 200 {
        return format!(
            "updated existing connection {} ({}) with the new refresh token",
            conn.id, conn.label
        );
    }
    let hosts = site_hosts(&conn.sites);
    let listed = if hosts.is_empty() {
        String::new()
    } else {
        format!(": {}", hosts.join(", "))
    };
    format!(
        "{verb} connection {} ({}) for account {}, {} site(s){listed}",
        conn.id,
        conn.label,
        conn.account_id.as_deref().unwrap_or("unknown"),
        hosts.len()
    )
}

/// `list`'s table: columns padded to their widest cell, two spaces apart, no trailing blanks.
fn format_table(conns: &[ConnectionView]) -> String {
    if conns.is_empty() {
        return "no connections\n".to_string();
    }
    let header = [
        "ID",
        "LABEL",
        "STATUS",
        "ACCOUNT",
        "SITES",
        "NEXT ROTATION",
        "INACTIVITY DEADLINE",
    ]
    .map(String::from)
    .to_vec();
    let mut rows = vec![header];
    for c in conns {
        let hosts = site_hosts(&c.sites).join(",");
        rows.push(vec![
            c.id.clone(),
            or_dash(&c.label).to_string(),
            or_dash(&c.status).to_string(),
            c.account_id.clone().unwrap_or_else(|| "-".into()),
            or_dash(&hosts).to_string(),
            time(c.next_rotation_at.as_deref()),
            time(c.inactivity_expires_at.as_deref()),
        ]);
    }
    let columns = rows[0].len();
    let widths: Vec<usize> = (0..columns)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(cell);
            let pad = widths[i] - cell.chars().count();
            line.extend(std::iter::repeat_n(' ', pad));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `show`'s human form: `key: value` lines, sites as an indented list, last_error if any.
fn format_show(c: &ConnectionView) -> String {
    let mut lines = vec![
        format!("id: {}", c.id),
        format!("label: {}", c.label),
        format!("provider: {}", or_dash(&c.provider)),
        format!("status: {}", c.status),
        format!(
            "account_id: {}",
            c.account_id.as_deref().unwrap_or("unknown")
        ),
        format!("scopes: {}", or_dash(&scopes_text(&c.scopes))),
        format!(
            "access_token_expires_at: {}",
            time(c.access_token_expires_at.as_deref())
        ),
        format!(
            "refresh_token_rotated_at: {}",
            time(c.refresh_token_rotated_at.as_deref())
        ),
        format!("next_rotation_at: {}", time(c.next_rotation_at.as_deref())),
        format!(
            "inactivity_expires_at: {}",
            time(c.inactivity_expires_at.as_deref())
        ),
        format!(
            "absolute_expires_at: {}",
            time(c.absolute_expires_at.as_deref())
        ),
        format!("last_refresh_at: {}", time(c.last_refresh_at.as_deref())),
        format!("consecutive_failures: {}", c.consecutive_failures),
        format!("created_at: {}", time(c.created_at.as_deref())),
        format!("updated_at: {}", time(c.updated_at.as_deref())),
    ];
    if c.sites.is_empty() {
        lines.push("sites: none".to_string());
    } else {
        lines.push("sites:".to_string());
        for site in &c.sites {
            let name = if site.name.is_empty() {
                String::new()
            } else {
                format!(" ({})", site.name)
            };
            lines.push(format!("  - {}{name}", site.host()));
            lines.push(format!("    cloud_id: {}", or_dash(&site.cloud_id)));
            lines.push(format!("    url: {}", or_dash(&site.url)));
            lines.push(format!(
                "    scopes: {}",
                or_dash(&scopes_text(&site.scopes))
            ));
            if !site.api_base_urls.is_empty() {
                lines.push("    api_base_urls:".to_string());
                for (product, base) in &site.api_base_urls {
                    lines.push(format!("      {product}: {base}"));
                }
            }
            lines.push(format!(
                "    last_seen_at: {}",
                time(site.last_seen_at.as_deref())
            ));
        }
    }
    if let Some(err) = &c.last_error {
        lines.push(format!(
            "last_error: {}: {} (at {})",
            err.code,
            err.message,
            time(err.at.as_deref())
        ));
    }
    let mut out = lines.join("\n");
    out.push('\n');
    out
}

// ---------------------------------------------------------------------------------------
// connect: authorization code + state through the browser.

/// Runs the consent flow and has the daemon exchange the code.
async fn connect(
    client: &Client,
    label: &str,
    no_browser: bool,
    out: &mut dyn Write,
) -> Result<(), Failure> {
    let auth: AuthorizationView = client
        .request(
            Method::POST,
            "/v1/authorizations",
            Some(json!({ "provider": PROVIDER })),
        )
        .await?
        .json()?;
    let redirect = Url::parse(&auth.redirect_uri).map_err(|e| {
        Failure::runtime(format!(
            "the daemon's redirect_uri {:?} is not a URL: {e}",
            auth.redirect_uri
        ))
    })?;

    let listeners = if no_browser {
        Vec::new()
    } else {
        match loopback_addrs(&redirect) {
            None => {
                eprintln!(
                    "tokend: the redirect URI {redirect} is not a loopback http address \
                     this machine can listen on; paste the redirect URL instead."
                );
                Vec::new()
            }
            Some(addrs) => match bind_all(&addrs).await {
                Ok(listeners) => listeners,
                Err(e) => {
                    eprintln!(
                        "tokend: cannot listen on {redirect} ({e}); paste the redirect URL instead."
                    );
                    Vec::new()
                }
            },
        }
    };
    let listening = !listeners.is_empty();
    let stdin_is_tty = io::stdin().is_terminal();

    if listening {
        eprintln!(
            "Opening your browser for Atlassian consent. If it does not open, visit:\n\n  {}\n",
            auth.authorize_url
        );
        open_browser(&auth.authorize_url);
        eprintln!(
            "Waiting up to {} minutes for the browser to come back to {redirect}",
            CALLBACK_TIMEOUT.as_secs() / 60
        );
        if stdin_is_tty {
            eprintln!(
                "(if the browser runs on another machine, paste the address it ends on here and press Enter)"
            );
        }
    } else {
        eprintln!(
            "Visit this URL in a browser and grant access:\n\n  {}\n\n\
             The browser then goes to an address starting with {redirect} (the page may fail \
             to load; that is fine).\nCopy that whole address from the address bar, paste it \
             here and press Enter:",
            auth.authorize_url
        );
    }

    let code = wait_for_redirect(
        listeners,
        &redirect,
        &auth.state,
        !listening || stdin_is_tty,
    )
    .await?;
    let body = json!({
        "provider": PROVIDER,
        "label": label,
        "code": code.expose(),
        "state": auth.state,
    });
    let resp = client
        .request(Method::POST, "/v1/connections", Some(body))
        .await?;
    let conn: ConnectionView = resp.json()?;
    emit(
        out,
        &format!("{}\n", added_summary("added", resp.status, &conn)),
    )
}

/// Where a `connect` redirect came from.
enum RedirectEvent {
    /// A request on the loopback listener, already checked.
    Callback(Result<Secret, Failure>),
    /// A line typed or piped on stdin.
    Pasted(String),
    /// stdin reached end of file without a line.
    StdinClosed,
}

/// Waits for the authorization code: from the loopback listeners, from stdin (when
/// `read_stdin`), whichever comes first, within [`CALLBACK_TIMEOUT`].
async fn wait_for_redirect(
    listeners: Vec<TcpListener>,
    redirect: &Url,
    state: &str,
    read_stdin: bool,
) -> Result<Secret, Failure> {
    let (tx, mut rx) = mpsc::channel::<RedirectEvent>(4);
    let listening = !listeners.is_empty();
    for listener in listeners {
        tokio::spawn(serve_callback(
            listener,
            redirect.clone(),
            state.to_string(),
            tx.clone(),
        ));
    }
    if read_stdin {
        let tx = tx.clone();
        // A plain thread, not spawn_blocking: a blocking stdin read cannot be cancelled, and
        // the runtime would wait for it on shutdown; a detached thread dies with the process.
        std::thread::spawn(move || {
            let mut line = String::new();
            let read = io::stdin()
                .lock()
                .take(MAX_STDIN_BYTES)
                .read_line(&mut line);
            let event = match read {
                Ok(_) if !line.trim().is_empty() => RedirectEvent::Pasted(line),
                _ => RedirectEvent::StdinClosed,
            };
            let _ = tx.blocking_send(event);
        });
    }
    drop(tx);

    let deadline = tokio::time::Instant::now() + CALLBACK_TIMEOUT;
    loop {
        let event = match tokio::time::timeout_at(deadline, rx.recv()).await {
            Err(_) => {
                return Err(Failure::runtime(format!(
                    "no authorization redirect within {} minutes; run `tokend connect` again",
                    CALLBACK_TIMEOUT.as_secs() / 60
                )));
            }
            Ok(None) => return Err(Failure::runtime("no redirect URL on stdin")),
            Ok(Some(event)) => event,
        };
        match event {
            RedirectEvent::Callback(result) => return result,
            RedirectEvent::Pasted(line) => return parse_redirect(&line, redirect, state),
            RedirectEvent::StdinClosed if listening => continue,
            RedirectEvent::StdinClosed => {
                return Err(Failure::runtime("no redirect URL on stdin"));
            }
        }
    }
}

/// Extracts the authorization code from a redirect URL (absolute, or just its `/path?query`
/// or `?query` part): an `error` parameter is a refusal, `state` must be the one the daemon
/// issued for this run, `code` must be present.
fn parse_redirect(input: &str, redirect: &Url, expected_state: &str) -> Result<Secret, Failure> {
    let input = input.trim();
    if input.is_empty() {
        return Err(Failure::runtime("no redirect URL given"));
    }
    let url = match Url::parse(input) {
        Ok(url) => url,
        Err(_) if input.starts_with('/') || input.starts_with('?') => redirect
            .join(input)
            .map_err(|e| Failure::runtime(format!("the pasted redirect is not a URL: {e}")))?,
        Err(e) => {
            return Err(Failure::runtime(format!(
                "the pasted redirect is not a URL ({e}); paste the whole address starting with {redirect}"
            )));
        }
    };
    let mut params: HashMap<String, String> = HashMap::new();
    for (key, value) in url.query_pairs() {
        params.entry(key.into_owned()).or_insert(value.into_owned());
    }
    if let Some(error) = params.get("error") {
        let description = params
            .get("error_description")
            .map(|d| format!(": {}", printable(d)))
            .unwrap_or_default();
        return Err(Failure::runtime(format!(
            "authorization failed: {}{description}",
            printable(error)
        )));
    }
    match params.get("state") {
        Some(state) if state == expected_state => {}
        Some(_) => {
            return Err(Failure::runtime(
                "state mismatch: this redirect does not belong to this `tokend connect` run; start again",
            ));
        }
        None => {
            return Err(Failure::runtime(format!(
                "the redirect URL has no state parameter; paste the whole address starting with {redirect}"
            )));
        }
    }
    match params.get("code") {
        Some(code) if !code.is_empty() => Ok(Secret::new(code.clone())),
        _ => Err(Failure::runtime(format!(
            "the redirect URL has no code parameter; paste the address the browser was sent to (it starts with {redirect})"
        ))),
    }
}

/// Text from a URL made safe for a terminal: control characters (escape sequences) dropped.
fn printable(text: &str) -> String {
    text.chars().filter(|c| !c.is_control()).collect()
}

/// The addresses to listen on for `redirect`, when it is a plain-http loopback URL with a
/// host of exactly `127.0.0.1`, `localhost` or `[::1]`. `localhost` gets both loopbacks,
/// since browsers may resolve it to either.
fn loopback_addrs(redirect: &Url) -> Option<Vec<SocketAddr>> {
    if redirect.scheme() != "http" {
        return None;
    }
    let port = redirect.port_or_known_default()?;
    match redirect.host()? {
        Host::Domain(domain) if domain.eq_ignore_ascii_case("localhost") => Some(vec![
            SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            SocketAddr::from((Ipv6Addr::LOCALHOST, port)),
        ]),
        Host::Ipv4(ip) if ip == Ipv4Addr::LOCALHOST => Some(vec![SocketAddr::from((ip, port))]),
        Host::Ipv6(ip) if ip == Ipv6Addr::LOCALHOST => Some(vec![SocketAddr::from((ip, port))]),
        _ => None,
    }
}

/// Binds every address. An address this host lacks (no IPv6) is skipped; one that is in use
/// is an error, since whoever holds it would receive the authorization code.
async fn bind_all(addrs: &[SocketAddr]) -> io::Result<Vec<TcpListener>> {
    let mut listeners = Vec::new();
    let mut last_err = None;
    for addr in addrs {
        match TcpListener::bind(addr).await {
            Ok(listener) => listeners.push(listener),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => return Err(e),
            Err(e) => last_err = Some(e),
        }
    }
    match (listeners.is_empty(), last_err) {
        (true, Some(e)) => Err(e),
        _ => Ok(listeners),
    }
}

/// Answers requests on the loopback listener until one arrives on the redirect path; that
/// one gets a small page and its checked result goes to `tx`. Anything else (favicon, ...)
/// gets a 404.
async fn serve_callback(
    listener: TcpListener,
    redirect: Url,
    state: String,
    tx: mpsc::Sender<RedirectEvent>,
) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let target =
            match tokio::time::timeout(CALLBACK_READ_TIMEOUT, read_request_target(&mut stream))
                .await
            {
                Ok(Some(target)) => target,
                _ => continue,
            };
        let url = match redirect.join(&target) {
            Ok(url) if url.path() == redirect.path() => url,
            _ => {
                respond(&mut stream, "404 Not Found", "Not found.").await;
                continue;
            }
        };
        let result = parse_redirect(url.as_str(), &redirect, &state);
        let page = if result.is_ok() {
            "tokend received the authorization. You can close this tab."
        } else {
            "tokend could not use this authorization; see the terminal. You can close this tab."
        };
        respond(&mut stream, "200 OK", page).await;
        let _ = tx.send(RedirectEvent::Callback(result)).await;
        return;
    }
}

/// Reads an HTTP request head and returns the target of a `GET`, or `None`.
async fn read_request_target(stream: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut buf = [0u8; 2048];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await.ok()?;
        if n == 0 || head.len() + n > MAX_CALLBACK_HEAD {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head);
    let mut parts = head.lines().next()?.split_whitespace();
    match (parts.next(), parts.next()) {
        (Some("GET"), Some(target)) => Some(target.to_string()),
        _ => None,
    }
}

async fn respond(stream: &mut TcpStream, status: &str, text: &str) {
    let html = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>tokend</title></head>\
         <body><p>{text}</p></body></html>\n"
    );
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nConnection: close\r\n\r\n{html}",
        html.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// Tries to open `url` in the user's browser; failure is fine, the URL is printed anyway.
fn open_browser(url: &str) {
    let opener = if cfg!(target_os = "macos") {
        "open"
    } else {
        "xdg-open"
    };
    let child = std::process::Command::new(opener)
        .arg(url)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    if let Ok(mut child) = child {
        // Reap it so that it does not linger as a zombie while we wait for the redirect.
        std::thread::spawn(move || {
            let _ = child.wait();
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use clap::error::ErrorKind;
    use std::convert::Infallible;
    use std::sync::{Arc, Mutex};

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("tokend").chain(args.iter().copied()))
    }

    fn command(args: &[&str]) -> Command {
        parse(args).unwrap().command
    }

    fn usage_error(args: &[&str]) -> ErrorKind {
        let err = parse(args).unwrap_err();
        assert_eq!(err.exit_code(), 2, "usage errors exit 2: {args:?}");
        err.kind()
    }

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_daemon_commands_and_global_config() {
        let cli = parse(&["--config", "/etc/tokend/daemon.toml", "run"]).unwrap();
        assert_eq!(cli.command, Command::Run);
        assert_eq!(cli.config, PathBuf::from("/etc/tokend/daemon.toml"));
        // --config is global: accepted after the subcommand too.
        let cli = parse(&["check-config", "--config", "x.toml"]).unwrap();
        assert_eq!(cli.command, Command::CheckConfig);
        assert_eq!(cli.config, PathBuf::from("x.toml"));
    }

    #[test]
    fn config_defaults_to_daemon_toml() {
        if std::env::var_os("TOKEND_CONFIG").is_none() {
            assert_eq!(
                parse(&["run"]).unwrap().config,
                PathBuf::from("daemon.toml")
            );
        }
    }

    #[test]
    fn parses_connect() {
        assert_eq!(
            command(&["connect"]),
            Command::Connect {
                label: "atlassian".into(),
                no_browser: false
            }
        );
        assert_eq!(
            command(&["connect", "--label", "conf", "--no-browser"]),
            Command::Connect {
                label: "conf".into(),
                no_browser: true
            }
        );
        assert_eq!(
            usage_error(&["connect", "extra"]),
            ErrorKind::UnknownArgument
        );
    }

    #[test]
    fn parses_import_and_requires_a_label() {
        assert_eq!(
            command(&["import", "--label", "conf"]),
            Command::Import {
                label: "conf".into()
            }
        );
        assert_eq!(usage_error(&["import"]), ErrorKind::MissingRequiredArgument);
        assert_eq!(
            usage_error(&["import", "--label", ""]),
            ErrorKind::InvalidValue
        );
        // The token never goes on argv.
        assert_eq!(
            usage_error(&["import", "--label", "conf", "rt-value"]),
            ErrorKind::UnknownArgument
        );
    }

    #[test]
    fn parses_list_and_show() {
        assert_eq!(command(&["list"]), Command::List { json: false });
        assert_eq!(command(&["list", "--json"]), Command::List { json: true });
        assert_eq!(
            command(&["show", "conf", "--json"]),
            Command::Show {
                id: "conf".into(),
                json: true
            }
        );
        assert_eq!(usage_error(&["show"]), ErrorKind::MissingRequiredArgument);
        assert_eq!(usage_error(&["show", ""]), ErrorKind::InvalidValue);
    }

    #[test]
    fn token_takes_exactly_one_of_id_and_site() {
        assert_eq!(
            command(&["token", "conf"]),
            Command::Token {
                id: Some("conf".into()),
                site: None
            }
        );
        assert_eq!(
            command(&["token", "--site", "example.atlassian.net"]),
            Command::Token {
                id: None,
                site: Some("example.atlassian.net".into())
            }
        );
        assert_eq!(
            usage_error(&["token", "conf", "--site", "example.atlassian.net"]),
            ErrorKind::ArgumentConflict
        );
        assert_eq!(usage_error(&["token"]), ErrorKind::MissingRequiredArgument);
    }

    #[test]
    fn parses_refresh_and_remove() {
        assert_eq!(
            command(&["refresh", "c1"]),
            Command::Refresh { id: "c1".into() }
        );
        assert_eq!(
            command(&["remove", "c1"]),
            Command::Remove { id: "c1".into() }
        );
        assert_eq!(usage_error(&["remove"]), ErrorKind::MissingRequiredArgument);
        assert_eq!(usage_error(&["frobnicate"]), ErrorKind::InvalidSubcommand);
        assert_eq!(
            usage_error(&[]),
            ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
        );
    }

    #[test]
    fn version_and_help_exit_zero_and_help_documents_tokend_socket() {
        let err = parse(&["--version"]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::DisplayVersion);
        assert_eq!(err.exit_code(), 0);
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("TOKEND_SOCKET"), "{help}");
        assert!(help.contains("64 bad configuration"), "{help}");
        let mut cmd = Cli::command();
        let token_help = cmd
            .find_subcommand_mut("token")
            .unwrap()
            .render_long_help()
            .to_string();
        assert!(token_help.contains("TOKEND_SOCKET"), "{token_help}");
    }

    #[test]
    fn client_config_errors_exit_64_and_suggest_the_way_out() {
        let dir = tempfile::tempdir().unwrap();
        let cli = parse(&[
            "--config",
            dir.path().join("missing.toml").to_str().unwrap(),
            "list",
        ])
        .unwrap();
        let failure = run(cli, None, None).unwrap_err();
        assert_eq!(failure.code, EXIT_CONFIG);
        assert!(
            failure.message.contains("missing.toml"),
            "{}",
            failure.message
        );
        assert!(
            failure.message.contains("TOKEND_SOCKET"),
            "{}",
            failure.message
        );
    }

    #[test]
    fn tokend_socket_skips_the_config_and_an_absent_daemon_is_exit_1() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("nobody.sock");
        let cli = parse(&["--config", "/nonexistent/daemon.toml", "list"]).unwrap();
        let failure = run(cli, Some(socket.clone()), None).unwrap_err();
        assert_eq!(failure.code, EXIT_RUNTIME);
        assert!(
            failure.message.starts_with(&format!(
                "cannot connect to tokend at {}: ",
                socket.display()
            )),
            "{}",
            failure.message
        );
        assert!(failure.message.ends_with("(is the daemon running?)"));
    }

    // --- connect: redirect parsing -------------------------------------------------------

    fn redirect() -> Url {
        Url::parse("http://localhost:8976/callback").unwrap()
    }

    #[test]
    fn redirect_yields_the_code_when_state_matches() {
        let code = parse_redirect(
            "http://localhost:8976/callback?code=abc%2F123&state=s-1",
            &redirect(),
            "s-1",
        )
        .unwrap();
        assert_eq!(code.expose(), "abc/123");
        // Surrounding blanks from a paste, and only the query part, are fine.
        let code = parse_redirect("  ?state=s-1&code=xyz\n", &redirect(), "s-1").unwrap();
        assert_eq!(code.expose(), "xyz");
        let code = parse_redirect("/callback?state=s-1&code=q", &redirect(), "s-1").unwrap();
        assert_eq!(code.expose(), "q");
    }

    #[test]
    fn redirect_error_parameter_is_reported() {
        let failure = parse_redirect(
            "http://localhost:8976/callback?error=access_denied&error_description=User%20said%20no%1B%5B31m&state=s-1",
            &redirect(),
            "s-1",
        )
        .unwrap_err();
        assert_eq!(failure.code, EXIT_RUNTIME);
        assert_eq!(
            failure.message,
            "authorization failed: access_denied: User said no[31m"
        );
    }

    #[test]
    fn redirect_state_must_match() {
        let failure = parse_redirect(
            "http://localhost:8976/callback?code=abc&state=other",
            &redirect(),
            "s-1",
        )
        .unwrap_err();
        assert!(
            failure.message.starts_with("state mismatch"),
            "{}",
            failure.message
        );
        let failure = parse_redirect(
            "http://localhost:8976/callback?code=abc",
            &redirect(),
            "s-1",
        )
        .unwrap_err();
        assert!(failure.message.contains("no state"), "{}", failure.message);
    }

    #[test]
    fn redirect_needs_a_code_and_a_url() {
        let failure = parse_redirect(
            "http://localhost:8976/callback?state=s-1",
            &redirect(),
            "s-1",
        )
        .unwrap_err();
        assert!(failure.message.contains("no code"), "{}", failure.message);
        let failure = parse_redirect("just some words", &redirect(), "s-1").unwrap_err();
        assert!(failure.message.contains("not a URL"), "{}", failure.message);
        let failure = parse_redirect("   ", &redirect(), "s-1").unwrap_err();
        assert!(
            failure.message.contains("no redirect URL"),
            "{}",
            failure.message
        );
    }

    #[test]
    fn only_plain_http_loopback_redirects_are_listened_on() {
        let addrs = |u: &str| loopback_addrs(&Url::parse(u).unwrap());
        assert_eq!(
            addrs("http://localhost:8976/callback").unwrap(),
            vec![
                "127.0.0.1:8976".parse::<SocketAddr>().unwrap(),
                "[::1]:8976".parse().unwrap()
            ]
        );
        assert_eq!(
            addrs("http://127.0.0.1:9000/cb").unwrap(),
            vec!["127.0.0.1:9000".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(
            addrs("http://[::1]:9000/cb").unwrap(),
            vec!["[::1]:9000".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(addrs("https://localhost:8976/callback"), None);
        assert_eq!(addrs("http://example.com:8976/callback"), None);
        assert_eq!(addrs("http://127.0.0.2:8976/callback"), None);
    }

    #[tokio::test]
    async fn the_loopback_listener_takes_the_redirect() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let redirect = Url::parse(&format!("http://127.0.0.1:{port}/callback")).unwrap();
        let waiter = tokio::spawn({
            let redirect = redirect.clone();
            async move { wait_for_redirect(vec![listener], &redirect, "s-1", false).await }
        });
        async fn get(port: u16, target: &str) -> String {
            let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            let request = format!("GET {target} HTTP/1.1\r\nHost: localhost\r\n\r\n");
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut answer = String::new();
            stream.read_to_string(&mut answer).await.unwrap();
            answer
        }
        let favicon = get(port, "/favicon.ico").await;
        assert!(favicon.starts_with("HTTP/1.1 404"), "{favicon}");
        let page = get(port, "/callback?code=the-code&state=s-1").await;
        assert!(page.starts_with("HTTP/1.1 200"), "{page}");
        assert!(page.contains("close this tab"), "{page}");
        assert!(!page.contains("the-code"), "{page}");
        let code = waiter.await.unwrap().unwrap();
        assert_eq!(code.expose(), "the-code");
    }

    // --- formatting ----------------------------------------------------------------------

    fn sample_connection() -> Value {
        json!({
            "id": "c_01",
            "label": "confluence-prod",
            "provider": "atlassian",
            "account_id": "557058:abcd",
            "status": "active",
            "scopes": ["offline_access", "read:page:confluence"],
            "sites": [{
                "cloud_id": "1111-2222",
                "url": "https://example.atlassian.net",
                "name": "Example",
                "scopes": ["read:page:confluence"],
                "api_base_urls": {"confluence": "https://api.atlassian.com/ex/confluence/1111-2222"},
                "last_seen_at": "2025-01-02T03:04:05Z"
            }, {
                "cloud_id": "3333",
                "url": "https://other.atlassian.net",
                "name": "Other",
                "scopes": [],
                "api_base_urls": {},
                "last_seen_at": null
            }],
            "access_token_expires_at": "2025-01-02T04:04:05Z",
            "refresh_token_rotated_at": "2025-01-02T03:04:05Z",
            "next_rotation_at": "2025-01-09T03:04:05.123456Z",
            "inactivity_expires_at": "2025-04-02T03:04:05+00:00",
            "absolute_expires_at": null,
            "last_refresh_at": "2025-01-02T03:04:05Z",
            "last_error": {"code": "provider_unavailable", "message": "HTTP 502", "at": "2025-01-01T00:00:00Z"},
            "consecutive_failures": 1,
            "created_at": "2024-12-01T00:00:00Z",
            "updated_at": "2025-01-02T03:04:05Z"
        })
    }

    fn view(value: Value) -> ConnectionView {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn table_lists_connections_aligned() {
        let mut second = sample_connection();
        second["id"] = json!("c_2");
        second["label"] = json!("jira");
        second["status"] = json!("needs_reauth");
        second["account_id"] = Value::Null;
        second["sites"] = json!([]);
        second["next_rotation_at"] = Value::Null;
        let table = format_table(&[view(sample_connection()), view(second)]);
        let expected = "\
ID    LABEL            STATUS        ACCOUNT      SITES                                      NEXT ROTATION         INACTIVITY DEADLINE
c_01  confluence-prod  active        557058:abcd  example.atlassian.net,other.atlassian.net  2025-01-09T03:04:05Z  2025-04-02T03:04:05Z
c_2   jira             needs_reauth  -            -                                          -                     2025-04-02T03:04:05Z
";
        assert_eq!(table, expected);
    }

    #[test]
    fn empty_table_says_so() {
        assert_eq!(format_table(&[]), "no connections\n");
    }

    #[test]
    fn show_prints_fields_sites_and_last_error() {
        let text = format_show(&view(sample_connection()));
        for line in [
            "id: c_01",
            "label: confluence-prod",
            "account_id: 557058:abcd",
            "scopes: offline_access read:page:confluence",
            "next_rotation_at: 2025-01-09T03:04:05Z",
            "absolute_expires_at: -",
            "consecutive_failures: 1",
            "sites:",
            "  - example.atlassian.net (Example)",
            "    cloud_id: 1111-2222",
            "      confluence: https://api.atlassian.com/ex/confluence/1111-2222",
            "  - other.atlassian.net (Other)",
            "    last_seen_at: -",
            "last_error: provider_unavailable: HTTP 502 (at 2025-01-01T00:00:00Z)",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        let mut healthy = sample_connection();
        healthy["last_error"] = Value::Null;
        assert!(!format_show(&view(healthy)).contains("last_error"));
    }

    #[test]
    fn import_summaries() {
        let conn = view(sample_connection());
        assert_eq!(
            added_summary("imported", 201, &conn),
            "imported connection c_01 (confluence-prod) for account 557058:abcd, 2 site(s): \
             example.atlassian.net, other.atlassian.net"
        );
        assert_eq!(
            added_summary("imported", 200, &conn),
            "updated existing connection c_01 (confluence-prod) with the new refresh token"
        );
        let mut hidden = sample_connection();
        hidden["account_id"] = Value::Null;
        hidden["sites"] = json!([]);
        assert_eq!(
            added_summary("imported", 201, &view(hidden)),
            "imported connection c_01 (confluence-prod) for account unknown, 0 site(s)"
        );
    }

    #[test]
    fn refresh_token_is_read_trimmed_and_empty_input_refused() {
        let token = read_refresh_token(&mut &b"  rt-abc\n"[..], false).unwrap();
        assert_eq!(token.expose(), "rt-abc");
        // At a terminal, one line is enough.
        let token = read_refresh_token(&mut &b"rt-line\nrest\n"[..], true).unwrap();
        assert_eq!(token.expose(), "rt-line");
        let failure = read_refresh_token(&mut &b" \n\t"[..], false).unwrap_err();
        assert_eq!(failure.code, EXIT_RUNTIME);
        assert!(failure.message.starts_with("no refresh token on stdin"));
        let huge = vec![b'a'; MAX_STDIN_BYTES as usize + 10];
        assert!(read_refresh_token(&mut &huge[..], false).is_err());
    }

    // --- commands against a fake daemon ---------------------------------------------------

    type Seen = Arc<Mutex<Vec<(String, String, String)>>>;

    /// A fake daemon answering `(method, path) -> (status, retry_after, body)`.
    async fn fake_daemon(
        routes: Vec<(&'static str, &'static str, u16, Option<u64>, Value)>,
    ) -> (tempfile::TempDir, Client, Seen) {
        use http_body_util::{BodyExt, Full};
        use hyper::body::{Bytes, Incoming};
        use hyper::{Request, Response};
        use hyper_util::rt::TokioIo;

        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("tokend.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let seen: Seen = Arc::default();
        let routes = Arc::new(routes);
        let seen2 = seen.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (seen, routes) = (seen2.clone(), routes.clone());
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (seen, routes) = (seen.clone(), routes.clone());
                    async move {
                        let method = req.method().to_string();
                        let path = req.uri().to_string();
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let body = String::from_utf8_lossy(&body).to_string();
                        seen.lock()
                            .unwrap()
                            .push((method.clone(), path.clone(), body));
                        let route = routes.iter().find(|r| r.0 == method && r.1 == path);
                        let (status, retry, json) = match route {
                            Some((_, _, s, r, j)) => (*s, *r, j.to_string()),
                            None => (
                                404,
                                None,
                                r#"{"error":{"code":"not_found","message":"no route"}}"#.into(),
                            ),
                        };
                        let mut resp = Response::builder().status(status);
                        if let Some(secs) = retry {
                            resp = resp.header("retry-after", secs);
                        }
                        let body = if status == 204 { String::new() } else { json };
                        Ok::<_, Infallible>(resp.body(Full::new(Bytes::from(body))).unwrap())
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        (dir, Client::new(socket), seen)
    }

    async fn output(command: Command, client: &Client) -> Result<String, Failure> {
        let mut out = Vec::new();
        client_command(command, client, &mut out).await?;
        Ok(String::from_utf8(out).unwrap())
    }

    #[tokio::test]
    async fn token_prints_only_the_access_token() {
        let token = json!({
            "connection_id": "c_01", "access_token": "at-123", "token_type": "Bearer",
            "expires_at": "2025-01-02T04:04:05Z", "expires_in": 3600, "scopes": [], "sites": []
        });
        let (_dir, client, seen) = fake_daemon(vec![
            (
                "GET",
                "/v1/connections/conf%20prod/token",
                200,
                None,
                token.clone(),
            ),
            (
                "GET",
                "/v1/token?site=example.atlassian.net",
                200,
                None,
                token,
            ),
        ])
        .await;
        let id = Command::Token {
            id: Some("conf prod".into()),
            site: None,
        };
        assert_eq!(output(id, &client).await.unwrap(), "at-123\n");
        let site = Command::Token {
            id: None,
            site: Some("example.atlassian.net".into()),
        };
        assert_eq!(output(site, &client).await.unwrap(), "at-123\n");
        assert_eq!(seen.lock().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn token_unavailable_reports_retry_after() {
        let (_dir, client, _seen) = fake_daemon(vec![(
            "GET",
            "/v1/connections/c_01/token",
            503,
            Some(30),
            json!({"error": {"code": "provider_unavailable", "message": "Atlassian answered 502"}}),
        )])
        .await;
        let failure = output(
            Command::Token {
                id: Some("c_01".into()),
                site: None,
            },
            &client,
        )
        .await
        .unwrap_err();
        assert_eq!(failure.code, EXIT_RUNTIME);
        assert_eq!(
            failure.message,
            "provider_unavailable: Atlassian answered 502 (retry after 30s)"
        );
    }

    #[tokio::test]
    async fn import_list_show_refresh_remove_against_the_api() {
        let (_dir, client, seen) = fake_daemon(vec![
            (
                "GET",
                "/v1/connections",
                200,
                None,
                json!([sample_connection()]),
            ),
            (
                "GET",
                "/v1/connections/c_01",
                200,
                None,
                sample_connection(),
            ),
            (
                "POST",
                "/v1/connections/c_01/refresh",
                200,
                None,
                sample_connection(),
            ),
            ("DELETE", "/v1/connections/c_01", 204, None, Value::Null),
        ])
        .await;
        let table = output(Command::List { json: false }, &client)
            .await
            .unwrap();
        assert!(table.starts_with("ID "), "{table}");
        assert!(table.contains("confluence-prod"), "{table}");
        let listed = output(Command::List { json: true }, &client).await.unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(&listed).unwrap(),
            json!([sample_connection()])
        );
        let shown = output(
            Command::Show {
                id: "c_01".into(),
                json: false,
            },
            &client,
        )
        .await
        .unwrap();
        assert!(shown.starts_with("id: c_01\n"), "{shown}");
        let refreshed = output(Command::Refresh { id: "c_01".into() }, &client)
            .await
            .unwrap();
        assert_eq!(
            refreshed,
            "refreshed c_01 (confluence-prod): status active, next rotation 2025-01-09T03:04:05Z\n"
        );
        let removed = output(Command::Remove { id: "c_01".into() }, &client)
            .await
            .unwrap();
        assert_eq!(removed, "removed c_01\n");
        let failure = output(Command::Remove { id: "gone".into() }, &client)
            .await
            .unwrap_err();
        assert_eq!(failure.message, "not_found: no route");
        let methods: Vec<String> = seen.lock().unwrap().iter().map(|s| s.0.clone()).collect();
        assert_eq!(methods, ["GET", "GET", "GET", "POST", "DELETE", "DELETE"]);
    }
}
