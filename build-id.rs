// The build id of baton's binaries, included by the build scripts of `baton`, `baton-proxy` and
// `baton-stats` (`include!("../build-id.rs")`), so that one build of the workspace gives the
// three binaries one id.
//
// The id is `<version>-<profile>-<hash>`, where the hash covers every source file the binaries
// are built from (the workspace crates' `src/`, their manifests and `Cargo.lock`): it changes
// whenever the code does, and the same sources built again give the same id. `baton status`,
// `/server_info` and `--version` show it, so that an operator sees which build runs after an
// upgrade.

/// The workspace folders whose files make the binaries.
const SOURCES: &[&str] = &[
    "Cargo.toml",
    "Cargo.lock",
    "config-errors",
    "proxy",
    "restart-protocol",
    "shm-stats",
    "supervisor",
];

/// Prints the `cargo:` lines that set `BATON_BUILD_ID` and rebuild when a source changes.
fn emit_build_id() {
    use std::hash::Hasher;
    let manifest = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest.parent().expect("a crate of the workspace");
    let mut files = Vec::new();
    for source in SOURCES {
        let path = root.join(source);
        println!("cargo:rerun-if-changed={}", path.display());
        collect(&path, &mut files);
    }
    files.sort();
    // SipHash with fixed keys: the same bytes give the same id on every machine.
    #[allow(deprecated)]
    let mut hash = std::hash::SipHasher::new();
    for file in &files {
        hash.write(file.strip_prefix(root).unwrap_or(file).to_string_lossy().as_bytes());
        hash.write(&std::fs::read(file).unwrap_or_default());
    }
    let version = std::env::var("CARGO_PKG_VERSION").unwrap_or_default();
    let profile = std::env::var("PROFILE").unwrap_or_default();
    println!(
        "cargo:rustc-env=BATON_BUILD_ID={version}-{profile}-{:016x}",
        hash.finish()
    );
}

/// The source files under `path` (a file, or a folder walked without its build outputs).
fn collect(path: &std::path::Path, files: &mut Vec<std::path::PathBuf>) {
    if path.is_file() {
        files.push(path.to_owned());
        return;
    }
    let Ok(entries) = std::fs::read_dir(path) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if name == "target" || name.to_string_lossy().starts_with('.') {
            continue;
        }
        if path.is_dir() {
            collect(&path, files);
        } else if path
            .extension()
            .is_some_and(|e| e == "rs" || e == "toml" || e == "md")
        {
            files.push(path);
        }
    }
}
