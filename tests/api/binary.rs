//! The real binary: `migrate`, `serve`, and a graceful stop on SIGTERM.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use key_authority::pb;
use key_authority::pb::verify_service_client::VerifyServiceClient;
use tonic::transport::Channel;

pub const BINARY: &str = env!("CARGO_BIN_EXE_key-authority");

pub use crate::postgres_cluster::free_port;

pub async fn connect(port: u16) -> Channel {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match Channel::from_shared(format!("http://127.0.0.1:{port}"))
            .unwrap()
            .connect()
            .await
        {
            Ok(channel) => return channel,
            Err(error) => {
                assert!(Instant::now() < deadline, "server did not come up: {error}");
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
    }
}

/// `key-authority serve` on 127.0.0.1:`port` against `database_url`, with the cheap argon2 of the
/// in-process tests and `admin_token` as the one admin token.
pub(crate) fn serve_command(port: u16, database_url: &str, admin_token: &str) -> Command {
    let mut command = Command::new(BINARY);
    command
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .env("DATABASE_URL", database_url)
        .env("KEY_AUTHORITY_ADMIN_TOKEN", admin_token)
        .env("KEY_AUTHORITY_ARGON2_MEMORY_KIB", "1024")
        .env("KEY_AUTHORITY_ARGON2_ITERATIONS", "1")
        .env("KEY_AUTHORITY_ARGON2_PARALLELISM", "1")
        .env_remove("RUST_LOG")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .stdin(Stdio::null());
    command
}

/// A running `key-authority` process whose stdout and stderr are read to the end in threads, so
/// it never blocks on a full pipe and the test gets every line it wrote.
/// Dropped before `wait` (a failed assertion), the process is killed rather than left running.
pub(crate) struct ServerProcess {
    child: Option<std::process::Child>,
    output: Option<[std::thread::JoinHandle<Vec<u8>>; 2]>,
}

/// How a server process ended, and everything it wrote.
pub(crate) struct Exited {
    pub status: std::process::ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl ServerProcess {
    /// Starts `command` (made by `serve_command`) with its output captured.
    pub fn spawn(mut command: Command) -> Self {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start key-authority");
        let read_all = |mut pipe: Box<dyn std::io::Read + Send>| {
            std::thread::spawn(move || {
                let mut bytes = Vec::new();
                let _ = pipe.read_to_end(&mut bytes);
                bytes
            })
        };
        let stdout = read_all(Box::new(child.stdout.take().unwrap()));
        let stderr = read_all(Box::new(child.stderr.take().unwrap()));
        Self {
            child: Some(child),
            output: Some([stdout, stderr]),
        }
    }

    fn child(&mut self) -> &mut std::process::Child {
        self.child.as_mut().expect("not waited for yet")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("not waited for yet").id()
    }

    /// Sends SIGTERM: the graceful stop.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -TERM {}", self.pid());
    }

    /// Sends SIGKILL: no drain, no flush.
    pub fn kill(&mut self) {
        self.child().kill().expect("SIGKILL the server");
    }

    /// Waits for the process to end; returns its status and output.
    pub async fn wait(mut self) -> Exited {
        let mut child = self.child.take().expect("waited for once");
        let [stdout, stderr] = self.output.take().expect("waited for once");
        tokio::task::spawn_blocking(move || {
            let status = child.wait().expect("wait for the server");
            Exited {
                status,
                stdout: stdout.join().expect("stdout reader"),
                stderr: stderr.join().expect("stderr reader"),
            }
        })
        .await
        .unwrap()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[test]
fn migrate_creates_the_schema() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("m.db").display());
    let status = Command::new(BINARY)
        .args(["migrate", "--database-url", &url])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(dir.path().join("m.db").is_file());
    // Running it again is a no-op, not an error.
    let status = Command::new(BINARY)
        .args(["migrate", "--database-url", &url])
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn bad_configuration_exits_non_zero_with_a_reason() {
    let output = Command::new(BINARY)
        .args([
            "serve",
            "--key-prefix",
            "Not_Valid",
            "--listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("key prefix"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_then_sigterm_drains_and_flushes_usage() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("s.db").display());
    let port = free_port();
    let child = Command::new(BINARY)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .env("DATABASE_URL", &url)
        .env("KEY_AUTHORITY_KEY_PREFIX", "acme")
        .env("KEY_AUTHORITY_USAGE_FLUSH_INTERVAL", "1h")
        .env("KEY_AUTHORITY_ADMIN_TOKEN", "binary-test-admin")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let channel = connect(port).await;
    let mut keys = crate::common::keys_as(&channel, Some("binary-test-admin"));
    let mut verify = VerifyServiceClient::new(channel);
    let issued = keys
        .issue_key(pb::IssueKeyRequest {
            workspace_id: "w".into(),
            name: "n".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        issued.secret.starts_with("acme_live_"),
        "the configured brand is used"
    );
    for _ in 0..4 {
        let verdict = verify
            .verify_key(pb::VerifyKeyRequest {
                key: issued.secret.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(verdict.valid);
    }
    drop(keys);
    drop(verify);

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.status.success(), "graceful exit: {:?}", exit.status);
    let stderr = String::from_utf8_lossy(&exit.stderr);
    assert!(
        !stderr.contains(&issued.secret[12..]),
        "no secret in the logs"
    );

    // The usage counted before SIGTERM reached the database.
    let store = key_authority::store::open(&url, 1).await.unwrap();
    let workspace = key_authority::key::WorkspaceId::parse("w").unwrap();
    let key_id = key_authority::key::KeyId::parse(&issued.key.unwrap().key_id).unwrap();
    let key = store.get_key(&workspace, &key_id).await.unwrap().unwrap();
    assert_eq!(key.total_requests, 4);
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_run_without_credentials_generates_an_admin_token() {
    use std::io::BufRead;

    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("g.db").display());
    let port = free_port();
    let mut child = Command::new(BINARY)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .env("DATABASE_URL", &url)
        .env_remove("KEY_AUTHORITY_ADMIN_TOKEN")
        .env_remove("KEY_AUTHORITY_JWT_SECRET")
        .env_remove("KEY_AUTHORITY_JWT_PUBLIC_KEY_FILE")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (found, token) = tokio::sync::oneshot::channel();
    // Keep draining stderr after the token line, so the server never writes to a closed pipe.
    std::thread::spawn(move || {
        let mut found = Some(found);
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if let Some((_, token)) = line.split_once("generated admin token for this run: ")
                && let Some(found) = found.take()
            {
                let _ = found.send(token.trim().to_owned());
            }
        }
    });
    let token = token
        .await
        .expect("the generated token is printed on stderr");
    assert!(token.starts_with("kaadmin_") && token.len() == "kaadmin_".len() + 40);

    let channel = connect(port).await;
    let anonymous = crate::common::keys_as(&channel, None)
        .issue_key(pb::IssueKeyRequest {
            workspace_id: "w".into(),
            name: "n".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(anonymous.code(), tonic::Code::Unauthenticated, "never open");
    crate::common::keys_as(&channel, Some(&token))
        .issue_key(pb::IssueKeyRequest {
            workspace_id: "w".into(),
            name: "n".into(),
            ..Default::default()
        })
        .await
        .expect("the printed token is an admin token");
    drop(channel);
    child.kill().unwrap();
    child.wait().unwrap();
}
