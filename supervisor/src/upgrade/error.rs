//! Why an upgrade did not happen ([`UpgradeError`], the running supervisor's side: it serves on
//! as it was), and why a new program could not take over what it was handed
//! ([`HandoverError`]: the previous binary then takes over again).

use std::ffi::NulError;
use std::io;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use nix::errno::Errno;

/// Why the running supervisor was not upgraded. `baton upgrade-supervisor` and `baton status`
/// show it after `not upgraded: `.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// Asked of a supervisor that is stopping.
    #[error("the supervisor is stopping")]
    Stopping,
    /// Asked during a reload: the operator asks again once it has ended.
    #[error("a reload is in progress; upgrade the supervisor once it has ended")]
    Reloading,
    /// Asked while a replacement of a crashed generation starts.
    #[error(
        "a generation is starting (replacing one that crashed); upgrade the supervisor once `baton status` shows it active"
    )]
    Starting,
    /// The new binary could not be run for its checks.
    #[error("cannot run {}: {source}", binary.display())]
    CannotRun { binary: PathBuf, source: io::Error },
    /// The new binary did not finish a check (`step`) in time, and was killed.
    #[error("{} did not answer its {step} within {timeout:?}; it was killed", binary.display())]
    CheckTimedOut {
        binary: PathBuf,
        step: &'static str,
        timeout: Duration,
    },
    /// `baton internal upgrade-check` failed. `said` is `: ` and the last line the binary
    /// wrote on its standard error, or nothing.
    #[error("{} failed its self-check ({status}){said}", binary.display())]
    SelfCheckFailed {
        binary: PathBuf,
        status: ExitStatus,
        said: String,
    },
    /// The new binary does not read the state this one writes.
    #[error(
        "{} cannot take over from this supervisor (it reads state versions `{reads}`, this one writes {writes})",
        binary.display()
    )]
    StateVersion {
        binary: PathBuf,
        reads: String,
        writes: u32,
    },
    /// The new binary is from before trial take-overs: it is not executed blind.
    #[error(
        "{} cannot show that it can take over (it does no trial take-over: a build older than this one's upgrade protocol); restart the service to run it",
        binary.display()
    )]
    NoTrial { binary: PathBuf },
    /// The trial take-over exited but did not answer with the state's nonce.
    #[error(
        "{} cannot take over this supervisor: run as `baton run` with the running state, it did not read it{said}",
        binary.display()
    )]
    TrialUnread { binary: PathBuf, said: String },
    /// The trial take-over failed.
    #[error(
        "{} cannot take over this supervisor: run as `baton run` with the running state, it failed ({status}){said}",
        binary.display()
    )]
    TrialFailed {
        binary: PathBuf,
        status: ExitStatus,
        said: String,
    },
    /// The state could not be written as JSON (a bug of this program).
    #[error("cannot write the state: {0}")]
    EncodeState(#[source] serde_json::Error),
    /// The memfd for the state could not be made.
    #[error("cannot create the state memfd: {0}")]
    StateMemfd(#[source] Errno),
    /// The state could not be written into its memfd.
    #[error("cannot write the state: {0}")]
    WriteState(#[source] io::Error),
    /// A descriptor could not be made to survive the exec.
    #[error("cannot hand fd {fd} over: {source}")]
    HandFd { fd: RawFd, source: io::Error },
    /// The exec itself failed.
    #[error(transparent)]
    Exec(#[from] ExecError),
}

/// Why a new program could not take over what the supervisor it replaced handed over, or why
/// the previous binary could not be executed again after that.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    /// A variable that names a handed-over descriptor holds something else.
    #[error("{name}={value} is not a descriptor number")]
    NotAnFd { name: &'static str, value: String },
    /// A variable names a descriptor that is not open in this process.
    #[error("{name}={fd} is not open: {source}")]
    FdNotOpen {
        name: &'static str,
        fd: RawFd,
        source: Errno,
    },
    /// The state's memfd could not be read.
    #[error("cannot read the handed-over state: {0}")]
    ReadState(#[source] io::Error),
    /// A trial take-over could not read the state on its standard input.
    #[error("cannot read the state: {0}")]
    ReadTrialState(#[source] io::Error),
    /// The state is not what this program reads.
    #[error("cannot understand the handed-over state: {0}")]
    ParseState(#[source] serde_json::Error),
    /// The state is of a version this program does not read.
    #[error("the handed-over state is version {found}, this supervisor reads {reads}")]
    StateVersion { found: u32, reads: u32 },
    /// A descriptor the state names (the one said) was not open.
    #[error("the {0} was not handed over")]
    Missing(&'static str),
    /// The handed-over control socket cannot be made non-blocking.
    #[error("control socket: {0}")]
    ControlSocket(#[source] io::Error),
    /// A trial take-over does not read the config it would run.
    #[error("{0}")]
    Config(String),
    /// Tests make an upgraded program fail to take over (debug builds only).
    #[cfg(debug_assertions)]
    #[error("BATON_TEST_TAKEOVER_FAILS is set (a test build)")]
    TestFailure,
    /// There is no previous binary to execute again.
    #[error("the previous supervisor left no binary to go back to")]
    NoPreviousBinary,
    /// The variable naming the state's memfd (`name`) is not set.
    #[error("{name} is not set")]
    NoState { name: &'static str },
    /// Executing the previous binary failed.
    #[error(transparent)]
    Exec(#[from] ExecError),
}

/// Why `execve` of a supervisor binary failed.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// An argument or an environment variable holds a NUL byte.
    #[error(transparent)]
    Nul(#[from] NulError),
    /// The kernel refused to execute the binary.
    #[error("cannot execute {}: {source}", binary.display())]
    Exec { binary: PathBuf, source: Errno },
}
