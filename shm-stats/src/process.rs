//! Which process wrote a row: its start time, recorded beside its pid, and whether it still runs.

#![forbid(unsafe_code)]

use nix::errno::Errno;
use nix::sys::signal;
use nix::unistd::Pid;

/// A process's start time in clock ticks since boot, from `/proc/<pid>/stat`.
pub(crate) fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from the last `)`.
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(19)?.parse().ok()
}

/// Whether `pid` runs and is the process that recorded `recorded_start` (0: unknown).
pub(crate) fn alive(pid: u32, recorded_start: u64) -> bool {
    if recorded_start != 0 {
        return start_time(pid) == Some(recorded_start);
    }
    exists(pid)
}

fn exists(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    // No signal: only the check that the process exists and may be signalled. A process of
    // another user exists too (EPERM).
    matches!(
        signal::kill(Pid::from_raw(pid), None),
        Ok(()) | Err(Errno::EPERM)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fallback when a row has no start time: a process exists while it runs, also one of
    /// another user (which this process may not signal), and not once it has been reaped.
    #[test]
    fn a_process_exists_while_it_runs_whoever_owns_it() {
        assert!(exists(std::process::id()));
        assert!(
            exists(1),
            "pid 1 runs, as another user unless the test runs as root"
        );
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(!exists(pid), "a reaped process is gone");
        assert!(!exists(0), "0 names no process");
        assert!(!exists(u32::MAX), "nor does a pid beyond i32");
        assert!(alive(std::process::id(), 0));
        assert!(alive(
            std::process::id(),
            start_time(std::process::id()).unwrap()
        ));
        assert!(!alive(pid, 0));
    }
}
