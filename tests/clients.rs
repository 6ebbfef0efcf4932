//! The Python and Node clients' own suites (`clients/python`, `clients/node`), each run against
//! this build's binary. A suite whose toolchain or packages are missing is skipped with a
//! "skipping: ..." line, unless `KEY_AUTHORITY_REQUIRE_CLIENTS=1` (CI), which makes it a failure.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const BINARY: &str = env!("CARGO_BIN_EXE_key-authority");
const REQUIRE: &str = "KEY_AUTHORITY_REQUIRE_CLIENTS";
/// Each suite takes seconds; this only stops a hung one from hanging the test run.
const SUITE_TIMEOUT: Duration = Duration::from_secs(120);
const PIP_INSTALL: &str = "pip install -r clients/python/requirements.txt";
const NPM_INSTALL: &str = "npm ci --prefix clients/node";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Reports a missing prerequisite: a failure when clients are required, else a skip. Returns so
/// the caller can `return` after a skip.
fn skip_or_fail(what: &str) {
    if std::env::var(REQUIRE).as_deref() == Ok("1") {
        panic!("{REQUIRE}=1, but {what}");
    }
    println!("skipping: {what}");
}

/// Runs a probe command; `Err` says why it could not run or failed.
fn probe(program: &str, args: &[&str], dir: &Path) -> Result<(), String> {
    match Command::new(program)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
    {
        Ok(output) if output.status.success() => Ok(()),
        Ok(output) => Err(format!(
            "`{program} {}` failed ({}): {}{}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stdout).trim(),
            String::from_utf8_lossy(&output.stderr).trim(),
        )),
        Err(error) => Err(format!("`{program}` cannot run: {error}")),
    }
}

struct SuiteOutput {
    status: Option<ExitStatus>,
    stdout: String,
    stderr: String,
}

impl SuiteOutput {
    fn passed(&self) -> bool {
        self.status.is_some_and(|status| status.success())
    }

    fn report(&self, name: &str) -> String {
        let outcome = match self.status {
            Some(status) => format!("{name} exited with {status}"),
            None => format!("{name} did not finish within {SUITE_TIMEOUT:?} and was killed"),
        };
        format!(
            "{outcome}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.stdout, self.stderr
        )
    }
}

fn drain(mut stream: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stream.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// Kills the suite and everything it started (its server included): they share the process
/// group the suite was started in.
fn kill_suite(child: &mut Child) {
    #[cfg(unix)]
    {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", child.id())])
            .status();
    }
    let _ = child.kill();
}

/// Runs a suite with the binary under test, capturing its output, within SUITE_TIMEOUT.
fn run_suite(program: &str, args: &[&str]) -> SuiteOutput {
    let mut command = Command::new(program);
    command
        .args(args)
        .current_dir(repo())
        .env("KEY_AUTHORITY_BIN", BINARY)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        command.process_group(0);
    }
    let mut child = command
        .spawn()
        .unwrap_or_else(|error| panic!("cannot start `{program}`: {error}"));
    let stdout = drain(child.stdout.take().unwrap());
    let stderr = drain(child.stderr.take().unwrap());
    let deadline = Instant::now() + SUITE_TIMEOUT;
    let status = loop {
        match child.try_wait().expect("waiting for the suite") {
            Some(status) => break Some(status),
            None if Instant::now() >= deadline => {
                kill_suite(&mut child);
                let _ = child.wait();
                break None;
            }
            None => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    SuiteOutput {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}

#[test]
fn python_client_suite() {
    let imports = "import grpc, grpc_tools, grpc_status, grpc_health, google.rpc.error_details_pb2, pytest, \
         standardwebhooks";
    if let Err(why) = probe("python3", &["-c", imports], repo()) {
        skip_or_fail(&format!(
            "the Python client suite needs python3 with its packages ({PIP_INSTALL}): {why}"
        ));
        return;
    }
    let output = run_suite("python3", &["-m", "pytest", "-q", "clients/python/tests"]);
    assert!(output.passed(), "{}", output.report("pytest"));
    println!("{}", output.stdout.trim_end());
}

#[test]
fn node_client_suite() {
    let node_dir: PathBuf = repo().join("clients/node");
    for program in ["node", "npm"] {
        if let Err(why) = probe(program, &["--version"], &node_dir) {
            skip_or_fail(&format!(
                "the Node client suite needs {program} on PATH: {why}"
            ));
            return;
        }
    }
    if !node_dir.join("node_modules").is_dir() {
        if !node_dir.join("package-lock.json").is_file() {
            skip_or_fail("clients/node has neither node_modules nor package-lock.json");
            return;
        }
        if let Err(why) = probe("npm", &["ci", "--no-audit", "--no-fund"], &node_dir) {
            skip_or_fail(&format!(
                "clients/node/node_modules is missing and `{NPM_INSTALL}` failed: {why}"
            ));
            return;
        }
    }
    let output = run_suite("npm", &["test", "--prefix", "clients/node"]);
    assert!(output.passed(), "{}", output.report("npm test"));
    println!("{}", output.stdout.trim_end());
}
