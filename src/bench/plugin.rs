//! `cdp bench plugin`: the cost of running a connector in the sandbox.
//!
//! * Throughput of a destination's write path: the shipped `dest-file`
//!   component turns batches of 1,000 records (~10 fields each) into a
//!   customer-list CSV (normalised, SHA-256-hashed email and phone), next to
//!   the same transform written natively in the host, in the same run.
//! * Load: cold compile of the component vs loading its cached compiled code.
//! * Instantiation: a fresh store and instance per sync, from the
//!   pre-instantiated component.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::plugin::{Grants, Host, Mount};
use crate::rng::Rng;

/// Records per write call.
pub const BATCH: usize = 1_000;
const FIELDS: [&str; 6] = ["first_name", "last_name", "city", "country", "tier", "lifetime_value"];

/// Generated batches: JSON Lines of destination records.
pub fn batches(records: usize, seed: u64) -> Vec<(String, u32)> {
    const FIRST: &[&str] = &["Ada", "Grace", "Alan", "Edsger", "Barbara", "Ken", "Frances", "Donald", "Radia", "Linus"];
    const LAST: &[&str] = &["Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Thompson", "Allen", "Knuth"];
    const CITY: &[&str] = &["Stockholm", "Göteborg", "Malmö", "Uppsala", "Oslo", "Helsinki", "København"];
    const TIER: &[&str] = &["bronze", "silver", "gold"];
    let mut rng = Rng::new(seed);
    let mut out = Vec::new();
    let mut i = 0usize;
    while i < records {
        let n = BATCH.min(records - i);
        let mut text = String::with_capacity(n * 400);
        for _ in 0..n {
            let (first, last) = (rng.pick(FIRST), rng.pick(LAST));
            let rec = json!({
                "key": format!("bench-{i}"),
                "op": if rng.chance(0.9) { "enter" } else { "exit" },
                "profile_id": format!("p{:08}", rng.below(1 << 30)),
                "audience": "vip",
                "identities": {
                    "email": [format!(" {first}.{last}{}@Example.com", rng.below(10_000))],
                    "phone": [format!("+46 70 {:03} {:02} {:02}", rng.below(1000), rng.below(100), rng.below(100))],
                },
                "traits": {
                    "first_name": first,
                    "last_name": last,
                    "city": rng.pick(CITY),
                    "country": "SE",
                    "tier": rng.pick(TIER),
                    "lifetime_value": rng.below(100_000) as f64 / 10.0,
                },
                "occurred_at": "2026-11-30T12:00:00Z",
            });
            text.push_str(&rec.to_string());
            text.push('\n');
            i += 1;
        }
        out.push((text, n as u32));
    }
    out
}

fn config(path: &str) -> Value {
    json!({"path": path, "format": "csv", "hash_identifiers": true, "identities": ["email", "phone"], "fields": FIELDS})
}

/// The `dest-file` transform, natively: the same record decode (borrowed,
/// as the SDK's `DestinationRecordRef`), normalisation, hashing and CSV rows
/// with reused buffers, appended to a file and synced at the end.
mod native {
    use std::borrow::Cow;
    use std::fmt;
    use std::ops::Range;

