//! loadgen: drives running key-authority servers over real gRPC and reports throughput and
//! latency against the service's performance targets. See BENCHMARKS.md and bench/run.sh.
//!
//! Every request loop is closed (one request in flight per loop) and bounded in time and count;
//! every answer is checked, and wrong answers are counted and printed, never timed as successes.

#![forbid(unsafe_code)]

mod client;
mod cold;
mod cpu;
mod driver;
mod ext_authz;
mod flood;
mod frames;
mod local;
mod memory;
mod propagation;
mod report;
mod scale;
mod soak;
mod stats;
mod warm;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use client::{Net, Result};
use cold::Argon2Settings;
use propagation::PropagationSettings;
use report::TargetLine;
use soak::{Replica, SoakSettings};
use warm::LoopSettings;

#[derive(Debug, Parser)]
#[command(
    name = "loadgen",
    about = "Benchmarks running key-authority servers over gRPC"
)]
struct Cli {
    /// Tokio worker threads of this load generator (1 lets it be pinned to one core).
    #[arg(long, default_value_t = 1, global = true)]
    workers: usize,

    /// Deadline of every RPC.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration, global = true)]
    request_timeout: Duration,

    /// How long to wait for the servers to report SERVING before starting.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration, global = true)]
    wait: Duration,

    /// How many request loops share one HTTP/2 connection.
    #[arg(long, default_value_t = 16, global = true)]
    loops_per_connection: usize,

    /// Bearer token for KeyService calls (IssueKey, RevokeKey), if the server requires one.
    #[arg(
        long,
        env = "LOADGEN_ADMIN_TOKEN",
        global = true,
        hide_env_values = true
    )]
    admin_token: Option<String>,

    /// Bearer token for VerifyKey calls, if the server requires one.
    #[arg(
        long,
        env = "LOADGEN_VERIFY_TOKEN",
        global = true,
        hide_env_values = true
    )]
    verify_token: Option<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// grpc.health Check vs VerifyKey of a warm key, per concurrency level, in the same run.
    Warm {
        /// host:port of the server.
        #[arg(long)]
        target: String,
        /// Concurrency levels (request loops), comma separated.
        #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
        concurrency: Vec<usize>,
        /// The server's pid (same machine), to report its CPU time per request.
        #[arg(long)]
        server_pid: Option<u32>,
        #[command(flatten)]
        loops: LoopArgs,
    },
    /// Envoy ext_authz Check vs VerifyKey of the same warm key, in alternating phases.
    ExtAuthz {
        /// host:port of the server.
        #[arg(long)]
        target: String,
        /// Concurrency levels (request loops), comma separated.
        #[arg(long, value_delimiter = ',', default_value = "1,16")]
        concurrency: Vec<usize>,
        #[command(flatten)]
        loops: LoopArgs,
    },
    /// First (cold) VerifyKey of freshly issued keys, and one argon2id verify in-process.
    Cold {
        #[arg(long)]
        target: String,
        #[command(flatten)]
        cold: ColdArgs,
    },
    /// Warm VerifyKey p99 alone and under a flood of wrong secrets for known keys.
    Flood {
        #[arg(long)]
        target: String,
        /// Warm request loops.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        #[command(flatten)]
        flood: FloodArgs,
        #[command(flatten)]
        loops: LoopArgs,
    },
    /// The server's resident memory and threads before, right after and a while after a long
    /// flood of wrong secrets and unknown key ids.
    Memory {
        #[arg(long)]
        target: String,
        /// The target's pid (same machine), whose /proc status is read.
        #[arg(long)]
        server_pid: u32,
        /// Flooding request loops (half wrong secrets, half unknown key ids).
        #[arg(long, default_value_t = 32)]
        flood_concurrency: usize,
        /// Known keys whose secrets the flood gets wrong.
        #[arg(long, default_value_t = 1000)]
        victims: usize,
        /// How long the flood lasts.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        flood_for: Duration,
        /// How long to wait after it before the last reading (past the negative-verdict TTL).
        #[arg(long, default_value = "70s", value_parser = humantime::parse_duration)]
        settle: Duration,
    },
    /// Writes h2load request bodies (check.bin, verify.bin for a fresh warm key) into --out.
    Frames {
        #[arg(long)]
        target: String,
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// The caller-side verifier (LocalVerifier): a warm key verified in process (ns per call,
    /// verifies per second on one thread) beside remote VerifyKey, and revocation propagation
    /// from RevokeKey on --replica to the verifier connected to --target.
    Local {
        /// host:port of the server the verifier connects to.
        #[arg(long)]
        target: String,
        /// host:port of the server revocations are made on (default: --target).
        #[arg(long)]
        replica: Option<String>,
        /// Length of each measured phase.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Revocations timed.
        #[arg(long, default_value_t = 200)]
        rounds: usize,
        /// The verifier's settle time (LocalVerifierBuilder::settle).
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        settle: Duration,
        /// Keys issued and verified to measure the verifier's memory per key (0: skip).
        #[arg(long, default_value_t = 1000)]
        memory_keys: usize,
    },
    /// Time from RevokeKey's return on the target until the replica answers REVOKED.
    Propagation {
        #[arg(long)]
        target: String,
        /// host:port of another replica on the same database.
        #[arg(long)]
        replica: String,
        #[command(flatten)]
        propagation: PropagationArgs,
    },
    /// Cold VerifyKey with 1k and 1M rows in api_key (filler rows inserted with SQL).
    Scale {
        #[arg(long)]
        target: String,
        /// The PostgreSQL database the target uses.
        #[arg(long)]
        database_url: String,
        #[command(flatten)]
        scale: ScaleArgs,
    },
    /// Minutes of VerifyKey load spread over several replicas with a steady mix of management
    /// calls beside it; at the end: errors, resident memory, and every key's usage count
    /// against the VALID answers seen (bench/soak.sh).
    Soak {
        /// host:port of every replica, comma separated (named A, B, ... in the report).
        #[arg(long, value_delimiter = ',', required = true)]
        targets: Vec<String>,
        /// Their pids (same machine), in the same order, to read their resident memory.
        #[arg(long, value_delimiter = ',')]
        server_pids: Vec<u32>,
        #[command(flatten)]
        soak: SoakArgs,
    },
    /// warm, cold and flood; propagation with --replica; scale with --database-url.
    All {
        #[arg(long)]
        target: String,
        #[arg(long)]
        replica: Option<String>,
        #[arg(long)]
        database_url: Option<String>,
        /// Concurrency levels of the warm comparison.
        #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
        concurrency: Vec<usize>,
        /// Warm request loops of the flood comparison.
        #[arg(long, default_value_t = 16)]
        flood_warm_concurrency: usize,
        /// The target's pid (same machine), to report its CPU time per request.
        #[arg(long)]
        server_pid: Option<u32>,
        #[command(flatten)]
        loops: LoopArgs,
        #[command(flatten)]
        cold: ColdArgs,
        #[command(flatten)]
        flood: FloodArgs,
        #[command(flatten)]
        propagation: PropagationArgs,
        #[command(flatten)]
        scale: ScaleArgs,
    },
}

