//! `palisade`: the agent and the CLI in one binary (also usable as `kubectl-palisade`).

use clap::{CommandFactory as _, FromArgMatches as _};
use palisade::cli::Cli;

/// A large first sync interleaves megabytes of short-lived parsed objects with the
/// compiler's long-lived entries; glibc's arenas keep the pages that mixture pins (RSS three
/// times the heap in use at 100,000 pods), mimalloc's size-segregated pages give them back.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let mut cmd = Cli::command();
    // Installed (or symlinked) as kubectl-palisade, kubectl runs it for `kubectl palisade`;
    // help and errors should show the command the user typed.
    let invoked_as = std::env::args_os()
        .next()
        .map(std::path::PathBuf::from)
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
    if invoked_as.as_deref() == Some("kubectl-palisade") {
        cmd = cmd.bin_name("kubectl palisade");
    }
    let cli = match Cli::from_arg_matches(&cmd.get_matches()) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    palisade::cli::init_tracing(cli.log_format, cli.verbose);
    match palisade::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("palisade: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
