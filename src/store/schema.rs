//! Migrations for SQLite and PostgreSQL. One list, applied in order on
//! connect, each version once, recorded in `cdp_migrations`. The two backends
//! share every statement except where their types differ; `{id}` and `{f64}`
//! are rendered per backend; a statement that only one backend needs is
//! marked with [`sqlite_only`].

/// Marks a statement that runs on SQLite only (PostgreSQL skips it).
const SQLITE_ONLY: &str = "-- sqlite only\n";

/// Marks a statement that runs on PostgreSQL only (SQLite skips it).
const POSTGRES_ONLY: &str = "-- postgres only\n";

/// Whether `statement` applies to SQLite only; returns the statement itself.
pub fn sqlite_only(statement: &str) -> Option<&str> {
    statement.strip_prefix(SQLITE_ONLY)
}

/// Whether `statement` applies to PostgreSQL only; returns the statement itself.
pub fn postgres_only(statement: &str) -> Option<&str> {
    statement.strip_prefix(POSTGRES_ONLY)
}

/// `(version, name, statements)`.
pub const MIGRATIONS: &[(i64, &str, &[&str])] = &[
    (
        1,
        "profiles, identities, records, traits, entities, consent, ledger",
        &[
            "CREATE TABLE profiles (
            id BIGINT PRIMARY KEY,
            created_at BIGINT NOT NULL,
            merged_into BIGINT
        )",
            "CREATE INDEX profiles_merged ON profiles (merged_into)",
            // One row per identifier. `component` groups identifiers connected by
            // any record (ignoring limits); `profile_id` is the resolved person.
            "CREATE TABLE identities (
            id BIGINT PRIMARY KEY,
            key TEXT NOT NULL,
            value TEXT NOT NULL,
            profile_id BIGINT NOT NULL,
            component BIGINT NOT NULL,
            first_at BIGINT NOT NULL,
            source TEXT NOT NULL,
            message_id TEXT NOT NULL,
            isolated BIGINT NOT NULL DEFAULT 0,
            UNIQUE (key, value)
        )",
            "CREATE INDEX identities_profile ON identities (profile_id)",
            "CREATE INDEX identities_component ON identities (component)",
            // Records that carried two or more identifiers: the identity graph.
            "CREATE TABLE links (
            id {id},
            component BIGINT NOT NULL,
            at BIGINT NOT NULL,
            source TEXT NOT NULL,
            message_id TEXT NOT NULL,
            ids TEXT NOT NULL
        )",
            "CREATE INDEX links_component ON links (component)",
            "CREATE UNIQUE INDEX links_ids ON links (ids)",
            // Every accepted record, deduplicated by (source, message id). Records
            // belong to the identifier they anchor on; their profile is that
            // identifier's, so merges never rewrite this table.
            "CREATE TABLE records (
            source TEXT NOT NULL,
            message_id TEXT NOT NULL,
            at BIGINT NOT NULL,
            received_at BIGINT NOT NULL,
            identity_id BIGINT NOT NULL,
            kind TEXT NOT NULL,
            name TEXT,
            payload TEXT NOT NULL,
            PRIMARY KEY (source, message_id)
        )",
            "CREATE INDEX records_identity ON records (identity_id)",
            // Trait observations per identifier and source, folded so every merge
            // policy can be answered: first, latest, min, max, sum.
            "CREATE TABLE trait_obs (
            identity_id BIGINT NOT NULL,
            name TEXT NOT NULL,
            source TEXT NOT NULL,
            first_value TEXT NOT NULL,
            first_at BIGINT NOT NULL,
            last_value TEXT NOT NULL,
            last_at BIGINT NOT NULL,
            min_value TEXT NOT NULL,
            max_value TEXT NOT NULL,
            num_sum {f64},
            num_min {f64},
            num_max {f64},
            n BIGINT NOT NULL,
            PRIMARY KEY (identity_id, name, source)
        )",
            "CREATE TABLE entities (
            entity TEXT NOT NULL,
            key TEXT NOT NULL,
            identity_id BIGINT,
            profile_id BIGINT,
            source TEXT NOT NULL,
            at BIGINT NOT NULL,
            fields TEXT NOT NULL,
            PRIMARY KEY (entity, key)
        )",
            "CREATE INDEX entities_profile ON entities (profile_id)",
            "CREATE INDEX entities_identity ON entities (identity_id)",
            "CREATE TABLE consent (
            identity_id BIGINT NOT NULL,
            purpose TEXT NOT NULL,
            granted BIGINT NOT NULL,
            at BIGINT NOT NULL,
            source TEXT NOT NULL,
            message_id TEXT NOT NULL,
            PRIMARY KEY (identity_id, purpose)
        )",
            // Every merge, split, limit conflict and unmerge, with the record and rule behind it.
            "CREATE TABLE ledger (
            id {id},
            at BIGINT NOT NULL,
            kind TEXT NOT NULL,
            profile_id BIGINT NOT NULL,
            other_profile_id BIGINT,
            identity_id BIGINT,
            source TEXT,
            message_id TEXT,
            rule TEXT NOT NULL,
            detail TEXT
        )",
            "CREATE INDEX ledger_profile ON ledger (profile_id)",
            "CREATE INDEX ledger_other ON ledger (other_profile_id)",
            // Where each input stream stopped, committed with the records it covers.
            "CREATE TABLE cursors (
            stream TEXT PRIMARY KEY,
            position TEXT NOT NULL,
            updated_at BIGINT NOT NULL
        )",
        ],
    ),
    (
        2,
        "SQLite: one B-tree per table where a key says it all",
        // In SQLite only `INTEGER PRIMARY KEY` names the row id; `BIGINT PRIMARY
        // KEY` kept a second B-tree beside each table that every insert paid for.
        // Trait observations and links are small rows found by their key: stored
        // in the key's B-tree (WITHOUT ROWID) they are one insert, not two.
        // PostgreSQL's tables are unchanged.
        &[
            "-- sqlite only
        CREATE TABLE profiles_v2 (
            id INTEGER PRIMARY KEY,
            created_at BIGINT NOT NULL,
            merged_into BIGINT
        )",
            "-- sqlite only
        INSERT INTO profiles_v2 (id, created_at, merged_into) SELECT id, created_at, merged_into FROM profiles",
            "-- sqlite only
        DROP TABLE profiles",
            "-- sqlite only
        ALTER TABLE profiles_v2 RENAME TO profiles",
            // Only merged profiles have `merged_into`; indexing the NULLs of all
            // the others cost an insert per new profile.
            "-- sqlite only
        CREATE INDEX profiles_merged ON profiles (merged_into) WHERE merged_into IS NOT NULL",
            "-- sqlite only
        CREATE TABLE identities_v2 (
            id INTEGER PRIMARY KEY,
            key TEXT NOT NULL,
            value TEXT NOT NULL,
            profile_id BIGINT NOT NULL,
            component BIGINT NOT NULL,
            first_at BIGINT NOT NULL,
            source TEXT NOT NULL,
            message_id TEXT NOT NULL,
            isolated BIGINT NOT NULL DEFAULT 0,
            UNIQUE (key, value)
        )",
            "-- sqlite only
        INSERT INTO identities_v2 (id, key, value, profile_id, component, first_at, source, message_id, isolated)
        SELECT id, key, value, profile_id, component, first_at, source, message_id, isolated FROM identities",
            "-- sqlite only
        DROP TABLE identities",
            "-- sqlite only
        ALTER TABLE identities_v2 RENAME TO identities",
            "-- sqlite only
        CREATE INDEX identities_profile ON identities (profile_id)",
            "-- sqlite only
        CREATE INDEX identities_component ON identities (component)",
            "-- sqlite only
        CREATE TABLE trait_obs_v2 (
            identity_id BIGINT NOT NULL,
            name TEXT NOT NULL,
            source TEXT NOT NULL,
            first_value TEXT NOT NULL,
            first_at BIGINT NOT NULL,
            last_value TEXT NOT NULL,
            last_at BIGINT NOT NULL,
            min_value TEXT NOT NULL,
            max_value TEXT NOT NULL,
            num_sum REAL,
            num_min REAL,
            num_max REAL,
            n BIGINT NOT NULL,
            PRIMARY KEY (identity_id, name, source)
        ) WITHOUT ROWID",
            "-- sqlite only
        INSERT INTO trait_obs_v2 SELECT identity_id, name, source, first_value, first_at, last_value, last_at,
            min_value, max_value, num_sum, num_min, num_max, n FROM trait_obs",
            "-- sqlite only
        DROP TABLE trait_obs",
            "-- sqlite only
        ALTER TABLE trait_obs_v2 RENAME TO trait_obs",
            "-- sqlite only
        CREATE TABLE links_v2 (
            ids TEXT NOT NULL PRIMARY KEY,
            component BIGINT NOT NULL,
            at BIGINT NOT NULL,
            source TEXT NOT NULL,
            message_id TEXT NOT NULL
        ) WITHOUT ROWID",
            "-- sqlite only
        INSERT INTO links_v2 (ids, component, at, source, message_id)
        SELECT ids, component, at, source, message_id FROM links",
            "-- sqlite only
        DROP TABLE links",
            "-- sqlite only
        ALTER TABLE links_v2 RENAME TO links",
            "-- sqlite only
        CREATE INDEX links_component ON links (component)",
        ],
    ),
    (
        3,
        "leases, job queue, outbox, id blocks",
        &[
            // A lease is never deleted: a release or expiry keeps the token,
            // so the next holder's is higher.
            "CREATE TABLE leases (
            name TEXT PRIMARY KEY,
            holder TEXT NOT NULL,
            token BIGINT NOT NULL,
            expires_at BIGINT NOT NULL
        )",
            "CREATE TABLE jobs (
            id {id},
            queue TEXT NOT NULL,
            payload TEXT NOT NULL,
            state TEXT NOT NULL,
            run_at BIGINT NOT NULL,
            attempts BIGINT NOT NULL DEFAULT 0,
            claimed_by TEXT,
            claimed_until BIGINT,
            last_error TEXT,
            created_at BIGINT NOT NULL
        )",
            "CREATE INDEX jobs_due ON jobs (queue, state, run_at)",
            // One entry per ingest transaction that changed profiles, numbered
            // in commit order from the single `outbox_head` row.
            "CREATE TABLE outbox (
            seq BIGINT PRIMARY KEY,
            at BIGINT NOT NULL,
            changes TEXT NOT NULL
        )",
            "CREATE TABLE outbox_head (id BIGINT PRIMARY KEY, seq BIGINT NOT NULL)",
            "INSERT INTO outbox_head (id, seq) VALUES (1, 0)",
            "CREATE TABLE outbox_readers (
            name TEXT PRIMARY KEY,
            position BIGINT NOT NULL,
            updated_at BIGINT NOT NULL
        )",
            // SQLite: the processes writing to the file, so a writer waiting
            // for the lock can say who holds it.
            "-- sqlite only
        CREATE TABLE store_writers (pid BIGINT PRIMARY KEY, tag TEXT NOT NULL, since BIGINT NOT NULL)",
            // PostgreSQL: profile and identifier ids come in blocks of 2^20
            // numbered by this sequence (block b holds b·2^20 … b·2^20 +
            // 2^20 − 1), so processes never collide and ids still grow with
            // time. It starts above every stored id and above the clock-based
            // ids earlier versions allocated in the process.
            "-- postgres only
        CREATE SEQUENCE cdp_id_blocks",
            "-- postgres only
        SELECT setval('cdp_id_blocks', GREATEST(
            (SELECT COALESCE(MAX(id), 0) FROM profiles) / 1048576 + 1,
            (SELECT COALESCE(MAX(id), 0) FROM identities) / 1048576 + 1,
            CAST((EXTRACT(EPOCH FROM now()) * 1000 - 1600000000000) AS BIGINT) * 65536 / 1048576 + 1))",
        ],
    ),
    (
        4,
        "runtime: sync run history, rejected records, applied manifests, runtime status",
        &[
            // One row per sync run, updated as its batches commit.
            "CREATE TABLE sync_runs (
            id {id},
            sync TEXT NOT NULL,
            trigger TEXT NOT NULL,
            holder TEXT NOT NULL,
            started_at BIGINT NOT NULL,
            ended_at BIGINT,
            state TEXT NOT NULL,
            records_read BIGINT NOT NULL DEFAULT 0,
            accepted BIGINT NOT NULL DEFAULT 0,
            rejected BIGINT NOT NULL DEFAULT 0,
            duplicates BIGINT NOT NULL DEFAULT 0,
            error_class TEXT,
            error_message TEXT,
            checkpoint TEXT
        )",
            "CREATE INDEX sync_runs_sync ON sync_runs (sync, started_at)",
            // Records a run rejected, with their reason (bounded per run).
            "CREATE TABLE sync_rejects (
            run_id BIGINT NOT NULL,
            seq BIGINT NOT NULL,
            reason TEXT NOT NULL,
            record TEXT NOT NULL,
            PRIMARY KEY (run_id, seq)
        )",
            // Every manifest a runtime or ingest applied to this store; the
            // newest is what `cdp plan` compares the file with.
            "CREATE TABLE manifests (
            id {id},
            sha256 TEXT NOT NULL,
            text TEXT NOT NULL,
            applied_at BIGINT NOT NULL,
            applied_by TEXT NOT NULL
        )",
            // Small JSON documents about the running runtime: its heartbeat,
            // the last reload's outcome.
            "CREATE TABLE runtime_status (
            name TEXT PRIMARY KEY,
            value TEXT NOT NULL,
            updated_at BIGINT NOT NULL
        )",
        ],
    ),
    (
        5,
        "audit log",
        &[
            // Append-only: who read personal data or changed state, when,
            // how, and with what outcome. cdp has no statement that updates
            // or deletes these rows.
            "CREATE TABLE audit_log (
            id {id},
            at BIGINT NOT NULL,
            actor TEXT NOT NULL,
            via TEXT NOT NULL,
            action TEXT NOT NULL,
            target TEXT NOT NULL,
            outcome TEXT NOT NULL
        )",
            "CREATE INDEX audit_log_at ON audit_log (at)",
        ],
    ),
    (
        6,
        "activation: audience membership and history, destination holdings, delivery queue",
        &[
            // Who is in each audience now, and since when.
            "CREATE TABLE audience_members (
            audience TEXT NOT NULL,
            profile_id BIGINT NOT NULL,
            since BIGINT NOT NULL,
            PRIMARY KEY (audience, profile_id)
        )",
            "CREATE INDEX audience_members_profile ON audience_members (profile_id)",
            // Every entry and exit, with its time.
            "CREATE TABLE audience_changes (
            id {id},
            audience TEXT NOT NULL,
            profile_id BIGINT NOT NULL,
            entered BIGINT NOT NULL,
            at BIGINT NOT NULL
        )",
            "CREATE INDEX audience_changes_audience ON audience_changes (audience, at)",
            // The rule each audience was last evaluated with, and when.
            "CREATE TABLE audience_state (
            audience TEXT PRIMARY KEY,
            rule TEXT NOT NULL,
            members BIGINT NOT NULL,
            evaluated_at BIGINT NOT NULL,
            full_at BIGINT NOT NULL
        )",
            // What each destination holds: the profiles sent to it and not
            // removed since, with a digest of the fields sent and the
            // identities a removal is addressed with.
            "CREATE TABLE destination_members (
            destination TEXT NOT NULL,
            profile_id BIGINT NOT NULL,
            digest TEXT NOT NULL,
            identities TEXT NOT NULL,
            since BIGINT NOT NULL,
            PRIMARY KEY (destination, profile_id)
        )",
            "CREATE INDEX destination_members_profile ON destination_members (profile_id)",
            // Per destination: the definition last reconciled, and whether
            // the shrink guard paused it (and why).
            "CREATE TABLE destination_state (
            destination TEXT PRIMARY KEY,
            fingerprint TEXT NOT NULL,
            paused BIGINT NOT NULL DEFAULT 0,
            reason TEXT,
            reconcile BIGINT NOT NULL DEFAULT 0,
            updated_at BIGINT NOT NULL
        )",
            // The delivery queue: one row per record for a destination, with
            // its idempotency key, its outcome and, for dead letters, why.
            "CREATE TABLE deliveries (
            id {id},
            destination TEXT NOT NULL,
            profile_id BIGINT NOT NULL,
            op TEXT NOT NULL,
            audience TEXT,
            key TEXT NOT NULL,
            record TEXT NOT NULL,
            state TEXT NOT NULL,
            attempts BIGINT NOT NULL DEFAULT 0,
            run_at BIGINT NOT NULL,
            claimed_by TEXT,
            claimed_until BIGINT,
            last_error TEXT,
            origin_at BIGINT NOT NULL,
            created_at BIGINT NOT NULL,
            done_at BIGINT
        )",
            "CREATE INDEX deliveries_due ON deliveries (destination, state, run_at)",
            "CREATE INDEX deliveries_profile ON deliveries (destination, profile_id, id)",
        ],
    ),
    (
        7,
        "privacy: erasure tombstones and suppressions, requests, destination receipts",
        &[
            // Small named values of the store itself (the privacy hashing key).
            "CREATE TABLE cdp_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
            // Keyed hashes of erased (`erased`) or suppressed (`suppressed`)
            // identifiers: ingest drops what carries them. No value is kept.
            "CREATE TABLE privacy_marks (
            hash TEXT NOT NULL,
            kind TEXT NOT NULL,
            key TEXT NOT NULL,
            request_id BIGINT,
            created_at BIGINT NOT NULL,
            PRIMARY KEY (hash, kind)
        )",
            // Access, erasure and suppression requests; `subject` is the keyed
            // hash of the identifier the request named.
            "CREATE TABLE privacy_requests (
            id {id},
            kind TEXT NOT NULL,
            subject TEXT NOT NULL,
            key TEXT NOT NULL,
            state TEXT NOT NULL,
            actor TEXT NOT NULL,
            summary TEXT,
            created_at BIGINT NOT NULL,
            updated_at BIGINT NOT NULL
        )",
            // One row per destination an erasure must reach: its payload (the
            // identities the destination was sent) until it is done, then its receipt.
            "CREATE TABLE privacy_receipts (
            request_id BIGINT NOT NULL,
            destination TEXT NOT NULL,
            state TEXT NOT NULL,
            attempts BIGINT NOT NULL DEFAULT 0,
            run_at BIGINT NOT NULL,
            payload TEXT,
            last_error TEXT,
            receipt TEXT,
            updated_at BIGINT NOT NULL,
            PRIMARY KEY (request_id, destination)
        )",
            // An erasure finds a person's rows by these.
            "CREATE INDEX ledger_identity ON ledger (identity_id)",
            "CREATE INDEX audience_changes_profile ON audience_changes (profile_id)",
            "CREATE INDEX deliveries_person ON deliveries (profile_id)",
        ],
    ),
    (
        8,
        "materialised computed traits",
        &[
            // Each profile's computed traits as activation last evaluated
            // them (JSON values), kept with the profile's changes.
            "CREATE TABLE computed_values (
            profile_id BIGINT NOT NULL,
            name TEXT NOT NULL,
            value TEXT NOT NULL,
            spec TEXT NOT NULL,
            updated_at BIGINT NOT NULL,
            PRIMARY KEY (profile_id, name)
        )",
        ],
    ),
    (
        9,
        "PostgreSQL bulk path: staged rows",
        &[
            // Rows a batch copied in and reads back in its transaction
            // (`stage.rs`). Unlogged: they never outlive the batch, so a
            // crash may lose them.
            "-- postgres only
        CREATE UNLOGGED TABLE cdp_stage (
            batch BIGINT NOT NULL,
            seq INTEGER NOT NULL,
            staged_at TIMESTAMPTZ NOT NULL DEFAULT now(),
            c1 TEXT, c2 TEXT, c3 TEXT, c4 TEXT, c5 TEXT, c6 TEXT, c7 TEXT, c8 TEXT,
            c9 TEXT, c10 TEXT, c11 TEXT, c12 TEXT, c13 TEXT, c14 TEXT, c15 TEXT, c16 TEXT
        )",
            "-- postgres only
        CREATE INDEX cdp_stage_rows ON cdp_stage (batch, seq)",
            "-- postgres only
        CREATE SEQUENCE cdp_stage_batch",
        ],
    ),
    (
        10,
        "match links keep their probability",
        &[
            // A probabilistic match's probability (NULL for a record's
            // link): resolution lets a strong match cross key limits.
            "ALTER TABLE links ADD COLUMN probability {f64}",
        ],
    ),
    (
        11,
        "records by arrival, for matching",
        &[
            // What matching has not seen: the newest arrival, and the records
            // after a run's watermark (each a scan of every record before:
            // 265 ms at 960,000 records for every `cdp match`). Entries are
            // appended in arrival order, so ingest writes them at the end of
            // the tree.
            "CREATE INDEX records_received ON records (received_at) WHERE source <> 'match'",
        ],
    ),
];
