//! Tests only: throw-away PostgreSQL clusters for the PostgreSQL ledger's tests.
//!
//! A [`Cluster`] is `initdb` + `pg_ctl start` in a fresh temp dir, stopped when dropped. It
//! listens on a Unix socket in that dir only (`listen_addresses=''`), so its trust
//! authentication is open to nobody but users who can reach the dir, never to every local
//! process over 127.0.0.1; [`PASSWORD_ROLE`] alone must give a password. The TLS cluster
//! ([`Cluster::start_tls`]) also listens on 127.0.0.1 at a free port, TLS only
//! (`hostssl`), still with trust over it: its tests check which certificates the client
//! accepts, and the cluster lives for one test in a private temp dir. As root, the server
//! runs as the `postgres` user (`runuser`), which owns the dir. [`shared`]
//! is one cluster per test process; [`database`] gives each test its own database in it.
//!
//! The file depends on nothing but std and `tempfile`, so that the unit tests (`lib.rs`
//! mounts it under `cfg(test)`) and the integration tests (`#[path]` include) share it.
//!
//! When no PostgreSQL server is installed, [`database`] returns `None` after printing a
//! notice, and the test returns early; with `TOKEND_REQUIRE_POSTGRES` set (CI sets it to 1) it panics
//! instead, so a missing server fails the run rather than silently skipping it.

#![allow(dead_code)] // Each includer uses a part.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

/// The environment variable that turns a missing PostgreSQL into a failure (set by `.ci/run`).
pub const REQUIRE_ENV: &str = "TOKEND_REQUIRE_POSTGRES";

/// How many times a start is tried with a new port (another process may take the free port
/// between our probe and the server's bind).
const START_TRIES: usize = 3;

/// The superuser `initdb` creates, and the user tests connect as.
pub const SUPERUSER: &str = "postgres";

/// The one role that must give a password (`scram-sha-256`), for tests of a failed login.
/// A test creates it (with a password of its choosing).
pub const PASSWORD_ROLE: &str = "tokend_pw";

/// A running throw-away cluster.
pub struct Cluster {
    /// `pg_ctl`, `initdb`, `createdb`, ... live here.
    bindir: PathBuf,
    /// The data directory, the socket and the log (removed with it).
    dir: tempfile::TempDir,
    /// The socket's number (`.s.PGSQL.<port>`), and the TCP port on 127.0.0.1 of a TLS
    /// cluster.
    port: u16,
    /// Run the server's tools as `postgres` (we are root).
    as_postgres: bool,
    /// `server.crt` and `server.key` are in the dir, and the server has `ssl=on`.
    tls: bool,
    /// `fsync=on`: commits reach the disk, as on a production server. Off for the tests
    /// (a throw-away cluster need not survive a power cut, and they run faster); on for the
    /// benchmark, whose commit rates must be those of a real server.
    durable: bool,
}

impl Cluster {
    /// Starts a new cluster, or `None` (after a notice) when no server is installed and
    /// [`REQUIRE_ENV`] is not set. Panics when one is installed but does not start.
    pub fn start() -> Option<Cluster> {
        Cluster::start_with(None, false)
    }

    /// [`Cluster::start`] with `fsync=on`, for measurements (the outside bench).
    pub fn start_durable() -> Option<Cluster> {
        Cluster::start_with(None, true)
    }

    /// [`Cluster::start`] with TLS on (`ssl=on`), serving the PEM certificate (chain) and key
    /// given; TCP clients must use TLS (`hostssl` only).
    pub fn start_tls(cert_pem: &str, key_pem: &str) -> Option<Cluster> {
        Cluster::start_with(Some((cert_pem, key_pem)), false)
    }

