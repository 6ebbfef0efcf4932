//! A throwaway PostgreSQL cluster, started once per test run with initdb and postgres in a temp
//! dir on a free port, and stopped by a watchdog when the test process exits.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub struct Cluster {
    pub port: u16,
    pub data_dir: PathBuf,
    /// Held, never waited on: the watchdog stops both when this process exits.
    _processes: [Child; 2],
}

static CLUSTER: OnceLock<Option<Cluster>> = OnceLock::new();

/// The shared cluster, or `None` (with a note on stderr) when PostgreSQL is not installed.
/// With `KEY_AUTHORITY_REQUIRE_POSTGRES=1` a missing PostgreSQL fails the test instead.
pub fn cluster() -> Option<&'static Cluster> {
    CLUSTER
        .get_or_init(|| match find_bin_dir() {
            Some(bin_dir) => Some(start(&bin_dir)),
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

fn start(bin_dir: &Path) -> Cluster {
    let as_root = running_as_root();
    let base = std::env::temp_dir().join(format!("key-authority-pg-{}", std::process::id()));
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
    let server = pg_command(bin_dir, "postgres", as_root)
        .arg("-D")
        .arg(&data_dir)
        .args(["-p", &port.to_string()])
        .args(["-c", "listen_addresses=127.0.0.1"])
        .arg("-c")
        .arg(format!("unix_socket_directories={}", base.display()))
        .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
        .args(["-c", "full_page_writes=off", "-c", "max_connections=400"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start postgres");
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
        _processes: [server, watchdog],
    }
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
}
