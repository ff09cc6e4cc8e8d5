//! Names and tags: the rules a stat's name, tags and help text follow, and this process's index
//! of the region's name table.

#![forbid(unsafe_code)]

use std::collections::HashMap;

use crate::layout::{Kind, entry};

/// The name table as this process has read it, so that a registration looks a name up instead
/// of reading the whole table: with thousands of stats (a config of hundreds of clusters) that
/// scan made a generation's start quadratic, seconds long. The table only grows, and a
/// published entry never changes, so entries read once stay true.
#[derive(Default)]
pub(crate) struct NameIndex {
    /// Entries read so far: the table's first `read` entries.
    pub(crate) read: u32,
    /// By name: the name's kind (one name, one kind), and the first cell of each tag list.
    pub(crate) by_name: HashMap<String, (Kind, HashMap<String, u32>)>,
}

impl NameIndex {
    pub(crate) fn add(&mut self, kind: Kind, name: &str, tags: &str, first_cell: u32) {
        let (_, by_tags) = self
            .by_name
            .entry(name.to_owned())
            .or_insert_with(|| (kind, HashMap::new()));
        by_tags.entry(tags.to_owned()).or_insert(first_cell);
        self.read += 1;
    }
}

pub(crate) fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > entry::NAME_MAX {
        return Err(format!("a name is 1 to {} bytes", entry::NAME_MAX));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
        || name.as_bytes()[0].is_ascii_digit()
    {
        return Err(
            "a name holds letters, digits, `_` and `.`, and does not start with a digit".into(),
        );
    }
    Ok(())
}

/// `[("listener", "public")]` → `listener=public`.
pub(crate) fn encode_tags(tags: &[(&str, &str)]) -> Result<String, String> {
    let mut out = String::new();
    for (k, v) in tags {
        let key_ok = !k.is_empty()
            && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            && !k.as_bytes()[0].is_ascii_digit();
        if !key_ok {
            return Err(format!("tag key `{k}`: use letters, digits and `_`"));
        }
        if !v
            .bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b',' | b'=' | b'"' | b'\\'))
        {
            return Err(format!(
                "tag `{k}`: value `{v}` may hold printable ASCII except , = \" and \\"
            ));
        }
        if !out.is_empty() {
            out.push(',');
        }
        out.push_str(k);
        out.push('=');
        out.push_str(v);
    }
    if out.len() > entry::TAGS_MAX {
        return Err(format!("tags are at most {} bytes in all", entry::TAGS_MAX));
    }
    Ok(out)
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
pub(crate) fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
