use super::*;
use crate::consent::LedgerRow;
use crate::manifest::{Options, load_str};
use proptest::prelude::*;

const DAY: i64 = 86_400_000;

fn manifest(default: &str) -> Manifest {
    let text = format!(
        "version: 1\nname: t\nidentity:\n  keys:\n    email: {{ normalize: email }}\n    phone: {{ normalize: e164 }}\n\
         model:\n  traits:\n    first_name: {{ type: string, labels: [pii] }}\n    tier: {{ type: string }}\n    \
         health: {{ type: string, labels: [sensitive] }}\n    points: {{ type: integer }}\n\
         consent:\n  purposes: [email_marketing, advertising]\n  default: {default}\n  expiry: 30d\n  policies:\n    \
         - {{ deny_labels: [pii], for: [advertising], unless: hashed }}\n    \
         - {{ deny_labels: [sensitive], for: [email_marketing, advertising] }}\n\
         audiences:\n  gold:\n    where: 'tier == \"gold\"'\n  spenders:\n    where: 'points > 100 && audiences.gold'\n"
    );
    let l = load_str(&text, &Options::validate("."));
    assert!(!l.has_errors(), "{:#?}", l.diagnostics);
    l.manifest.expect("manifest")
}

fn destination(purpose: &str, fields: &[&str], hash: &[&str], audience: Option<&str>, sync: SyncMode) -> Destination {
    Destination {
        plugin: "webhook".into(),
        audience: audience.map(str::to_owned),
        purpose: purpose.into(),
        sync: Some(sync),
        fields: fields.iter().map(|s| (*s).to_owned()).collect(),
        hash: hash.iter().map(|s| (*s).to_owned()).collect(),
        config: None,
        allow_hosts: vec![],
        mount: IndexMap::new(),
        batch: None,
        rate_limit: None,
        retry: None,
        shrink_guard: None,
    }
}

fn state(m: &Manifest, ledger: &[LedgerRow], now: i64) -> ProfileState {
    let mut values = HashMap::new();
    values.insert("first_name".to_owned(), json!("Ada"));
    values.insert("tier".to_owned(), json!("gold"));
    values.insert("health".to_owned(), json!("asthma"));
    values.insert("points".to_owned(), json!(150));
    ProfileState {
        profile: 7,
        live: true,
        audiences: ["gold".to_owned()].into_iter().collect(),
        decisions: consent::decide(m, consent::expiry(m).expect("expiry"), ledger, now),
        identities: vec![("email".into(), "ada@example.com".into()), ("phone".into(), "+46701234567".into())],
        values,
        suppressed: false,
    }
}

fn row(purpose: &str, granted: bool, at: i64) -> LedgerRow {
    LedgerRow { purpose: purpose.into(), granted, at, source: "web".into() }
}

#[test]
fn a_grant_enters_a_withdrawal_exits_and_nothing_repeats() {
    let m = manifest("denied");
    let t = Target::resolve(
        &m,
        "vip",
        &destination("email_marketing", &["email", "first_name"], &[], Some("gold"), SyncMode::Membership),
    )
    .expect("target");
    let granted = state(&m, &[row("email_marketing", true, DAY)], 2 * DAY);
    let enter = plan(&m, &t, &granted, true, None, 2 * DAY).expect("enters");
    assert_eq!(enter.op, Op::Enter);
    assert_eq!(enter.record["identities"], json!({"email": ["ada@example.com"]}));
    assert_eq!(enter.record["traits"], json!({"first_name": "Ada"}));
    assert_eq!(enter.record["audience"], json!("gold"));
    let held = enter.hold.clone().expect("held");
    assert_eq!(plan(&m, &t, &granted, true, Some(&held), 3 * DAY), None, "nothing changed");

    let withdrawn = state(&m, &[row("email_marketing", true, DAY), row("email_marketing", false, 3 * DAY)], 3 * DAY);
    let exit = plan(&m, &t, &withdrawn, true, Some(&held), 3 * DAY).expect("exits");
    assert_eq!((exit.op, exit.hold.as_ref()), (Op::Exit, None));
    assert_eq!(exit.record["identities"], json!({"email": ["ada@example.com"]}), "addressed as it was sent");
    assert_eq!(plan(&m, &t, &withdrawn, true, None, 3 * DAY), None);
    // Leaving the audience exits too; a retired (merged) profile as well.
    assert_eq!(plan(&m, &t, &granted, false, Some(&held), 3 * DAY).map(|o| o.op), Some(Op::Exit));
    let retired = ProfileState { live: false, ..granted.clone() };
    assert_eq!(plan(&m, &t, &retired, true, Some(&held), 3 * DAY).map(|o| o.op), Some(Op::Exit));
    let suppressed = ProfileState { suppressed: true, ..granted.clone() };
    assert_eq!(plan(&m, &t, &suppressed, true, Some(&held), 3 * DAY).map(|o| o.op), Some(Op::Exit));
    assert_eq!(plan(&m, &t, &suppressed, true, None, 3 * DAY), None);
}

