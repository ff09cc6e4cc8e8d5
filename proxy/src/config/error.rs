use std::fmt;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// Why a configuration was refused. Every variant is the operator's to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read: a wrong path or missing permission.
    #[error("{}: cannot read the config file: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The file is read but a value in it is wrong; `at` names the line.
    #[error("{at}: {message}")]
    Invalid { at: Location, message: String },
}

/// A place in a config file, shown as `file:line:column`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub path: PathBuf,
    /// 1-based.
    pub line: usize,
    /// 1-based, in characters.
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.path.display(), self.line, self.column)
    }
}

impl Location {
    /// The location of byte `offset` of `source`, read from `path`.
    pub fn of(path: &Path, source: &str, offset: usize) -> Location {
        let (line, column) = config_errors::line_column(source, offset);
        Location {
            path: path.to_owned(),
            line,
            column,
        }
    }
}

impl ConfigError {
    pub(super) fn at(path: &Path, source: &str, span: Range<usize>, message: String) -> Self {
        ConfigError::Invalid {
            at: Location::of(path, source, span.start),
            message,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_count_lines_and_characters() {
        let src = "a = 1\nbé = 2\n";
        let at = Location::of(Path::new("f.toml"), src, src.find('2').unwrap());
        assert_eq!((at.line, at.column), (2, 6));
        assert_eq!(at.to_string(), "f.toml:2:6");
        let start = Location::of(Path::new("f.toml"), src, 0);
        assert_eq!((start.line, start.column), (1, 1));
    }
}
