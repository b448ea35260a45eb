//! Identifier normalisation and hashing for customer-list uploads.
//!
//! The rules follow Meta's customer list requirements ("Customer list custom
//! audiences: hashing and normalisation" in the Meta Marketing API docs):
//!
//! * **Email**: trim leading and trailing whitespace, lower-case. Nothing
//!   else: dots in Gmail local parts are *not* removed and `+tags` are kept,
//!   since removing them changes the hash from the one the platform
//!   computes for the address as its owner typed it. (Google's enhanced
//!   conversions guidance additionally strips dots before `@gmail.com`; this
//!   exporter does not.) A value without exactly one `@` with text on both
//!   sides, or with whitespace inside, is not an email.
//! * **Phone**: E.164 digits without the leading `+`, as Meta requires
//!   ("remove symbols, letters and any leading zeros; include the country
//!   code", e.g. `+1 (650) 555-1234` → `16505551234`). Exactly:
//!   1. drop every character that is not a digit, keeping whether the value
//!      started with `+` (after whitespace);
//!   2. a `+` prefix means the digits already start with the country code;
//!      else a `00` international prefix is dropped and the rest is taken
//!      as starting with the country code; else, when `default_country_code`
//!      is configured, national trunk zeros are dropped and the code is
//!      put in front (`070-123 45 67` with `46` → `46701234567`); else the
//!      value is not usable;
//!   3. the result must be 8 to 15 digits (E.164 allows at most 15) and not
//!      start with `0`.
//!
//!   Google Customer Match hashes phones in E.164 *with* the `+`; files for
//!   Google need `hash_identifiers: false` and the host's E.164 values.
//! * **Hash**: SHA-256 of the normalised UTF-8 text, lower-case hex,
//!   computed by the host (`cdp_plugin_sdk::hash`).

use cdp_plugin_sdk::hash;

/// A normalised email, or `None` if `raw` is not an email address.
pub fn normalize_email(raw: &str) -> Option<String> {
    let mut out = String::new();
    normalize_email_into(raw, &mut out).then_some(out)
}

/// Appends the normalised email to `out` and answers `true`, or leaves `out`
/// as it was and answers `false` if `raw` is not an email address. No
/// allocation beyond `out`'s growth for ASCII input.
pub fn normalize_email_into(raw: &str, out: &mut String) -> bool {
    let start = out.len();
    let trimmed = raw.trim();
    if trimmed.is_ascii() {
        out.push_str(trimmed);
        out[start..].make_ascii_lowercase();
    } else {
        // `str::to_lowercase` knows context-dependent mappings (a final Σ).
        out.push_str(&trimmed.to_lowercase());
    }
    let email = &out[start..];
    let ok = if email.is_ascii() {
        // One pass: exactly one `@` with text on both sides, no whitespace
        // (`char::is_whitespace` in ASCII: tab to carriage return, space).
        let (mut ats, mut at, mut space) = (0, 0, false);
        for (i, &b) in email.as_bytes().iter().enumerate() {
            if b == b'@' {
                ats += 1;
                at = i;
            }
            space |= matches!(b, b'\t'..=b'\r' | b' ');
        }
        ats == 1 && at > 0 && at + 1 < email.len() && !space
    } else {
        match email.split_once('@') {
            Some((local, domain)) => {
                !local.is_empty()
                    && !domain.is_empty()
                    && !domain.contains('@')
                    && !email.chars().any(char::is_whitespace)
            }
            None => false,
        }
    };
    if !ok {
        out.truncate(start);
    }
    ok
}

/// A phone as E.164 digits without `+`, or `None` if it cannot be made one.
pub fn normalize_phone(raw: &str, default_country_code: Option<&str>) -> Option<String> {
    let mut out = String::new();
    normalize_phone_into(raw, default_country_code, &mut out).then_some(out)
}

/// Appends the phone as E.164 digits without `+` to `out` and answers
/// `true`, or leaves `out` as it was and answers `false` if it cannot be
/// made one.
pub fn normalize_phone_into(raw: &str, default_country_code: Option<&str>, out: &mut String) -> bool {
    let start = out.len();
    let trimmed = raw.trim_start();
    let plus = trimmed.starts_with('+');
    let mut digits = trimmed.bytes().filter(u8::is_ascii_digit).map(char::from).peekable();
    if !plus {
        // A `00` international prefix is dropped; else the default country
        // code goes in front of the national number without trunk zeros.
        let mut rest = digits.clone();
        if rest.next() == Some('0') && rest.next() == Some('0') {
            digits = rest;
        } else {
            let Some(cc) = default_country_code else { return false };
            out.push_str(cc);
            while digits.next_if_eq(&'0').is_some() {}
        }
    }
    out.extend(digits);
    let e164 = &out[start..];
    let ok = (8..=15).contains(&e164.len()) && !e164.starts_with('0');
    if !ok {
        out.truncate(start);
    }
    ok
}

