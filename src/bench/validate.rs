//! `cdp bench validate`: how long validating a large manifest takes, next to
//! the cost of only scanning the same YAML (the parser's floor), plus how fast
//! hostile inputs are refused.

use super::{median, ms};
use crate::manifest::{self, Options};
use std::fmt::Write as _;

/// Generates a valid manifest of about `lines` lines: sources, traits, events,
/// computed traits, audiences with expressions and destinations, in the
/// proportions of a large real deployment.
pub fn generate(lines: usize) -> String {
    // One unit (source, traits, event, computed traits, audiences) is 29 lines.
    let units = lines.div_ceil(29).max(1);
    let mut s = String::from("version: 1\nname: generated\nstorage: { url: \"sqlite://.cdp/bench.db\" }\n");
    s.push_str("identity:\n  keys:\n    email: { normalize: email, limit: 5 }\n    phone: { normalize: e164, default_region: SE }\n    crm_id: { limit: 1 }\n");
    s.push_str("consent:\n  purposes: [analytics, email_marketing, advertising]\n  policies:\n    - { deny_labels: [pii], for: [advertising], unless: hashed }\n");
    s.push_str("sources:\n");
    for i in 0..units {
        let _ = write!(
            s,
            "  web_{i}:\n    collector: {{ write_keys: [\"${{env:KEY_{i}}}\"] }}\n    map:\n      message_id: messageId\n      identities: {{ email: traits.email }}\n      traits: {{ t_{i}_a: traits.a, t_{i}_b: traits.b }}\n      event: {{ name_field: event, names: {{ \"Event {i}\": e_{i} }} }}\n"
        );
    }
    s.push_str("model:\n  traits:\n    email: { type: string, labels: [pii] }\n");
    for i in 0..units {
        let _ = write!(
            s,
            "    t_{i}_a: {{ type: string, enum: [bronze, silver, gold], labels: [pii] }}\n    t_{i}_b:\n      type: number\n      merge: max\n      description: Generated trait {i}\n"
        );
    }
    s.push_str("  events:\n");
    for i in 0..units {
        let _ = write!(
            s,
            "    e_{i}:\n      properties:\n        amount: number\n        sku: string\n        at: timestamp\n"
        );
    }
    s.push_str("  computed:\n");
    for i in 0..units {
        let _ = write!(
            s,
            "    c_{i}_sum: {{ sum: e_{i}.amount, within: 90d }}\n    c_{i}_count:\n      count: e_{i}\n      within: 30d\n      where: 'amount > 10 && sku.startsWith(\"A\")'\n    c_{i}_seen: {{ last_seen: e_{i} }}\n"
        );
    }
    s.push_str("audiences:\n");
    for i in 0..units {
        let _ = write!(
            s,
            "  a_{i}:\n    where: 't_{i}_a in [\"gold\", \"silver\"] && c_{i}_sum >= 100.5 && (c_{i}_count > 2 || now - c_{i}_seen < duration(\"14d\")) && consent.email_marketing'\n    description: Generated audience {i}\n  b_{i}:\n    where: \"t_{i}_b > 3 && !audiences.a_{i}\"\n    refresh: \"0 0 3 * * *\"\n"
        );
    }
    s.push_str("plugins: {}\ndestinations: {}\n");
    s
}

/// Runs the benchmark and returns the report.
pub fn run(lines: usize, runs: usize) -> String {
    let text = generate(lines);
    let opts = Options::validate(".");
    let mut r = String::new();
    let n_lines = text.lines().count();
    let _ = writeln!(r, "cdp bench validate: {n_lines} lines, {} KiB, median of {runs} runs", text.len() / 1024);
    let (full, loaded) = median(runs, || manifest::load_str(&text, &opts));
    let errors = loaded.diagnostics.iter().filter(|d| d.is_error()).count();
    let (scan, events) = median(runs, || scan_only(&text));
    let _ = writeln!(r, "  validate (parse, schema, rules, expressions): {:>10}   ({errors} errors)", ms(full));
    let _ = writeln!(r, "  baseline: YAML event scan only ({events} events):  {:>10}", ms(scan));
    let _ = writeln!(r, "  ratio validate / scan: {:.1}x", full.as_secs_f64() / scan.as_secs_f64().max(1e-9));
    let _ = writeln!(r, "hostile inputs (time to refuse, one run each):");
    for (name, input) in hostile_inputs() {
        let (t, l) = median(1, || manifest::load_bytes(&input, &opts));
        let code = l.diagnostics.first().map_or("-", |d| d.code);
        let _ = writeln!(r, "  {name:<28} {:>10}  {code}", ms(t));
    }
    r
}

fn scan_only(text: &str) -> usize {
    let mut p = saphyr_parser::Parser::new_from_str(text);
    let mut n = 0;
    while let Some(Ok(_)) = p.next_event() {
        n += 1;
    }
    n
}

/// The hostile corpus: alias bomb, deep nesting, oversize, bad bytes, empty, wrong root.
pub fn hostile_inputs() -> Vec<(&'static str, Vec<u8>)> {
    let mut bomb = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x]\n");
    for i in 1..10 {
        let p = i - 1;
        let _ = writeln!(bomb, "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]");
    }
    vec![
        ("alias bomb (9^9 values)", bomb.into_bytes()),
        ("100,000-deep [ nesting", "[".repeat(100_000).into_bytes()),
        ("100,000-deep { nesting", "{a: ".repeat(100_000).into_bytes()),
        ("50 MB file", vec![b'#'; 50 << 20]),
        ("non-UTF-8 bytes", b"version: 1\nname: \xff\xfe\n".to_vec()),
        ("empty file", Vec::new()),
        ("list instead of mapping", b"- version: 1\n- name: x\n".to_vec()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_manifest_is_valid_and_large() {
        let text = generate(5_000);
        assert!(text.lines().count() >= 5_000, "{}", text.lines().count());
        let env = |_: &str| Some("x".to_owned());
        let opts = Options { env: &env, ..Options::validate(".") };
        let l = manifest::load_str(&text, &opts);
        let errors: Vec<_> = l.diagnostics.iter().filter(|d| d.is_error()).collect();
        assert!(errors.is_empty(), "{errors:#?}");
    }

    #[test]
    fn hostile_inputs_are_refused_with_a_diagnostic() {
        let opts = Options::validate(".");
        for (name, input) in hostile_inputs() {
            let l = manifest::load_bytes(&input, &opts);
            assert!(l.has_errors(), "{name} was accepted");
            assert!(l.manifest.is_none(), "{name}");
        }
    }
}
