//! RFC 8288 `Link` headers and RFC 3986 reference resolution.

/// The target of the first link with relation `rel` in `values` (every
/// `Link` header of a response), resolved against `base`.
///
/// Handles several links per header, several headers, quoted parameters
/// containing `,` or `;`, relation lists (`rel="prev next"`) and unquoted or
/// differently cased relation names.
pub fn find_link<'a>(values: impl IntoIterator<Item = &'a str>, rel: &str, base: &str) -> Option<String> {
    for value in values {
        for link in parse_links(value) {
            let matches = link
                .params
                .iter()
                .filter(|(k, _)| k.eq_ignore_ascii_case("rel"))
                .any(|(_, v)| v.split_ascii_whitespace().any(|r| r.eq_ignore_ascii_case(rel)));
            if matches {
                return Some(resolve(base, &link.target));
            }
        }
    }
    None
}

/// One link: its target and parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// The URI reference between `<` and `>`.
    pub target: String,
    /// Parameters, names lower-cased, values unquoted.
    pub params: Vec<(String, String)>,
}

/// Parses one `Link` header value into its links; malformed parts are skipped.
pub fn parse_links(value: &str) -> Vec<Link> {
    let mut links = Vec::new();
    let mut rest = value;
    loop {
        rest = rest.trim_start_matches(|c: char| c == ',' || c.is_whitespace());
        let Some(after_lt) = rest.strip_prefix('<') else {
            // Skip garbage up to the next link.
            match rest.find('<') {
                Some(i) if !rest.is_empty() => {
                    rest = &rest[i..];
                    continue;
                }
                _ => return links,
            }
        };
        let Some(end) = after_lt.find('>') else { return links };
        let target = after_lt[..end].trim().to_string();
        rest = &after_lt[end + 1..];
        let mut params = Vec::new();
        loop {
            rest = rest.trim_start();
            let Some(after_semi) = rest.strip_prefix(';') else {
                break;
            };
            rest = after_semi.trim_start();
            let name_end = rest
                .find(|c: char| c == '=' || c == ';' || c == ',' || c.is_whitespace())
                .unwrap_or(rest.len());
            let name = rest[..name_end].to_ascii_lowercase();
            rest = rest[name_end..].trim_start();
            let mut val = String::new();
            if let Some(after_eq) = rest.strip_prefix('=') {
                rest = after_eq.trim_start();
                if let Some(quoted) = rest.strip_prefix('"') {
                    let mut chars = quoted.char_indices();
                    let mut consumed = quoted.len();
                    while let Some((i, c)) = chars.next() {
                        match c {
                            '\\' => {
                                if let Some((_, n)) = chars.next() {
                                    val.push(n);
                                }
                            }
                            '"' => {
                                consumed = i + 1;
                                break;
                            }
                            c => val.push(c),
                        }
                    }
                    rest = &quoted[consumed..];
                } else {
                    let end = rest.find([';', ',']).unwrap_or(rest.len());
                    val = rest[..end].trim().to_string();
                    rest = &rest[end..];
                }
            }
            if !name.is_empty() {
                params.push((name, val));
            }
        }
        links.push(Link { target, params });
    }
}

/// Resolves a URI reference against an absolute base URL (RFC 3986 §5.2).
pub fn resolve(base: &str, reference: &str) -> String {
    if has_scheme(reference) {
        return reference.to_string();
    }
    let (scheme, after_scheme) = base.split_once("://").unwrap_or(("https", base));
    if let Some(net_path) = reference.strip_prefix("//") {
        return format!("{scheme}://{net_path}");
    }
    let base_no_frag = after_scheme.split('#').next().unwrap_or("");
    let (authority, path_query) = match base_no_frag.find('/') {
        Some(i) => (&base_no_frag[..i], &base_no_frag[i..]),
        None => match base_no_frag.find('?') {
            Some(i) => (&base_no_frag[..i], &base_no_frag[i..]),
            None => (base_no_frag, ""),
        },
    };
    let (base_path, base_query) = match path_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_query, None),
    };
    if reference.is_empty() {
        let q = base_query.map(|q| format!("?{q}")).unwrap_or_default();
        return format!("{scheme}://{authority}{base_path}{q}");
    }
    if reference.starts_with('?') || reference.starts_with('#') {
        let keep_query = if reference.starts_with('#') {
            base_query.map(|q| format!("?{q}")).unwrap_or_default()
        } else {
            String::new()
        };
        return format!("{scheme}://{authority}{base_path}{keep_query}{reference}");
    }
    let (ref_path, ref_tail) = match reference.find(['?', '#']) {
        Some(i) => (&reference[..i], &reference[i..]),
        None => (reference, ""),
    };
    let merged = if ref_path.starts_with('/') {
        ref_path.to_string()
    } else if authority.is_empty() || !base_path.is_empty() {
        let dir = &base_path[..base_path.rfind('/').map_or(0, |i| i + 1)];
        format!("{dir}{ref_path}")
    } else {
        format!("/{ref_path}")
    };
    format!("{scheme}://{authority}{}{ref_tail}", remove_dot_segments(&merged))
}

