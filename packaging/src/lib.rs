//! The files an install needs that are made from baton's command-line definitions: a man page
//! per binary (and per `baton` subcommand, as git and systemd's tools have), and bash, zsh and
//! fish completions.
//!
//! It reads the definitions from the binaries' own `cli.rs` files (which depend on clap alone)
//! instead of asking the built binaries, for two reasons: the release binaries stay free of
//! clap_mangen and clap_complete and of a subcommand no operator needs at run time, and a
//! packager who cross-compiles can still generate the files on the build machine, where the
//! target's binaries cannot run. `make install` and the Debian package run it as
//! `cargo run -p baton-packaging -- DIR`.
//!
//! Layout under `DIR`, as the files are installed:
//! `man/man1/*.1`, `completions/bash/<bin>`, `completions/zsh/_<bin>`,
//! `completions/fish/<bin>.fish`.

#![forbid(unsafe_code)]

use std::io;
use std::path::{Path, PathBuf};

use clap_complete::Shell;

// The binaries' definitions; their `Cli` types' fields are read only by the binaries.
#[allow(dead_code)]
#[path = "../../supervisor/src/cli.rs"]
mod baton_cli;
#[allow(dead_code)]
#[path = "../../proxy/src/cli.rs"]
mod proxy_cli;
#[allow(dead_code)]
#[path = "../../shm-stats/src/bin/baton-stats/cli.rs"]
mod stats_cli;

/// The command trees of `baton`, `baton-proxy` and `baton-stats`, built (defaults and the
/// generated `--help` and `--version` flags filled in).
pub fn commands() -> Vec<clap::Command> {
    [
        baton_cli::command(),
        proxy_cli::command(),
        stats_cli::command(),
    ]
    .into_iter()
    .map(|mut command| {
        command.build();
        command
    })
    .collect()
}

/// The shells completions are made for, and where each keeps its file under `completions/`.
pub const SHELLS: [(Shell, &str); 3] = [
    (Shell::Bash, "bash"),
    (Shell::Zsh, "zsh"),
    (Shell::Fish, "fish"),
];

/// The name of the completion file of `bin` for `shell`, as that shell looks it up.
pub fn completion_file(shell: Shell, bin: &str) -> String {
    match shell {
        Shell::Zsh => format!("_{bin}"),
        Shell::Fish => format!("{bin}.fish"),
        _ => bin.to_owned(),
    }
}

/// Writes the man pages and completions under `dir` (see the crate's doc); returns the files
/// written.
pub fn generate(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    let man = dir.join("man/man1");
    std::fs::create_dir_all(&man)?;
    for command in commands() {
        let before = listing(&man)?;
        clap_mangen::generate_to(command.clone(), &man)?;
        written.extend(listing(&man)?.into_iter().filter(|p| !before.contains(p)));
        let bin = command.get_name().to_owned();
        for (shell, folder) in SHELLS {
            let folder = dir.join("completions").join(folder);
            std::fs::create_dir_all(&folder)?;
            let path = folder.join(completion_file(shell, &bin));
            let mut file = std::fs::File::create(&path)?;
            clap_complete::generate(shell, &mut command.clone(), &bin, &mut file);
            written.push(path);
        }
    }
    Ok(written)
}

fn listing(dir: &Path) -> io::Result<Vec<PathBuf>> {
    std::fs::read_dir(dir)?
        .map(|entry| entry.map(|e| e.path()))
        .collect()
}
