//! The restart protocol between the baton supervisor and its proxy generations.
//!
//! This crate will hold the two message enums (`ToSupervisor`, `ToGeneration`), their framing over a
//! `SOCK_SEQPACKET` socketpair, file-descriptor passing with `SCM_RIGHTS`, and the version
//! handshake. It depends on neither the supervisor nor the proxy, nor on any async runtime: the
//! channel is a plain non-blocking fd that each side registers with its own event loop.
//!
//! It is filled by the supervisor issue; until then it is empty on purpose.
