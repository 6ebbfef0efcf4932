use clap::Parser;

use key_authority::config::{Cli, Command, ensure_admin_access};
use key_authority::{server, store, telemetry};

/// mimalloc returns freed memory to the OS, so a flood's caches and buffers do not stay resident
/// once they are gone (BENCHMARKS.md, "Memory").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // Dropped last: flushes exported spans after the server has drained.
    let _telemetry = telemetry::init(cli.log_format);
    let outcome = match cli.command {
        Command::Serve(args) => match args.into_config() {
            Ok(mut config) => {
                if let Some(token) = ensure_admin_access(&mut config) {
                    // Printed once, on purpose: the only way to reach a first run with no
                    // configured credentials. Set KEY_AUTHORITY_ADMIN_TOKEN to choose your own.
                    eprintln!(
                        "no admin token or JWT key configured; generated admin token for this run: {token}"
                    );
                }
                server::serve(config, server::shutdown_signal())
                    .await
                    .map_err(|error| error.to_string())
            }
            Err(error) => Err(error),
        },
        Command::Migrate(args) => store::migrate(&args.database_url)
            .await
            .map(|()| tracing::info!("migrations applied"))
            .map_err(|error| error.to_string()),
    };
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "key-authority failed");
            std::process::ExitCode::FAILURE
        }
    }
}
