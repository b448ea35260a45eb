//! The manifest as typed Rust values: one struct per section of `cdp.yaml`.
//! These types mirror the file (serde), and the JSON Schema in
//! `schemas/cdp.schema.json` is generated from them (schemars), so the doc
//! comments here are the field reference users see in their editor and README.
//!
//! Values that need parsing (durations, cron schedules, rates, expressions) are
//! kept as written here and checked by the semantic rules in `rules.rs`, which
//! point at the exact position of a bad value.

use indexmap::IndexMap;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A cdp manifest: the sources, identity rules, data model, consent rules,
/// audiences and destinations of one deployment.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
#[schemars(title = "cdp manifest")]
pub struct Manifest {
    /// Manifest format version. The only version is `1`.
    pub version: u32,
    /// Name of this deployment: lowercase letters, digits, `-` and `_`.
    pub name: String,
    /// Where cdp keeps its state.
    #[serde(default)]
    pub storage: Storage,
    /// The HTTP server: event collector and admin API.
    #[serde(default)]
    pub server: Server,
    /// Connector plugins (WebAssembly components), by the name sources and destinations use.
    #[serde(default)]
    pub plugins: IndexMap<String, Plugin>,
    /// Where customer data comes from, by source name.
    #[serde(default)]
    pub sources: IndexMap<String, Source>,
    /// Which identifiers identify a person and how they join into one profile.
    #[serde(default)]
    pub identity: Identity,
    /// The traits, events, entities, computed and predicted traits of a profile.
    #[serde(default)]
    pub model: Model,
    /// Purposes a person can consent to, and label policies over what destinations send for them.
    #[serde(default)]
    pub consent: Consent,
    /// Rule-based segments of profiles, by audience name.
    #[serde(default)]
    pub audiences: IndexMap<String, Audience>,
    /// Where profiles and audience membership are activated, by destination name.
    #[serde(default)]
    pub destinations: IndexMap<String, Destination>,
    /// How long raw records and events are kept; `cdp run` deletes older ones on schedule.
    #[serde(default)]
    pub retention: Option<Retention>,
}

/// Where cdp keeps its state.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Storage {
    /// Database URL: `sqlite://PATH` (embedded, the default; a relative path is
    /// relative to the manifest) or `postgres://USER@HOST:PORT/DB`.
    #[serde(default = "default_storage_url")]
    pub url: String,
}

impl Default for Storage {
    fn default() -> Self {
        Storage { url: default_storage_url() }
    }
}

fn default_storage_url() -> String {
    "sqlite://.cdp/cdp.db".into()
}

/// The HTTP server: event collector and admin API.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Server {
    /// Socket address to listen on, `HOST:PORT`.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Bearer token for the admin API with the `admin` role, named `admin`
    /// (shorthand for an entry in `tokens`). Write `${env:NAME}`, never the
    /// token itself.
    #[serde(default)]
    pub admin_token: Option<String>,
    /// Named bearer tokens for the admin API, each with a role. The name is
    /// what the audit log records; the value should be `${env:NAME}`.
    #[serde(default)]
    pub tokens: IndexMap<String, ApiToken>,
    /// Serve HTTPS with this certificate and key (PEM files, relative to the manifest).
    #[serde(default)]
    pub tls: Option<Tls>,
}

impl Default for Server {
    fn default() -> Self {
        Server { listen: default_listen(), admin_token: None, tokens: IndexMap::new(), tls: None }
    }
}

/// A named admin-API credential.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ApiToken {
    /// The bearer token. Write `${env:NAME}`, never the token itself.
    pub token: String,
    /// What the token may do.
    pub role: Role,
}

/// What an admin-API token may do.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, JsonSchema, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Every route: reads, syncs, reloads, unmerges.
    Admin,
    /// Reads only; every state-changing route answers 403.
    ReadOnly,
    /// Reads, and the privacy operations (access, erasure, suppression).
    Privacy,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::ReadOnly => "read_only",
            Role::Privacy => "privacy",
        }
    }
}

/// TLS for the HTTP server.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    /// PEM file with the certificate chain, leaf first.
    pub cert: String,
    /// PEM file with the private key (PKCS#8, PKCS#1 or SEC1).
    pub key: String,
}

fn default_listen() -> String {
    "127.0.0.1:8080".into()
}