fn has_scheme(s: &str) -> bool {
    match s.find(':') {
        Some(i) if i > 0 => {
            let scheme = &s[..i];
            scheme.starts_with(|c: char| c.is_ascii_alphabetic())
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
                && !s[..i].contains('/')
        }
        _ => false,
    }
}

fn remove_dot_segments(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path.split('/').collect();
    let last = segments.len().saturating_sub(1);
    for (i, seg) in segments.iter().enumerate() {
        match *seg {
            "." => {
                if i == last {
                    out.push("");
                }
            }
            ".." => {
                if out.len() > 1 {
                    out.pop();
                }
                if i == last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    let joined = out.join("/");
    if path.starts_with('/') && !joined.starts_with('/') {
        format!("/{joined}")
    } else {
        joined
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn github_style_links() {
        let v = r#"<https://api.example.com/members?page=2&per_page=100>; rel="next", <https://api.example.com/members?page=9&per_page=100>; rel="last""#;
        assert_eq!(
            find_link([v], "next", "https://api.example.com/members?page=1"),
            Some("https://api.example.com/members?page=2&per_page=100".into())
        );
        assert_eq!(
            find_link([v], "last", "https://x/").as_deref(),
            Some("https://api.example.com/members?page=9&per_page=100")
        );
        assert_eq!(find_link([v], "prev", "https://x/"), None);
    }

    #[test]
    fn quoting_relation_lists_and_several_headers() {
        let tricky = r#"<https://a.example/x?ids=1,2;3>; title="next, but; not really"; rel=prev, </p?cursor=abc>; REL="prev NEXT"; type="application/json""#;
        let links = parse_links(tricky);
        assert_eq!(links.len(), 2);
        assert_eq!(links[0].target, "https://a.example/x?ids=1,2;3");
        assert_eq!(
            links[0].params,
            [
                ("title".to_string(), "next, but; not really".to_string()),
                ("rel".to_string(), "prev".to_string())
            ]
        );
        assert_eq!(
            find_link([tricky], "next", "https://a.example/v1/members").as_deref(),
            Some("https://a.example/p?cursor=abc")
        );
        let first = r#"<https://a.example/1>; rel="first""#;
        let second = r#"<https://a.example/2>; rel=next"#;
        assert_eq!(
            find_link([first, second], "next", "https://a.example/").as_deref(),
            Some("https://a.example/2")
        );
        assert!(parse_links("garbage").is_empty());
        assert_eq!(parse_links("junk <https://a/>; rel=next").len(), 1);
        assert_eq!(
            parse_links(r#"<https://a/>; rel="unterminated"#)[0].params[0].1,
            "unterminated"
        );
    }

    #[test]
    fn reference_resolution_rfc3986_examples() {
        // RFC 3986 §5.4.1, base http://a/b/c/d;p?q
        let base = "http://a/b/c/d;p?q";
        let cases = [
            ("g:h", "g:h"),
            ("g", "http://a/b/c/g"),
            ("./g", "http://a/b/c/g"),
            ("g/", "http://a/b/c/g/"),
            ("/g", "http://a/g"),
            ("//g", "http://g"),
            ("?y", "http://a/b/c/d;p?y"),
            ("g?y", "http://a/b/c/g?y"),
            ("#s", "http://a/b/c/d;p?q#s"),
            ("g#s", "http://a/b/c/g#s"),
            (";x", "http://a/b/c/;x"),
            ("", "http://a/b/c/d;p?q"),
            (".", "http://a/b/c/"),
            ("./", "http://a/b/c/"),
            ("..", "http://a/b/"),
            ("../", "http://a/b/"),
            ("../g", "http://a/b/g"),
            ("../..", "http://a/"),
            ("../../g", "http://a/g"),
            ("../../../g", "http://a/g"),
            ("/./g", "http://a/g"),
            ("g.", "http://a/b/c/g."),
            ("./../g", "http://a/b/g"),
            ("g/../h", "http://a/b/c/h"),
        ];
        for (reference, want) in cases {
            assert_eq!(resolve(base, reference), want, "{reference}");
        }
        assert_eq!(resolve("https://a.example", "p?x=1"), "https://a.example/p?x=1");
        assert_eq!(resolve("https://a.example?q=1", "?q=2"), "https://a.example?q=2");
    }
}
