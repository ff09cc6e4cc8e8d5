//! Why a request to an HTTP/1.1 upstream got no (complete) response.

use std::io;

use baton_proxy::http1_wire::WireError;

/// Why a request got no (complete) response.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("upstream connection failed: {0}")]
    Io(#[from] io::Error),
    #[error("upstream closed the connection before the response was complete")]
    Closed,
    #[error("upstream sent an invalid response: {0}")]
    Invalid(&'static str),
    /// The client's request body failed (it broke off, or went past `max_request_body`).
    #[error("request body: {0}")]
    RequestBody(Box<dyn std::error::Error + Send + Sync>),
}

impl From<WireError> for Error {
    fn from(e: WireError) -> Self {
        match e {
            WireError::Closed => Error::Closed,
            WireError::Invalid(what) => Error::Invalid(what),
        }
    }
}