/// A connector plugin: a WebAssembly component file, pinned by digest.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Plugin {
    /// Path of the `.wasm` component, relative to the manifest.
    pub path: String,
    /// Lowercase hex SHA-256 of the file. cdp refuses to load a file that does not match.
    #[serde(default)]
    #[schemars(regex(pattern = r"^[0-9a-f]{64}$"))]
    pub sha256: Option<String>,
    /// Memory cap of one instance, e.g. `64MiB` (default `256MiB`).
    #[serde(default)]
    pub memory: Option<String>,
    /// Deadline of one call into the plugin, e.g. `30s` (default `30s`).
    #[serde(default)]
    pub timeout: Option<String>,
}

/// A source of customer data: the built-in event collector or a source plugin.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct Source {
    /// Receive events over HTTP: Segment's tracking API (`/v1/batch`, `/v1/track`,
    /// `/v1/identify`, `/v1/page`, `/v1/screen`, `/v1/group`, `/v1/alias`) on `server.listen`.
    #[serde(default)]
    pub collector: Option<Collector>,
    /// Name of a source plugin from `plugins`.
    #[serde(default)]
    pub plugin: Option<String>,
    /// Cron schedule of batch syncs, with seconds: `SEC MIN HOUR DOM MON DOW`.
    #[serde(default)]
    pub schedule: Option<String>,
    /// `batch` (run on the schedule) or `streaming` (run continuously).
    #[serde(default)]
    pub mode: Option<SourceMode>,
    /// The plugin's own configuration, checked against the plugin's config schema.
    #[serde(default)]
    #[schemars(with = "Option<Map<String, Value>>")]
    pub config: Option<Map<String, Value>>,
    /// Read-only directories lent to the plugin: host path (relative to the
    /// manifest) → absolute path seen inside the plugin.
    #[serde(default)]
    pub mount: IndexMap<String, String>,
    /// Hosts the plugin may reach over HTTP: `host`, `host:port` or `*.domain`.
    /// Private and loopback addresses are refused unless listed literally.
    #[serde(default)]
    pub allow_hosts: Vec<String>,
    /// How the source's records map onto identities, traits, events and entities.
    #[serde(default)]
    pub map: Mapping,
}

/// How a source runs.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SourceMode {
    /// Runs on `schedule`, reads until the plugin reports it is done.
    Batch,
    /// Runs continuously, polling the plugin when it is idle.
    Streaming,
}

/// The built-in HTTP event collector.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct Collector {
    /// Write keys clients send (HTTP basic auth user). Use `${env:NAME}`.
    #[serde(default)]
    pub write_keys: Vec<String>,
}

/// Field mapping from a source record to the model. Field paths are dotted
/// (`traits.email`, `context.ip`).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct Mapping {
    /// Field holding a unique record id, used to drop duplicates. Without it the
    /// id is a hash of the record.
    #[serde(default)]
    pub message_id: Option<String>,
    /// Field holding when the record was observed (RFC 3339 or epoch seconds).
    #[serde(default)]
    pub timestamp: Option<String>,
    /// Identity key (from `identity.keys`) → field.
    #[serde(default)]
    pub identities: IndexMap<String, String>,
    /// Trait (from `model.traits`) → field.
    #[serde(default)]
    pub traits: IndexMap<String, String>,
    /// Each record is an event.
    #[serde(default)]
    pub event: Option<EventMapping>,
    /// Each record is a row of a related entity.
    #[serde(default)]
    pub entity: Option<EntityMapping>,
    /// Consent purpose (from `consent.purposes`) → field holding true/false.
    #[serde(default)]
    pub consent: IndexMap<String, String>,
}

/// Maps a record to an event.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct EventMapping {
    /// The event (from `model.events`) every record is.
    #[serde(default)]
    pub name: Option<String>,
    /// Field holding the event name; with `names`, renamed to model events.
    #[serde(default)]
    pub name_field: Option<String>,
    /// Incoming event name → model event, e.g. `"Order Completed": order_completed`.
    #[serde(default)]
    pub names: IndexMap<String, String>,
    /// Event property → field. Without an entry a property is read from the field of its own name.
    #[serde(default)]
    pub properties: IndexMap<String, String>,
}

/// Maps a record to a row of a related entity.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct EntityMapping {
    /// The entity (from `model.entities`).
    pub name: String,
    /// Entity field → record field. Without an entry a field is read from the field of its own name.
    #[serde(default)]
    pub fields: IndexMap<String, String>,
}

