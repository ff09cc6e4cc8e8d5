//! Scalar values: names, durations, counts, sizes, listen addresses and paths, each checked
//! with the field it came from.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_spanned::Spanned;

use super::super::raw::{RawDuration, RawSize};
use super::*;

/// The longest duration a config may give: times are added to instants, and a year is more
/// than any timeout or interval needs.
const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

impl Validator<'_> {
    pub(super) fn instance_name(&self, name: Spanned<String>) -> Result<String> {
        let ok = !name.get_ref().is_empty()
            && name.get_ref().len() <= 64
            && name
                .get_ref()
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
            && !name.get_ref().starts_with('.');
        if !ok {
            return Err(self.error(
                name.span(),
                format!(
                    "instance: `{}` is not a valid instance name; use 1 to 64 letters, digits, `-`, `_` or `.` (it names files such as /dev/shm/baton.<instance>)",
                    name.get_ref()
                ),
            ));
        }
        Ok(name.into_inner())
    }

    pub(super) fn duration(&self, field: &str, value: &Spanned<RawDuration>) -> Result<Duration> {
        let d = self.any_duration(field, value)?;
        if d > MAX_DURATION {
            return Err(self.error(
                value.span(),
                format!("{field}: at most a year (365d); no timeout needs to be longer"),
            ));
        }
        Ok(d)
    }

    fn any_duration(&self, field: &str, value: &Spanned<RawDuration>) -> Result<Duration> {
        match value.get_ref() {
            RawDuration::Fraction(f) => Duration::try_from_secs_f64(*f).map_err(|_| {
                self.error(
                    value.span(),
                    format!("{field}: a duration is a number of seconds from 0, not {f}"),
                )
            }),
            RawDuration::Seconds(s) => u64::try_from(*s).map(Duration::from_secs).map_err(|_| {
                self.error(value.span(), format!("{field}: a duration cannot be negative"))
            }),
            RawDuration::Text(text) => humantime::parse_duration(text).map_err(|e| {
                self.error(
                    value.span(),
                    format!(
                        "{field}: `{text}` is not a duration ({e}); write it like \"250ms\", \"5s\" or \"2m\""
                    ),
                )
            }),
        }
    }

    pub(super) fn duration_or(
        &self,
        field: &str,
        value: Option<Spanned<RawDuration>>,
        default: Duration,
    ) -> Result<Duration> {
        value.map_or(Ok(default), |v| self.duration(field, &v))
    }

    /// A positive duration, for timeouts where zero would mean "fail at once".
    pub(super) fn timeout_or(
        &self,
        field: &str,
        value: Option<Spanned<RawDuration>>,
        default: Duration,
    ) -> Result<Duration> {
        let Some(value) = value else {
            return Ok(default);
        };
        let d = self.duration(field, &value)?;
        if d.is_zero() {
            return Err(self.error(value.span(), format!("{field}: must be more than zero")));
        }
        Ok(d)
    }

    /// A whole number from 1 to `max`.
    pub(super) fn count(&self, field: &str, value: &Spanned<i64>, max: usize) -> Result<usize> {
        usize::try_from(*value.get_ref())
            .ok()
            .filter(|n| (1..=max).contains(n))
            .ok_or_else(|| {
                self.error(
                    value.span(),
                    format!("{field}: expected a number from 1 to {max}"),
                )
            })
    }

    /// A size in bytes from 1 to `max`: a number of bytes, or a number with a unit (`k`, `KiB`,
    /// `m`, `MiB`, `g`, `GiB`; every unit counts in 1024s, as nginx's sizes do).
    pub(super) fn size(&self, field: &str, value: &Spanned<RawSize>, max: u64) -> Result<u64> {
        let bytes = match value.get_ref() {
            RawSize::Bytes(n) => u64::try_from(*n).ok(),
            RawSize::Text(text) => parse_size(text),
        };
        bytes.filter(|n| (1..=max).contains(n)).ok_or_else(|| {
            let range = if max == u64::MAX {
                "more than zero".to_owned()
            } else {
                format!("from 1 byte to {max} bytes")
            };
            self.error(
                value.span(),
                format!(
                    "{field}: expected a size {range}, written like 65536, \"64KiB\" or \"10MiB\""
                ),
            )
        })
    }

    /// A listen address (a listener's or the admin's): an IP address and a port other than 0.
    pub(super) fn address(&self, field: &str, value: &Spanned<String>) -> Result<SocketAddr> {
        if let Some(url) = Url::of(value.get_ref(), field == "listener.address") {
            let tls = if field == "listener.address" {
                "for TLS, add [[listener.tls.certificate]] to the listener"
            } else {
                "the admin listener speaks cleartext HTTP only"
            };
            return Err(self.error(
                value.span(),
                format!("{field}: {}", url.message("an address is `IP:PORT`", tls)),
            ));
        }
        let address: SocketAddr = value.get_ref().parse().map_err(|_| {
            self.error(
                value.span(),
                format!(
                    "{field}: `{}` is not an IP address and port; write it like \"127.0.0.1:8080\" or \"[::1]:8080\"",
                    value.get_ref()
                ),
            )
        })?;
        if address.port() == 0 {
            // The system would pick a free port, another one at every reload, and no client
            // could know it.
            return Err(self.error(
                value.span(),
                format!(
                    "{field}: port 0 would make the system pick a port, another one at every reload; give the port clients connect to"
                ),
            ));
        }
        Ok(address)
    }

    pub(super) fn name(&self, field: &str, value: &Spanned<String>) -> Result<String> {
        let name = value.get_ref();
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        {
            return Err(self.error(
                value.span(),
                format!(
                    "{field}: `{name}` is not a valid name; use letters, digits, `-`, `_` or `.`"
                ),
            ));
        }
        Ok(name.clone())
    }

    /// Relative paths in the file start from the file's own folder, so that a config and the
    /// certificates beside it can move together.
    pub(super) fn relative_path(&self, value: &str) -> PathBuf {
        let path = Path::new(value);
        if path.is_absolute() {
            return path.to_owned();
        }
        match self.path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.join(path),
            _ => path.to_owned(),
        }
    }
}

/// `"64KiB"`, `"10m"`, `"1 GiB"`, `"512"`: a number of bytes with an optional unit, every
/// unit a power of 1024. `None` if it is not such a size or does not fit in 64 bits.
fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = text.split_at(digits);
    let number: u64 = number.parse().ok()?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        _ => return None,
    };
    number.checked_mul(1 << shift)
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_count_in_1024s() {
        assert_eq!(parse_size("512"), Some(512));
        assert_eq!(parse_size("64KiB"), Some(64 * 1024));
        assert_eq!(parse_size("64k"), Some(64 * 1024));
        assert_eq!(parse_size("10 MiB"), Some(10 << 20));
        assert_eq!(parse_size("1g"), Some(1 << 30));
        assert_eq!(parse_size("1.5m"), None);
        assert_eq!(parse_size("ten"), None);
        assert_eq!(parse_size("99999999999999999999k"), None);
        assert_eq!(parse_size("20000000000000g"), None);
    }
}
