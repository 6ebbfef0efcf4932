use clap::Parser;

use key_authority::config::{Cli, Command};
use key_authority::{server, store, telemetry};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    telemetry::init();
    let outcome = match cli.command {
        Command::Serve(args) => match args.into_config() {
            Ok(config) => server::serve(config, server::shutdown_signal())
                .await
                .map_err(|error| error.to_string()),
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