/// Identity keys and the rules that join them into profiles.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    /// Identity key types by name (`email`, `phone`, `crm_id`, …).
    #[serde(default)]
    pub keys: IndexMap<String, IdentityKey>,
    /// Keys from strongest to weakest. When a record would push a profile past a
    /// key's `limit`, it joins the profile of its highest-priority key instead.
    /// Default: the order of `keys`.
    #[serde(default)]
    pub priority: Vec<String>,
    /// Probabilistic matching of records that share no key.
    #[serde(default, rename = "match")]
    pub matching: Option<Match>,
}

/// One identity key type.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct IdentityKey {
    /// How values are normalised before matching.
    #[serde(default)]
    pub normalize: Option<Normalizer>,
    /// Region for phone numbers written without a country code (ISO 3166 alpha-2, e.g. `SE`).
    #[serde(default)]
    pub default_region: Option<String>,
    /// Regular expression a value must match; its first capture group, if any, is the value kept.
    #[serde(default)]
    pub pattern: Option<String>,
    /// Most values of this key one profile may hold. `1` makes the key unique:
    /// two profiles with different values never merge.
    #[serde(default)]
    #[schemars(range(min = 1))]
    pub limit: Option<u32>,
    /// Values that never identify anyone (after normalisation), added to the
    /// built-in placeholders (`null`, `n/a`, `test@test.com`, …).
    #[serde(default)]
    pub blocklist: Vec<String>,
    /// `normalize: email` only: apply mailbox providers' own rules, so addresses
    /// one mailbox receives compare equal (Gmail ignores dots and `+tags` in
    /// the local part and treats `googlemail.com` as `gmail.com`; Outlook,
    /// iCloud and Fastmail ignore `+tags`). Default `false`.
    #[serde(default)]
    pub provider_rules: bool,
}

/// Identifier normalisers.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Normalizer {
    /// Trim, lowercase, Unicode NFKC; must look like an address.
    Email,
    /// Phone number to E.164 (`+46701234567`), using `default_region` for national numbers.
    E164,
    /// Lowercase.
    Lowercase,
    /// Trim whitespace.
    Trim,
    /// Keep digits only.
    Digits,
    /// Keep the value as is.
    None,
}

/// Probabilistic (Fellegi–Sunter) matching.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Match {
    /// Trait → comparison used for it.
    pub compare: IndexMap<String, Comparison>,
    /// Blocking rules: candidate pairs must agree on every trait of at least one rule.
    pub block_on: Vec<Vec<String>>,
    /// Match probability (0–1) above which two profiles are linked.
    pub threshold: f64,
    /// Identity key → match probability at or above which a match may join
    /// two profiles past that key's `limit` (e.g. `crm_id: 0.995`: name,
    /// birth date and address agreeing join two CRM records of one person
    /// under different CRM ids). Records never cross a limit, only matches.
    #[serde(default)]
    pub cross_limits: IndexMap<String, f64>,
}

/// How one trait is compared: a method name, or a method with options.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(untagged)]
pub enum Comparison {
    /// Just the method.
    Method(CompareMethod),
    /// The method with options.
    Detailed(ComparisonOptions),
}

/// A comparison with options.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ComparisonOptions {
    /// Comparison method.
    pub method: CompareMethod,
    /// For `date`: how far apart two dates may be and still partly agree, e.g. `3d`.
    /// For `numeric`: the relative difference tolerated, e.g. `0.05`.
    #[serde(default)]
    pub tolerance: Option<Value>,
    /// Probability that a true match agrees on this field (estimated from data when absent).
    #[serde(default)]
    pub m: Option<f64>,
    /// Probability that a non-match agrees on this field (estimated from data when absent).
    #[serde(default)]
    pub u: Option<f64>,
    /// Weigh an agreement by how common the agreed value is among profiles
    /// (term-frequency adjustment): `Lars Andersson` agreeing says less than a
    /// rare name agreeing. Default `false`.
    #[serde(default)]
    pub term_frequency: bool,
    /// Names: a nickname and its full name (`mange`/`magnus`, `bill`/`william`,
    /// from a built-in table) count as close. Default `false`.
    #[serde(default)]
    pub nicknames: bool,
    /// Another compared trait whose value may have been written in this one's
    /// place (`first_name` with `swap_with: last_name`): when both are
    /// crossed, they count as close instead of disagreeing.
    #[serde(default)]
    pub swap_with: Option<String>,
}

/// Field comparison methods.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CompareMethod {
    Exact,
    JaroWinkler,
    Levenshtein,
    Phonetic,
    Date,
    Numeric,
}

