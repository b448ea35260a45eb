//! Identifier normalisation: the same person writes the same email or phone
//! number many ways; resolution compares normalised values only. The
//! normalisers are an explicit registry keyed by the manifest's `normalize`.

use crate::manifest::{IdentityKey, Normalizer, TextNormalizer, Trait, TraitType};
use serde_json::Value;
use std::borrow::Cow;

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

/// Options of one identity key.
#[derive(Debug, Clone, Default)]
pub struct Options<'a> {
    pub default_region: Option<&'a str>,
    /// Email only: apply mailbox providers' rules ([`PROVIDERS`]).
    pub provider_rules: bool,
}

impl<'a> Options<'a> {
    /// The options the manifest gives an identity key.
    pub fn for_key(spec: &'a IdentityKey) -> Self {
        Options { default_region: spec.default_region.as_deref(), provider_rules: spec.provider_rules }
    }
}

/// Normalises `raw` by `kind`.
pub fn normalize(kind: Normalizer, raw: &str, opts: &Options<'_>) -> Result<String, NormalizeError> {
    let trimmed = raw.trim();
    if trimmed.is_empty() {
        return Err(NormalizeError::Empty);
    }
    Ok(match kind {
        Normalizer::Email => {
            let e = email(trimmed)?;
            if opts.provider_rules { provider_rules(&e) } else { e }
        }
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

/// Mailbox providers whose addresses have several spellings:
/// (domain, canonical domain, dots ignored in the local part, `+tag` ignored).
pub const PROVIDERS: &[(&str, &str, bool, bool)] = &[
    ("gmail.com", "gmail.com", true, true),
    ("googlemail.com", "gmail.com", true, true),
    ("outlook.com", "outlook.com", false, true),
    ("hotmail.com", "hotmail.com", false, true),
    ("live.com", "live.com", false, true),
    ("icloud.com", "icloud.com", false, true),
    ("me.com", "me.com", false, true),
    ("fastmail.com", "fastmail.com", false, true),
];

/// Applies [`PROVIDERS`] to a normalised address; other domains are kept as they are.
fn provider_rules(email: &str) -> String {
    let Some((local, domain)) = email.split_once('@') else { return email.to_owned() };
    let Some((_, canonical, dots, tags)) = PROVIDERS.iter().find(|(d, ..)| *d == domain) else {
        return email.to_owned();
    };
    let mut local = local;
    if *tags && let Some((base, _)) = local.split_once('+') {
        local = base;
    }
    let local: String = if *dots { local.chars().filter(|c| *c != '.').collect() } else { local.to_owned() };
    if local.is_empty() {
        // `+tag@gmail.com` has no mailbox to reduce to: keep the address.
        return email.to_owned();
    }
    format!("{local}@{canonical}")
}

/// A phone number to E.164 through libphonenumber's metadata: national trunk
/// prefixes (`070…` in Sweden), a trunk prefix written after the country code
/// (`+46 (0)70…`), `00` and other international prefixes, and each region's
/// number lengths.
/// The region a `default_region` names (ISO 3166 alpha-2).
fn region_id(r: &str) -> Result<phonenumber::country::Id, NormalizeError> {
    r.parse::<phonenumber::country::Id>().map_err(|_| NormalizeError::Region(r.to_owned()))
}

/// Whether `normalize: e164` accepts `region` as its `default_region`;
/// cheap (the numbering plans load on the first number).
pub fn known_region(region: &str) -> bool {
    region_id(region).is_ok()
}

fn e164(s: &str, region: Option<&str>) -> Result<String, NormalizeError> {
    if s.chars().any(char::is_alphabetic) {
        return Err(NormalizeError::Phone(s.to_owned(), "it contains letters"));
    }
    let country = match region {
        Some(r) => Some(region_id(r)?),
        None => None,
    };
    let international = s.starts_with('+') || s.starts_with("00");
    if country.is_none() && !international {
        return Err(NormalizeError::NoRegion(s.to_owned()));
    }
    // libphonenumber reads `+46 (0)70` as `+46 070`; drop the bracketed trunk
    // prefix so the national number is parsed without it.
    let cleaned = if international { s.replacen("(0)", "", 1) } else { s.to_owned() };
    let cleaned = match cleaned.strip_prefix("00") {
        Some(rest) if country.is_none() => format!("+{rest}"),
        _ => cleaned,
    };
    let n = phonenumber::parse(country, &cleaned).map_err(|e| NormalizeError::Phone(s.to_owned(), phone_reason(&e)))?;
    let out = n.format().mode(phonenumber::Mode::E164).to_string();
    let digits = out.len().saturating_sub(1);
    if digits < 8 {
        return Err(NormalizeError::Phone(s.to_owned(), "too short"));
    }
    if digits > 15 {
        return Err(NormalizeError::Phone(s.to_owned(), "longer than 15 digits"));
    }
    Ok(out)
}

fn phone_reason(e: &phonenumber::ParseError) -> &'static str {
    use phonenumber::ParseError as P;
    match e {
        P::NoNumber => "no number in it",
        P::InvalidCountryCode => "unknown country code",
        P::TooShortAfterIdd | P::TooShortNsn => "too short",
        P::TooLong => "too long",
        _ => "not a phone number",
    }
}

/// Prepares a raw trait value for typing: the trait's text normalisers, then
/// its declared date or timestamp `format`. Values of other shapes pass
/// through unchanged (typing rejects what does not fit).
pub fn trait_value<'v>(t: &Trait, v: &'v Value) -> Result<Cow<'v, Value>, String> {
    if t.normalize.is_empty() && t.format.is_none() {
        return Ok(Cow::Borrowed(v));
    }
    let mut v = match v {
        Value::String(s) if !t.normalize.is_empty() => Value::String(text(&t.normalize, s)),
        Value::Array(items) if !t.normalize.is_empty() => Value::Array(
            items
                .iter()
                .map(|i| match i {
                    Value::String(s) => Value::String(text(&t.normalize, s)),
                    other => other.clone(),
                })
                .collect(),
        ),
        other => other.clone(),
    };
    if let Some(fmt) = &t.format {
        let raw = match &v {
            Value::String(s) => Some(s.trim().to_owned()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        };
        if let Some(raw) = raw {
            v = Value::String(match t.kind {
                TraitType::Date => date(&raw, fmt)?,
                TraitType::Timestamp => timestamp(&raw, fmt)?,
                _ => return Ok(Cow::Owned(v)),
            });
        }
    }
    Ok(Cow::Owned(v))
}

/// Applies text normalisers in order.
pub fn text(steps: &[TextNormalizer], s: &str) -> String {
    let mut out = s.to_owned();
    for step in steps {
        out = match step {
            TextNormalizer::Trim => out.trim().to_owned(),
            TextNormalizer::CollapseWhitespace => out.split_whitespace().collect::<Vec<_>>().join(" "),
            TextNormalizer::RemoveWhitespace => out.chars().filter(|c| !c.is_whitespace()).collect(),
            TextNormalizer::Lowercase => out.to_lowercase(),
            TextNormalizer::Uppercase => out.to_uppercase(),
            TextNormalizer::StripAccents => strip_accents(&out),
        };
    }
    out
}

/// Removes diacritics: NFKD, combining marks dropped, and the Latin letters
/// that do not decompose folded by hand.
pub fn strip_accents(s: &str) -> String {
    use unicode_normalization::UnicodeNormalization;
    use unicode_normalization::char::is_combining_mark;
    let mut out = String::with_capacity(s.len());
    for c in s.nfkd().filter(|c| !is_combining_mark(*c)) {
        match c {
            'ø' => out.push('o'),
            'Ø' => out.push('O'),
            'æ' => out.push_str("ae"),
            'Æ' => out.push_str("AE"),
            'ß' => out.push_str("ss"),
            'ł' => out.push('l'),
            'Ł' => out.push('L'),
            'đ' => out.push('d'),
            'Đ' => out.push('D'),
            'þ' => out.push_str("th"),
            'Þ' => out.push_str("TH"),
            c => out.push(c),
        }
    }
    out
}

fn date(raw: &str, fmt: &str) -> Result<String, String> {
    use chrono::NaiveDate;
    NaiveDate::parse_from_str(raw, fmt)
        .or_else(|_| NaiveDate::parse_from_str(raw, "%Y-%m-%d"))
        .map(|d| d.format("%Y-%m-%d").to_string())
        .map_err(|_| format!("`{raw}` is not a date in the format `{fmt}` (nor YYYY-MM-DD)"))
}

fn timestamp(raw: &str, fmt: &str) -> Result<String, String> {
    use chrono::{DateTime, NaiveDateTime, SecondsFormat, Utc};
    let parsed = DateTime::parse_from_str(raw, fmt)
        .map(|t| t.with_timezone(&Utc))
        .or_else(|_| NaiveDateTime::parse_from_str(raw, fmt).map(|t| t.and_utc()))
        .or_else(|_| DateTime::parse_from_rfc3339(raw).map(|t| t.with_timezone(&Utc)));
    parsed
        .map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
        .map_err(|_| format!("`{raw}` is not a timestamp in the format `{fmt}` (nor RFC 3339)"))
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
        Options { default_region: Some("SE"), provider_rules: false }
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
        let no = Options { default_region: Some("NO"), provider_rules: false };
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

    #[test]
    fn a_trunk_prefix_after_the_country_code_is_one_number() {
        let want = "+46701234567";
        for raw in ["+46 (0)70 123 45 67", "070-123 45 67", "+46 70 123 45 67", "0046 70 123 45 67", "+460701234567"] {
            assert_eq!(normalize(Normalizer::E164, raw, &se()).as_deref(), Ok(want), "{raw}");
        }
        let gb = Options { default_region: Some("GB"), provider_rules: false };
        assert_eq!(normalize(Normalizer::E164, "+44 (0)20 7946 0958", &gb).unwrap(), "+442079460958");
        assert_eq!(normalize(Normalizer::E164, "020 7946 0958", &gb).unwrap(), "+442079460958");
        assert!(matches!(
            normalize(Normalizer::E164, "0701234567", &Options { default_region: Some("XX"), provider_rules: false }),
            Err(NormalizeError::Region(_))
        ));
    }

    #[test]
    fn provider_rules_are_off_by_default() {
        let on = Options { default_region: None, provider_rules: true };
        assert_eq!(
            normalize(Normalizer::Email, "Ada.Love+news@GoogleMail.com", &se()).unwrap(),
            "ada.love+news@googlemail.com"
        );
        assert_eq!(normalize(Normalizer::Email, "Ada.Love+news@GoogleMail.com", &on).unwrap(), "adalove@gmail.com");
        assert_eq!(normalize(Normalizer::Email, "a.da@gmail.com", &on).unwrap(), "ada@gmail.com");
        assert_eq!(normalize(Normalizer::Email, "ada.l+x@outlook.com", &on).unwrap(), "ada.l@outlook.com");
        assert_eq!(normalize(Normalizer::Email, "ada.l+x@example.org", &on).unwrap(), "ada.l+x@example.org");
    }

    #[test]
    fn trait_values_are_normalised_and_dates_read_in_their_format() {
        use crate::manifest::MergePolicy;
        let t = |kind, normalize: Vec<TextNormalizer>, format: Option<&str>| Trait {
            kind,
            allowed: vec![],
            labels: vec![],
            merge: None::<MergePolicy>,
            description: None,
            normalize,
            format: format.map(str::to_owned),
        };
        let pc = t(TraitType::String, vec![TextNormalizer::RemoveWhitespace, TextNormalizer::Uppercase], None);
        assert_eq!(*trait_value(&pc, &Value::from(" se 114 55 ")).unwrap(), Value::from("SE11455"));
        let name = t(
            TraitType::String,
            vec![TextNormalizer::CollapseWhitespace, TextNormalizer::StripAccents, TextNormalizer::Lowercase],
            None,
        );
        assert_eq!(
            *trait_value(&name, &Value::from("  Åsa   Øberg-Müller ")).unwrap(),
            Value::from("asa oberg-muller")
        );
        let d = t(TraitType::Date, vec![], Some("%Y%m%d"));
        assert_eq!(*trait_value(&d, &Value::from("19921119")).unwrap(), Value::from("1992-11-19"));
        assert_eq!(*trait_value(&d, &Value::from(19921119)).unwrap(), Value::from("1992-11-19"));
        assert_eq!(*trait_value(&d, &Value::from("1992-11-19")).unwrap(), Value::from("1992-11-19"));
        assert!(trait_value(&d, &Value::from("19921341")).is_err());
        let ts = t(TraitType::Timestamp, vec![], Some("%d/%m/%Y %H:%M"));
        assert_eq!(
            *trait_value(&ts, &Value::from("19/11/1992 08:30")).unwrap(),
            Value::from("1992-11-19T08:30:00.000Z")
        );
    }
}
