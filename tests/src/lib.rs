//! The harness of baton's whole-system tests: it builds the real binaries, starts them as
//! processes on loopback with generated configs and free ports, and gives the tests real clients
//! and real upstream servers.
//!
//! Nothing here sleeps to synchronise: waits are on a readiness line, a socket, or a condition,
//! each with a timeout.

#![forbid(unsafe_code)]

pub mod binaries;
pub mod client;
pub mod config;
pub mod dns;
pub mod grpc;
pub mod load;
pub mod proxy;
pub mod supervisor;
pub mod tls;
pub mod upstream;
pub mod websocket;

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

/// A port on 127.0.0.1 that nothing listens on right now.
///
/// Ports come from below the kernel's ephemeral range (32768 and up on Linux), so that the
/// outgoing connections of other tests cannot take them between this call and the bind; each
/// test process starts at its own offset so that parallel test binaries do not collide.
pub fn free_port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let _ = NEXT.compare_exchange(
        0,
        20_000 + (std::process::id() % 400) as u16 * 25,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    loop {
        let port = NEXT.fetch_add(1, Ordering::SeqCst);
        let port = if port >= 32_000 {
            NEXT.store(20_001, Ordering::SeqCst);
            20_000
        } else {
            port
        };
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            return port;
        }
    }
}

/// A loopback address with a free port.
pub fn free_addr() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()))
}

/// A listener on a free loopback port, for the harness's own servers: the port is bound here
/// and kept, so nothing can take it between the choice and the bind (as it can with
/// [`free_addr`], whose check-bind is dropped before the caller binds).
pub fn listen_on_free_port() -> tokio::net::TcpListener {
    loop {
        if let Ok(listener) = TcpListener::bind((Ipv4Addr::LOCALHOST, free_port())) {
            listener
                .set_nonblocking(true)
                .expect("a listener can be made non-blocking");
            return tokio::net::TcpListener::from_std(listener)
                .expect("a listener joins the tokio runtime");
        }
    }
}

/// Polls `condition` until it holds or `timeout` passes; returns whether it held.
///
/// Inside a multi-threaded tokio runtime the wait gives its thread up to the runtime's other
/// tasks (an upstream server of the same test may need it).
pub fn wait_until(timeout: Duration, condition: impl FnMut() -> bool) -> bool {
    blocking(|| poll_until(timeout, condition))
}

/// Runs blocking work; inside a multi-threaded tokio runtime, lets the runtime move its other
/// tasks off this thread meanwhile.
pub fn blocking<T>(work: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(work),
        _ => work(),
    }
}

fn poll_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        // The poll interval of a wait on a condition, not a wait in place of one.
        #[allow(clippy::disallowed_methods)]
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Async [`wait_until`].
pub async fn wait_until_async<F, Fut>(timeout: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if condition().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Runs `baton-stats` with `args` and returns its exit code, stdout and stderr.
pub fn baton_stats(args: &[&str]) -> (Option<i32>, String, String) {
    let output = blocking(|| {
        std::process::Command::new(binaries::stats())
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("baton-stats can be run")
    });
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Writes an executable file at `path` without this process ever holding it open for writing:
/// the bytes go to a staging file, and a `cp` child writes the executable. A test process
/// spawns children from many threads; one forked while this process held a write descriptor on
/// the executable keeps that descriptor until its own exec, and running the file meanwhile
/// fails with "Text file busy" (ETXTBSY).
pub fn write_executable(path: &std::path::Path, content: &[u8]) {
    use std::os::unix::fs::PermissionsExt;
    let mut staging = path.as_os_str().to_owned();
    staging.push(".staging");
    std::fs::write(&staging, content).expect("the staging file can be written");
    let status = std::process::Command::new("cp")
        .arg(&staging)
        .arg(path)
        .status()
        .expect("cp can be run");
    assert!(status.success(), "cp {staging:?} {path:?}: {status}");
    std::fs::remove_file(&staging).expect("the staging file can be removed");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

/// A copy of `binary` whose build id reads differently: a new build, as far as anyone can tell
/// (for the tests that install a "new" `baton` or `baton-proxy`).
pub fn rebuilt(binary: &[u8], build_id: &str) -> Vec<u8> {
    let mut other = build_id.to_owned();
    let last = other.pop().expect("a build id");
    other.push(if last == '0' { '1' } else { '0' });
    let (from, to) = (build_id.as_bytes(), other.as_bytes());
    let mut out = binary.to_vec();
    let mut found = 0;
    let mut i = 0;
    while let Some(at) = out[i..].windows(from.len()).position(|w| w == from) {
        out[i + at..i + at + to.len()].copy_from_slice(to);
        i += at + to.len();
        found += 1;
    }
    assert!(found > 0, "the build id is in the binary");
    out
}

/// Where a program is found on `PATH`, if it is installed.
pub fn on_path(name: &str) -> Option<std::path::PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}
