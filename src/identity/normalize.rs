//! Identifier normalisation: the same person writes the same email or phone
//! number many ways; resolution compares normalised values only. The
//! normalisers are an explicit registry keyed by the manifest's `normalize`.

use crate::manifest::Normalizer;

/// Why a value cannot be an identifier (shown in ingest summaries).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NormalizeError {
    #[error("`{0}` is not an email address")]
    Email(String),
    #[error("`{0}` is not a phone number: {1}")]
    Phone(String, &'static str),
    #[error("`{0}` has no country code and the key has no `default_region`")]
    NoRegion(String),
    #[error("unknown region `{0}`")]
    Region(String),
    #[error("the value is empty")]
    Empty,
}

/// Country calling codes and national trunk prefixes by ISO 3166 region.
/// Covers the regions cdp's users operate in; extend as needed.
pub const REGIONS: &[(&str, &str, &str)] = &[
    ("AT", "43", "0"),
    ("AU", "61", "0"),
    ("BE", "32", "0"),
    ("BR", "55", "0"),
    ("CA", "1", "1"),
    ("CH", "41", "0"),
    ("CN", "86", "0"),
    ("CZ", "420", ""),
    ("DE", "49", "0"),
    ("DK", "45", ""),
    ("EE", "372", ""),
    ("ES", "34", ""),
    ("FI", "358", "0"),
    ("FR", "33", "0"),
    ("GB", "44", "0"),
    ("GR", "30", ""),
    ("HU", "36", "06"),
    ("IE", "353", "0"),
    ("IN", "91", "0"),
    ("IS", "354", ""),
    ("IT", "39", ""),
    ("JP", "81", "0"),
    ("LT", "370", "8"),
    ("LV", "371", ""),
    ("MX", "52", ""),
    ("NL", "31", "0"),
    ("NO", "47", ""),
    ("NZ", "64", "0"),
    ("PL", "48", ""),
    ("PT", "351", ""),
    ("SE", "46", "0"),
    ("SG", "65", ""),
    ("US", "1", "1"),
    ("ZA", "27", "0"),
];

/// Options of one identity key.
#[derive(Debug, Clone, Default)]
pub struct Options<'a> {
    pub default_region: Option<&'a str>,
}

/// Normalises `raw` by `kind`.
pub fn normalize(kind: Normalizer, raw: &str, opts: &Options<'_>) -> Result<String, NormalizeError> {
    let trimmed = raw.trim();
    if trimmed.is_empty() {
        return Err(NormalizeError::Empty);
    }
    Ok(match kind {
        Normalizer::Email => email(trimmed)?,
        Normalizer::E164 => e164(trimmed, opts.default_region)?,
        Normalizer::Lowercase => trimmed.to_lowercase(),
        Normalizer::Trim => trimmed.to_owned(),
        Normalizer::Digits => {
            let d: String = trimmed.chars().filter(char::is_ascii_digit).collect();
            if d.is_empty() {
                return Err(NormalizeError::Empty);
            }
            d
        }
        Normalizer::None => raw.to_owned(),
    })
}

fn email(s: &str) -> Result<String, NormalizeError> {
    let lower = s.to_lowercase();
    let bad = || NormalizeError::Email(s.to_owned());
    let (local, domain) = lower.split_once('@').ok_or_else(bad)?;
    let ok = !local.is_empty()
        && local.len() <= 64
        && !domain.contains('@')
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !domain.contains("..")
        && !lower.chars().any(|c| c.is_whitespace() || c.is_control() || matches!(c, '<' | '>' | ',' | ';' | '"'));
    if ok { Ok(lower) } else { Err(bad()) }
}

