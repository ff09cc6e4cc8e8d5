use proptest::prelude::*;

use super::*;

const DEFAULT: PathNormalization = PathNormalization {
    normalize: true,
    merge_slashes: true,
    escaped_slashes: EscapedSlashes::Reject,
};

fn with(escaped_slashes: EscapedSlashes) -> PathNormalization {
    PathNormalization {
        escaped_slashes,
        ..DEFAULT
    }
}

fn changed(path: &str, options: &PathNormalization) -> String {
    match normalize(path, options) {
        Ok(Normalized::Changed(p)) => p,
        other => panic!("{path}: {other:?}"),
    }
}

#[test]
fn the_defaults_are_the_configs() {
    assert_eq!(PathNormalization::default(), DEFAULT);
}

#[test]
fn ordinary_paths_are_left_alone() {
    for path in [
        "/",
        "/a/b/c",
        "/a/b/",
        "/.well-known/x",
        "/a/..b/c.",
        "/a/.../b",
        "/file.tar.gz",
        "*",
        "",
    ] {
        assert_eq!(
            normalize(path, &DEFAULT),
            Ok(Normalized::Unchanged),
            "{path}"
        );
    }
}

#[test]
fn dot_segments_go_as_rfc_3986_says() {
    // RFC 3986, section 5.4's examples, as absolute paths.
    for (path, expected) in [
        ("/a/b/c/./../../g", "/a/g"),
        ("/mid/content=5/../6", "/mid/6"),
        ("/public/../admin/x", "/admin/x"),
        ("/..", "/"),
        ("/../../x", "/x"),
        ("/.", "/"),
        ("/a/.", "/a/"),
        ("/a/..", "/"),
        ("/a/b/..", "/a/"),
        ("/a/./b", "/a/b"),
        ("/a/../", "/"),
    ] {
        assert_eq!(changed(path, &DEFAULT), expected, "{path}");
    }
}

#[test]
fn encoded_dots_are_dots() {
    for (path, expected) in [
        ("/public/%2e%2e/admin/x", "/admin/x"),
        ("/public/%2E%2E/admin/x", "/admin/x"),
        ("/public/.%2e/admin", "/admin"),
        ("/public/%2e/x", "/public/x"),
        ("/a/%2e%2e", "/"),
    ] {
        assert_eq!(changed(path, &DEFAULT), expected, "{path}");
    }
}

#[test]
fn unreserved_characters_are_decoded_and_the_rest_kept_as_sent() {
    assert_eq!(changed("/%7Euser/%41b%2d_", &DEFAULT), "/~user/Ab-_");
    // Reserved and other characters stay encoded, in the client's case: `%3f` is not a `?`.
    assert_eq!(
        normalize("/a%3fb/%20c%25/%e2%82%ac", &DEFAULT),
        Ok(Normalized::Unchanged)
    );
    assert_eq!(changed("/a%3f%2e/../b", &DEFAULT), "/b");
}

#[test]
fn invalid_percent_encodings_are_refused() {
    for path in ["/%zz", "/a%", "/a%2", "/%g0/x", "/%%41"] {
        assert_eq!(
            normalize(path, &DEFAULT),
            Err(PathError::InvalidPercentEncoding),
            "{path}"
        );
    }
}

#[test]
fn encoded_slashes_are_refused_by_default() {
    for path in ["/public/..%2fadmin/x", "/a%2Fb", "/a%5cb", "/a%5C..%5Cb"] {
        assert_eq!(
            normalize(path, &DEFAULT),
            Err(PathError::EscapedSlash),
            "{path}"
        );
    }
}

#[test]
fn encoded_slashes_are_kept_or_decoded_as_configured() {
    let keep = with(EscapedSlashes::Keep);
    assert_eq!(
        normalize("/public/..%2fadmin/x", &keep),
        Ok(Normalized::Unchanged)
    );
    assert_eq!(changed("/a/%2e%2e/b%2Fc", &keep), "/b%2Fc");

    let forward = with(EscapedSlashes::UnescapeAndForward);
    assert_eq!(changed("/public/..%2fadmin/x", &forward), "/admin/x");
    assert_eq!(changed("/a%5Cb", &forward), "/a/b");
    assert_eq!(changed("/a%2F%2Fb", &forward), "/a/b");

    let redirect = with(EscapedSlashes::UnescapeAndRedirect);
    assert_eq!(
        normalize("/a%2Fb/../c", &redirect),
        Ok(Normalized::Redirect("/a/c".into()))
    );
    // Only a decoded slash redirects; other normalisations are forwarded.
    assert_eq!(
        normalize("/a/../c", &redirect),
        Ok(Normalized::Changed("/c".into()))
    );
}

