//! What a generation is started from: the config file's bytes and the proxy binary, taken from
//! disk when a reload (or the first start) spawns it, and kept as they were. The binary is
//! looked for again at every launch from disk ([`proxy_binary`]), so that a replaced one is
//! picked up; `spawn.rs` runs what a launch holds.
//!
//! The launch of the active generation is the *last good* one: a generation that crashes is
//! replaced from it, not from the disk, so that a config or binary broken on disk since (and
//! refused by a reload) cannot keep the supervisor from having an active generation again.
//! The config travels to the generation in a sealed memfd (`BATON_CONFIG_FD`), and the binary
//! is executed through the descriptor opened when the launch was taken, so that both stay the
//! same whatever happens to the files.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};

use crate::config::{self, SupervisorConfig};

/// A generation's binary and config, fixed when it was spawned.
#[derive(Debug)]
pub struct Launch {
    /// The supervisor's part of the config, parsed from `source`.
    pub config: SupervisorConfig,
    /// The whole config file as it was read.
    pub source: String,
    /// A sealed memfd holding `source`: what the generation reads its config from.
    pub config_fd: OwnedFd,
    /// The proxy binary, opened when the launch was taken.
    pub binary: File,
    /// Where it was found, for logs and the generation's `argv[0]`.
    pub binary_path: PathBuf,
    /// A `#!` script (its interpreter opens it by path after the exec, so its descriptor
    /// must stay open across the exec).
    pub script: bool,
}

impl Launch {
    /// Reads the config at `path` and finds the proxy binary it names, checking the whole
    /// supervisor part of the config as `baton check` does, and that it changes nothing a
    /// reload cannot apply to the running supervisor (`running`).
    pub fn from_disk(path: &Path, running: Option<&SupervisorConfig>) -> Result<Launch, String> {
        let source = std::fs::read_to_string(path)
            .map_err(|e| format!("{}: cannot read the config file: {e}", path.display()))?;
        let config = config::parse(path, &source)?;
        if let Some(running) = running {
            config::reloadable(running, &config)?;
        }
        let binary_path = proxy_binary(config.proxy_binary.as_deref())
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let binary = File::open(&binary_path)
            .map_err(|e| format!("cannot open {}: {e}", binary_path.display()))?;
        Self::new(config, source, binary, binary_path)
    }

    /// A launch handed over by the supervisor this process replaced: the running config's text
    /// and the binary's descriptor.
    pub fn handed_over(
        path: &Path,
        source: String,
        binary: File,
        binary_path: PathBuf,
    ) -> Result<Launch, String> {
        let config = config::parse(path, &source)?;
        Self::new(config, source, binary, binary_path)
    }

    fn new(
        config: SupervisorConfig,
        source: String,
        binary: File,
        binary_path: PathBuf,
    ) -> Result<Launch, String> {
        let config_fd = sealed(&source)
            .map_err(|e| format!("cannot keep a copy of the config in memory: {e}"))?;
        let mut head = [0u8; 2];
        use std::os::unix::fs::FileExt;
        let script = binary.read_exact_at(&mut head, 0).is_ok() && head == *b"#!";
        Ok(Launch {
            config,
            source,
            config_fd,
            binary,
            binary_path,
            script,
        })
    }
}

/// Where `baton-proxy` is: the configured path, else beside the running `baton`.
pub fn proxy_binary(configured: Option<&Path>) -> Result<PathBuf, String> {
    let (candidate, how) = match configured {
        Some(path) => (path.to_owned(), "supervisor.proxy_binary in the config"),
        None => {
            let exe = std::env::current_exe().map_err(|e| {
                format!("cannot tell where baton itself is ({e}); set supervisor.proxy_binary")
            })?;
            let dir = exe.parent().unwrap_or(Path::new("/"));
            (dir.join("baton-proxy"), "beside baton")
        }
    };
    match std::fs::metadata(&candidate) {
        Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => Ok(candidate),
        Ok(_) => Err(format!(
            "{} ({how}) is not an executable file; fix its permissions or set supervisor.proxy_binary",
            candidate.display()
        )),
        Err(e) => Err(format!(
            "baton-proxy not found: looked for {} ({how}): {e}; install baton-proxy there or set supervisor.proxy_binary",
            candidate.display()
        )),
    }
}

/// A memfd holding `text`, sealed so that no process holding it can change it.
fn sealed(text: &str) -> std::io::Result<OwnedFd> {
    let fd = memfd_create(
        c"baton-config",
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )?;
    let mut file = File::from(fd);
    file.write_all(text.as_bytes())?;
    fcntl(
        file.as_fd(),
        FcntlArg::F_ADD_SEALS(
            SealFlag::F_SEAL_SHRINK
                | SealFlag::F_SEAL_GROW
                | SealFlag::F_SEAL_WRITE
                | SealFlag::F_SEAL_SEAL,
        ),
    )?;
    Ok(OwnedFd::from(file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_launch_keeps_the_config_as_it_was_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("baton.toml");
        let binary = dir.path().join("proxy");
        std::fs::write(&binary, b"#!/bin/sh\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).unwrap();
        let text = format!(
            "instance = \"a\"\n[supervisor]\nproxy_binary = \"{}\"\n",
            binary.display()
        );
        std::fs::write(&path, &text).unwrap();
        let launch = Launch::from_disk(&path, None).unwrap();
        std::fs::write(&path, "broken = [").unwrap();
        let copy = std::fs::read_to_string(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&launch.config_fd)
        ))
        .unwrap();
        assert_eq!(copy, text);
        // Sealed: nobody can write to it.
        let mut file = File::from(launch.config_fd.try_clone().unwrap());
        assert!(file.write_all(b"x").is_err());
    }
}
