//! Daemons on one PostgreSQL ledger: a fresh database in the test process's throw-away
//! cluster (`src/testpg.rs`), one key file they all share, and a [`Proxy`] per daemon so
//! that a test can cut one of them off the ledger.

use std::path::PathBuf;

use super::proxy::Proxy;
use super::{DaemonBuilder, TestDaemon, toml_str};
use crate::fake::FakeAtlassian;

#[path = "../../../src/testpg.rs"]
pub mod testpg;

/// The key every daemon of one [`SharedLedger`] seals with (64 hex digits).
const KEY_HEX: &str = "8f1c2e3d4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";

/// One database and one key file for several daemons.
pub struct SharedLedger {
    /// The database's name in the shared cluster.
    db: String,
    /// The cluster's Unix socket, which each daemon's proxy forwards to.
    socket: PathBuf,
    /// Holds the key file.
    dir: tempfile::TempDir,
    /// The cluster's socket directory and port, for [`SharedLedger::query_i64`].
    direct: (PathBuf, u16),
}

/// A daemon on a [`SharedLedger`], with the proxy between it and PostgreSQL.
pub struct PgDaemon {
    pub daemon: TestDaemon,
    pub proxy: Proxy,
}

impl SharedLedger {
    /// A fresh database, or `None` when no PostgreSQL is installed (and
    /// `TOKEND_REQUIRE_POSTGRES` is not set): the test then returns early.
    pub fn new() -> Option<SharedLedger> {
        Some(SharedLedger::on(testpg::shared()?))
    }

    /// A fresh database in a cluster of the test's own (one it may crash and restart), or
    /// `None` as in [`SharedLedger::new`].
    pub fn own_cluster() -> Option<(testpg::Cluster, SharedLedger)> {
        let cluster = testpg::Cluster::start()?;
        let ledger = SharedLedger::on(&cluster);
        Some((cluster, ledger))
    }

    fn on(cluster: &testpg::Cluster) -> SharedLedger {
        let db = cluster.create_database();
        let dir = tempfile::tempdir().expect("temp dir for the key file");
        let key = dir.path().join("ledger.key");
        std::fs::write(&key, format!("{KEY_HEX}\n")).expect("write the key file");
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))
                .expect("chmod the key file");
        }
        SharedLedger {
            db,
            socket: cluster
                .socket_dir()
                .join(format!(".s.PGSQL.{}", cluster.port())),
            dir,
            direct: (cluster.socket_dir().to_path_buf(), cluster.port()),
        }
    }

    /// The one `bigint` a query of the ledger's database answers (straight to the cluster,
    /// past every proxy): for a test that looks at what the daemons stored.
    pub fn query_i64(&self, sql: &str) -> i64 {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime for the query");
        rt.block_on(async {
            let config = format!(
                "host={} port={} user={} dbname={}",
                self.direct.0.display(),
                self.direct.1,
                testpg::SUPERUSER,
                self.db
            );
            let (client, conn) = tokio_postgres::connect(&config, tokio_postgres::NoTls)
                .await
                .expect("connect to the test cluster");
            tokio::spawn(conn);
            client
                .query_one(sql, &[])
                .await
                .expect("the test's query")
                .get(0)
        })
    }

    /// The database's name in its cluster (for a test that reads the ledger itself).
    pub fn database(&self) -> &str {
        &self.db
    }

    /// The key file every daemon is given.
    pub fn key_file(&self) -> PathBuf {
        self.dir.path().join("ledger.key")
    }

    /// A builder for daemon `node` on this ledger through a new proxy: `daemon.node_name`,
    /// `daemon.key_file`, `ledger.url` and a short `ledger.lease` set; anything else can be
    /// set on the builder before [`PgDaemon::start`].
    pub fn builder(&self, fake: &FakeAtlassian, node: &str) -> (DaemonBuilder, Proxy) {
        let proxy = Proxy::start(self.socket.clone());
        let url = format!(
            "postgres://{}@{}/{}?sslmode=disable&connect_timeout=2",
            testpg::SUPERUSER,
            proxy.addr(),
            self.db
        );
        let b = TestDaemon::builder(fake)
            .set("daemon", "node_name", &toml_str(node))
            .set(
                "daemon",
                "key_file",
                &toml_str(&self.key_file().display().to_string()),
            )
            .set("ledger", "url", &toml_str(&url))
            .set("ledger", "lease", &toml_str("10s"))
            .metrics();
        (b, proxy)
    }

    /// Starts daemon `node` with the defaults of [`SharedLedger::builder`].
    pub fn start(&self, fake: &FakeAtlassian, node: &str) -> PgDaemon {
        let (b, proxy) = self.builder(fake, node);
        PgDaemon {
            daemon: b.start(),
            proxy,
        }
    }
}
