//! Running the loaded programs on crafted packets with BPF_PROG_TEST_RUN: exact verdicts
//! without any network, for tests and per-packet benchmarks. The kernel runs the program
//! with the loopback device as the skb's interface.

use std::time::Duration;

use aya::programs::{TestRun, TestRunOptions};

use super::{program, Dataplane, DataplaneError, Hook};

/// TC verdicts the programs return.
pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;

/// The interface index BPF_PROG_TEST_RUN gives the skb (loopback): register an endpoint
/// under it to have test packets judged as that pod's.
pub const TEST_RUN_IFINDEX: u32 = 1;

#[derive(Clone, Copy, Debug)]
pub struct RunResult {
    pub verdict: u32,
    /// Mean time per run as measured by the kernel.
    pub per_run: Duration,
}

impl Dataplane {
    /// Runs the program of `hook` on `frame` (an Ethernet frame), `repeat` times.
    pub fn test_run(
        &mut self,
        hook: Hook,
        frame: &[u8],
        repeat: u32,
    ) -> Result<RunResult, DataplaneError> {
        let prog = program(&mut self.ebpf, hook)?;
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.repeat = repeat.max(1);
        let r = prog
            .test_run(opts)
            .map_err(|source| DataplaneError::Program {
                name: hook.program(),
                source: Box::new(source),
            })?;
        Ok(RunResult {
            verdict: r.return_value,
            per_run: r.duration,
        })
    }
}
