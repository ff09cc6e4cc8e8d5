//! The restart-protocol decoder on arbitrary bytes: what a generation (or a supervisor) of
//! another build, or a broken one, may send. Decoding must never panic, and a message that
//! decodes must come back unchanged through encoding and decoding again, so that what a peer
//! reads is what the sender meant.
#![no_main]

use libfuzzer_sys::fuzz_target;
use restart_protocol::{ToGeneration, ToSupervisor, decode};

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = decode::<ToSupervisor>(data) {
        let again = postcard::to_stdvec(&msg).expect("a decoded message encodes");
        assert_eq!(decode::<ToSupervisor>(&again).ok(), Some(msg));
    }
    if let Ok(msg) = decode::<ToGeneration>(data) {
        let again = postcard::to_stdvec(&msg).expect("a decoded message encodes");
        assert_eq!(decode::<ToGeneration>(&again).ok(), Some(msg));
    }
});
