//! The `tokend` binary: the command line (clap) and the adoption of a socket passed by
//! systemd. Everything a command does lives in the library ([`tokend::cli`]); this file only
//! parses arguments into a [`tokend::cli::Action`], so that the clap definition ([`Cli`],
//! reachable through `clap::CommandFactory`) can also generate man pages and completions.
//!
//! Socket activation needs `from_raw_fd`, which is `unsafe`, and the library forbids unsafe
//! code: that is the other reason this file exists.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::builder::NonEmptyStringValueParser;
use clap::{ArgGroup, Parser, Subcommand};
use tokend::cli::{Action, ClientCommand, DEFAULT_LABEL, LedgerUrl, MigrateTarget, TokenTarget};

/// `tokend --version`: the package version and the git commit it was built from
/// (`build.rs`; `unknown` from a tarball without git).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("TOKEND_GIT_COMMIT"),
    ")"
);

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: i32 = 3;

/// Help text shared by the client commands.
const SOCKET_HELP: &str = "\
This command talks to the running daemon over its Unix socket: `daemon.socket_path` from \
--config. If the environment variable TOKEND_SOCKET is set (and not empty), it names the \
socket instead and no configuration file is read.";

const AFTER_HELP: &str = "\
Every command but `run`, `check-config` and `migrate-ledger` is a client of the running \
daemon's socket: its path is `daemon.socket_path` from --config, unless the environment variable TOKEND_SOCKET \
is set (and not empty), which names the socket directly; then no configuration is read.

Exit codes: 0 ok, 1 runtime failure, 2 usage error, 64 bad configuration.";

/// The command line.
#[derive(Debug, Parser)]
#[command(
    name = "tokend",
    version = VERSION,
    about = "Keeps Atlassian OAuth refresh-token chains alive and serves fresh access tokens over a Unix socket",
    after_help = AFTER_HELP
)]
struct Cli {
    /// The daemon's configuration file.
    #[arg(
        long,
        global = true,
        value_name = "PATH",
        env = "TOKEND_CONFIG",
        hide_env_values = true,
        default_value = "daemon.toml"
    )]
    config: PathBuf,

    /// What to do.
    #[command(subcommand)]
    command: Command,
}

/// The subcommands, exactly those of INTERFACE.md.
#[derive(Debug, PartialEq, Eq, Subcommand)]
enum Command {
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
    /// With the daemon stopped: copy the SQLite ledger into an empty PostgreSQL ledger,
    /// verify it, and print the daemon.toml lines to use.
    #[command(
        after_help = MIGRATE_HELP,
        group(ArgGroup::new("migrate_target").required(true).args(["to", "to_file"]))
    )]
    MigrateLedger {
        /// The PostgreSQL URL, e.g. postgres://tokend@db.example:5432/tokend?sslmode=verify-full.
        #[arg(long, value_name = "URL", value_parser = parse_ledger_url)]
        to: Option<LedgerUrl>,
        /// Read the URL from this file instead (for a URL holding a password).
        #[arg(long, value_name = "PATH")]
        to_file: Option<PathBuf>,
    },
    /// Print a shell completion script (bash, zsh or fish) on stdout.
    ///
    /// bash: `tokend completions bash > /etc/bash_completion.d/tokend`; zsh: into a
    /// directory of `$fpath` as `_tokend`; fish: `~/.config/fish/completions/tokend.fish`.
    /// The Debian package installs all three.
    Completions {
        /// The shell.
        #[arg(value_name = "SHELL")]
        shell: CompletionShell,
    },
    /// Write the man pages (tokend(1), one per subcommand, daemon.toml(5)) into DIR/man1 and
    /// DIR/man5: a packaging step (`.ci/package`), hidden from --help.
    #[command(hide = true)]
    ManPages {
        /// Output directory; created when missing.
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
}

/// The shells `tokend completions` supports (INTERFACE.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

/// `--to`: any non-empty text (the library judges it, and never echoes it).
fn parse_ledger_url(s: &str) -> Result<LedgerUrl, String> {
    if s.trim().is_empty() {
        return Err("the URL is empty".into());
    }
    Ok(LedgerUrl::new(s))
}

