//! Where a `baton` command finds the supervisor's control socket: from the config file, or, when
//! the file does not load (an edit half done, a mistake), from what can still be read of it, so
//! that `baton status` and `baton stop` keep working while the config is broken. A command
//! only needs the socket's path, which the running supervisor took from the file when it was
//! still good.

use std::path::{Path, PathBuf};

use crate::config;

/// The instance a config without `instance` names (as `config::parse` reads it).
const DEFAULT_INSTANCE: &str = "baton";

/// A control socket found from a config file.
#[derive(Debug, PartialEq, Eq)]
pub struct Located {
    pub socket: PathBuf,
    /// Set when the file did not load and the socket was found some other way: why, and how
    /// it was found, for the operator.
    pub guessed: Option<String>,
}

/// The control socket of the supervisor that runs with the config at `path`.
pub fn control_socket(path: &Path) -> Located {
    let error = match config::load(path) {
        Ok(config) => {
            return Located {
                socket: config.control_socket,
                guessed: None,
            };
        }
        Err(e) => e,
    };
    let salvaged = std::fs::read_to_string(path)
        .map(|source| salvage(&source))
        .unwrap_or_default();
    let (socket, how) = match salvaged.control_socket {
        Some(socket) => {
            let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
            let socket = match dir {
                Some(dir) if Path::new(&socket).is_relative() => dir.join(socket),
                _ => PathBuf::from(socket),
            };
            (socket, "the control socket the file names".to_owned())
        }
        None => {
            let instance = salvaged
                .instance
                .unwrap_or_else(|| DEFAULT_INSTANCE.to_owned());
            (
                config::default_control_socket(&instance),
                format!("the default control socket of instance `{instance}`"),
            )
        }
    };
    Located {
        guessed: Some(format!("{error}; using {how}, {}", socket.display())),
        socket,
    }
}

/// What a command needs from a config file that does not load.
#[derive(Debug, Default, PartialEq, Eq)]
struct Salvaged {
    instance: Option<String>,
    control_socket: Option<String>,
}

impl Salvaged {
    /// Takes what `table` (the whole file, or one line of it placed in its table) holds and
    /// was not found before.
    fn take(&mut self, table: &toml::Table) {
        if self.instance.is_none() {
            self.instance = table
                .get("instance")
                .and_then(toml::Value::as_str)
                .map(str::to_owned);
        }
        if self.control_socket.is_none() {
            self.control_socket = table
                .get("supervisor")
                .and_then(toml::Value::as_table)
                .and_then(|s| s.get("control_socket"))
                .and_then(toml::Value::as_str)
                .map(str::to_owned);
        }
    }
}

/// `instance` and `supervisor.control_socket` from a config that the supervisor refuses: from
/// the TOML when it parses (a mistake in a field), else line by line.
fn salvage(source: &str) -> Salvaged {
    let mut found = Salvaged::default();
    if let Ok(table) = toml::from_str::<toml::Table>(source) {
        found.take(&table);
        return found;
    }
    // A syntax error: each `key = value` and `[table]` line is a TOML document of its own, so
    // the toml crate still reads the lines that are whole. A line it cannot read as a header
    // leaves the table unknown, and nothing is taken until the next header it can read.
    #[derive(PartialEq)]
    enum Table {
        Top,
        Supervisor,
        Other,
    }
    let mut table = Table::Top;
    for line in source.lines() {
        let Ok(parsed) = toml::from_str::<toml::Table>(line) else {
            if line.trim_start().starts_with('[') {
                table = Table::Other;
            }
            continue;
        };
        if line.trim_start().starts_with('[') {
            let supervisor = parsed
                .get("supervisor")
                .and_then(toml::Value::as_table)
                .is_some_and(toml::Table::is_empty);
            table = if supervisor && parsed.len() == 1 {
                Table::Supervisor
            } else {
                Table::Other
            };
            continue;
        }
        match table {
            Table::Top => found.take(&parsed),
            Table::Supervisor => {
                let mut wrapped = toml::Table::new();
                wrapped.insert("supervisor".into(), toml::Value::Table(parsed));
                found.take(&wrapped);
            }
            Table::Other => {}
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn salvaged(instance: Option<&str>, socket: Option<&str>) -> Salvaged {
        Salvaged {
            instance: instance.map(str::to_owned),
            control_socket: socket.map(str::to_owned),
        }
    }

    #[test]
    fn a_file_that_parses_gives_its_values_whatever_else_is_wrong() {
        let source = "instance = \"edge\"\nconcurrency = \"many\"\n[supervisor]\ncontrol_socket = \"run/edge.sock\"\nreadyness_timeout = 1\n";
        assert_eq!(
            salvage(source),
            salvaged(Some("edge"), Some("run/edge.sock"))
        );
        assert_eq!(
            salvage("supervisor.control_socket = \"/run/x.sock\"\n"),
            salvaged(None, Some("/run/x.sock"))
        );
    }

    #[test]
    fn a_syntax_error_leaves_the_whole_lines_readable() {
        let source = r#"
instance = "edge"   # the name
concurrency = = 2

[[listener]
name = "public"
control_socket = "not/this.sock"

[ supervisor ]
proxy_binary = "/opt/baton-proxy
control_socket = "/run/edge.sock"
"#;
        assert_eq!(
            salvage(source),
            salvaged(Some("edge"), Some("/run/edge.sock"))
        );
        // Keys of other tables, or after a header that cannot be read, are not taken.
        let source = "[listener]\ninstance = \"no\"\n[supervisor.x]\ncontrol_socket = \"no\"\n[[broken\ncontrol_socket = \"no\"\n";
        assert_eq!(salvage(source), salvaged(None, None));
        assert_eq!(salvage("= nothing"), salvaged(None, None));
    }

    #[test]
    fn a_broken_file_is_located_by_what_it_names_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("baton.toml");
        std::fs::write(
            &path,
            "[supervisor]\ncontrol_socket = \"baton.sock\"\nreadiness_timeout = \"soon\n",
        )
        .unwrap();
        let located = control_socket(&path);
        assert_eq!(located.socket, dir.path().join("baton.sock"));
        let guessed = located.guessed.unwrap();
        assert!(
            guessed.starts_with(&format!("{}:3:", path.display()))
                && guessed.ends_with(&format!(
                    "; using the control socket the file names, {}",
                    dir.path().join("baton.sock").display()
                )),
            "{guessed}"
        );
        std::fs::write(
            &path,
            "instance = \"edge\"\n[supervisor]\ncontrol_socket = \"baton.sock\"\n",
        )
        .unwrap();
        assert_eq!(
            control_socket(&path),
            Located {
                socket: dir.path().join("baton.sock"),
                guessed: None
            }
        );
    }
}
