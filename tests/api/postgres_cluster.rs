//! A throwaway PostgreSQL cluster, started once per test run with initdb and postgres in a temp
//! dir on a free port, and stopped by a watchdog when the test process exits.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub struct Cluster {
    pub port: u16,
    pub data_dir: PathBuf,
    bin_dir: PathBuf,
    /// Where the unix socket lives.
    socket_dir: PathBuf,
    as_root: bool,
    /// Held, never waited on: the watchdog stops the server when this process exits. A restart
    /// adds the new server.
    _processes: std::sync::Mutex<Vec<Child>>,
}

static CLUSTER: OnceLock<Option<Cluster>> = OnceLock::new();

/// The shared cluster, or `None` (with a note on stderr) when PostgreSQL is not installed.
/// With `KEY_AUTHORITY_REQUIRE_POSTGRES=1` a missing PostgreSQL fails the test instead.
pub fn cluster() -> Option<&'static Cluster> {
    CLUSTER
        .get_or_init(|| match find_bin_dir() {
            Some(bin_dir) => Some(start(&bin_dir, "shared")),
            None => {
                if std::env::var("KEY_AUTHORITY_REQUIRE_POSTGRES").as_deref() == Ok("1") {
                    panic!(
                        "KEY_AUTHORITY_REQUIRE_POSTGRES=1 but no PostgreSQL binaries (initdb, \
                         postgres) were found; install PostgreSQL or set KEY_AUTHORITY_PG_BIN"
                    );
                }
                eprintln!(
                    "PostgreSQL binaries not found: skipping PostgreSQL tests \
                     (install PostgreSQL or set KEY_AUTHORITY_PG_BIN)"
                );
                None
            }
        })
        .as_ref()
}

fn find_bin_dir() -> Option<PathBuf> {
    let has_server = |dir: &Path| dir.join("initdb").is_file() && dir.join("postgres").is_file();
    if let Ok(dir) = std::env::var("KEY_AUTHORITY_PG_BIN") {
        return Some(PathBuf::from(dir)).filter(|dir| has_server(dir));
    }
    if let Ok(output) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        if has_server(&dir) {
            return Some(dir);
        }
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path().join("bin"))
        .filter(|dir| has_server(dir))
        .collect();
    versions.sort_by_key(|dir| {
        dir.parent()
            .and_then(|version| version.file_name())
            .and_then(|name| name.to_str())
            .and_then(|name| name.parse::<u32>().ok())
            .unwrap_or(0)
    });
    versions.pop()
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|output| String::from_utf8_lossy(&output.stdout).trim() == "0")
        .unwrap_or(false)
}

/// PostgreSQL refuses to run as root: as root, run its binaries as the `postgres` user.
fn pg_command(bin_dir: &Path, program: &str, as_root: bool) -> Command {
    let binary = bin_dir.join(program);
    if as_root {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(binary);
        command
    } else {
        Command::new(binary)
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free port")
}

/// A cluster of the caller's own, which it may stop and start again (outage tests); `None`
/// where PostgreSQL is not installed, as `cluster()`.
pub fn private_cluster() -> Option<Cluster> {
    // Checks the installation (and KEY_AUTHORITY_REQUIRE_POSTGRES) the same way.
    cluster()?;
    let bin_dir = find_bin_dir()?;
    Some(start(&bin_dir, &format!("private-{}", free_port())))
}

fn start(bin_dir: &Path, name: &str) -> Cluster {
    let as_root = running_as_root();
    let base = std::env::temp_dir().join(format!("key-authority-pg-{}-{name}", std::process::id()));
    let data_dir = base.join("data");
    std::fs::create_dir_all(&base).expect("create the cluster folder");
    if as_root {
        let status = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&base)
            .status()
            .expect("chown the cluster folder");
        assert!(status.success(), "chown of {base:?} failed");
    }
    let initdb = pg_command(bin_dir, "initdb", as_root)
        .arg("-D")
        .arg(&data_dir)
        .args([
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ])
        .stdout(Stdio::null())
        .output()
        .expect("run initdb");
    assert!(
        initdb.status.success(),
        "initdb failed: {}",
        String::from_utf8_lossy(&initdb.stderr)
    );
    let port = free_port();
    let server = spawn_server(bin_dir, &data_dir, &base, port, as_root);
    // Nothing runs at process exit in a Rust test binary, so a watchdog stops the cluster and
    // removes its files once this process is gone. The postmaster's own pid is in its pid file
    // (the spawned process may be runuser).
    let watchdog = format!(
        "while kill -0 {test} 2>/dev/null; do sleep 1; done; \
         pg=$(head -n 1 '{data}/postmaster.pid' 2>/dev/null); \
         if [ -n \"$pg\" ]; then kill -INT \"$pg\" 2>/dev/null; \
         for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 \"$pg\" 2>/dev/null || break; sleep 1; done; fi; \
         rm -rf '{base}'",
        test = std::process::id(),
        data = data_dir.display(),
        base = base.display()
    );
    let watchdog = Command::new("sh")
        .args(["-c", &watchdog])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the cluster watchdog");
    wait_until_accepting(port);
    Cluster {
        port,
        data_dir,
        bin_dir: bin_dir.to_owned(),
        socket_dir: base,
        as_root,
        _processes: std::sync::Mutex::new(vec![server, watchdog]),
    }
}

fn spawn_server(
    bin_dir: &Path,
    data_dir: &Path,
    socket_dir: &Path,
    port: u16,
    as_root: bool,
) -> Child {
    pg_command(bin_dir, "postgres", as_root)
        .arg("-D")
        .arg(data_dir)
        .args(["-p", &port.to_string()])
        .args(["-c", "listen_addresses=127.0.0.1"])
        .arg("-c")
        .arg(format!("unix_socket_directories={}", socket_dir.display()))
        .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
        .args(["-c", "full_page_writes=off", "-c", "max_connections=400"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start postgres")
}

fn wait_until_accepting(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "postgres did not start within 60 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Cluster {
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Stops the server for real (a fast shutdown: clients are disconnected, the port closes)
    /// and returns once it is gone.
    pub fn stop(&self) {
        let pid = std::fs::read_to_string(self.data_dir.join("postmaster.pid"))
            .expect("the server's pid file")
            .lines()
            .next()
            .expect("a pid")
            .trim()
            .to_owned();
        let status = Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -INT {pid} failed");
        let deadline = Instant::now() + Duration::from_secs(60);
        while Command::new("kill")
            .args(["-0", &pid])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
        {
            assert!(
                Instant::now() < deadline,
                "postgres did not stop within 60 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the server again on the same data and port; returns once it accepts connections.
    pub fn start_again(&self) {
        let server = spawn_server(
            &self.bin_dir,
            &self.data_dir,
            &self.socket_dir,
            self.port,
            self.as_root,
        );
        self._processes.lock().unwrap().push(server);
        wait_until_accepting(self.port);
    }

    /// Creates a database and returns its URL, waiting for the server to take queries.
    pub async fn create_database(&self) -> String {
        use sqlx::Connection as _;
        let name = format!("t_{}", crate::common::random_suffix());
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match sqlx::PgConnection::connect(&self.url("postgres")).await {
                Ok(mut admin) => {
                    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("create database {name}")))
                        .execute(&mut admin)
                        .await
                        .expect("create a test database");
                    return self.url(&name);
                }
                Err(error) if Instant::now() < deadline => {
                    let _ = error;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(error) => panic!("cannot reach the test cluster: {error}"),
            }
        }
    }
}
