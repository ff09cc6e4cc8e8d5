//! The config parser (TOML, then validation) on arbitrary text: any file an operator may write.
//! It must answer with a config or an error that names a place in the file, never panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(source) = std::str::from_utf8(data) else {
        return;
    };
    // Relative paths (certificates, logs) start from a folder that does not exist: loading
    // them fails with an error, as it should, without touching the disk beyond a lookup.
    let path = Path::new("/nonexistent-baton-fuzz/baton.toml");
    if let Err(e) = baton_proxy::config::parse(path, source) {
        let message = e.to_string();
        assert!(
            message.starts_with("/nonexistent-baton-fuzz/baton.toml"),
            "an error names the file: {message}"
        );
    }
});
