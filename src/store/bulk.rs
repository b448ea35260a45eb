//! Bulk profile reads, for commands that evaluate every profile (audience
//! membership over the whole store, `cdp bench audience`): live profile ids
//! a page at a time, then the rows of a whole page with one query per table
//! and chunk of [`IN_CHUNK`] profiles, grouped per profile. A page of 1,000
//! profiles costs ten queries, not five per profile. [`Store::profile_rows`]
//! is the same read for one profile, so the two never disagree.

use rustc_hash::FxHashMap;
use serde::de::DeserializeOwned;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::{Backend, IN_CHUNK, Result, Store, StoreError, in_list, render};
use crate::consent::LedgerRow;
use crate::profile::{EntityRow, EventRow, IdentityRow, ProfileRows, TraitObs};

/// One table's part of a profile's rows: its columns (the profile first),
/// where they come from (`{}` is the IN list of profiles) and their order:
/// by profile, then total within a profile, so a profile's rows come in one
/// order whichever page it is read with. `real(x)` marks a floating-point
/// column.
trait Part: Sized {
    const COLS: &'static str;
    const FROM: &'static str;
    const ORDER: &'static str;
    /// The columns as SQLite packs them into JSON (see [`Reader::rows`]).
    type Packed: DeserializeOwned;
    fn packed(p: Self::Packed) -> Result<(i64, Self)>;
    fn row(r: &AnyRow) -> Result<(i64, Self)>;
}

impl Part for IdentityRow {
    const COLS: &'static str = "profile_id, id, key, value, first_at, source, message_id, isolated";
    const FROM: &'static str = "identities WHERE profile_id IN ({})";
    const ORDER: &'static str = "profile_id, first_at, id";
    type Packed = (i64, i64, String, String, i64, String, String, i64);

    fn packed((p, id, key, value, first_at, source, message_id, isolated): Self::Packed) -> Result<(i64, Self)> {
        Ok((p, IdentityRow { id, key, value, first_at, source, message_id, isolated: isolated != 0 }))
    }

    fn row(r: &AnyRow) -> Result<(i64, Self)> {
        Self::packed((
            r.try_get(0)?,
            r.try_get(1)?,
            r.try_get(2)?,
            r.try_get(3)?,
            r.try_get(4)?,
            r.try_get(5)?,
            r.try_get(6)?,
            r.try_get(7)?,
        ))
    }
}

impl Part for TraitObs {
    const COLS: &'static str = "i.profile_id, t.name, t.source, t.first_value, t.first_at, t.last_value, t.last_at, \
         t.min_value, t.max_value, real(t.num_sum), real(t.num_min), real(t.num_max)";
    const FROM: &'static str = "identities i JOIN trait_obs t ON t.identity_id = i.id WHERE i.profile_id IN ({})";
    const ORDER: &'static str = "i.profile_id, t.name, t.source, t.identity_id";
    type Packed = (i64, String, String, String, i64, String, i64, String, String, String, String, String);

    fn packed((p, name, source, fv, fa, lv, la, min, max, sum, nmin, nmax): Self::Packed) -> Result<(i64, Self)> {
        let obs = TraitObs {
            name,
            source,
            first: (fa, fv),
            last: (la, lv),
            min,
            max,
            sum: quoted_real(&sum)?,
            nmin: quoted_real(&nmin)?,
            nmax: quoted_real(&nmax)?,
        };
        Ok((p, obs))
    }

    fn row(r: &AnyRow) -> Result<(i64, Self)> {
        let obs = TraitObs {
            name: r.try_get(1)?,
            source: r.try_get(2)?,
            first: (r.try_get(4)?, r.try_get(3)?),
            last: (r.try_get(6)?, r.try_get(5)?),
            min: r.try_get(7)?,
            max: r.try_get(8)?,
            sum: r.try_get(9)?,
            nmin: r.try_get(10)?,
            nmax: r.try_get(11)?,
        };
        Ok((r.try_get(0)?, obs))
    }
}