#[test]
fn slashes_merge_after_dot_segments_go() {
    assert_eq!(changed("//admin//x", &DEFAULT), "/admin/x");
    // The empty segment is a segment for `..` (RFC 3986), then the slashes merge.
    assert_eq!(changed("/a//../b", &DEFAULT), "/a/b");
    let keep_slashes = PathNormalization {
        merge_slashes: false,
        ..DEFAULT
    };
    assert_eq!(
        normalize("//admin//x", &keep_slashes),
        Ok(Normalized::Unchanged)
    );
    assert_eq!(changed("/a//../b", &keep_slashes), "/a/b");
}

#[test]
fn without_normalize_path_only_slashes_are_handled() {
    let off = PathNormalization {
        normalize: false,
        merge_slashes: false,
        escaped_slashes: EscapedSlashes::Keep,
    };
    for path in ["/public/../admin", "/%zz/%2e%2e/%2f", "//a"] {
        assert_eq!(normalize(path, &off), Ok(Normalized::Unchanged), "{path}");
    }
    let slashes = PathNormalization {
        normalize: false,
        merge_slashes: true,
        escaped_slashes: EscapedSlashes::UnescapeAndForward,
    };
    assert_eq!(changed("/%zz//a%2Fb/..", &slashes), "/%zz/a/b/..");
}

/// Paths made of the pieces that matter: segments, dots, slashes and escapes.
fn paths() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("/"),
        Just("."),
        Just(".."),
        Just("a"),
        Just("bc"),
        Just("%2e"),
        Just("%2E"),
        Just("%2f"),
        Just("%5C"),
        Just("%41"),
        Just("%3F"),
        Just("%"),
        Just("%z"),
        Just("é"),
    ];
    proptest::collection::vec(piece, 0..16).prop_map(|pieces| format!("/{}", pieces.concat()))
}

fn options() -> impl Strategy<Value = PathNormalization> {
    (
        any::<bool>(),
        any::<bool>(),
        prop_oneof![
            Just(EscapedSlashes::Keep),
            Just(EscapedSlashes::Reject),
            Just(EscapedSlashes::UnescapeAndForward),
            Just(EscapedSlashes::UnescapeAndRedirect),
        ],
    )
        .prop_map(
            |(normalize, merge_slashes, escaped_slashes)| PathNormalization {
                normalize,
                merge_slashes,
                escaped_slashes,
            },
        )
}

proptest! {
    /// A normalised path is normal: normalising it again changes nothing, and it has what the
    /// options forbid no more.
    #[test]
    fn normalising_is_idempotent(path in paths(), options in options()) {
        let once = match normalize(&path, &options) {
            Ok(Normalized::Unchanged) => path.clone(),
            Ok(Normalized::Changed(p) | Normalized::Redirect(p)) => p,
            Err(_) => return Ok(()),
        };
        prop_assert!(once.starts_with('/'), "{once}");
        prop_assert_eq!(normalize(&once, &options), Ok(Normalized::Unchanged), "{} -> {}", path, once);
        if options.normalize {
            prop_assert!(
                !once.split('/').any(|s| s == "." || s == ".."),
                "{} -> {}", path, once
            );
        }
        if options.merge_slashes {
            prop_assert!(!once.contains("//"), "{} -> {}", path, once);
        }
        // What goes upstream is a valid request path.
        prop_assert!(http::uri::PathAndQuery::try_from(once.as_str()).is_ok(), "{}", once);
    }

    /// The fast check never lets through a path the full work would change.
    #[test]
    fn the_byte_check_misses_nothing(path in paths(), options in options()) {
        if !needs_work(path.as_bytes(), &options) {
            let decoded = if path.contains('%') {
                decode(&path, &options).map(|(p, _)| p)
            } else {
                Ok(path.clone())
            };
            let mut full = decoded.map(|p| if options.normalize { remove_dot_segments(&p) } else { p });
            if let Ok(p) = &mut full && options.merge_slashes {
                merge_slashes(p);
            }
            prop_assert_eq!(full, Ok(path));
        }
    }
}