    fn start_with(tls: Option<(&str, &str)>, durable: bool) -> Option<Cluster> {
        let Some(bindir) = bindir() else {
            if std::env::var_os(REQUIRE_ENV).is_some() {
                panic!(
                    "{REQUIRE_ENV} is set but no PostgreSQL server is installed (no initdb under `pg_config --bindir` or /usr/lib/postgresql/*/bin); install the postgresql package"
                );
            }
            eprintln!(
                "notice: skipping a PostgreSQL test: no PostgreSQL server is installed (install the postgresql package; set {REQUIRE_ENV} to make this a failure)"
            );
            return None;
        };
        let as_postgres = rustix::process::geteuid().is_root();
        let dir = tempfile::Builder::new()
            .prefix("tokend-pg-")
            .tempdir()
            .expect("temp dir for a PostgreSQL cluster");
        if as_postgres {
            run(Command::new("chown")
                .arg(format!("{SUPERUSER}:"))
                .arg(dir.path()));
        }
        let data = dir.path().join("data");
        let mut cluster = Cluster {
            bindir,
            dir,
            port: 0,
            as_postgres,
            tls: tls.is_some(),
            durable,
        };
        run(cluster
            .tool("initdb")
            .args([
                "-A",
                "trust",
                "-U",
                SUPERUSER,
                "-E",
                "UTF8",
                "--no-sync",
                "-D",
            ])
            .arg(&data));
        if let Some((cert, key)) = tls {
            use std::os::unix::fs::PermissionsExt;
            for (name, pem, mode) in [("server.crt", cert, 0o644), ("server.key", key, 0o600)] {
                let path = cluster.dir.path().join(name);
                std::fs::write(&path, pem).expect("write a TLS file");
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
                    .expect("chmod a TLS file");
                if as_postgres {
                    run(Command::new("chown")
                        .arg(format!("{SUPERUSER}:"))
                        .arg(&path));
                }
            }
        }
        // The first matching line wins: PASSWORD_ROLE gives a password, the rest is trusted
        // on the socket; over TCP (TLS clusters only) TLS or nothing, so that a test that
        // connects proves TLS was used.
        let hba = format!(
            "local all {PASSWORD_ROLE} scram-sha-256\nlocal all all trust\n{}",
            if tls.is_some() {
                "hostssl all all 127.0.0.1/32 trust\n"
            } else {
                ""
            }
        );
        std::fs::write(cluster.data().join("pg_hba.conf"), hba).expect("write pg_hba.conf");
        let mut last = String::new();
        for _ in 0..START_TRIES {
            cluster.port = free_port();
            match cluster.pg_ctl_start() {
                Ok(()) => {
                    cluster.reaper();
                    return Some(cluster);
                }
                Err(e) => last = e,
            }
        }
        panic!("PostgreSQL did not start: {last}");
    }

