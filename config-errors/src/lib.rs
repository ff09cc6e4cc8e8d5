//! How an error in baton's config file reads.
//!
//! One file is read by two checkers: the supervisor (`baton`) reads its own tables, the proxy
//! (`baton-proxy`) everything else. An operator who misspells a field must get the same words
//! whichever of them finds it, so both turn a TOML parse error into their message here.
//!
//! Who depends on it: the supervisor and the proxy. It depends on neither, and knows nothing of
//! the config's fields: it reads the names serde lists in its error.
//!
//! What it promises:
//! - A place reads `file:line:column`, the line and column counted from 1, the column in
//!   characters ([`line_column`]).
//! - A parse error's message quotes the line it points at when there is one ([`parse_error`]).
//! - An unknown field or variant that is close to an expected name (a typo: a letter missing,
//!   added, changed, or two swapped) gets `did you mean `name`?`; a far-off one gets nothing.

#![forbid(unsafe_code)]

use std::path::Path;

/// The 1-based line and column (in characters) of byte `offset` of `source`.
pub fn line_column(source: &str, offset: usize) -> (usize, usize) {
    let before = &source[..floor(source, offset)];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

/// `file:line:column: message`, the place being byte `offset` of `source`, read from `path`.
pub fn at(path: &Path, source: &str, offset: usize, message: impl std::fmt::Display) -> String {
    let (line, column) = line_column(source, offset);
    format!("{}:{line}:{column}: {message}", path.display())
}

/// What a TOML parse error of `source` says, and the byte offset it points at: the parser's
/// message, with the nearest expected name when a field or variant is unknown and close to one,
/// and the line quoted (the parser's words name a type, not always the field).
pub fn parse_error(source: &str, error: &toml::de::Error) -> (usize, String) {
    let offset = floor(source, error.span().map_or(0, |s| s.start));
    let mut message = error.message().trim_end().to_owned();
    if let Some(hint) = suggestion(&message) {
        message = hint;
    }
    let line_start = source[..offset].rfind('\n').map_or(0, |i| i + 1);
    let text = source[line_start..].lines().next().unwrap_or("").trim();
    if !text.is_empty() {
        message = format!("{message} (in `{text}`)");
    }
    (offset, message)
}

/// The first top-level key of `source` that is not one of `known`, as [`parse_error`] would
/// word it: its offset, and `unknown field `x` (did you mean `y`?), expected one of …` with the
/// line quoted.
///
/// serde reports a file's errors in the order it reads the file, and a misspelt table name
/// (`[[listner]]`) is often not the first thing it trips on: the `[[listener.route]]` below it
/// makes `listener` a table where a list was expected, and that error names neither the typo nor
/// the way out. A checker that fails asks this first.
pub fn unknown_top_level_key(source: &str, known: &[&str]) -> Option<(usize, String)> {
    let table = toml::de::DeTable::parse(source).ok()?;
    let (key, _) = table
        .get_ref()
        .iter()
        .filter(|(key, _)| !known.contains(&key.get_ref().as_ref()))
        .min_by_key(|(key, _)| key.span().start)?;
    let unknown: &str = key.get_ref().as_ref();
    let expected = match known {
        [one] => format!("`{one}`"),
        [a, b] => format!("`{a}` or `{b}`"),
        _ => format!(
            "one of {}",
            known
                .iter()
                .map(|k| format!("`{k}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut message = format!("unknown field `{unknown}`, expected {expected}");
    if let Some(hint) = suggestion(&message) {
        message = hint;
    }
    let offset = floor(source, key.span().start);
    let line_start = source[..offset].rfind('\n').map_or(0, |i| i + 1);
    let text = source[line_start..].lines().next().unwrap_or("").trim();
    if !text.is_empty() {
        message = format!("{message} (in `{text}`)");
    }
    Some((offset, message))
}

/// `offset`, within `source` and on a character's first byte.
fn floor(source: &str, offset: usize) -> usize {
    let mut offset = offset.min(source.len());
    while !source.is_char_boundary(offset) {
        offset -= 1;
    }
    offset
}

/// serde's `unknown field `x`, expected ...` (or `unknown variant`) with `(did you mean `y`?)`
/// after the unknown name, when one expected name is close to it; `None` otherwise.
///
/// serde gives the unknown name and the expected ones only as this text
/// (`serde::de::Error::unknown_field`), so it is read back here; its wording is pinned by the
/// tests below, which fail should serde change it.
fn suggestion(message: &str) -> Option<String> {
    let (kind, rest) = ["unknown field `", "unknown variant `"]
        .into_iter()
        .find_map(|prefix| message.strip_prefix(prefix).map(|rest| (prefix, rest)))?;
    let (unknown, expected) = rest.split_once("`, expected ")?;
    // The expected names are the backquoted words: "`a`", "`a` or `b`", "one of `a`, `b`".
    let names = expected.split('`').skip(1).step_by(2);
    let best = nearest(unknown, names)?;
    Some(format!(
        "{kind}{unknown}` (did you mean `{best}`?), expected {expected}"
    ))
}

/// The name of `candidates` nearest to `typed`, if it is near enough to be a typo of it: at
/// most one edit for every three characters typed (and always one), counting a swap of two
/// neighbours as one edit and ignoring case (rustc's rule for its own suggestions).
pub fn nearest<'a>(typed: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let typed_lower = typed.to_lowercase();
    let limit = (typed.chars().count() / 3).max(1);
    candidates
        .into_iter()
        .filter(|c| *c != typed)
        .map(|c| {
            (
                strsim::damerau_levenshtein(&typed_lower, &c.to_lowercase()),
                c,
            )
        })
        .filter(|(distance, _)| *distance <= limit)
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_misspelt_table_is_named_before_what_it_breaks_below() {
        let source =
            "instance = \"a\"\n\n[[listner]]\nname = \"x\"\n\n[[listener.route]]\npath = \"/\"\n";
        let (offset, message) =
            unknown_top_level_key(source, &["instance", "listener", "cluster"]).unwrap();
        assert_eq!(line_column(source, offset), (3, 3));
        assert_eq!(
            message,
            "unknown field `listner` (did you mean `listener`?), expected one of `instance`, `listener`, `cluster` (in `[[listner]]`)"
        );
        assert_eq!(
            unknown_top_level_key("instance = 1\n[[listener]]\n", &["instance", "listener"]),
            None
        );
    }
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Listener {
        name: String,
        address: Option<String>,
        protocol: Option<Protocol>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "lowercase")]
    enum Protocol {
        Http,
        Tcp,
    }

    fn error(source: &str) -> String {
        let e = toml::from_str::<Listener>(source).unwrap_err();
        let (offset, message) = parse_error(source, &e);
        at(Path::new("b.toml"), source, offset, message)
    }

    #[test]
    fn a_misspelt_field_gets_the_nearest_name_and_keeps_the_list() {
        assert_eq!(
            error("name = \"x\"\nadress = \"127.0.0.1:80\"\n"),
            "b.toml:2:1: unknown field `adress` (did you mean `address`?), expected one of `name`, `address`, `protocol` (in `adress = \"127.0.0.1:80\"`)"
        );
        // Swapped letters and another case are typos too.
        assert!(error("name = \"x\"\nadrdess = \"a\"\n").contains("did you mean `address`?"));
        assert!(error("name = \"x\"\nProtocl = \"tcp\"\n").contains("did you mean `protocol`?"));
    }

    #[test]
    fn a_far_off_field_gets_no_suggestion() {
        assert_eq!(
            error("name = \"x\"\nbandwidth = 3\n"),
            "b.toml:2:1: unknown field `bandwidth`, expected one of `name`, `address`, `protocol` (in `bandwidth = 3`)"
        );
        // One letter is not enough to guess from.
        assert!(!error("name = \"x\"\nq = 3\n").contains("did you mean"));
    }

    #[test]
    fn a_misspelt_variant_gets_the_nearest_one() {
        let e = error("name = \"x\"\nprotocol = \"htp\"\n");
        assert!(
            e.starts_with("b.toml:2:12: unknown variant `htp` (did you mean `http`?), expected `http` or `tcp`"),
            "{e}"
        );
    }

    #[test]
    fn nearest_takes_the_closest_within_a_third_of_the_name() {
        let fields = ["readiness_timeout", "request_timeout", "idle_timeout"];
        assert_eq!(
            nearest("readyness_timeout", fields),
            Some("readiness_timeout")
        );
        assert_eq!(nearest("reqest_timeout", fields), Some("request_timeout"));
        assert_eq!(nearest("timeout", fields), None);
        assert_eq!(nearest("adr", ["address"]), None);
    }

    #[test]
    fn columns_count_characters() {
        let src = "a = 1\nbé = 2\n";
        assert_eq!(line_column(src, src.find('2').unwrap()), (2, 6));
        assert_eq!(line_column(src, 0), (1, 1));
        assert_eq!(line_column(src, 999), (3, 1));
    }
}
