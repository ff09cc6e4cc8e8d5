//! The files a packager looks for beside the code: the licence Cargo.toml names, and a changelog
//! for the version being built.

fn repo_file(name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn the_license_is_the_apache_2_0_text_that_cargo_toml_names() {
    assert!(
        repo_file("Cargo.toml").contains("\nlicense = \"Apache-2.0\"\n"),
        "the workspace names Apache-2.0"
    );
    assert_eq!(env!("CARGO_PKG_LICENSE"), "Apache-2.0");
    let license = repo_file("LICENSE");
    let words: Vec<&str> = license.split_whitespace().collect();
    assert_eq!(
        words[..5],
        ["Apache", "License", "Version", "2.0,", "January"],
        "the licence's title"
    );
    // Its nine sections and the appendix, whole (the standard text has 202 lines).
    for needle in [
        "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION",
        "1. Definitions.",
        "2. Grant of Copyright License.",
        "3. Grant of Patent License.",
        "4. Redistribution.",
        "5. Submission of Contributions.",
        "6. Trademarks.",
        "7. Disclaimer of Warranty.",
        "8. Limitation of Liability.",
        "9. Accepting Warranty or Additional Liability.",
        "END OF TERMS AND CONDITIONS",
        "APPENDIX: How to apply the Apache License to your work.",
    ] {
        assert!(license.contains(needle), "LICENSE has {needle:?}");
    }
    assert_eq!(license.lines().count(), 202);
}

#[test]
fn the_changelog_has_a_section_for_this_version_in_keep_a_changelog_form() {
    let changelog = repo_file("CHANGELOG.md");
    assert!(changelog.starts_with("# Changelog\n"));
    assert!(changelog.contains("[Keep a Changelog](https://keepachangelog.com/"));
    let sections: Vec<&str> = changelog
        .lines()
        .filter_map(|l| l.strip_prefix("## "))
        .collect();
    let version = env!("CARGO_PKG_VERSION");
    // Before a release its changes sit under Unreleased, naming the version to come; after,
    // under `## [VERSION] - YYYY-MM-DD`.
    let released = sections
        .iter()
        .any(|s| s.starts_with(&format!("[{version}] - ")));
    let unreleased = changelog
        .split("\n## ")
        .find(|s| s.starts_with("[Unreleased]\n"))
        .unwrap_or_default();
    let coming = sections.first() == Some(&"[Unreleased]") && unreleased.contains(version);
    assert!(
        released || coming,
        "a section for {version} in {sections:?}"
    );
    for kind in changelog.lines().filter_map(|l| l.strip_prefix("### ")) {
        assert!(
            [
                "Added",
                "Changed",
                "Deprecated",
                "Removed",
                "Fixed",
                "Security"
            ]
            .contains(&kind),
            "Keep a Changelog's kinds of change, not {kind:?}"
        );
    }
    assert!(
        changelog.contains("\n[Unreleased]: "),
        "the Unreleased link"
    );
}