#[derive(Debug, Args)]
struct LoopArgs {
    /// Measured length of each load phase.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Unrecorded run-in before each load phase.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Most requests one loop sends in one phase.
    #[arg(long, default_value_t = 10_000_000)]
    max_requests_per_loop: u64,
    /// warm: alternating Check/VerifyKey pairs per concurrency level (ratios are their median).
    #[arg(long, default_value_t = 5)]
    pairs: u32,
}

impl LoopArgs {
    fn settings(&self) -> LoopSettings {
        LoopSettings {
            warmup: self.warmup,
            duration: self.duration,
            max_requests_per_loop: self.max_requests_per_loop,
            pairs: self.pairs,
        }
    }
}

#[derive(Debug, Args)]
struct ColdArgs {
    /// Keys issued, then verified once each.
    #[arg(long, default_value_t = 200)]
    keys: usize,
    /// The server's argon2id memory cost in KiB.
    #[arg(long, default_value_t = 4096)]
    argon2_memory_kib: u32,
    /// The server's argon2id passes.
    #[arg(long, default_value_t = 1)]
    argon2_iterations: u32,
    /// The server's argon2id lanes.
    #[arg(long, default_value_t = 1)]
    argon2_parallelism: u32,
    /// argon2id verifies timed in-process.
    #[arg(long, default_value_t = 200)]
    argon2_samples: usize,
}

impl ColdArgs {
    fn argon2(&self) -> Argon2Settings {
        Argon2Settings {
            memory_kib: self.argon2_memory_kib,
            iterations: self.argon2_iterations,
            parallelism: self.argon2_parallelism,
            samples: self.argon2_samples,
        }
    }
}

