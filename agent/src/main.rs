//! `palisade`: the agent and the CLI in one binary (also usable as `kubectl-palisade`).

use clap::Parser;
use palisade::cli::Cli;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    palisade::cli::init_tracing(cli.log_format, cli.verbose);
    match palisade::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("palisade: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
