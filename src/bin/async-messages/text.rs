//! Output for a person: times, sizes, message lists.

use std::fmt::Write;

use async_messages::Message;

use crate::json::{expires_at_ms, hex, sent_at_ms};

pub(crate) const SEND_HELP: &str = "\
Examples:
  async-messages send /srv/app/messages 42 'Your export is ready' --level success
  async-messages send /srv/app/messages alice 'The nightly import failed' --level error
  async-messages send /srv/app/messages 42 'Report ready' --replace-key report:42 --expires-after 1d
  async-messages send /srv/app/messages --everyone 'Maintenance at 22:00' --expires-after 12h
  async-messages send redis://cache:6379/0 --namespace shop 42 'Welcome back'
DURATION: a number and a unit, several added up: 500ms, 90s, 15m, 12h, 7days, 2weeks,
'1h 30m'; from 1 ms to 3650 days. The expiry counts from now (on a directory, by this
machine's clock), so a message that waits in the spool longer than that, because the
app is stopped, is dropped unseen when the app takes it in.
KEY: at most 256 bytes; a newer message with the same key replaces the user's queued one.
Output: one line saying where the message went. A bad DURATION or KEY is an error
(exit code 1) and nothing is stored.";

/// Reads a DURATION such as `90s`, `15m`, `12h`, `7days` or `1h 30m`.
pub(crate) fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(text).map_err(|e| {
        format!(
            "--expires-after {text:?} is not a duration ({e}); write a number and a unit, such as 90s, 15m, 12h or 7days; nothing was stored"
        )
    })
}

/// `ms` since the Unix epoch as `2025-01-01 12:00:00 UTC`.
pub(crate) fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let days = i64::try_from(secs / 86_400).unwrap_or(i64::MAX / 2);
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Howard Hinnant's `civil_from_days`: the proleptic Gregorian date of a
/// day number (days since 1970-01-01).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// `bytes` for a person: `1.3 MiB (1318912 bytes)`.
pub(crate) fn size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} bytes");
    }
    // Precision is not needed for a size to read.
    #[allow(clippy::cast_precision_loss)]
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {} ({bytes} bytes)", UNITS[unit])
}

/// "1 message", "2 messages".
pub(crate) fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// A user's messages, one block each: id, level, time (with its expiry
/// and replace key, when it has them), then the text with its later lines
/// indented under the first.
pub(crate) fn messages(messages: &[Message]) -> String {
    let mut out = String::new();
    for message in messages {
        let _ = write!(
            out,
            "#{}  {}  {}",
            message.id(),
            message.level(),
            utc(sent_at_ms(message))
        );
        if let Some(at) = expires_at_ms(message) {
            let _ = write!(out, "  expires {}", utc(at));
        }
        if let Some(key) = message.replace_key() {
            let _ = write!(out, "  key {key:?}");
        }
        out.push('\n');
        for line in message.text().lines() {
            let _ = writeln!(out, "    {line}");
        }
    }
    out
}

/// A key for a line of text: hex, cut after 40 bytes.
pub(crate) fn short_key(key: &[u8]) -> String {
    match key.get(..40) {
        Some(head) if key.len() > 40 => format!("{}… ({} bytes)", hex(head), key.len()),
        _ => hex(key),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_sizes_read_well() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_735_689_599_999), "2024-12-31 23:59:59 UTC");
        assert_eq!(utc(1_735_689_600_000), "2025-01-01 00:00:00 UTC");
        assert_eq!(size(0), "0 bytes");
        assert_eq!(size(1023), "1023 bytes");
        assert_eq!(size(1_318_912), "1.3 MiB (1318912 bytes)");
        assert_eq!(short_key(&[1, 0xab]), "01ab");
        assert!(short_key(&[7; 50]).ends_with("… (50 bytes)"));
    }

    #[test]
    fn durations_read_as_documented() {
        use std::time::Duration;
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("7days"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        for bad in ["", "soon", "10", "-5m", "1 fortnight"] {
            let error = parse_duration(bad).expect_err(bad);
            assert!(error.contains("is not a duration"), "{bad}: {error}");
        }
    }
}