fn e164(s: &str, region: Option<&str>) -> Result<String, NormalizeError> {
    let mut digits = String::with_capacity(16);
    let mut plus = false;
    for (i, c) in s.chars().enumerate() {
        match c {
            '0'..='9' => digits.push(c),
            '+' if i == 0 => plus = true,
            ' ' | '-' | '(' | ')' | '.' | '/' | '\u{a0}' => {}
            _ => return Err(NormalizeError::Phone(s.to_owned(), "it contains letters or symbols")),
        }
    }
    let international = if plus {
        digits
    } else if let Some(rest) = digits.strip_prefix("00") {
        rest.to_owned()
    } else {
        let region = region.ok_or_else(|| NormalizeError::NoRegion(s.to_owned()))?;
        let (_, cc, trunk) =
            REGIONS.iter().find(|(r, _, _)| *r == region).ok_or_else(|| NormalizeError::Region(region.to_owned()))?;
        let national = if !trunk.is_empty() && digits.starts_with(trunk) && digits.len() > trunk.len() + 6 {
            &digits[trunk.len()..]
        } else {
            &digits
        };
        format!("{cc}{national}")
    };
    // E.164: at most 15 digits; fewer than 8 is no subscriber number.
    if international.len() < 8 {
        return Err(NormalizeError::Phone(s.to_owned(), "too short"));
    }
    if international.len() > 15 {
        return Err(NormalizeError::Phone(s.to_owned(), "longer than 15 digits"));
    }
    if international.starts_with('0') {
        return Err(NormalizeError::Phone(s.to_owned(), "no country code starts with 0"));
    }
    Ok(format!("+{international}"))
}

/// Built-in placeholders that never identify anyone, compared after normalisation.
pub const PLACEHOLDERS: &[&str] = &[
    "null",
    "none",
    "nil",
    "n/a",
    "na",
    "unknown",
    "undefined",
    "0",
    "-",
    "test",
    "test@test.com",
    "test@example.com",
    "noreply@example.com",
    "no-reply@example.com",
    "noemail@noemail.com",
    "none@none.com",
    "asdf@asdf.com",
];

/// Whether a normalised value is a placeholder rather than an identifier.
pub fn is_placeholder(value: &str) -> bool {
    let v = value.trim().to_lowercase();
    if PLACEHOLDERS.contains(&v.as_str()) {
        return true;
    }
    // `+0000000000`, `1111111111`: one repeated digit.
    let digits: Vec<char> = v.chars().filter(char::is_ascii_digit).collect();
    if digits.len() >= 6 && digits.iter().all(|d| *d == digits[0]) && v.chars().all(|c| c.is_ascii_digit() || c == '+')
    {
        return true;
    }
    v.starts_with("noreply@") || v.starts_with("no-reply@")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn se() -> Options<'static> {
        Options { default_region: Some("SE") }
    }

    #[test]
    fn emails() {
        assert_eq!(
            normalize(Normalizer::Email, " Ada.Lovelace@Example.ORG ", &se()).unwrap(),
            "ada.lovelace@example.org"
        );
        assert!(normalize(Normalizer::Email, "ada@", &se()).is_err());
        assert!(normalize(Normalizer::Email, "ada at example.org", &se()).is_err());
        assert!(normalize(Normalizer::Email, "a@b@c.com", &se()).is_err());
        assert!(normalize(Normalizer::Email, "ada@localhost", &se()).is_err());
    }

    #[test]
    fn phones() {
        assert_eq!(normalize(Normalizer::E164, "070-123 45 67", &se()).unwrap(), "+46701234567");
        assert_eq!(normalize(Normalizer::E164, "+46 70 234 56 78", &se()).unwrap(), "+46702345678");
        assert_eq!(normalize(Normalizer::E164, "0046701234567", &se()).unwrap(), "+46701234567");
        assert_eq!(normalize(Normalizer::E164, "+1 (415) 555-2671", &se()).unwrap(), "+14155552671");
        let no = Options { default_region: Some("NO") };
        assert_eq!(normalize(Normalizer::E164, "412 34 567", &no).unwrap(), "+4741234567");
        assert!(normalize(Normalizer::E164, "12345", &se()).is_err());
        assert!(normalize(Normalizer::E164, "call me", &se()).is_err());
        assert!(matches!(
            normalize(Normalizer::E164, "0701234567", &Options::default()),
            Err(NormalizeError::NoRegion(_))
        ));
    }

    #[test]
    fn placeholders() {
        assert!(is_placeholder("N/A"));
        assert!(is_placeholder("test@test.com"));
        assert!(is_placeholder("+0000000000"));
        assert!(is_placeholder("noreply@shop.example"));
        assert!(!is_placeholder("ada@example.org"));
        assert!(!is_placeholder("+46701234567"));
    }
}
