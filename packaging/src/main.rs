//! `cargo run -p baton-packaging -- DIR`: writes baton's man pages and shell completions under
//! DIR (see the library's doc for the layout).

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let (Some(dir), None) = (args.next(), args.next()) else {
        eprintln!(
            "usage: baton-packaging DIR  (writes DIR/man/man1/*.1 and DIR/completions/{{bash,zsh,fish}}/*)"
        );
        return ExitCode::from(64);
    };
    let dir = PathBuf::from(dir);
    match baton_packaging::generate(&dir) {
        Ok(files) => {
            println!(
                "baton-packaging: {} files under {}",
                files.len(),
                dir.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("baton-packaging: cannot write under {}: {e}", dir.display());
            ExitCode::FAILURE
        }
    }
}