    use serde::de::value::{MapAccessDeserializer, SeqAccessDeserializer};
    use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};

    use super::*;

    #[derive(Deserialize)]
    struct Record<'a> {
        #[serde(borrow)]
        key: Cow<'a, str>,
        op: Op,
        #[serde(borrow)]
        #[allow(dead_code)] // decoded as the plugin's record type does
        profile_id: Cow<'a, str>,
        #[serde(default, borrow, deserialize_with = "optional_str")]
        audience: Option<Cow<'a, str>>,
        #[serde(default, borrow)]
        identities: Identities<'a>,
        #[serde(default, borrow)]
        traits: Traits<'a>,
        #[serde(default, borrow, deserialize_with = "optional_str")]
        #[allow(dead_code)]
        occurred_at: Option<Cow<'a, str>>,
    }

    #[derive(Clone, Copy, Deserialize)]
    #[serde(rename_all = "lowercase")]
    enum Op {
        Upsert,
        Enter,
        Exit,
    }

    impl Op {
        fn as_str(self) -> &'static str {
            match self {
                Op::Upsert => "upsert",
                Op::Enter => "enter",
                Op::Exit => "exit",
            }
        }
    }

    #[derive(Default)]
    struct Identities<'a>(Vec<(Cow<'a, str>, Values<'a>)>);

    /// One value kept without a list of its own, as the SDK does.
    enum Values<'a> {
        One(Cow<'a, str>),
        Many(Vec<Cow<'a, str>>),
    }

    impl<'a> Values<'a> {
        fn as_slice(&self) -> &[Cow<'a, str>] {
            match self {
                Values::One(v) => std::slice::from_ref(v),
                Values::Many(v) => v,
            }
        }
    }

    #[derive(Default)]
    struct Traits<'a>(Vec<(Cow<'a, str>, TraitValue<'a>)>);

    enum TraitValue<'a> {
        String(Cow<'a, str>),
        Other(Value),
    }

    struct CowStr<'a>(Cow<'a, str>);

    impl<'de> Deserialize<'de> for CowStr<'de> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = CowStr<'de>;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("a string")
                }
                fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                    Ok(CowStr(Cow::Borrowed(v)))
                }
                fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                    Ok(CowStr(Cow::Owned(v.to_owned())))
                }
            }
            d.deserialize_str(V)
        }
    }

    fn optional_str<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Cow<'de, str>>, D::Error> {
        Ok(Option::<CowStr<'de>>::deserialize(d)?.map(|s| s.0))
    }

    fn insert<'a, T>(list: &mut Vec<(Cow<'a, str>, T)>, key: Cow<'a, str>, value: T) {
        match list.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => list.push((key, value)),
        }
    }

    impl<'de: 'a, 'a> Deserialize<'de> for Values<'a> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Values<'de>;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("a sequence")
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                    let Some(CowStr(first)) = seq.next_element()? else {
                        return Ok(Values::Many(Vec::new()));
                    };
                    let Some(CowStr(second)) = seq.next_element()? else {
                        return Ok(Values::One(first));
                    };
                    let mut out = vec![first, second];
                    while let Some(CowStr(s)) = seq.next_element()? {
                        out.push(s);
                    }
                    Ok(Values::Many(out))
                }
            }
            d.deserialize_seq(V)
        }
    }

    impl<'de: 'a, 'a> Deserialize<'de> for Identities<'a> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Identities<'de>;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("a map")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                    let mut out = Vec::with_capacity(map.size_hint().unwrap_or(0).min(64));
                    while let Some((CowStr(k), v)) = map.next_entry::<CowStr<'de>, Values<'de>>()? {
                        insert(&mut out, k, v);
                    }
                    Ok(Identities(out))
                }
            }
            d.deserialize_map(V)
        }
    }

    impl<'de: 'a, 'a> Deserialize<'de> for Traits<'a> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Traits<'de>;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("a map")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                    let mut out = Vec::with_capacity(map.size_hint().unwrap_or(8).min(64));
                    while let Some((CowStr(k), v)) = map.next_entry()? {
                        insert(&mut out, k, v);
                    }
                    Ok(Traits(out))
                }
            }
            d.deserialize_map(V)
        }
    }

    impl<'de: 'a, 'a> Deserialize<'de> for TraitValue<'a> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = TraitValue<'de>;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("any valid JSON value")
                }
                fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                    Ok(TraitValue::String(Cow::Borrowed(v)))
                }
                fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                    Ok(TraitValue::String(Cow::Owned(v.to_owned())))
                }
                fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
                    Ok(TraitValue::Other(Value::Bool(v)))
                }
                fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                    Ok(TraitValue::Other(Value::from(v)))
                }
                fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                    Ok(TraitValue::Other(Value::from(v)))
                }
                fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
                    Ok(TraitValue::Other(Value::from(v)))
                }
                fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                    Ok(TraitValue::Other(Value::Null))
                }
                fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                    Ok(TraitValue::Other(Value::deserialize(SeqAccessDeserializer::new(seq))?))
                }
                fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                    Ok(TraitValue::Other(Value::deserialize(MapAccessDeserializer::new(map))?))
                }
            }
            d.deserialize_any(V)
        }
    }

    fn email_into(raw: &str, out: &mut String) -> bool {
        let start = out.len();
        let t = raw.trim();
        if t.is_ascii() {
            out.push_str(t);
            out[start..].make_ascii_lowercase();
        } else {
            out.push_str(&t.to_lowercase());
        }
        let e = &out[start..];
        let ok = e.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty() && !domain.is_empty() && !domain.contains('@') && !e.chars().any(char::is_whitespace)
        });
        if !ok {
            out.truncate(start);
        }
        ok
    }

    fn phone_into(raw: &str, out: &mut String) -> bool {
        let start = out.len();
        let t = raw.trim_start();
        let mut digits = t.bytes().filter(u8::is_ascii_digit).map(char::from);
        if !t.starts_with('+') {
            // No default country code: only a `00` prefix makes it E.164.
            if !(digits.next() == Some('0') && digits.next() == Some('0')) {
                return false;
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

    fn push_sha256_hex(value: &str, out: &mut String) {
        let mut text = [0u8; 64];
        if hex::encode_to_slice(Sha256::digest(value.as_bytes()), &mut text).is_ok() {
            out.push_str(std::str::from_utf8(&text).unwrap_or_default());
        }
    }

    fn csv_line(cells: &[String]) -> Result<Vec<u8>> {
        let mut w = csv::WriterBuilder::new().terminator(csv::Terminator::CRLF).from_writer(Vec::new());
        w.write_record(cells)?;
        Ok(w.into_inner()?)
    }

    /// Writes every batch to `file`; returns the records written and the
    /// time spent in the final `sync_all`.
    pub fn run(batches: &[(String, u32)], file: &Path) -> Result<(usize, Duration)> {
        const KINDS: [&str; 2] = ["email", "phone"];
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(file)?;
        let mut header: Vec<String> = ["key", "op", "audience", "email", "phone"].map(String::from).to_vec();
        header.extend(FIELDS.map(String::from));
        f.write_all(&csv_line(&header)?)?;
        let mut written = 0;
        // Buffers reused across records and batches, as the plugin's are.
        let (mut out, mut normalised, mut ids, mut cell) = (Vec::new(), String::new(), String::new(), Vec::new());
        let mut spans: [Vec<Range<usize>>; 2] = Default::default();
        for (text, _) in batches {
            let records: Vec<Record<'_>> =
                text.lines().filter(|l| !l.trim().is_empty()).filter_map(|l| serde_json::from_str(l).ok()).collect();
            let mut buf = std::mem::take(&mut out);
            buf.clear();
            let mut w = csv::WriterBuilder::new().terminator(csv::Terminator::CRLF).from_writer(buf);
            for r in &records {
                ids.clear();
                for (kind, cells) in KINDS.iter().zip(spans.iter_mut()) {
                    cells.clear();
                    let values = r.identities.0.iter().find(|(k, _)| k == kind).map_or(&[][..], |(_, v)| v.as_slice());
                    for raw in values {
                        normalised.clear();
                        let ok = if *kind == "email" {
                            email_into(raw, &mut normalised)
                        } else {
                            phone_into(raw, &mut normalised)
                        };
                        if ok {
                            let start = ids.len();
                            push_sha256_hex(&normalised, &mut ids);
                            cells.push(start..ids.len());
                        }
                    }
                }
                let rows = spans.iter().map(Vec::len).max().unwrap_or(0);
                if rows == 0 {
                    continue;
                }
                let audience = r.audience.as_deref().unwrap_or_default();
                for i in 0..rows {
                    w.write_field(r.key.as_bytes())?;
                    w.write_field(r.op.as_str())?;
                    w.write_field(audience)?;
                    for cells in &spans {
                        w.write_field(cells.get(i).map_or("", |c| &ids[c.clone()]))?;
                    }
                    for k in FIELDS {
                        match r.traits.0.iter().find(|(name, _)| name == k).map(|(_, v)| v) {
                            None | Some(TraitValue::Other(Value::Null)) => w.write_field("")?,
                            Some(TraitValue::String(s)) => w.write_field(s.as_bytes())?,
                            Some(TraitValue::Other(v)) => {
                                cell.clear();
                                serde_json::to_writer(&mut cell, v)?;
                                w.write_field(&cell)?;
                            }
                        }
                    }
                    w.write_record(None::<&[u8]>)?;
                }
                written += 1;
            }
            out = w.into_inner().map_err(|e| anyhow::anyhow!("{}", e.error()))?;
            f.write_all(&out)?;
        }
        let started = Instant::now();
        f.sync_all()?;
        Ok((written, started.elapsed()))
    }
}

/// Finds the shipped `dest-file` component.
fn find_component(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_owned());
    }
    let candidates = [
        PathBuf::from("plugins/dist/dest_file.wasm"),
        Path::new(env!("CARGO_MANIFEST_DIR")).join("plugins/dist/dest_file.wasm"),
    ];
    candidates
        .into_iter()
        .find(|p| p.exists())
        .context("plugins/dist/dest_file.wasm not found: build the plugins first (`plugins/build.sh`) or pass --plugin")
}