/// The profile's data model.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct Model {
    /// Profile traits by name.
    #[serde(default)]
    pub traits: IndexMap<String, Trait>,
    /// Events a profile collects, by name.
    #[serde(default)]
    pub events: IndexMap<String, EventType>,
    /// Related entities (bookings, orders, hotels), by name.
    #[serde(default)]
    pub entities: IndexMap<String, Entity>,
    /// Traits computed from events (aggregates), by name.
    #[serde(default)]
    pub computed: IndexMap<String, Computed>,
    /// Traits predicted by a model from events, by name.
    #[serde(default)]
    pub predicted: IndexMap<String, Predicted>,
}

/// A profile trait.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Trait {
    /// Value type.
    #[serde(rename = "type")]
    pub kind: TraitType,
    /// Allowed values (string traits only).
    #[serde(default, rename = "enum")]
    pub allowed: Vec<String>,
    /// Data-usage labels (`pii`, `contact`, `sensitive`, …) that consent policies refer to.
    #[serde(default)]
    pub labels: Vec<String>,
    /// How values from several records combine. Default `latest`.
    #[serde(default)]
    pub merge: Option<MergePolicy>,
    /// What the trait means.
    #[serde(default)]
    pub description: Option<String>,
    /// Text normalisers applied, in order, to the value before it is typed,
    /// stored and compared by matching (e.g. `[remove_whitespace, uppercase]`
    /// for postcodes).
    #[serde(default)]
    pub normalize: Vec<TextNormalizer>,
    /// `date` and `timestamp` traits: the format values arrive in, as chrono
    /// `strftime` (`"%Y%m%d"` reads `19921119`). Values in the standard format
    /// are accepted too.
    #[serde(default)]
    pub format: Option<String>,
}

/// Text normalisers for trait values.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TextNormalizer {
    /// Remove leading and trailing whitespace.
    Trim,
    /// Trim, and turn each run of whitespace into one space.
    CollapseWhitespace,
    /// Remove all whitespace (postcodes: `114 55` → `11455`).
    RemoveWhitespace,
    /// Lowercase.
    Lowercase,
    /// Uppercase.
    Uppercase,
    /// Remove diacritics (`Åsa Öberg` → `Asa Oberg`), Unicode NFKD.
    StripAccents,
}

/// Trait value types.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TraitType {
    String,
    Number,
    Integer,
    Boolean,
    /// A calendar date, `YYYY-MM-DD`.
    Date,
    /// An instant, RFC 3339.
    Timestamp,
    /// A list of strings.
    List,
}

/// Field types of event properties and entity fields.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FieldType {
    String,
    Number,
    Integer,
    Boolean,
    Date,
    Timestamp,
}

/// How values from several records combine into one trait value.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(untagged)]
pub enum MergePolicy {
    /// A simple policy.
    Simple(SimpleMerge),
    /// Prefer some sources over others.
    Priority(SourcePriority),
}

/// Simple merge policies.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SimpleMerge {
    /// The value observed last wins.
    Latest,
    /// The value observed first wins.
    First,
    /// The largest value wins.
    Max,
    /// The smallest value wins.
    Min,
    /// Values add up (numbers).
    Sum,
}

/// Source-priority merge.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SourcePriority {
    /// Sources from most to least trusted; among equals the latest value wins.
    pub source_priority: Vec<String>,
}

/// An event type.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct EventType {
    /// Property name → type.
    #[serde(default)]
    pub properties: IndexMap<String, FieldType>,
    /// Data-usage labels of the event's properties.
    #[serde(default)]
    pub labels: Vec<String>,
}

/// A related entity.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Entity {
    /// The field that identifies a row.
    pub key: String,
    /// Field name → type.
    pub fields: IndexMap<String, FieldType>,
    /// Whether rows belong to a person (bookings) or stand alone (hotels). Default true.
    #[serde(default = "yes")]
    pub per_profile: bool,
    /// Links to other entities by name.
    #[serde(default)]
    pub relations: IndexMap<String, Relation>,
    /// Data-usage labels of the entity's fields.
    #[serde(default)]
    pub labels: Vec<String>,
}

fn yes() -> bool {
    true
}

/// A link from one entity to another: `field` holds the other entity's key.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Relation {
    /// The target entity.
    pub entity: String,
    /// The field of this entity holding the target's key.
    pub field: String,
}

