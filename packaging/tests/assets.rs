//! The generated man pages and completions: one page per binary and per visible `baton`
//! subcommand, one completion file per binary and shell, each naming the flags it documents.

use std::path::Path;

fn read(path: &Path) -> String {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{} was generated: {e}", path.display()));
    assert!(!text.trim().is_empty(), "{} is empty", path.display());
    text
}

/// A long flag as roff writes it (`\-\-log\-format`).
fn roff_flag(long: &str) -> String {
    format!("\\-\\-{}", long.replace('-', "\\-"))
}

#[test]
fn a_man_page_per_binary_and_per_baton_subcommand_naming_their_flags() {
    let dir = tempfile::tempdir().unwrap();
    let written = baton_packaging::generate(dir.path()).unwrap();
    let man = dir.path().join("man/man1");
    let mut pages: Vec<String> = std::fs::read_dir(&man)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    pages.sort();
    assert_eq!(
        pages,
        [
            "baton-check.1",
            "baton-drain.1",
            "baton-proxy.1",
            "baton-reload.1",
            "baton-reopen-logs.1",
            "baton-run.1",
            "baton-stats.1",
            "baton-status.1",
            "baton-stop.1",
            "baton-upgrade-supervisor.1",
            "baton.1",
        ],
        "no page for the hidden `internal` subcommand or for `help`"
    );
    for page in &pages {
        assert!(
            written.contains(&man.join(page)),
            "{page} is reported as written"
        );
    }
    for command in baton_packaging::commands() {
        let page = read(&man.join(format!("{}.1", command.get_name())));
        assert!(
            page.starts_with(".ie \\n(.g .ds Aq") || page.contains(".TH "),
            "roff: {page}"
        );
        assert!(page.contains(&format!(
            "{} {}",
            command.get_name(),
            env!("CARGO_PKG_VERSION")
        )));
        for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
            if sub.get_name() == "help" {
                continue;
            }
            assert!(
                page.contains(&sub.get_name().replace('-', "\\-")),
                "baton.1 lists {}",
                sub.get_name()
            );
            let sub_page = read(&man.join(format!("baton-{}.1", sub.get_name())));
            for long in sub.get_arguments().filter_map(|a| a.get_long()) {
                assert!(
                    sub_page.contains(&roff_flag(long)),
                    "baton-{}.1 names --{long}",
                    sub.get_name()
                );
            }
        }
        for long in command.get_arguments().filter_map(|a| a.get_long()) {
            assert!(
                page.contains(&roff_flag(long)),
                "{}.1 names --{long}",
                command.get_name()
            );
        }
    }
    let run = read(&man.join("baton-run.1"));
    assert!(run.contains("\\-\\-log\\-format") && run.contains("The configuration file"));
    // What an operator looks a daemon's man page up for: its signals and exit statuses.
    for needed in [
        "SIGHUP",
        "SIGTERM",
        "Exit status:",
        "64  the configuration is invalid",
    ] {
        assert!(
            run.contains(needed),
            "baton-run(1) lacks {needed:?}:\n{run}"
        );
    }
}

#[test]
fn bash_zsh_and_fish_completions_per_binary_naming_their_flags() {
    let dir = tempfile::tempdir().unwrap();
    baton_packaging::generate(dir.path()).unwrap();
    for command in baton_packaging::commands() {
        let bin = command.get_name();
        for (shell, folder) in baton_packaging::SHELLS {
            let path = dir
                .path()
                .join("completions")
                .join(folder)
                .join(baton_packaging::completion_file(shell, bin));
            let text = read(&path);
            let flags: Vec<&str> = command
                .get_arguments()
                .chain(command.get_subcommands().flat_map(|s| s.get_arguments()))
                .filter(|a| !a.is_hide_set())
                .filter_map(|a| a.get_long())
                .collect();
            assert!(!flags.is_empty());
            for long in flags {
                // fish writes `-l log-format`, the others `--log-format`.
                assert!(
                    text.contains(&format!("--{long}")) || text.contains(&format!("-l {long}")),
                    "{} names --{long}",
                    path.display()
                );
            }
            for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
                assert!(
                    text.contains(sub.get_name()),
                    "{} offers {}",
                    path.display(),
                    sub.get_name()
                );
            }
            // bash's and zsh's scripts know the hidden commands' paths (what to offer after a
            // typed `baton internal`), but must not offer `internal` itself.
            let hidden = match folder {
                "bash" => text
                    .lines()
                    .filter(|l| l.trim_start().starts_with("opts="))
                    .any(|l| l.split(['"', ' ']).any(|w| w == "internal")),
                "zsh" => text.lines().any(|l| l.starts_with("'internal:")),
                _ => text.contains(" -a \"internal\" "),
            };
            assert!(!hidden, "{}: hidden commands stay hidden", path.display());
        }
    }
    let zsh = read(&dir.path().join("completions/zsh/_baton"));
    assert!(
        zsh.starts_with("#compdef baton"),
        "zsh finds it by its first line"
    );
}

#[test]
fn the_generator_binary_writes_under_the_folder_it_is_given() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_baton-packaging"))
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dir.path().join("man/man1/baton-proxy.1").is_file());
    assert!(
        dir.path()
            .join("completions/fish/baton-stats.fish")
            .is_file()
    );
    let none = std::process::Command::new(env!("CARGO_BIN_EXE_baton-packaging"))
        .output()
        .unwrap();
    assert_eq!(none.status.code(), Some(64), "no folder: a usage error");
    assert!(String::from_utf8_lossy(&none.stderr).contains("usage: baton-packaging DIR"));
}