/// Runs the benchmark over `records` records.
pub async fn run(records: usize, runs: usize, component: Option<&Path>) -> Result<String> {
    let path = find_component(component)?;
    let tmp = tempfile::tempdir()?;
    let out_dir = tmp.path().join("out");
    std::fs::create_dir_all(&out_dir)?;
    let mut report = String::new();
    writeln!(report, "plugin benchmark: {} ({} records, batches of {BATCH})", path.display(), records)?;

    // Load: cold compile vs cached compiled code.
    let cold_host = Host::new(None)?;
    let started = Instant::now();
    cold_host.load(&path, None)?;
    let cold = started.elapsed();
    let cache = tmp.path().join("cache");
    let host = Host::new(Some(cache))?;
    host.load(&path, None)?; // fills the cache
    let started = Instant::now();
    let plugin = host.load(&path, None)?;
    let cached = started.elapsed();
    if plugin.origin() != crate::plugin::Origin::Cached {
        bail!("the second load did not come from the cache");
    }
    writeln!(report, "\nload")?;
    writeln!(report, "  cold compile         {:>10}", super::ms(cold))?;
    writeln!(report, "  cached code          {:>10}   ({:.0}x faster)", super::ms(cached), ratio(cold, cached))?;

    // Instantiation per sync.
    let grants = Grants {
        mounts: vec![Mount { host: out_dir.canonicalize()?, guest: "/out".into(), writable: true }],
        ..Grants::default()
    };
    let n = 2_000;
    let started = Instant::now();
    for _ in 0..n {
        let inst = plugin.destination("bench", &grants).await?;
        drop(inst);
    }
    let per_instance = started.elapsed() / n;
    let cfg = config("/out/warm.csv");
    let mut inst = plugin.destination("bench", &grants).await?;
    let started = Instant::now();
    let mut calls = 0u32;
    while started.elapsed() < Duration::from_millis(300) {
        inst.check(&cfg).await?;
        calls += 1;
    }
    let per_call = started.elapsed() / calls.max(1);
    drop(inst);
    writeln!(report, "\ninstantiation")?;
    writeln!(report, "  store + instance     {:>10.1} µs   (target ≤ 50 µs)", per_instance.as_secs_f64() * 1e6)?;
    writeln!(report, "  warm call (check)    {:>10.1} µs", per_call.as_secs_f64() * 1e6)?;

    // Throughput: write path in the sandbox vs natively.
    let data = batches(records, 7);
    let total: u64 = data.iter().map(|b| u64::from(b.1)).sum();
    let bytes: usize = data.iter().map(|b| b.0.len()).sum();

    // Alternating runs, so a slow spell of the machine hits both paths; the
    // median of each is reported.
    let native_file = tmp.path().join("native.csv");
    let wasm_file = out_dir.join("list.csv");
    let mut native_runs = Vec::new();
    let mut wasm_runs = Vec::new();
    let (mut native_written, mut accepted) = (0, 0u64);
    for _ in 0..runs.max(1) {
        for f in [&native_file, &wasm_file] {
            if f.exists() {
                std::fs::remove_file(f)?;
            }
        }
        let started = Instant::now();
        let (written, sync) = native::run(&data, &native_file)?;
        native_runs.push((started.elapsed(), sync));
        native_written = written;

        // The host hands batches over by value; the copies are made before
        // the clock starts, as the native path reads them in place.
        let owned: Vec<(String, u32)> = data.clone();
        let started = Instant::now();
        let mut inst = plugin.destination("bench", &grants).await?;
        inst.open(&config("/out/list.csv")).await?;
        accepted = 0;
        for (text, n) in owned {
            accepted += u64::from(inst.write(text, n).await?.accepted);
        }
        let flush_started = Instant::now();
        inst.flush().await?;
        let sync = flush_started.elapsed();
        inst.close().await?;
        wasm_runs.push((started.elapsed(), sync));
    }
    native_runs.sort();
    wasm_runs.sort();
    let (native_time, native_sync) = native_runs[native_runs.len() / 2];
    let (wasm_time, wasm_sync) = wasm_runs[wasm_runs.len() / 2];

    let native_bytes = std::fs::metadata(&native_file)?.len();
    let wasm_bytes = std::fs::metadata(&wasm_file)?.len();
    if accepted != native_written as u64 || native_bytes != wasm_bytes {
        bail!(
            "the two paths disagree: plugin accepted {accepted} records ({wasm_bytes} bytes), native wrote {native_written} ({native_bytes} bytes)"
        );
    }
    let rate = |d: Duration| total as f64 / d.as_secs_f64();
    writeln!(
        report,
        "\nwrite path ({total} records, {:.1} MiB of JSON Lines in, {:.1} MiB of CSV out; median of {runs} alternating runs)",
        bytes as f64 / 1048576.0,
        wasm_bytes as f64 / 1048576.0
    )?;
    writeln!(
        report,
        "  native transform     {:>10.0} records/s  {:>10}   (of which fsync {})",
        rate(native_time),
        super::ms(native_time),
        super::ms(native_sync)
    )?;
    writeln!(
        report,
        "  dest-file plugin     {:>10.0} records/s  {:>10}   (of which fsync {})",
        rate(wasm_time),
        super::ms(wasm_time),
        super::ms(wasm_sync)
    )?;
    writeln!(
        report,
        "  plugin / native      {:>10.0} %          (target ≥ 50 %)",
        100.0 * native_time.as_secs_f64() / wasm_time.as_secs_f64()
    )?;
    writeln!(
        report,
        "  outputs identical    {:>10}",
        if std::fs::read(&native_file)? == std::fs::read(&wasm_file)? { "yes" } else { "no" }
    )?;
    Ok(report)
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64().max(1e-9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_hold_what_they_say() {
        let b = batches(2_500, 1);
        assert_eq!(b.iter().map(|x| x.1).collect::<Vec<_>>(), [1000, 1000, 500]);
        for (text, n) in &b {
            assert_eq!(text.lines().count(), *n as usize);
        }
    }

    #[test]
    fn native_transform_writes_a_row_per_record() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("x.csv");
        let b = batches(10, 3);
        assert_eq!(native::run(&b, &file).unwrap().0, 10);
        let text = std::fs::read_to_string(&file).unwrap();
        assert_eq!(text.lines().count(), 11);
        assert!(text.starts_with("key,op,audience,email,phone,first_name"));
    }
}
