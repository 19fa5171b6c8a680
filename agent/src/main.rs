//! `palisade`: the agent and the CLI in one binary (also usable as `kubectl-palisade`).

use clap::{CommandFactory as _, FromArgMatches as _};
use palisade::cli::Cli;

/// A large first sync interleaves megabytes of short-lived parsed objects with the
/// compiler's long-lived entries; glibc's arenas keep the pages that mixture pins (RSS three
/// times the heap in use at 100,000 pods), mimalloc's size-segregated pages give them back.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in libmimalloc-sys 0.1.49 (mimalloc 3.x), which names no
/// constant for it.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// The agent is a long-lived daemon whose memory is charged to its pod's limit: pages it
/// frees should leave its RSS at once. mimalloc 3 keeps freed pages for a second (ten for
/// whole arenas) and only returns them on later allocator activity, so a quiet agent kept
/// the first sync's transient pages (and the kernel BTF aya parses at load) for good; and
/// transparent huge pages turn each touched 4 KiB of a sparse heap into 2 MiB. Together
/// they tripled the RSS of an idle agent (16 MiB instead of 49 at no pods).
fn tune_allocator() {
    // SAFETY: prctl with these arguments only sets a flag on this process; mi_option_set
    // only stores an option value.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0);
    }
}

fn main() -> std::process::ExitCode {
    tune_allocator();
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

#[cfg(test)]
mod tests {
    /// The option index is this version's: purge_delay's documented default is 1000 ms
    /// (no neighbouring option has that default).
    #[test]
    fn the_purge_delay_index_names_purge_delay() {
        // SAFETY: reads an option value.
        let default = unsafe { libmimalloc_sys::mi_option_get(super::MI_OPTION_PURGE_DELAY) };
        assert_eq!(default, 1000);
    }
}