impl Part for LedgerRow {
    const COLS: &'static str = "i.profile_id, c.purpose, c.granted, c.at, c.source";
    const FROM: &'static str = "identities i JOIN consent c ON c.identity_id = i.id WHERE i.profile_id IN ({})";
    const ORDER: &'static str = "i.profile_id, c.identity_id, c.purpose";
    type Packed = (i64, String, i64, i64, String);

    fn packed((p, purpose, granted, at, source): Self::Packed) -> Result<(i64, Self)> {
        Ok((p, LedgerRow { purpose, granted: granted != 0, at, source }))
    }

    fn row(r: &AnyRow) -> Result<(i64, Self)> {
        Self::packed((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?, r.try_get(3)?, r.try_get(4)?))
    }
}

impl Part for EventRow {
    const COLS: &'static str = "i.profile_id, r.name, r.at, r.source, r.message_id, r.payload";
    const FROM: &'static str =
        "identities i JOIN records r ON r.identity_id = i.id WHERE i.profile_id IN ({}) AND r.kind = 'event'";
    const ORDER: &'static str = "i.profile_id, r.at, r.source, r.message_id";
    type Packed = (i64, Option<String>, i64, String, String, String);

    fn packed((p, name, at, source, message_id, payload): Self::Packed) -> Result<(i64, Self)> {
        Ok((p, EventRow { name, at, source, message_id, payload }))
    }

    fn row(r: &AnyRow) -> Result<(i64, Self)> {
        Self::packed((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?, r.try_get(3)?, r.try_get(4)?, r.try_get(5)?))
    }
}

impl Part for EntityRow {
    const COLS: &'static str = "profile_id, entity, key, fields, at";
    const FROM: &'static str = "entities WHERE profile_id IN ({})";
    const ORDER: &'static str = "profile_id, entity, key";
    type Packed = (i64, String, String, String, i64);

    fn packed((p, entity, key, fields, at): Self::Packed) -> Result<(i64, Self)> {
        Ok((p, EntityRow { entity, key, fields, at }))
    }

    fn row(r: &AnyRow) -> Result<(i64, Self)> {
        Self::packed((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?, r.try_get(3)?, r.try_get(4)?))
    }
}

/// A floating-point value or NULL as SQLite's `quote()` writes it: digits
/// that read back to the same bits (JSON numbers from SQLite may not).
fn quoted_real(s: &str) -> Result<Option<f64>> {
    if s == "NULL" {
        return Ok(None);
    }
    s.parse().map(Some).map_err(|_| StoreError::Invariant(format!("`{s}` from SQLite is not a number")))
}

impl Store {
    /// Up to `limit` live profile ids (profiles that hold an identifier, as
    /// [`Store::live_profiles`] lists them) above `after`, ascending. Page
    /// through every profile by passing the last id of one page as `after`
    /// of the next, starting from `i64::MIN`.
    pub async fn live_profile_page(&self, after: i64, limit: usize) -> Result<Vec<i64>> {
        let rows = sqlx::query(
            &self.sql("SELECT DISTINCT profile_id FROM identities WHERE profile_id > ? ORDER BY profile_id LIMIT ?"),
        )
        .bind(after)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(self.read_pool())
        .await?;
        rows.iter().map(|r| Ok(r.try_get(0)?)).collect()
    }

