//! Units written in the manifest: durations (`90d`, `5s`, `1h30m`, `250ms`),
//! rates (`20/s`, `1000/m`) and byte sizes (`64MiB`). Parsed here so every
//! section and the audience language read them the same way.

use std::time::Duration;

const DURATION_UNITS: &[(&str, u64)] =
    &[("ms", 1), ("s", 1_000), ("m", 60_000), ("h", 3_600_000), ("d", 86_400_000), ("w", 604_800_000)];

/// Parses `90d`, `1h30m`, `250ms`. Units: ms, s, m, h, d, w. No bare numbers:
/// `30` is ambiguous, so it is an error that asks for a unit.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    let mut total: u64 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(format!("`{s}` is not a duration: expected a number at `{rest}`"));
        }
        let n: u64 = rest[..digits].parse().map_err(|_| format!("`{s}` is too large"))?;
        // `5 s` reads as `5s`; the space is what people write, not a second value.
        rest = rest[digits..].trim_start();
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit = &rest[..unit_len];
        if unit.is_empty() {
            return Err(format!("`{s}` has a number without a unit (ms, s, m, h, d, w)"));
        }
        let Some((_, ms)) = DURATION_UNITS.iter().find(|(u, _)| *u == unit) else {
            let example = spelled_out(unit).map_or_else(String::new, |u| format!("; write `{n}{u}`"));
            return Err(format!("`{unit}` is not a duration unit (ms, s, m, h, d, w){example}"));
        };
        total = n.checked_mul(*ms).and_then(|v| total.checked_add(v)).ok_or_else(|| format!("`{s}` is too large"))?;
        rest = rest[unit_len..].trim_start();
    }
    Ok(Duration::from_millis(total))
}

/// A duration in the manifest's notation, largest unit that divides it
/// (`90d`, `36h`, `1500ms`).
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis() as u64;
    if ms == 0 {
        return "0s".into();
    }
    for (unit, size) in DURATION_UNITS.iter().rev() {
        if ms.is_multiple_of(*size) {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

/// The unit meant by a spelled-out one (`seconds` → `s`).
fn spelled_out(unit: &str) -> Option<&'static str> {
    let u = unit.to_ascii_lowercase();
    Some(match u.strip_suffix('s').unwrap_or(&u) {
        "millisecond" | "msec" | "milli" => "ms",
        "sec" | "second" => "s",
        "min" | "minute" => "m",
        "hr" | "hour" => "h",
        "day" => "d",
        "wk" | "week" => "w",
        _ => return None,
    })
}

/// A rate: at most `count` per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub per: Duration,
}

/// Parses `20/s`, `1000/m`, `50000/h`, `5/10s`.
pub fn parse_rate(s: &str) -> Result<Rate, String> {
    let (n, per) =
        s.trim().split_once('/').ok_or_else(|| format!("`{s}` is not a rate: write COUNT/UNIT, e.g. `20/s`"))?;
    let count: u32 = n.trim().parse().map_err(|_| format!("`{n}` is not a whole number"))?;
    if count == 0 {
        return Err("a rate of 0 would never send anything".into());
    }
    let per = per.trim();
    let per = if per.bytes().next().is_some_and(|b| b.is_ascii_digit()) {
        parse_duration(per)?
    } else {
        parse_duration(&format!("1{per}"))?
    };
    if per.is_zero() {
        return Err("the period of a rate must be longer than zero".into());
    }
    Ok(Rate { count, per })
}

/// Parses `64MiB`, `512KiB`, `1GiB`, `1000000` (bytes).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    const UNITS: &[(&str, u64)] = &[
        ("KiB", 1 << 10),
        ("MiB", 1 << 20),
        ("GiB", 1 << 30),
        ("KB", 1000),
        ("MB", 1_000_000),
        ("GB", 1_000_000_000),
        ("B", 1),
    ];
    let s = s.trim();
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    let n: u64 = s[..digits].parse().map_err(|_| format!("`{s}` is not a size: write e.g. `64MiB`"))?;
    let unit = s[digits..].trim();
    if unit.is_empty() {
        return Ok(n);
    }
    let (_, mult) = UNITS
        .iter()
        .find(|(u, _)| *u == unit)
        .ok_or_else(|| format!("`{unit}` is not a size unit (KiB, MiB, GiB, KB, MB, GB, B)"))?;
    n.checked_mul(*mult).ok_or_else(|| format!("`{s}` is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90d").unwrap(), Duration::from_secs(90 * 86_400));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5_400));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("30").unwrap_err().contains("without a unit"));
        assert!(parse_duration("5 days").unwrap_err().contains("write `5d`"));
        assert!(parse_duration("5 seconds").unwrap_err().contains("write `5s`"));
        assert_eq!(parse_duration("5 s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("1h 30m").unwrap(), Duration::from_secs(5_400));
        assert!(parse_duration("3y").unwrap_err().contains("not a duration unit"));
        assert!(parse_duration("99999999999999999999d").is_err());
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("20/s").unwrap(), Rate { count: 20, per: Duration::from_secs(1) });
        assert_eq!(parse_rate("5/10s").unwrap().per, Duration::from_secs(10));
        assert!(parse_rate("20").is_err());
        assert!(parse_rate("0/s").is_err());
        assert!(parse_rate("x/s").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_bytes("100").unwrap(), 100);
        assert!(parse_bytes("12 parsecs").is_err());
    }
}