/// Help text of `migrate-ledger`.
const MIGRATE_HELP: &str = "\
Stop the daemon first: the copy refuses a state directory a daemon holds. The target must be \
an empty PostgreSQL database (no tokend rows; the schema is created). Everything is copied in \
one transaction (tokens sealed as they are: the same key file opens them), compared with the \
SQLite ledger, and only then committed; the SQLite file is left untouched, as a backup. The \
URL may hold a password: it is never printed, and --to-file keeps it off the command line.

Exit codes: 0 copied and checked, 1 refused or failed (nothing committed), 2 usage error \
(also a URL that is not a PostgreSQL URL), 64 bad configuration.";

impl Command {
    /// The library's plain form of the command.
    fn into_action(self) -> Action {
        let client = |c| Action::Client(c);
        match self {
            Command::Run => Action::Run,
            Command::CheckConfig => Action::CheckConfig,
            Command::Connect { label, no_browser } => {
                client(ClientCommand::Connect { label, no_browser })
            }
            Command::Import { label } => client(ClientCommand::Import { label }),
            Command::List { json } => client(ClientCommand::List { json }),
            Command::Show { id, json } => client(ClientCommand::Show { id, json }),
            Command::Token { id, site } => client(ClientCommand::Token(match (id, site) {
                (Some(id), _) => TokenTarget::Id(id),
                (None, Some(site)) => TokenTarget::Site(site),
                (None, None) => unreachable!("clap requires one of ID and --site"),
            })),
            Command::Refresh { id } => client(ClientCommand::Refresh { id }),
            Command::Remove { id } => client(ClientCommand::Remove { id }),
            Command::Events { id, since, json } => {
                client(ClientCommand::Events { id, since, json })
            }
            Command::MigrateLedger { to, to_file } => Action::MigrateLedger(match (to, to_file) {
                (Some(url), _) => MigrateTarget::Url(url),
                (None, Some(path)) => MigrateTarget::File(path),
                (None, None) => unreachable!("clap requires one of --to and --to-file"),
            }),
            Command::Completions { .. } | Command::ManPages { .. } => {
                unreachable!("main runs these without the library (generated())")
            }
        }
    }
}

fn main() -> ExitCode {
    // Taken before anything else opens a descriptor, so that fd 3 is still systemd's.
    let activated = activated_socket();
    // Usage errors exit 2 (clap's default); --help and --version exit 0.
    let cli = Cli::parse();
    if let Some(code) = generated(&cli.command) {
        return code;
    }
    let action = cli.command.into_action();
    tokend::cli::exit(tokend::cli::run(
        &cli.config,
        action,
        tokend::cli::env_socket(),
        activated,
    ))
}

/// The commands that print what is generated from this clap definition (completions, man
/// pages) and need neither a configuration nor the daemon; `None` for every other command.
fn generated(command: &Command) -> Option<ExitCode> {
    let result = match command {
        Command::Completions { shell } => {
            let mut out = std::io::stdout().lock();
            print_completions(*shell, &mut out)
        }
        Command::ManPages { dir } => write_man_pages(dir),
        _ => return None,
    };
    Some(match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tokend: {e}");
            ExitCode::FAILURE
        }
    })
}

/// The completion script for `shell`, generated from [`Cli`].
fn print_completions(shell: CompletionShell, out: &mut dyn std::io::Write) -> std::io::Result<()> {
    use clap_complete::Shell;
    let shell = match shell {
        CompletionShell::Bash => Shell::Bash,
        CompletionShell::Zsh => Shell::Zsh,
        CompletionShell::Fish => Shell::Fish,
    };
    clap_complete::generate(shell, &mut completion_command(), "tokend", out);
    out.flush()
}

/// [`Cli`] without its hidden subcommands (clap_complete would offer them): the same
/// arguments, the visible subcommands, nothing else changed.
fn completion_command() -> clap::Command {
    use clap::CommandFactory;
    let full = Cli::command();
    let args: Vec<clap::Arg> = full.get_arguments().cloned().collect();
    let subcommands: Vec<clap::Command> = full
        .get_subcommands()
        .filter(|s| !s.is_hide_set())
        .cloned()
        .collect();
    clap::Command::new("tokend")
        .version(VERSION)
        .args(args)
        .subcommands(subcommands)
}

