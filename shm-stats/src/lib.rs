//! The shared-memory stats region of baton.
//!
//! This crate will hold the region's layout (header, process-shared locks, the append-only name
//! table, one shard of cells per generation and worker), the writer handles used on the proxy's
//! request path, the bounds-checked reader that external tools use, and the `baton-stats` CLI.
//! It does not know about processes, sockets or the proxy.
//!
//! It is filled by the stats-region issue; until then it is empty on purpose.