#[derive(Debug, Args)]
struct FloodArgs {
    /// Request loops sending wrong secrets.
    #[arg(long, default_value_t = 16)]
    flood_concurrency: usize,
    /// Known keys whose secrets the flood gets wrong, comma separated: one flood phase per
    /// count. Many keys keep each under the server's lockout threshold (every wrong secret
    /// costs an argon2: the worst case); few keys let the lockout engage.
    #[arg(long, value_delimiter = ',', default_value = "1000,8")]
    flood_keys: Vec<usize>,
}

#[derive(Debug, Args)]
struct PropagationArgs {
    /// Revocations to time.
    #[arg(long, default_value_t = 200)]
    rounds: usize,
    /// A round still VALID after this long counts as a failure.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    round_timeout: Duration,
    /// Start no new round after this long in total.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    time_budget: Duration,
}

impl PropagationArgs {
    fn settings(&self) -> PropagationSettings {
        PropagationSettings {
            rounds: self.rounds,
            round_timeout: self.round_timeout,
            time_budget: self.time_budget,
        }
    }
}

#[derive(Debug, Args)]
struct ScaleArgs {
    /// Table sizes (rows in api_key) to measure at, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1000,1000000")]
    sizes: Vec<u64>,
    /// Keys issued and verified cold at each size.
    #[arg(long, default_value_t = 100)]
    keys_per_size: usize,
}

#[derive(Debug, Args)]
struct SoakArgs {
    /// How long the load runs.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Length of each reported interval.
    #[arg(long, default_value = "1m", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Keys in the verified set, issued in turn on each replica; never rotated or revoked.
    #[arg(long, default_value_t = 200)]
    keys: usize,
    /// VerifyKey request loops, spread in turn over the replicas.
    #[arg(long, default_value_t = 32)]
    verify_loops: usize,
    /// How often a management cycle (about a dozen calls) starts.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    management_every: Duration,
    /// Wait after the load before reading usage back: past the servers' usage flush interval.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    settle: Duration,
    /// Read mismatched usage again, every second, for at most this long.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    usage_deadline: Duration,
    /// The foreign-CPU log of bench/soak.sh's monitor (`<unix seconds> <% of a core>` lines).
    #[arg(long)]
    foreign_cpu_log: Option<std::path::PathBuf>,
}

