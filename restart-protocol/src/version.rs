//! Protocol version negotiation: the highest version both sides speak wins.

#![forbid(unsafe_code)]

use serde::{Deserialize, Serialize};

/// An inclusive range of protocol versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRange {
    pub min: u16,
    pub max: u16,
}

/// The versions this build speaks. Raise `max` for a compatible extension; raise `min` only when
/// an old version can no longer be served.
pub const PROTOCOL_VERSIONS: VersionRange = VersionRange { min: 1, max: 1 };

/// The supervisor understands `ToSupervisor::DrainRequested` (a message added after version 1;
/// an older supervisor could not decode it).
pub const FEATURE_DRAIN_REQUEST: u64 = 1 << 0;

/// The supervisor binds sockets on request (`ToSupervisor::BindSocket`).
pub const FEATURE_BIND_SOCKET: u64 = 1 << 1;

/// Adoption: the supervisor hands the active generation the rendezvous
/// (`ToGeneration::Rendezvous`), and a generation whose supervisor died serves on and lets the
/// next supervisor adopt it there (`ToSupervisor::HeldSocket`).
pub const FEATURE_ADOPT: u64 = 1 << 2;

/// Feature flags this build offers; both sides use the intersection.
pub const FEATURES: u64 = FEATURE_DRAIN_REQUEST | FEATURE_BIND_SOCKET | FEATURE_ADOPT;

impl std::fmt::Display for VersionRange {
    /// `version 1`, `versions 1 to 3`: for the operator, who is told which side is older.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.min == self.max {
            write!(f, "version {}", self.min)
        } else {
            write!(f, "versions {} to {}", self.min, self.max)
        }
    }
}

/// The two ranges share no version: the peers come from releases too far apart. The supervisor
/// negotiates (it answers the generation's `Hello`), so `ours` is its range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "no common restart protocol version: the supervisor (baton) speaks {ours}, the generation (baton-proxy) {theirs}; upgrade the older of baton and baton-proxy"
)]
pub struct NoCommonVersion {
    pub ours: VersionRange,
    pub theirs: VersionRange,
}

/// The highest version in both ranges.
pub fn negotiate(ours: VersionRange, theirs: VersionRange) -> Result<u16, NoCommonVersion> {
    let high = ours.max.min(theirs.max);
    let low = ours.min.max(theirs.min);
    if ours.min > ours.max || theirs.min > theirs.max || low > high {
        return Err(NoCommonVersion { ours, theirs });
    }
    Ok(high)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(min: u16, max: u16) -> VersionRange {
        VersionRange { min, max }
    }

    #[test]
    fn overlapping_ranges_pick_the_highest_common_version() {
        assert_eq!(negotiate(r(1, 3), r(2, 5)), Ok(3));
        assert_eq!(negotiate(r(2, 5), r(1, 3)), Ok(3));
        assert_eq!(negotiate(r(1, 1), r(1, 1)), Ok(1));
        assert_eq!(negotiate(r(1, 4), r(4, 9)), Ok(4));
    }

    #[test]
    fn disjoint_or_empty_ranges_are_an_error_that_says_why() {
        let err = negotiate(r(1, 2), r(3, 4)).unwrap_err();
        assert_eq!(err.ours, r(1, 2));
        assert_eq!(
            err.to_string(),
            "no common restart protocol version: the supervisor (baton) speaks versions 1 to 2, the generation (baton-proxy) versions 3 to 4; upgrade the older of baton and baton-proxy"
        );
        assert_eq!(
            negotiate(r(2, 2), r(1, 1)).unwrap_err().to_string(),
            "no common restart protocol version: the supervisor (baton) speaks version 2, the generation (baton-proxy) version 1; upgrade the older of baton and baton-proxy"
        );
        assert!(negotiate(r(3, 4), r(1, 2)).is_err());
        assert!(negotiate(r(2, 1), r(1, 2)).is_err(), "an empty range");
    }
}