    fn pg_ctl_start(&self) -> Result<(), String> {
        let out = self
            .tool("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.dir.path().join("server.log"))
            .arg("-o")
            .arg(format!(
                "-k {dir} -p {port} -c listen_addresses={listen} -c fsync={fsync} -c max_connections=200{tls}",
                dir = self.dir.path().display(),
                port = self.port,
                fsync = if self.durable { "on" } else { "off" },
                // The socket only, unless a test needs TCP (the TLS tests do).
                listen = if self.tls { "127.0.0.1" } else { "''" },
                tls = if self.tls {
                    format!(
                        " -c ssl=on -c ssl_cert_file={dir}/server.crt -c ssl_key_file={dir}/server.key",
                        dir = self.dir.path().display()
                    )
                } else {
                    String::new()
                },
            ))
            .args(["-w", "-t", "60", "start"])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("pg_ctl: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            let log =
                std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
            Err(format!(
                "{}{}\n{log}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// Stops the server when this process ends however it ends (a panic, an abort, a
    /// `static` never dropped): a small shell waits for our pid to go, then stops it.
    fn reaper(&self) {
        // The wait runs as ourselves (`kill -0` on our pid needs our rights), the stop as the
        // server's owner; then the temp dir goes, which a `static` never drops.
        let stop = if self.as_postgres {
            format!("{} -u {SUPERUSER} -- ", runuser())
        } else {
            String::new()
        };
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {stop}'{pg_ctl}' -D '{data}' -m immediate stop; rm -rf '{dir}'",
            pid = std::process::id(),
            pg_ctl = self.bindir.join("pg_ctl").display(),
            data = self.data().display(),
            dir = self.dir.path().display(),
        );
        // Detached from our stdio: a test runner waiting for our output's end must not wait
        // for it.
        let _ = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// A command running one of the server's tools, as `postgres` when we are root.
    fn tool(&self, name: &str) -> Command {
        let path = self.bindir.join(name);
        if self.as_postgres {
            let mut c = Command::new(runuser());
            c.args(["-u", SUPERUSER, "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    /// The port: the socket's number, and on a TLS cluster the TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory holding the server's Unix socket.
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server's log so far (for a failing test's message).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// A URL of database `db` over the Unix socket, without TLS.
    pub fn url(&self, db: &str) -> String {
        self.url_as(SUPERUSER, db)
    }

    /// [`Cluster::url`] for `userinfo` (`user` or `user:password`, percent-encoded).
    pub fn url_as(&self, userinfo: &str, db: &str) -> String {
        let dir: String = self
            .dir
            .path()
            .display()
            .to_string()
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => {
                    (b as char).to_string()
                }
                b => format!("%{b:02X}"),
            })
            .collect();
        format!(
            "postgres://{userinfo}@{dir}:{}/{db}?sslmode=disable",
            self.port
        )
    }

    /// Creates a new empty database and returns its name.
    pub fn create_database(&self) -> String {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "t{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run(self
            .tool("createdb")
            .args(["-h"])
            .arg(self.dir.path())
            .args(["-p", &self.port.to_string(), "-U", SUPERUSER, &name]));
        name
    }

    /// Stops the server at once, as a crash would (`pg_ctl -m immediate stop`).
    pub fn crash(&self) {
        run(self
            .tool("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "-w", "stop"]));
    }

    /// Stops the server as an orderly restart does (`pg_ctl -m fast stop`: open transactions
    /// rolled back, every client disconnected, a shutdown checkpoint).
    pub fn stop(&self) {
        run(self
            .tool("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-m", "fast", "-w", "stop"]));
    }

    /// Starts the server again on the same port after [`Cluster::crash`] or [`Cluster::stop`].
    pub fn restart(&self) {
        if let Err(e) = self.pg_ctl_start() {
            panic!("PostgreSQL did not restart: {e}");
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self
            .tool("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "-w", "stop"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// The cluster this test process shares (started on first use), or `None` as in
/// [`Cluster::start`].
pub fn shared() -> Option<&'static Cluster> {
    static SHARED: OnceLock<Option<Cluster>> = OnceLock::new();
    SHARED.get_or_init(Cluster::start).as_ref()
}

/// A fresh database in the shared cluster: its URL, or `None` as in [`Cluster::start`].
pub fn database() -> Option<String> {
    let cluster = shared()?;
    Some(cluster.url(&cluster.create_database()))
}

/// Where the server's binaries are: `pg_config --bindir` if it has `initdb`, else the newest
/// `/usr/lib/postgresql/*/bin` that has it.
pub fn bindir() -> Option<PathBuf> {
    let has_initdb = |d: &Path| d.join("initdb").is_file();
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if has_initdb(&dir) {
            return Some(dir);
        }
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let major = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            has_initdb(&bin).then_some((major, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin)
}

/// `runuser` (util-linux), which root's `PATH` may lack (`/usr/sbin`).
fn runuser() -> &'static str {
    ["/usr/sbin/runuser", "/sbin/runuser", "/usr/bin/runuser"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
        .unwrap_or("runuser")
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}

/// Runs a command to its end, panicking with its output when it fails.
fn run(cmd: &mut Command) {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