#[test]
fn upserts_follow_field_changes_and_keys_are_stable() {
    let m = manifest("granted");
    let t =
        Target::resolve(&m, "crm", &destination("email_marketing", &["email", "tier"], &[], None, SyncMode::Upsert))
            .expect("target");
    let s = state(&m, &[], DAY);
    let first = plan(&m, &t, &s, true, None, DAY).expect("upsert");
    assert_eq!(first.op, Op::Upsert);
    let held = first.hold.clone().unwrap();
    let mut changed = s.clone();
    changed.values.insert("tier".into(), json!("silver"));
    let second = plan(&m, &t, &changed, true, Some(&held), DAY).expect("changed");
    assert_eq!((second.op, &second.record["traits"]), (Op::Upsert, &json!({"tier": "silver"})));
    assert_eq!(idempotency_key(&first, "outbox:4"), idempotency_key(&first, "outbox:4"));
    assert_ne!(idempotency_key(&first, "outbox:4"), idempotency_key(&first, "outbox:5"));
    assert_ne!(idempotency_key(&first, "outbox:4"), idempotency_key(&second, "outbox:4").replace('x', "y") + "z");
}

#[test]
fn dependencies_follow_rules_through_audiences() {
    let m = manifest("denied");
    let d = Dependencies::new(&m, &crate::profile::Model::new(&m).expect("model"));
    assert!(d.touches("gold", &["tier".into()]));
    assert!(!d.touches("gold", &["points".into()]));
    assert!(d.touches("spenders", &["tier".into()]), "through audiences.gold");
    assert!(d.touches("spenders", &["points".into()]));
    assert!(d.touches("gold", &["merged".into()]));
    assert!(d.touches("gold", &["identities".into()]), "a joined identifier brings its traits");
    assert!(!d.clocked("gold"));
}

/// An oracle written from the manifest's words, not from `consent::decide`:
/// the latest answer (a grant over a withdrawal at one instant) holds unless
/// it is a grant older than the expiry; no answer takes the default.
fn has_basis(ledger: &[LedgerRow], purpose: &str, default_granted: bool, now: i64) -> bool {
    let mut latest: Option<&LedgerRow> = None;
    for r in ledger.iter().filter(|r| r.purpose == purpose) {
        if latest.is_none_or(|l| (r.at, r.granted) > (l.at, l.granted)) {
            latest = Some(r);
        }
    }
    match latest {
        None => default_granted,
        Some(r) => r.granted && now - r.at <= 30 * DAY,
    }
}

