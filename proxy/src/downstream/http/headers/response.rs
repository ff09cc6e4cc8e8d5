//! An upstream's response made ready for the client: hop-by-hop fields out, our `Via` in, and
//! a gRPC answer's trailers declared for an HTTP/1.1 client.

use http::header::{CONTENT_TYPE, HeaderMap, HeaderValue, TRAILER, VIA};
use http::{Version, response};

use super::{remove_hop_by_hop, via};

/// Declares a gRPC response's trailers (`grpc-status`, `grpc-message`,
/// `grpc-status-details-bin`) in a `Trailer` field when the upstream did not, for an HTTP/1.1
/// client that accepts trailers: hyper sends HTTP/1.1 trailers only when the request had
/// `te: trailers`, the body is chunked, and `Trailer` names them. gRPC servers speak HTTP/2,
/// where trailers need no declaration, so they do not make one.
pub fn declare_grpc_trailers(headers: &mut HeaderMap) {
    let grpc = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| {
            t == "application/grpc"
                || t.starts_with("application/grpc+")
                || t.starts_with("application/grpc;")
        });
    if grpc && !headers.contains_key(TRAILER) {
        headers.insert(
            TRAILER,
            HeaderValue::from_static("grpc-status, grpc-message, grpc-status-details-bin"),
        );
    }
}

/// Rewrites an upstream's response for the client.
pub fn prepare_response(parts: &mut response::Parts, upstream_version: Version) {
    remove_hop_by_hop(&mut parts.headers);
    parts.headers.append(VIA, via(upstream_version));
    parts.version = Version::default();
}