/// Writes `man1/tokend.1`, `man1/tokend-<subcommand>.1` for every visible subcommand, and
/// `man5/daemon.toml.5` (from the config's own key table, [`tokend::cli::daemon_toml_page`]).
fn write_man_pages(dir: &std::path::Path) -> std::io::Result<()> {
    let man1 = dir.join("man1");
    let man5 = dir.join("man5");
    std::fs::create_dir_all(&man1)?;
    std::fs::create_dir_all(&man5)?;
    for (name, page) in man_pages()? {
        std::fs::write(man1.join(name), page)?;
    }
    std::fs::write(
        man5.join("daemon.toml.5"),
        tokend::cli::daemon_toml_page(env!("CARGO_PKG_VERSION")),
    )
}

/// Section-1 pages as (file name, roff): `tokend.1` and one per visible subcommand.
fn man_pages() -> std::io::Result<Vec<(String, Vec<u8>)>> {
    use clap::CommandFactory;
    // The page's footer names the version without the commit (as Debian's pages do).
    let mut cmd = Cli::command()
        .version(env!("CARGO_PKG_VERSION"))
        .disable_help_subcommand(true);
    cmd.build();
    let subcommands: Vec<clap::Command> = cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set())
        .cloned()
        .collect();
    let mut out = Vec::new();
    let mut see_also: Vec<String> = subcommands
        .iter()
        .map(|s| format!("tokend-{}(1)", s.get_name()))
        .collect();
    see_also.push("daemon.toml(5)".to_owned());
    let mut top = Vec::new();
    clap_mangen::Man::new(cmd).render(&mut top)?;
    append_see_also(&mut top, &see_also);
    out.push(("tokend.1".to_owned(), top));
    for sub in subcommands {
        let name = format!("tokend-{}", sub.get_name());
        let mut page = Vec::new();
        clap_mangen::Man::new(sub.name(name.clone()))
            .title(name.clone())
            .render(&mut page)?;
        append_see_also(
            &mut page,
            &["tokend(1)".to_owned(), "daemon.toml(5)".to_owned()],
        );
        out.push((format!("{name}.1"), page));
    }
    Ok(out)
}

/// A SEE ALSO section naming `pages` (`name(section)`), in bold as man-pages(7) asks.
fn append_see_also(page: &mut Vec<u8>, pages: &[String]) {
    let refs: Vec<String> = pages
        .iter()
        .map(|p| match p.split_once('(') {
            Some((name, rest)) => format!("\\fB{}\\fR({rest}", name.replace('-', "\\-")),
            None => p.clone(),
        })
        .collect();
    page.extend_from_slice(format!(".SH \"SEE ALSO\"\n{}\n", refs.join(", ")).as_bytes());
}

