//! Which process wrote a row: its start time, recorded beside its pid, and whether it still runs.

use std::io;

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
    // SAFETY: signal 0 performs only the existence and permission check; no signal is sent.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}