/// SHA-256 of `value`, lower-case hex.
pub fn sha256_hex(value: &str) -> String {
    let mut out = String::with_capacity(64);
    push_sha256_hex(value, &mut out);
    out
}

/// Appends the SHA-256 of `value`, lower-case hex, to `out`.
pub fn push_sha256_hex(value: &str, out: &mut String) {
    hash::push_sha256_hex(value.as_bytes(), out);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ascii_emails_are_checked_as_the_general_rule_does() {
        let general = |e: &str| {
            e.split_once('@').is_some_and(|(l, d)| {
                !l.is_empty() && !d.is_empty() && !d.contains('@') && !e.chars().any(char::is_whitespace)
            })
        };
        for e in [
            "a@b",
            "@b",
            "a@",
            "a@@b",
            "a@b@c",
            "a b@c",
            "a\u{b}b@c",
            "a\u{c}@c",
            "a\u{1f}@c",
            "ab",
            "",
            "@",
            "x@y.z",
        ] {
            let mut out = String::new();
            assert_eq!(normalize_email_into(e, &mut out), general(e), "{e:?}");
        }
    }

    #[test]
    fn emails() {
        assert_eq!(
            normalize_email("  Ada@Example.COM \n").as_deref(),
            Some("ada@example.com")
        );
        assert_eq!(
            normalize_email("J.Smith+ads@Gmail.com").as_deref(),
            Some("j.smith+ads@gmail.com")
        );
        for bad in ["", "ada", "@example.com", "ada@", "a@b@c", "ad a@example.com"] {
            assert_eq!(normalize_email(bad), None, "{bad}");
        }
    }

    #[test]
    fn phones() {
        assert_eq!(normalize_phone("+46701234567", None).as_deref(), Some("46701234567"));
        assert_eq!(
            normalize_phone(" +1 (650) 555-1234", None).as_deref(),
            Some("16505551234")
        );
        assert_eq!(
            normalize_phone("0046 70 123 45 67", None).as_deref(),
            Some("46701234567")
        );
        assert_eq!(
            normalize_phone("070-123 45 67", Some("46")).as_deref(),
            Some("46701234567")
        );
        assert_eq!(
            normalize_phone("(650) 555-1234", Some("1")).as_deref(),
            Some("16505551234")
        );
        assert_eq!(normalize_phone("070-123 45 67", None), None);
        assert_eq!(normalize_phone("+0701234567", None), None);
        assert_eq!(normalize_phone("+1234567", None), None);
        assert_eq!(normalize_phone("+1234567890123456", None), None);
        assert_eq!(normalize_phone("call me", Some("46")), None);
    }

    #[test]
    fn digests_match_known_values() {
        assert_eq!(
            sha256_hex(""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            sha256_hex(&normalize_email(" Ada@Example.com").unwrap()),
            "b5fc85e55755f9e0d030a10ab4429b6b2944855f9a0d60077fe832becbc41d72"
        );
        assert_eq!(
            sha256_hex(&normalize_phone("+1 650 555 1234", None).unwrap()),
            "6069d14bf122fdfd931dc7beb58e5dfbba395b1faf05bdcd42d12358d63d8599"
        );
        assert_eq!(
            sha256_hex(&normalize_phone("+46 70-123 45 67", None).unwrap()),
            "a7274f98c43038d9c630738ac54c4cd06495600f29d7904131a2474a91d3d042"
        );
        // Gmail dots are kept: these two differ.
        assert_eq!(
            sha256_hex("john_smith@gmail.com"),
            "62a14e44f765419d10fea99367361a727c12365e2520f32218d505ed9aa0f62f"
        );
        assert_eq!(
            sha256_hex(&normalize_email("J.Smith@gmail.com").unwrap()),
            "3a6fdfdf35332bd51d9f926951fe69ac5ce797095379eef98930cb5e66595aab"
        );
    }
}