/// A trait computed from events. Exactly one aggregate is set.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct Computed {
    /// Number of events: `event`.
    #[serde(default)]
    pub count: Option<String>,
    /// Sum of a property: `event.property`.
    #[serde(default)]
    pub sum: Option<String>,
    /// Average of a property: `event.property`.
    #[serde(default)]
    pub avg: Option<String>,
    /// Smallest value of a property: `event.property`.
    #[serde(default)]
    pub min: Option<String>,
    /// Largest value of a property: `event.property`.
    #[serde(default)]
    pub max: Option<String>,
    /// Property of the first event: `event.property`.
    #[serde(default)]
    pub first: Option<String>,
    /// Property of the most recent event: `event.property`.
    #[serde(default)]
    pub last: Option<String>,
    /// Number of distinct values of a property: `event.property`.
    #[serde(default)]
    pub distinct: Option<String>,
    /// Time of the most recent event: `event`.
    #[serde(default)]
    pub last_seen: Option<String>,
    /// Only events within this window, e.g. `90d`.
    #[serde(default)]
    pub within: Option<String>,
    /// Only events for which this expression over their properties is true.
    #[serde(default, rename = "where")]
    pub filter: Option<String>,
}

/// The aggregate a computed trait takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aggregate {
    Count,
    Sum,
    Avg,
    Min,
    Max,
    First,
    Last,
    Distinct,
    LastSeen,
}

impl Aggregate {
    pub fn as_str(self) -> &'static str {
        match self {
            Aggregate::Count => "count",
            Aggregate::Sum => "sum",
            Aggregate::Avg => "avg",
            Aggregate::Min => "min",
            Aggregate::Max => "max",
            Aggregate::First => "first",
            Aggregate::Last => "last",
            Aggregate::Distinct => "distinct",
            Aggregate::LastSeen => "last_seen",
        }
    }

    /// Whether it reads an event (`count`, `last_seen`) rather than an event's property.
    pub fn of_events(self) -> bool {
        matches!(self, Aggregate::Count | Aggregate::LastSeen)
    }
}

impl Computed {
    /// The aggregates that are set, with what each reads (`event` or
    /// `event.property`); exactly one in a valid manifest.
    pub fn aggregates(&self) -> Vec<(Aggregate, &String)> {
        [
            (Aggregate::Count, &self.count),
            (Aggregate::Sum, &self.sum),
            (Aggregate::Avg, &self.avg),
            (Aggregate::Min, &self.min),
            (Aggregate::Max, &self.max),
            (Aggregate::First, &self.first),
            (Aggregate::Last, &self.last),
            (Aggregate::Distinct, &self.distinct),
            (Aggregate::LastSeen, &self.last_seen),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| (k, v)))
        .collect()
    }
}

/// A trait predicted from a person's event history.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Predicted {
    /// Which prediction.
    pub model: PredictModel,
    /// The event that counts as a purchase/transaction.
    pub event: String,
    /// Property holding the monetary value (required by `clv`).
    #[serde(default)]
    pub value: Option<String>,
    /// Prediction horizon, e.g. `90d`.
    pub horizon: String,
}

/// Prediction models.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PredictModel {
    /// BG/NBD: probability that the person has churned (0–1).
    Bgnbd,
    /// BG/NBD: expected number of transactions within the horizon.
    BgnbdPurchases,
    /// BG/NBD with Gamma-Gamma spend: expected value within the horizon.
    Clv,
}

/// Consent purposes and policies.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct Consent {
    /// Purposes a person can grant or withdraw (`email_marketing`, `advertising`, …).
    #[serde(default)]
    pub purposes: Vec<String>,
    /// State of a purpose the person never answered. `denied` (opt-in) is the default.
    #[serde(default)]
    pub default: ConsentDefault,
    /// A granted consent lapses after this long unless renewed, e.g. `395d`.
    #[serde(default)]
    pub expiry: Option<String>,
    /// Label policies. `cdp validate` refuses a destination whose `fields` include a
    /// field a policy denies for its purpose, and activation drops such a field from
    /// every delivery.
    #[serde(default)]
    pub policies: Vec<Policy>,
}

/// State of an unanswered purpose.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, JsonSchema, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum ConsentDefault {
    /// Opt-in: nothing is sent until the person grants the purpose.
    #[default]
    Denied,
    /// Opt-out: sent until the person withdraws the purpose.
    Granted,
}

/// A data-usage policy: fields with these labels never flow to these purposes.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Labels whose fields are denied.
    pub deny_labels: Vec<String>,
    /// Purposes the denial applies to.
    #[serde(rename = "for")]
    pub purposes: Vec<String>,
    /// An exception: `hashed` allows the field when the destination hashes it.
    #[serde(default)]
    pub unless: Option<PolicyException>,
}