    /// The rows of each of `profiles`, in their order: for each, what
    /// [`Store::profile_rows`] returns (empty rows for an id that holds no
    /// identifier). One query per table and chunk of profiles.
    pub async fn profile_rows_many(&self, profiles: &[i64]) -> Result<Vec<ProfileRows>> {
        let mut slots: FxHashMap<i64, usize> = FxHashMap::default();
        let mut distinct: Vec<i64> = Vec::with_capacity(profiles.len());
        // How many times each distinct profile was asked for: all but the
        // last answer are copies.
        let mut wanted: Vec<usize> = Vec::with_capacity(profiles.len());
        for &p in profiles {
            let slot = *slots.entry(p).or_insert_with(|| {
                distinct.push(p);
                wanted.push(0);
                distinct.len() - 1
            });
            wanted[slot] += 1;
        }
        let mut rows: Vec<ProfileRows> =
            distinct.iter().map(|&profile| ProfileRows { profile, ..ProfileRows::default() }).collect();
        let mut read = Reader { store: self, conn: self.pool.acquire().await?, profiles: &distinct, slots: &slots };
        read.rows(&mut rows, |r| &mut r.identities).await?;
        read.rows(&mut rows, |r| &mut r.traits).await?;
        read.rows(&mut rows, |r| &mut r.consent).await?;
        read.rows(&mut rows, |r| &mut r.events).await?;
        read.rows(&mut rows, |r| &mut r.entities).await?;
        drop(read);
        let mut out = Vec::with_capacity(profiles.len());
        for p in profiles {
            let slot = slots[p];
            wanted[slot] -= 1;
            out.push(if wanted[slot] == 0 { std::mem::take(&mut rows[slot]) } else { rows[slot].clone() });
        }
        Ok(out)
    }
}

/// One reading connection (SQLite's readers never wait for the writer)
/// and the page of profiles its statements ask about.
struct Reader<'a> {
    store: &'a Store,
    conn: sqlx::pool::PoolConnection<sqlx::Any>,
    profiles: &'a [i64],
    slots: &'a FxHashMap<i64, usize>,
}

