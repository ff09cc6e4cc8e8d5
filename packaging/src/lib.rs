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

/// The command trees of `baton`, `baton-proxy` and `baton-stats`, as the binaries define them
/// (not yet built: clap adds `--help`, `--version` and the `help` subcommand when it builds one).
pub fn commands() -> [clap::Command; 3] {
    [
        baton_cli::command(),
        proxy_cli::command(),
        stats_cli::command(),
    ]
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
        clap_mangen::generate_to(command.clone(), &man)?;
        written.extend(
            man_pages(&command, "")
                .into_iter()
                .map(|page| man.join(page)),
        );
        let bin = command.get_name().to_owned();
        for (shell, folder) in SHELLS {
            let folder = dir.join("completions").join(folder);
            std::fs::create_dir_all(&folder)?;
            let path = folder.join(completion_file(shell, &bin));
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut command.clone(), &bin, &mut script);
            script =
                unoffer_hidden(shell, &String::from_utf8_lossy(&script), &command).into_bytes();
            std::fs::write(&path, script)?;
            written.push(path);
        }
    }
    Ok(written)
}

/// clap_complete's scripts offer hidden subcommands (`baton internal`) among the words they
/// complete; this takes them out of bash's `opts="..."` lists, zsh's `'name:description'` lists
/// and fish's `-a "name"` lines, and leaves the rest of the scripts (which only follow a path
/// already typed) alone.
fn unoffer_hidden(shell: Shell, script: &str, command: &clap::Command) -> String {
    let hidden: Vec<&str> = command
        .get_subcommands()
        .filter(|s| s.is_hide_set())
        .map(|s| s.get_name())
        .collect();
    let mut out = String::with_capacity(script.len());
    for line in script.split_inclusive('\n') {
        let trimmed = line.trim_start();
        let bash_opts = trimmed
            .strip_prefix("opts=\"")
            .and_then(|rest| rest.trim_end().strip_suffix('"'));
        match (shell, bash_opts) {
            (Shell::Bash, Some(words)) => {
                let indent = &line[..line.len() - trimmed.len()];
                let kept: Vec<&str> = words.split(' ').filter(|w| !hidden.contains(w)).collect();
                out.push_str(&format!("{indent}opts=\"{}\"\n", kept.join(" ")));
            }
            (Shell::Zsh, _)
                if hidden
                    .iter()
                    .any(|h| trimmed.starts_with(&format!("'{h}:"))) => {}
            (Shell::Fish, _)
                if hidden
                    .iter()
                    .any(|h| line.contains(&format!(" -a \"{h}\" "))) => {}
            _ => out.push_str(line),
        }
    }
    out
}

/// The pages clap_mangen writes for `command`: its own, and one per visible subcommand, named
/// by their path (`baton-run.1`).
fn man_pages(command: &clap::Command, parent: &str) -> Vec<String> {
    let name = if parent.is_empty() {
        command.get_name().to_owned()
    } else {
        format!("{parent}-{}", command.get_name())
    };
    let mut pages = vec![format!("{name}.1")];
    for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
        pages.extend(man_pages(sub, &name));
    }
    pages
}
