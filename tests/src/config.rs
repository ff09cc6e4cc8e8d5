//! Edits of a test's config text that cannot silently do nothing.
//!
//! A test that changes one field of a generated config (`drain_timeout = "30s"` to `"1s"`, a
//! misspelt key, a bad value) says what it replaces and by what. `str::replace` returns the text
//! unchanged when the old text is absent, so a test whose config generator changed would go on
//! checking the unedited config and pass for the wrong reason. [`Edit::edit`] and its kin fail
//! the test instead, naming the text that was not found, and show the config they searched.
//!
//! ```
//! use baton_tests::config::Edit;
//! let config = "drain_timeout = \"30s\"\n";
//! assert_eq!(config.edit("\"30s\"", "\"1s\""), "drain_timeout = \"1s\"\n");
//! ```

/// Checked edits of config text (and of any text a test rewrites before use: unit files,
/// example configs).
pub trait Edit {
    /// Replaces the one occurrence of `from` with `to`. Fails the test if `from` is absent or
    /// occurs more than once (use [`Edit::edit_all`] when every occurrence is meant).
    fn edit(&self, from: &str, to: &str) -> String;

    /// Replaces every occurrence of `from` with `to`. Fails the test if there is none.
    fn edit_all(&self, from: &str, to: &str) -> String;

    /// Removes the one occurrence of `text`, as [`Edit::edit`] with an empty replacement.
    fn without(&self, text: &str) -> String;
}

impl Edit for str {
    #[track_caller]
    fn edit(&self, from: &str, to: &str) -> String {
        edited(self, from, to, Some(1))
    }

    #[track_caller]
    fn edit_all(&self, from: &str, to: &str) -> String {
        edited(self, from, to, None)
    }

    #[track_caller]
    fn without(&self, text: &str) -> String {
        edited(self, text, "", Some(1))
    }
}

/// Replaces `from` with `to` in `text`, failing the test unless `from` occurs `count` times (or,
/// with `None`, at least once).
#[track_caller]
pub fn edited(text: &str, from: &str, to: &str, count: Option<usize>) -> String {
    assert!(!from.is_empty(), "a config edit needs text to replace");
    let found = text.matches(from).count();
    match count {
        _ if found == 0 => panic!(
            "config edit: {from:?} is not in the text, so replacing it with {to:?} would change nothing; the text:\n{text}"
        ),
        Some(count) if found != count => {
            panic!("config edit: {from:?} occurs {found} times, not {count}; the text:\n{text}")
        }
        _ => text.replace(from, to),
    }
}

#[cfg(test)]
mod tests {
    use super::Edit;

    #[test]
    fn an_edit_replaces_the_text() {
        assert_eq!("a = 1\nb = 2\n".edit("b = 2", "b = 3"), "a = 1\nb = 3\n");
        assert_eq!("x x".edit_all("x", "y"), "y y");
        assert_eq!("a = 1\nb = 2\n".without("b = 2\n"), "a = 1\n");
    }

    #[test]
    #[should_panic(expected = "config edit: \"c = 1\" is not in the text")]
    fn an_edit_of_absent_text_fails() {
        "a = 1\n".edit("c = 1", "c = 2");
    }

    #[test]
    #[should_panic(expected = "config edit: \"c\" is not in the text")]
    fn an_edit_of_every_occurrence_fails_when_there_is_none() {
        "a = 1\n".edit_all("c", "d");
    }

    #[test]
    #[should_panic(expected = "occurs 2 times, not 1")]
    fn an_edit_meant_once_fails_on_two() {
        "x x".edit("x", "y");
    }
}
