//! What the supervisor's processes share through their environment and exit statuses: the
//! variable that hands a re-executed supervisor its state, whether logs are JSON, and the exit
//! status of a usage error. A leaf: the binary's root and the modules below it all read it.

/// The variable that hands a re-executed supervisor the state of the one it replaces.
pub const UPGRADE_FD_ENV: &str = "BATON_UPGRADE_FD";

/// Whether the supervisor logs JSON (`--log-format json`): its generations are told to as well.
pub static LOG_JSON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Exit status for a configuration or usage the operator must fix (sysexits' EX_USAGE).
pub const EXIT_USAGE: u8 = 64;