impl SoakArgs {
    fn settings(&self) -> SoakSettings {
        SoakSettings {
            duration: self.duration,
            interval: self.interval,
            keys: self.keys,
            verify_loops: self.verify_loops,
            management_every: self.management_every,
            settle: self.settle,
            usage_deadline: self.usage_deadline,
            foreign_cpu_log: self.foreign_cpu_log.clone(),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.workers.max(1))
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("loadgen: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(lines) => {
            report::print_targets(&lines);
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("loadgen: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<Vec<TargetLine>> {
    let net = Net {
        request_timeout: cli.request_timeout,
        loops_per_connection: cli.loops_per_connection.max(1),
        admin_auth: cli.admin_token.as_deref().map(client::bearer).transpose()?,
        verify_auth: cli
            .verify_token
            .as_deref()
            .map(client::bearer)
            .transpose()?,
    };
    println!(
        "# loadgen: {} worker thread(s), {} request loops per HTTP/2 connection, RPC deadline {:?}",
        cli.workers.max(1),
        net.loops_per_connection,
        net.request_timeout
    );
    match cli.command {
        Command::Warm {
            target,
            concurrency,
            server_pid,
            loops,
        } => {
            client::wait_serving(&net, &target, cli.wait).await?;
            let report =
                warm::run(&net, &target, &concurrency, &loops.settings(), server_pid).await?;
            Ok(report.targets())
        }
        Command::ExtAuthz {
            target,
            concurrency,
            loops,
        } => {
            client::wait_serving(&net, &target, cli.wait).await?;
            ext_authz::run(&net, &target, &concurrency, &loops.settings()).await?;
            Ok(Vec::new())
        }
        Command::Cold { target, cold } => {
            client::wait_serving(&net, &target, cli.wait).await?;
            let report = cold::run(&net, &target, cold.keys, cold.argon2()).await?;
            Ok(report.targets())
        }
        Command::Flood {
            target,
            concurrency,
            flood,
            loops,
        } => {
            client::wait_serving(&net, &target, cli.wait).await?;
            let report = flood::run(
                &net,
                &target,
                concurrency,
                flood.flood_concurrency,
                &flood.flood_keys,
                &loops.settings(),
            )
            .await?;
            Ok(report.targets())
        }
        Command::Memory {
            target,
            server_pid,
            flood_concurrency,
            victims,
            flood_for,
            settle,
        } => {
            client::wait_serving(&net, &target, cli.wait).await?;
            let report = memory::run(
                &net,
                &target,
                server_pid,
                flood_concurrency,
                victims,
                flood_for,
                settle,
            )
            .await?;
            Ok(report.targets())
        }
        Command::Frames { target, out } => {
            client::wait_serving(&net, &target, cli.wait).await?;
            frames::write(&net, &target, &out).await?;
            Ok(Vec::new())
        }
        Command::Local {
            target,
            replica,
            duration,
            rounds,
            settle,
            memory_keys,
        } => {
            let replica = replica.unwrap_or_else(|| target.clone());
            client::wait_serving(&net, &target, cli.wait).await?;
            client::wait_serving(&net, &replica, cli.wait).await?;
            let settings = local::LocalSettings {
                duration,
                rounds,
                settle,
                memory_keys,
            };
            let report = local::run(
                &net,
                &target,
                &replica,
                cli.admin_token.as_deref(),
                cli.verify_token.as_deref(),
                settings,
            )
            .await?;
            Ok(report.targets())
        }
        Command::Propagation {
            target,
            replica,
            propagation,
        } => {
            client::wait_serving(&net, &target, cli.wait).await?;
            client::wait_serving(&net, &replica, cli.wait).await?;
            let report = propagation::run(&net, &target, &replica, propagation.settings()).await?;
            Ok(report.targets())
        }
        Command::Scale {
            target,
            database_url,
            scale,
        } => {
            client::wait_serving(&net, &target, cli.wait).await?;
            let report = scale::run(
                &net,
                &target,
                &database_url,
                &scale.sizes,
                scale.keys_per_size,
            )
            .await?;
            Ok(report.targets())
        }
        Command::Soak {
            targets,
            server_pids,
            soak,
        } => {
            if !server_pids.is_empty() && server_pids.len() != targets.len() {
                return Err("give one --server-pids entry per --targets entry, or none".into());
            }
            let mut replicas = Vec::with_capacity(targets.len());
            for (index, addr) in targets.into_iter().enumerate() {
                client::wait_serving(&net, &addr, cli.wait).await?;
                replicas.push(Replica {
                    name: replica_name(index),
                    addr,
                    pid: server_pids.get(index).copied(),
                });
            }
            let report = soak::run(&net, &replicas, &soak.settings()).await?;
            Ok(report.targets())
        }
        Command::All {
            target,
            replica,
            database_url,
            concurrency,
            flood_warm_concurrency,
            server_pid,
            loops,
            cold,
            flood,
            propagation,
            scale,
        } => {
            client::wait_serving(&net, &target, cli.wait).await?;
            if let Some(replica) = &replica {
                client::wait_serving(&net, replica, cli.wait).await?;
            }
            let settings = loops.settings();
            let mut lines = warm::run(&net, &target, &concurrency, &settings, server_pid)
                .await?
                .targets();
            lines.extend(
                cold::run(&net, &target, cold.keys, cold.argon2())
                    .await?
                    .targets(),
            );
            lines.extend(
                flood::run(
                    &net,
                    &target,
                    flood_warm_concurrency,
                    flood.flood_concurrency,
                    &flood.flood_keys,
                    &settings,
                )
                .await?
                .targets(),
            );
            if let Some(replica) = &replica {
                lines.extend(
                    propagation::run(&net, &target, replica, propagation.settings())
                        .await?
                        .targets(),
                );
            }
            if let Some(database_url) = &database_url {
                lines.extend(
                    scale::run(
                        &net,
                        &target,
                        database_url,
                        &scale.sizes,
                        scale.keys_per_size,
                    )
                    .await?
                    .targets(),
                );
            }
            Ok(lines)
        }
    }
}

/// A, B, ..., Z, then R26, R27, ...
fn replica_name(index: usize) -> String {
    match u8::try_from(index) {
        Ok(letter @ 0..26) => char::from(b'A' + letter).to_string(),
        _ => format!("R{index}"),
    }
}
