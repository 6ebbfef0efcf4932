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