const FIELDS: [&str; 6] = ["email", "phone", "first_name", "tier", "health", "points"];

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    /// Zero deliveries without a basis for the destination's purpose; no
    /// denied label ever leaves unhashed; a withdrawal leads to removal.
    #[test]
    fn consent_is_enforced_fail_closed(
        default_granted in any::<bool>(),
        answers in proptest::collection::vec((0usize..2, any::<bool>(), 0i64..60), 0..6),
        purpose in 0usize..2,
        fields in proptest::sample::subsequence(FIELDS.to_vec(), 0..=6),
        hash_mask in any::<u8>(),
        mode in prop_oneof![Just(SyncMode::Membership), Just(SyncMode::Upsert)],
        now_day in 0i64..80,
    ) {
        let m = manifest(if default_granted { "granted" } else { "denied" });
        let purposes = ["email_marketing", "advertising"];
        let ledger: Vec<LedgerRow> = answers.iter().map(|(p, g, d)| row(purposes[*p], *g, d * DAY)).collect();
        let hash: Vec<&str> = fields.iter().enumerate().filter(|(i, _)| hash_mask & (1 << i) != 0).map(|(_, f)| *f).collect();
        let audience = (mode == SyncMode::Membership).then_some("gold");
        let t = Target::resolve(&m, "d", &destination(purposes[purpose], &fields, &hash, audience, mode))
            .expect("target");
        let now = now_day * DAY;
        let s = state(&m, &ledger, now);
        let basis = has_basis(&ledger, purposes[purpose], default_granted, now);

        let out = plan(&m, &t, &s, true, None, now);
        prop_assert_eq!(out.is_some(), basis, "a delivery exactly when there is a basis");
        if let Some(o) = &out {
            let ids = o.record["identities"].as_object().unwrap();
            let traits = o.record["traits"].as_object().unwrap();
            for f in FIELDS {
                let sent: Vec<String> = match ids.get(f).or_else(|| traits.get(f)) {
                    None => continue,
                    Some(Value::Array(a)) => a.iter().map(|v| v.as_str().unwrap_or_default().to_owned()).collect(),
                    Some(v) => vec![v.as_str().map_or_else(|| v.to_string(), str::to_owned)],
                };
                prop_assert!(fields.contains(&f), "{} was not asked for", f);
                let labels = consent::field_labels(&m, f);
                let hashed = hash.contains(&f);
                for (i, pol) in m.consent.policies.iter().enumerate() {
                    let denies = pol.purposes.iter().any(|p| p == purposes[purpose])
                        && labels.iter().any(|l| pol.deny_labels.iter().any(|x| x == l));
                    if denies {
                        prop_assert!(i == 0 && hashed, "{} left despite policy {}", f, i);
                        for v in &sent {
                            prop_assert!(v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()), "{} unhashed: {}", f, v);
                        }
                    }
                }
            }
            // A later withdrawal of the purpose removes the person.
            let at = ledger.iter().map(|r| r.at).max().unwrap_or(now).max(now) + 1;
            let mut later = ledger.clone();
            later.push(row(purposes[purpose], false, at));
            let w = state(&m, &later, at);
            let exit = plan(&m, &t, &w, true, o.hold.as_ref(), at);
            prop_assert_eq!(exit.map(|e| e.op), Some(Op::Exit));
        }
    }
}

#[test]
fn an_identity_key_that_is_also_a_trait_is_sent_from_the_identifiers() {
    let text = "version: 1\nname: t\nidentity:\n  keys:\n    email: { normalize: email }\n\
                model:\n  traits:\n    email: { type: string, labels: [pii] }\n\
                consent:\n  purposes: [advertising]\n  default: granted\n  policies:\n    \
                - { deny_labels: [pii], for: [advertising], unless: hashed }\n";
    let l = load_str(text, &Options::validate("."));
    assert!(!l.has_errors(), "{:#?}", l.diagnostics);
    let m = l.manifest.unwrap();
    let t = Target::resolve(&m, "ads", &destination("advertising", &["email"], &["email"], None, SyncMode::Upsert))
        .expect("target");
    let s = ProfileState {
        profile: 1,
        live: true,
        decisions: consent::decide(&m, None, &[], 0),
        identities: vec![("email".into(), "ada@example.com".into())],
        ..ProfileState::default()
    };
    let o = plan(&m, &t, &s, true, None, 0).expect("sent");
    assert_eq!(o.record["identities"]["email"], json!([consent::hash_text("ada@example.com")]));
    assert_eq!(o.record["traits"], json!({}));
}