/// Exceptions to a label policy.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PolicyException {
    /// Allowed when the destination lists the field under `hash`.
    Hashed,
}

/// A rule-based audience.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Audience {
    /// Membership rule, an expression over the profile (see README: Audience expressions).
    #[serde(rename = "where")]
    pub rule: String,
    /// Cron schedule of full re-evaluation. Without it the audience updates in realtime.
    #[serde(default)]
    pub refresh: Option<String>,
    /// What the audience is for.
    #[serde(default)]
    pub description: Option<String>,
}

/// An activation target.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Destination {
    /// Name of a destination plugin from `plugins`.
    pub plugin: String,
    /// The audience whose members are sent. Without it, every profile is.
    #[serde(default)]
    pub audience: Option<String>,
    /// The consent purpose of this activation: only people whose consent for it is
    /// granted are sent, and label policies are checked against it.
    pub purpose: String,
    /// What is sent: `membership` (enter/exit events), `upsert` (profile changes)
    /// or `mirror` (membership plus deletes on exit). Default: `membership` with
    /// an audience, `upsert` without.
    #[serde(default)]
    pub sync: Option<SyncMode>,
    /// Traits and identity keys sent with each profile.
    #[serde(default)]
    pub fields: Vec<String>,
    /// Fields sent as SHA-256 of their normalised value (required by ad platforms).
    #[serde(default)]
    pub hash: Vec<String>,
    /// The plugin's own configuration, checked against the plugin's config schema.
    #[serde(default)]
    #[schemars(with = "Option<Map<String, Value>>")]
    pub config: Option<Map<String, Value>>,
    /// Hosts the plugin may reach over HTTP: `host`, `host:port` or `*.domain`.
    #[serde(default)]
    pub allow_hosts: Vec<String>,
    /// Directories lent to the plugin: host path (relative to the manifest) → path inside the plugin.
    #[serde(default)]
    pub mount: IndexMap<String, String>,
    /// How records are grouped into calls.
    #[serde(default)]
    pub batch: Option<Batch>,
    /// Most records per second sent, e.g. `20/s`, `1000/m`.
    #[serde(default)]
    pub rate_limit: Option<String>,
    /// Retries of failed deliveries before they go to the dead-letter store.
    #[serde(default)]
    pub retry: Option<Retry>,
    /// Refuse a sync that would remove more than this share of the audience at once.
    #[serde(default)]
    pub shrink_guard: Option<ShrinkGuard>,
}

/// Retention of raw records: older ones are deleted by `cdp run` on its
/// schedule (`cdp plan` shows how many would go). Identifiers, merged traits
/// and consent answers stay; computed traits see only the events kept.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Retention {
    /// Every source's records older than this go, e.g. `730d`. Without it they are kept.
    #[serde(default)]
    pub records: Option<String>,
    /// Per source, overriding `records`: source → duration.
    #[serde(default)]
    pub sources: IndexMap<String, String>,
    /// Per event type, for events (the shorter of this and the source's applies): event → duration.
    #[serde(default)]
    pub events: IndexMap<String, String>,
    /// When the runtime deletes (cron, six fields, UTC). Default every hour: `0 0 * * * *`.
    #[serde(default)]
    pub schedule: Option<String>,
}

/// Destination sync modes.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SyncMode {
    /// Enter and exit events as people join and leave the audience.
    Membership,
    /// The profile's fields whenever they change.
    Upsert,
    /// Membership, and a delete when someone leaves.
    Mirror,
}

/// Batching of deliveries.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Batch {
    /// Most records in one call. Default 500.
    #[serde(default)]
    #[schemars(range(min = 1, max = 100000))]
    pub max_records: Option<u32>,
    /// Longest a record waits for its batch to fill, e.g. `5s`. Default `5s`.
    #[serde(default)]
    pub max_wait: Option<String>,
}

/// Retry policy.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Retry {
    /// Most attempts per record, the first included. Default 8.
    #[serde(default)]
    #[schemars(range(min = 1, max = 1000))]
    pub max_attempts: Option<u32>,
    /// First backoff, doubled at each attempt with jitter, e.g. `1s`.
    #[serde(default)]
    pub initial_backoff: Option<String>,
    /// Longest backoff, e.g. `5m`.
    #[serde(default)]
    pub max_backoff: Option<String>,
}

/// Protection against mass removals.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ShrinkGuard {
    /// Largest share of current members one sync may remove, in percent.
    #[schemars(range(min = 0.0, max = 100.0))]
    pub max_removal_percent: f64,
}