/// The socket systemd passed to this process, if any (`LISTEN_PID` is ours and
/// `LISTEN_FDS` ≥ 1, and the first descriptor is a Unix listening socket).
fn activated_socket() -> Option<std::os::unix::net::UnixListener> {
    let pid: u32 = std::env::var("LISTEN_PID").ok()?.parse().ok()?;
    let fds: u32 = std::env::var("LISTEN_FDS").ok()?.parse().ok()?;
    if pid != std::process::id() || fds < 1 {
        return None;
    }
    // SAFETY: systemd's protocol hands this process ownership of descriptors 3.. when
    // LISTEN_PID is its pid; nothing else in this process opened or owns descriptor 3 yet
    // (this runs first thing in main), so adopting it cannot alias another owner.
    let listener = unsafe {
        <std::os::unix::net::UnixListener as std::os::fd::FromRawFd>::from_raw_fd(LISTEN_FDS_START)
    };
    match listener.local_addr() {
        Ok(_) => Some(listener),
        Err(_) => {
            // Not a Unix socket: leave it alone rather than misuse it.
            std::mem::forget(listener);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use clap::error::ErrorKind;

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
        completion_command().debug_assert();
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
    fn migrate_ledger_takes_exactly_one_of_to_and_to_file() {
        assert_eq!(
            command(&["migrate-ledger", "--to", "postgres://db/tokend"]).into_action(),
            Action::MigrateLedger(MigrateTarget::Url(LedgerUrl::new("postgres://db/tokend")))
        );
        assert_eq!(
            command(&["migrate-ledger", "--to-file", "/etc/tokend/url"]).into_action(),
            Action::MigrateLedger(MigrateTarget::File("/etc/tokend/url".into()))
        );
        assert_eq!(
            usage_error(&["migrate-ledger"]),
            ErrorKind::MissingRequiredArgument
        );
        assert_eq!(
            usage_error(&["migrate-ledger", "--to", "postgres://a/b", "--to-file", "f"]),
            ErrorKind::ArgumentConflict
        );
        assert_eq!(
            usage_error(&["migrate-ledger", "--to", " "]),
            ErrorKind::ValueValidation
        );
        // A URL clap refuses is never echoed in its message.
        let err = parse(&[
            "migrate-ledger",
            "--to",
            "postgres://u:hunter2@h/d",
            "--to",
            "x",
        ])
        .unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    fn version_names_the_commit() {
        let version = Cli::command().render_version();
        assert!(
            version.starts_with(&format!("tokend {} (commit ", env!("CARGO_PKG_VERSION"))),
            "{version}"
        );
    }

    #[test]
    fn completions_cover_every_visible_subcommand_in_each_shell() {
        assert_eq!(
            command(&["completions", "zsh"]),
            Command::Completions {
                shell: CompletionShell::Zsh
            }
        );
        assert_eq!(
            usage_error(&["completions", "powershell"]),
            ErrorKind::InvalidValue
        );
        for shell in [
            CompletionShell::Bash,
            CompletionShell::Zsh,
            CompletionShell::Fish,
        ] {
            let mut out = Vec::new();
            print_completions(shell, &mut out).unwrap();
            let script = String::from_utf8(out).unwrap();
            for sub in [
                "run",
                "check-config",
                "import",
                "token",
                "events",
                "completions",
            ] {
                assert!(script.contains(sub), "{shell:?} lacks {sub}");
            }
            assert!(
                !script.contains("man-pages"),
                "{shell:?} offers the hidden command"
            );
        }
    }

    #[test]
    fn man_pages_are_one_per_visible_subcommand() {
        let pages = man_pages().unwrap();
        let names: Vec<&str> = pages.iter().map(|(n, _)| n.as_str()).collect();
        let mut want = vec!["tokend.1".to_owned()];
        want.extend(
            Cli::command()
                .get_subcommands()
                .filter(|s| !s.is_hide_set())
                .map(|s| format!("tokend-{}.1", s.get_name())),
        );
        assert_eq!(names, want);
        assert!(!names.contains(&"tokend-man-pages.1"));
        let top = String::from_utf8(pages[0].1.clone()).unwrap();
        assert!(top.contains(".SH \"SEE ALSO\""), "{top}");
        assert!(top.contains("daemon.toml\\fR(5)"), "{top}");
        let token = &pages.iter().find(|(n, _)| n == "tokend-token.1").unwrap().1;
        let token = String::from_utf8(token.clone()).unwrap();
        assert!(token.contains("tokend\\-token"), "{token}");
        assert!(token.contains("TOKEND_SOCKET"), "{token}");
    }

    #[test]
    fn commands_map_to_the_library_actions() {
        assert_eq!(command(&["run"]).into_action(), Action::Run);
        assert_eq!(
            command(&["token", "--site", "h"]).into_action(),
            Action::Client(ClientCommand::Token(TokenTarget::Site("h".into())))
        );
        assert_eq!(
            command(&["events", "c1", "--since", "2026-01-01T00:00:00Z"]).into_action(),
            Action::Client(ClientCommand::Events {
                id: "c1".into(),
                since: Some("2026-01-01T00:00:00Z".into()),
                json: false
            })
        );
    }
}