impl Reader<'_> {
    /// Reads part `P` of every profile of the page into `field` of its rows.
    /// On SQLite each chunk's rows come packed in one JSON text: sqlx hands
    /// each result row from its SQLite thread to the caller's separately, and
    /// a page has thousands. Floating-point columns are packed as `quote()`
    /// writes them, which reads back to the same bits.
    async fn rows<P: Part>(
        &mut self,
        rows: &mut [ProfileRows],
        field: impl Fn(&mut ProfileRows) -> &mut Vec<P>,
    ) -> Result<()> {
        for chunk in self.profiles.chunks(IN_CHUNK) {
            let from = P::FROM.replacen("{}", &in_list(chunk.len()), 1);
            let backend = self.store.backend();
            let sql = match backend {
                Backend::Sqlite => format!(
                    "SELECT json_group_array(json_array({}) ORDER BY {}) FROM {from}",
                    P::COLS.replace("real(", "quote("),
                    P::ORDER
                ),
                Backend::Postgres => render(
                    Backend::Postgres,
                    &format!("SELECT {} FROM {from} ORDER BY {}", P::COLS.replace("real(", "("), P::ORDER),
                )
                .into_owned(),
            };
            let mut q = sqlx::query(&sql);
            for p in chunk {
                q = q.bind(*p);
            }
            let got: Vec<(i64, P)> = match backend {
                Backend::Sqlite => {
                    let text: Option<String> = q.fetch_one(&mut *self.conn).await?.try_get(0)?;
                    let packed: Vec<P::Packed> = match text {
                        Some(t) => serde_json::from_str(&t)
                            .map_err(|e| StoreError::Invariant(format!("unreadable packed rows from SQLite: {e}")))?,
                        None => Vec::new(),
                    };
                    packed.into_iter().map(P::packed).collect::<Result<_>>()?
                }
                Backend::Postgres => q.fetch_all(&mut *self.conn).await?.iter().map(P::row).collect::<Result<_>>()?,
            };
            // Rows come by profile: one lookup per profile, not per row.
            let mut current: Option<(i64, usize)> = None;
            for (profile, row) in got {
                let slot = match current {
                    Some((p, slot)) if p == profile => slot,
                    _ => {
                        let slot = *self.slots.get(&profile).ok_or_else(|| {
                            StoreError::Invariant(format!(
                                "a read of profiles returned profile {profile}, not asked for"
                            ))
                        })?;
                        current = Some((profile, slot));
                        slot
                    }
                };
                field(&mut rows[slot]).push(row);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::ingest::Mapper;
    use crate::manifest::{Options, load_str};
    use crate::store::Store;
    use crate::store::ingest::IdentityConfig;
    use serde_json::json;

    const MANIFEST: &str = r#"
version: 1
name: t
sources:
  web:
    collector: {}
    map:
      message_id: id
      timestamp: at
      identities: { email: email, anonymous_id: anon }
      traits: { tier: tier, score: score }
      event: { name_field: event }
      consent: { email_marketing: optin }
identity:
  keys:
    email: { normalize: email }
    anonymous_id: {}
  priority: [email, anonymous_id]
model:
  traits:
    tier: { type: string }
    score: { type: number, merge: sum }
  events:
    page_viewed: {}
consent:
  purposes: [email_marketing]
"#;

    /// More profiles than one IN list holds, each read as it is alone; a
    /// merged profile's rows in their orders.
    #[tokio::test]
    async fn pages_span_chunks_and_keep_each_profiles_order() {
        let l = load_str(MANIFEST, &Options::validate("."));
        assert!(!l.has_errors(), "{:#?}", l.diagnostics);
        let m = l.manifest.expect("manifest");
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::connect("sqlite://s.db", dir.path()).await.expect("store");
        let mut mapper = Mapper::new(&m, "web").expect("source");
        let mut raws = Vec::new();
        for i in 0..super::super::IN_CHUNK + 300 {
            raws.push(json!({"id": format!("i{i}"), "at": "2026-01-02T00:00:00Z", "email": format!("p{i}@x.org"),
                "tier": "silver", "optin": i % 2 == 0}));
            raws.push(json!({"id": format!("e{i}"), "at": "2026-01-01T00:00:00Z", "email": format!("p{i}@x.org"),
                "event": "page_viewed"}));
        }
        // p0 is seen first anonymously (an earlier tier and consent answer), then signs in.
        raws.push(json!({"id": "a1", "at": "2025-12-01T00:00:00Z", "anon": "a", "tier": "gold", "optin": false}));
        raws.push(
            json!({"id": "a2", "at": "2025-12-02T00:00:00Z", "anon": "a", "email": "p0@x.org", "event": "page_viewed"}),
        );
        // Sums whose decimal text needs all 17 digits to read back.
        for (id, score) in [("s1", 0.1), ("s2", 0.2), ("s3", 1.0 / 3.0)] {
            raws.push(json!({"id": id, "at": "2026-01-03T00:00:00Z", "email": "p1@x.org", "score": score}));
        }
        let records: Vec<_> = raws.iter().map(|r| mapper.map(r, 0).expect("maps")).collect();
        store.apply_batch(&IdentityConfig::from_manifest(&m), records, None).await.expect("apply");

        let live = store.live_profiles().await.expect("live");
        assert_eq!(live.len(), super::super::IN_CHUNK + 300);
        let many = store.profile_rows_many(&live).await.expect("many");
        for (p, rows) in live.iter().zip(&many) {
            assert_eq!(rows, &store.profile_rows(*p).await.expect("alone"), "profile {p}");
        }
        let p0 = many.iter().find(|r| r.identities.len() == 2).expect("the merged profile");
        let ids: Vec<&str> = p0.identities.iter().map(|i| i.value.as_str()).collect();
        assert_eq!(ids, ["a", "p0@x.org"], "identifiers by first sighting");
        let tiers: Vec<&str> = p0.traits.iter().map(|t| t.last.1.as_str()).collect();
        assert_eq!(tiers.len(), 2, "{tiers:?}");
        let events: Vec<&str> = p0.events.iter().map(|e| e.message_id.as_str()).collect();
        assert_eq!(events, ["a2", "e0"], "events oldest first");
        assert_eq!(p0.consent.len(), 2);
        let p1 = many.iter().find(|r| r.identities.iter().any(|i| i.value == "p1@x.org")).expect("p1");
        let score = p1.traits.iter().find(|t| t.name == "score").expect("score");
        assert_eq!((score.sum, score.nmin, score.nmax), (Some(0.1 + 0.2 + 1.0 / 3.0), Some(0.1), Some(1.0 / 3.0)));
    }
}
