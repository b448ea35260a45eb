//! Semantic rules: what the schema cannot say. Every reference resolves
//! (destination → plugin, audience, purpose; source → plugin; mappings → model
//! and identity keys; computed and predicted traits → events and properties),
//! audience expressions type-check against the model, cron schedules, durations
//! and rates parse, names are identifiers and unique, plugin files exist and
//! match their digest, and no destination sends a field that a consent policy
//! denies for its purpose. Each rule reports at the key path it concerns.

use super::diag::{self, Diagnostic, Loc};
use super::types::*;
use super::units::{parse_bytes, parse_duration, parse_rate};
use super::yaml::{SpanIndex, display_path, push_segment};
use super::{Ghosts, suggest};
use crate::audience::{self, CheckErrorKind, Scope, Type};
use indexmap::IndexMap;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::str::FromStr;

/// Runs every semantic rule.
pub fn check(m: &Manifest, ghosts: &Ghosts, spans: &SpanIndex, base_dir: &Path) -> Vec<Diagnostic> {
    let mut c = Ctx { m, g: ghosts, spans, base: base_dir, out: Vec::new() };
    c.top();
    c.names();
    c.plugins();
    c.sources();
    c.identity();
    c.model();
    c.consent();
    c.audiences();
    c.destinations();
    c.retention();
    c.out
}

/// Builds a JSON pointer from segments.
fn ptr(segs: &[&str]) -> String {
    segs.iter().fold(String::new(), |p, s| push_segment(&p, s))
}

struct Ctx<'a> {
    m: &'a Manifest,
    g: &'a Ghosts,
    spans: &'a SpanIndex,
    base: &'a Path,
    out: Vec<Diagnostic>,
}

/// What a profile field name refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FieldKind {
    Trait,
    Computed,
    Predicted,
    Identity,
}

impl<'a> Ctx<'a> {
    fn at(&mut self, code: &'static str, pointer: &str, loc: Loc, msg: String) -> &mut Diagnostic {
        self.out.push(Diagnostic::error(code, display_path(pointer), msg).at(loc));
        self.out.last_mut().expect("just pushed")
    }

    /// An error located at the value of `pointer`.
    fn err(&mut self, code: &'static str, pointer: &str, msg: String) -> &mut Diagnostic {
        let loc = self.spans.value(pointer);
        self.at(code, pointer, loc, msg)
    }

    /// An error located at the key of `pointer` (for names).
    fn key_err(&mut self, code: &'static str, pointer: &str, msg: String) -> &mut Diagnostic {
        let loc = self.spans.key(pointer);
        self.at(code, pointer, loc, msg)
    }

    fn warn(&mut self, code: &'static str, pointer: &str, msg: String) -> &mut Diagnostic {
        let loc = self.spans.value(pointer);
        self.out.push(Diagnostic::warning(code, display_path(pointer), msg).at(loc));
        self.out.last_mut().expect("just pushed")
    }

    fn hint(&mut self, h: impl Into<String>) {
        if let Some(d) = self.out.last_mut() {
            d.hint = Some(h.into());
        }
    }

    /// Reports an unknown reference with a "did you mean" over the known names.
    fn unknown<'n>(
        &mut self,
        code: &'static str,
        pointer: &str,
        what: &str,
        name: &str,
        known: impl IntoIterator<Item = &'n str> + Clone,
        define: &str,
    ) {
        let msg = format!("`{name}` is not a defined {what}");
        self.err(code, pointer, msg);
        match suggest(name, known.clone()) {
            Some(s) => self.hint(format!("did you mean `{s}`?")),
            None => {
                let names: Vec<&str> = known.into_iter().take(12).collect();
                if names.is_empty() {
                    self.hint(format!("define it under `{define}`"));
                } else {
                    self.hint(format!("define it under `{define}`; defined: {}", names.join(", ")));
                }
            }
        }
    }

    fn duration(&mut self, pointer: &str, value: &str) {
        if let Err(e) = parse_duration(value) {
            self.err(diag::BAD_DURATION, pointer, e);
            self.hint("write a number and a unit: `500ms`, `30s`, `5m`, `12h`, `90d`, `1h30m`");
        }
    }

    fn cron(&mut self, pointer: &str, value: &str) {
        if let Some(msg) = cron_range(value) {
            self.err(diag::BAD_CRON, pointer, format!("`{value}` is not a valid cron schedule: {msg}"));
            self.hint("six fields: `SEC MIN HOUR DOM MON DOW`, e.g. `0 */15 * * * *` every 15 minutes");
            return;
        }
        if let Err(e) = cron::Schedule::from_str(value) {
            let fields = value.split_whitespace().count();
            // The parser's message echoes the input with a caret; keep its explanation only.
            let text = e.to_string();
            let detail = text.lines().map(str::trim).rfind(|l| !l.is_empty() && *l != value.trim() && *l != "^");
            let msg = match detail {
                Some(d) if !d.chars().all(|c| c == '^' || c == ' ') => {
                    format!("`{value}` is not a valid cron schedule: {d}")
                }
                _ if fields != 6 && fields != 7 => {
                    format!("`{value}` is not a valid cron schedule: it has {fields} fields, not 6")
                }
                _ => format!("`{value}` is not a valid cron schedule"),
            };
            self.err(diag::BAD_CRON, pointer, msg);
            if fields == 5 {
                self.hint("cdp schedules have a seconds field first: `SEC MIN HOUR DOM MON DOW`, e.g. `0 0 3 * * *`");
            } else {
                self.hint("six fields: `SEC MIN HOUR DOM MON DOW`, e.g. `0 */15 * * * *` every 15 minutes");
            }
        } else if super::lint::never_fires(value) {
            self.err(diag::BAD_CRON, pointer, format!("`{value}` never fires: no date matches it"));
            self.hint("check the day of month against the month (`31 2` is February 31st)");
        }
    }

    fn name(&mut self, pointer: &str, name: &str, what: &str) {
        if !super::names::is_name(name) {
            let fixed = super::names::fixed(name);
            self.key_err(diag::BAD_NAME, pointer, format!("`{name}` is not a valid {what} name"));
            self.hint(format!(
                "names are lowercase letters, digits and `_`, starting with a letter or `_`, at most 64 long: `{fixed}`"
            ));
        }
    }

    fn top(&mut self) {
        if self.m.version != 1 {
            self.err(diag::VERSION, "/version", format!("manifest version {} is not supported", self.m.version));
            self.hint("this cdp reads `version: 1`");
        }
        let n = &self.m.name;
        let ok = !n.is_empty()
            && n.chars().next().is_some_and(|c| c.is_ascii_lowercase())
            && n.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
        if !ok && self.spans.contains("/name") {
            self.err(diag::BAD_NAME, "/name", format!("`{n}` is not a valid deployment name"));
            self.hint("lowercase letters, digits, `-` and `_`, starting with a letter, e.g. `acme-retail`");
        }
        let url = &self.m.storage.url;
        let supported =
            url.starts_with("sqlite:") || url.starts_with("postgres://") || url.starts_with("postgresql://");
        if !supported && !super::env::is_reference(url) {
            self.err(diag::BAD_STORAGE, "/storage/url", format!("`{url}` is not a supported storage URL"));
            self.hint("use `sqlite://PATH` (embedded) or `postgres://USER@HOST:PORT/DB`");
        }
        let listen = &self.m.server.listen;
        if !super::env::is_reference(listen) && !valid_listen(listen) {
            self.err(diag::BAD_ADDRESS, "/server/listen", format!("`{listen}` is not a HOST:PORT address"));
            self.hint("e.g. `127.0.0.1:8080` or `0.0.0.0:8080`");
        }
        if let Some(t) = &self.m.server.admin_token
            && !super::env::is_reference(t)
        {
            self.warn(diag::PLAIN_SECRET, "/server/admin_token", "the admin token is written in plain text".into());
            self.hint("write `admin_token: \"${env:CDP_ADMIN_TOKEN}\"` and keep the token out of git");
        }
        self.server_tokens();
    }

    /// Admin-API tokens: kept out of git, one name each, and `admin` taken
    /// by the `admin_token` shorthand when it is set.
    fn server_tokens(&mut self) {
        let s = &self.m.server;
        if s.admin_token.is_some() && s.tokens.contains_key("admin") {
            self.err(
                diag::DUPLICATE_NAME,
                "/server/tokens/admin",
                "token `admin` is defined twice: by `server.admin_token` and in `server.tokens`".into(),
            );
            self.hint("`admin_token` is shorthand for a token named `admin` with role `admin`; keep one of the two");
        }
        for (name, t) in &s.tokens {
            if !super::env::is_reference(&t.token) {
                self.warn(
                    diag::PLAIN_SECRET,
                    &format!("/server/tokens/{name}/token"),
                    format!("the token of `{name}` is written in plain text"),
                );
                self.hint("write `token: \"${env:CDP_TOKEN_NAME}\"` and keep the token out of git");
            }
        }
        if let Some(tls) = &s.tls {
            for (field, path) in [("cert", &tls.cert), ("key", &tls.key)] {
                if path.trim().is_empty() {
                    self.err(diag::OUT_OF_RANGE, &format!("/server/tls/{field}"), format!("`tls.{field}` is empty"));
                    self.hint("give the path of a PEM file, relative to the manifest");
                }
            }
        }
    }

    /// Names are identifiers, and profile fields are unique across traits,
    /// computed and predicted traits (they share one namespace in audiences).
    fn names(&mut self) {
        let m = self.m;
        let groups: [(&str, &str, Vec<&String>); 10] = [
            ("plugins", "plugin", m.plugins.keys().collect()),
            ("sources", "source", m.sources.keys().collect()),
            ("audiences", "audience", m.audiences.keys().collect()),
            ("destinations", "destination", m.destinations.keys().collect()),
            ("identity/keys", "identity key", m.identity.keys.keys().collect()),
            ("model/traits", "trait", m.model.traits.keys().collect()),
            ("model/events", "event", m.model.events.keys().collect()),
            ("model/entities", "entity", m.model.entities.keys().collect()),
            ("model/computed", "computed trait", m.model.computed.keys().collect()),
            ("model/predicted", "predicted trait", m.model.predicted.keys().collect()),
        ];
        for (section, what, names) in groups {
            for n in names {
                self.name(&format!("/{section}{}", push_segment("", n)), n, what);
            }
        }
        for (ev, e) in &m.model.events {
            for p in e.properties.keys() {
                self.name(&ptr(&["model", "events", ev, "properties", p]), p, "event property");
            }
        }
        for (en, e) in &m.model.entities {
            for f in e.fields.keys() {
                self.name(&ptr(&["model", "entities", en, "fields", f]), f, "entity field");
            }
        }
        let mut seen: HashMap<&str, (&str, Loc)> = HashMap::new();
        let fields = m
            .model
            .traits
            .keys()
            .map(|k| ("traits", k))
            .chain(m.model.computed.keys().map(|k| ("computed", k)))
            .chain(m.model.predicted.keys().map(|k| ("predicted", k)));
        for (section, name) in fields {
            let pointer = ptr(&["model", section, name]);
            let loc = self.spans.key(&pointer);
            if let Some((first, first_loc)) = seen.get(name.as_str()).copied() {
                self.at(
                    diag::DUPLICATE_NAME,
                    &pointer,
                    loc,
                    format!(
                        "`{name}` is defined twice: in `model.{first}` (line {}) and `model.{section}`",
                        first_loc.line
                    ),
                );
                self.hint("traits, computed and predicted traits share one namespace; rename one");
            } else {
                seen.insert(name, (section, loc));
            }
        }
        let mut purposes: HashMap<&str, usize> = HashMap::new();
        for (i, p) in m.consent.purposes.iter().enumerate() {
            let pointer = ptr(&["consent", "purposes", &i.to_string()]);
            self.name(&pointer, p, "consent purpose");
            if let Some(first) = purposes.get(p.as_str()).copied() {
                let first_line = self.spans.value(&ptr(&["consent", "purposes", &first.to_string()])).line;
                self.err(
                    diag::DUPLICATE_NAME,
                    &pointer,
                    format!("purpose `{p}` is listed twice (first on line {first_line})"),
                );
                self.hint("remove the second entry");
            } else {
                purposes.insert(p, i);
            }
        }
    }

    fn plugins(&mut self) {
        let m = self.m;
        let used: HashSet<&str> = m
            .sources
            .values()
            .filter_map(|s| s.plugin.as_deref())
            .chain(m.destinations.values().map(|d| d.plugin.as_str()))
            .collect();
        for (name, p) in &m.plugins {
            let base = ptr(&["plugins", name]);
            if let Some(mem) = &p.memory
                && let Err(e) = parse_bytes(mem)
            {
                self.err(diag::OUT_OF_RANGE, &format!("{base}/memory"), e);
            }
            if let Some(t) = &p.timeout {
                self.duration(&format!("{base}/timeout"), t);
            }
            if !used.contains(name.as_str()) && self.g.is_empty() {
                self.warn(diag::UNUSED, &base, format!("plugin `{name}` is not used by any source or destination"));
                self.hint("remove it, or refer to it with `plugin: …`");
            }
            let path = self.base.join(&p.path);
            let path_ptr = format!("{base}/path");
            match std::fs::read(&path) {
                Err(e) => {
                    self.err(diag::PLUGIN_MISSING, &path_ptr, format!("cannot read plugin file `{}`: {e}", p.path));
                    self.hint("build the plugins first (`plugins/build.sh`); paths are relative to the manifest");
                }
                Ok(bytes) => {
                    use sha2::Digest;
                    let actual = hex::encode(sha2::Sha256::digest(&bytes));
                    match &p.sha256 {
                        Some(want) if *want != actual && want.len() == 64 => {
                            self.err(
                                diag::PLUGIN_DIGEST,
                                &format!("{base}/sha256"),
                                format!("`{}` has sha256 {actual}, not the pinned {want}", p.path),
                            );
                            self.hint("if the new build is intended, pin its digest: `sha256sum FILE`");
                        }
                        Some(_) => {}
                        None => {
                            self.warn(diag::UNPINNED, &base, format!("plugin `{name}` is not pinned by sha256"));
                            self.hint(format!("add `sha256: \"{actual}\"` so a changed file is refused"));
                        }
                    }
                }
            }
        }
    }

    fn plugin_ref(&mut self, pointer: &str, name: &str) {
        if !self.m.plugins.contains_key(name) && !self.g.covers("plugins", name) {
            let known: Vec<&str> = self.m.plugins.keys().map(String::as_str).collect();
            self.unknown(diag::UNKNOWN_PLUGIN, pointer, "plugin", name, known, "plugins");
        }
    }

    fn sandbox(&mut self, base: &str, allow_hosts: &[String], mount: &IndexMap<String, String>) {
        for (i, h) in allow_hosts.iter().enumerate() {
            if let Err(e) = check_host(h) {
                self.err(
                    diag::BAD_HOST,
                    &format!("{base}/allow_hosts/{i}"),
                    format!("`{h}` is not a host pattern: {e}"),
                );
                self.hint("write `api.example.com`, `api.example.com:8443` or `*.example.com`; no scheme, no path");
            }
        }
        let mut guests: HashMap<&str, &str> = HashMap::new();
        for (host, guest) in mount {
            let p = format!("{base}/mount{}", push_segment("", host));
            if !guest.starts_with('/') {
                self.err(diag::BAD_MOUNT, &p, format!("`{guest}` must be an absolute path inside the plugin"));
                self.hint("e.g. `/input`");
            } else if let Some(other) = guests.insert(guest, host) {
                self.err(diag::BAD_MOUNT, &p, format!("`{other}` and `{host}` are both mounted at `{guest}`"));
            }
            if Path::new(host).is_absolute() || host.split('/').any(|s| s == "..") {
                self.key_err(
                    diag::BAD_MOUNT,
                    &p,
                    format!("mount source `{host}` must be a path inside the manifest's directory"),
                );
                self.hint("write it relative to the manifest, without `..`");
            } else if !self.base.join(host).is_dir() {
                self.out.push(
                    Diagnostic::warning(
                        diag::BAD_MOUNT,
                        display_path(&p),
                        format!("mount source `{host}` is not a directory here"),
                    )
                    .at(self.spans.key(&p))
                    .hint("create it before a plugin uses it; validation does not need it"),
                );
            }
        }
    }

    fn sources(&mut self) {
        let m = self.m;
        for (name, s) in &m.sources {
            let base = ptr(&["sources", name]);
            match (&s.collector, &s.plugin) {
                (Some(_), Some(_)) => {
                    self.key_err(
                        diag::SOURCE_KIND,
                        &base,
                        format!("source `{name}` sets both `collector` and `plugin`"),
                    );
                    self.hint("split it into two sources");
                }
                (None, None) => {
                    self.key_err(
                        diag::SOURCE_KIND,
                        &base,
                        format!("source `{name}` sets neither `collector` nor `plugin`"),
                    );
                    self.hint("add `plugin: NAME` for a connector, or `collector: {}` for HTTP events");
                }
                (Some(c), None) => {
                    for key in ["schedule", "config", "mount", "allow_hosts"] {
                        let p = format!("{base}/{key}");
                        if self.spans.contains(&p) {
                            self.key_err(
                                diag::SOURCE_KIND,
                                &p,
                                format!("`{key}` applies to plugin sources, not the collector"),
                            );
                            self.hint("the collector receives events over HTTP; remove this key");
                        }
                    }
                    for (i, k) in c.write_keys.iter().enumerate() {
                        if !super::env::is_reference(k) {
                            self.warn(
                                diag::PLAIN_SECRET,
                                &format!("{base}/collector/write_keys/{i}"),
                                "write key in plain text".into(),
                            );
                            self.hint("write `\"${env:WEB_WRITE_KEY}\"` and keep keys out of git");
                        }
                    }
                }
                (None, Some(p)) => self.plugin_ref(&format!("{base}/plugin"), p),
            }
            if let Some(sched) = &s.schedule {
                self.cron(&format!("{base}/schedule"), sched);
                if s.mode == Some(SourceMode::Streaming) {
                    self.warn(
                        diag::BAD_CRON,
                        &format!("{base}/schedule"),
                        "a streaming source runs continuously; `schedule` is ignored".into(),
                    );
                    self.hint("remove `schedule`, or set `mode: batch`");
                }
            }
            self.sandbox(&base, &s.allow_hosts, &s.mount);
            self.mapping(&format!("{base}/map"), &s.map);
        }
    }

    fn mapping(&mut self, base: &str, map: &Mapping) {
        let m = self.m;
        for key in map.identities.keys() {
            if !m.identity.keys.contains_key(key) && !self.g.covers("identity.keys", key) {
                let known: Vec<&str> = m.identity.keys.keys().map(String::as_str).collect();
                self.key_unknown(
                    diag::UNKNOWN_IDENTITY,
                    &format!("{base}/identities{}", push_segment("", key)),
                    "identity key",
                    key,
                    &known,
                    "identity.keys",
                );
            }
        }
        for key in map.traits.keys() {
            let p = format!("{base}/traits{}", push_segment("", key));
            if m.model.computed.contains_key(key) || m.model.predicted.contains_key(key) {
                self.key_err(
                    diag::UNKNOWN_TRAIT,
                    &p,
                    format!("`{key}` is computed by cdp and cannot be mapped from a source"),
                );
                self.hint("map the events it is computed from instead");
            } else if !m.model.traits.contains_key(key) && !self.g.covers("traits", key) {
                let known: Vec<&str> = m.model.traits.keys().map(String::as_str).collect();
                self.key_unknown(diag::UNKNOWN_TRAIT, &p, "trait", key, &known, "model.traits");
            }
        }
        for key in map.consent.keys() {
            if !m.consent.purposes.contains(key) && !self.g.covers("consent", key) {
                let known: Vec<&str> = m.consent.purposes.iter().map(String::as_str).collect();
                self.key_unknown(
                    diag::UNKNOWN_PURPOSE,
                    &format!("{base}/consent{}", push_segment("", key)),
                    "consent purpose",
                    key,
                    &known,
                    "consent.purposes",
                );
            }
        }
        if let Some(ev) = &map.event {
            let eb = format!("{base}/event");
            if ev.name.is_none() && ev.name_field.is_none() {
                self.key_err(diag::UNKNOWN_EVENT, &eb, "an event mapping needs `name` or `name_field`".into());
                self.hint("`name: order_completed` when every record is that event");
            }
            let mut targets: Vec<(String, &str)> = Vec::new();
            if let Some(n) = &ev.name {
                targets.push((format!("{eb}/name"), n));
            }
            for (incoming, n) in &ev.names {
                targets.push((format!("{eb}/names{}", push_segment("", incoming)), n));
            }
            for (p, n) in targets {
                self.event_ref(&p, n);
            }
            if let Some(event) = ev.name.as_ref().and_then(|n| m.model.events.get(n)) {
                for prop in ev.properties.keys() {
                    if !event.properties.contains_key(prop) {
                        let known: Vec<&str> = event.properties.keys().map(String::as_str).collect();
                        let name = ev.name.as_deref().unwrap_or_default();
                        self.key_unknown(
                            diag::UNKNOWN_EVENT,
                            &format!("{eb}/properties{}", push_segment("", prop)),
                            &format!("property of `{name}`"),
                            prop,
                            &known,
                            &format!("model.events.{name}.properties"),
                        );
                    }
                }
            }
        }
        if let Some(en) = &map.entity {
            let eb = format!("{base}/entity");
            match m.model.entities.get(&en.name) {
                None if !self.g.covers("entities", &en.name) => {
                    let known: Vec<&str> = m.model.entities.keys().map(String::as_str).collect();
                    self.unknown(
                        diag::UNKNOWN_ENTITY,
                        &format!("{eb}/name"),
                        "entity",
                        &en.name,
                        known,
                        "model.entities",
                    );
                }
                None => {}
                Some(entity) => {
                    for f in en.fields.keys() {
                        if !entity.fields.contains_key(f) {
                            let known: Vec<&str> = entity.fields.keys().map(String::as_str).collect();
                            self.key_unknown(
                                diag::UNKNOWN_ENTITY,
                                &format!("{eb}/fields{}", push_segment("", f)),
                                &format!("field of `{}`", en.name),
                                f,
                                &known,
                                &format!("model.entities.{}.fields", en.name),
                            );
                        }
                    }
                }
            }
        }
    }

    /// Like `unknown`, located at a key (the reference is the key itself).
    fn key_unknown(&mut self, code: &'static str, pointer: &str, what: &str, name: &str, known: &[&str], define: &str) {
        self.key_err(code, pointer, format!("`{name}` is not a defined {what}"));
        match suggest(name, known.iter().copied()) {
            Some(s) => self.hint(format!("did you mean `{s}`?")),
            None => self.hint(format!("define it under `{define}`")),
        }
    }

    fn event_ref(&mut self, pointer: &str, name: &str) -> Option<&'a EventType> {
        let m = self.m;
        match m.model.events.get(name) {
            Some(e) => Some(e),
            None => {
                if !self.g.covers("events", name) {
                    let known: Vec<&str> = m.model.events.keys().map(String::as_str).collect();
                    self.unknown(diag::UNKNOWN_EVENT, pointer, "event", name, known, "model.events");
                }
                None
            }
        }
    }

    /// Resolves `event.property`; returns the property's type.
    fn property_ref(&mut self, pointer: &str, spec: &str) -> Option<FieldType> {
        let Some((ev, prop)) = spec.split_once('.') else {
            self.err(diag::UNKNOWN_EVENT, pointer, format!("`{spec}` must name an event property as `event.property`"));
            self.hint("e.g. `order_completed.revenue`");
            return None;
        };
        let event = self.event_ref(pointer, ev)?;
        match event.properties.get(prop) {
            Some(t) => Some(*t),
            None => {
                let known: Vec<&str> = event.properties.keys().map(String::as_str).collect();
                self.unknown(
                    diag::UNKNOWN_EVENT,
                    pointer,
                    &format!("property of `{ev}`"),
                    prop,
                    known,
                    &format!("model.events.{ev}.properties"),
                );
                None
            }
        }
    }

    fn identity(&mut self) {
        let m = self.m;
        for (name, k) in &m.identity.keys {
            let base = ptr(&["identity", "keys", name]);
            if let Some(r) = &k.default_region {
                if k.normalize != Some(Normalizer::E164) {
                    self.err(
                        diag::OUT_OF_RANGE,
                        &format!("{base}/default_region"),
                        "`default_region` only applies to `normalize: e164`".into(),
                    );
                } else if r.len() != 2 || !r.chars().all(|c| c.is_ascii_uppercase()) || unknown_region(r) {
                    self.err(
                        diag::OUT_OF_RANGE,
                        &format!("{base}/default_region"),
                        format!("`{r}` is not an ISO 3166 alpha-2 region cdp knows phone numbers of"),
                    );
                    self.hint("two capital letters, e.g. `SE`, `GB`, `US`");
                }
            }
            if k.provider_rules && k.normalize != Some(Normalizer::Email) {
                self.err(
                    diag::OUT_OF_RANGE,
                    &format!("{base}/provider_rules"),
                    "`provider_rules` only applies to `normalize: email`".into(),
                );
            }
            if let Some(p) = &k.pattern
                && let Err(e) = regex::Regex::new(p)
            {
                let msg = e.to_string().lines().last().unwrap_or("").trim().to_owned();
                self.err(diag::BAD_REGEX, &format!("{base}/pattern"), format!("invalid regular expression: {msg}"));
                self.hint("quote patterns with single quotes in YAML so backslashes stay as written");
            }
        }
        self.trait_formats();
        let mut seen = HashSet::new();
        for (i, k) in m.identity.priority.iter().enumerate() {
            let p = ptr(&["identity", "priority", &i.to_string()]);
            if !m.identity.keys.contains_key(k) && !self.g.covers("identity.keys", k) {
                let known: Vec<&str> = m.identity.keys.keys().map(String::as_str).collect();
                self.unknown(diag::BAD_PRIORITY, &p, "identity key", k, known, "identity.keys");
            } else if !seen.insert(k) {
                self.err(diag::BAD_PRIORITY, &p, format!("`{k}` appears twice in the priority order"));
            }
        }
        if let Some(mt) = &m.identity.matching {
            let base = "/identity/match";
            if !(mt.threshold > 0.0 && mt.threshold < 1.0) {
                self.err(
                    diag::BAD_MATCH,
                    &format!("{base}/threshold"),
                    format!("threshold {} is not a probability strictly between 0 and 1", mt.threshold),
                );
                self.hint("typical values are 0.9 to 0.99");
            }
            for (k, at) in &mt.cross_limits {
                let p = format!("{base}/cross_limits{}", push_segment("", k));
                match m.identity.keys.get(k) {
                    None if !self.g.covers("identity.keys", k) => {
                        let known: Vec<&str> = m.identity.keys.keys().map(String::as_str).collect();
                        self.key_unknown(diag::UNKNOWN_IDENTITY, &p, "identity key", k, &known, "identity.keys");
                    }
                    Some(key) if key.limit.is_none() => {
                        self.warn(diag::BAD_MATCH, &p, format!("`{k}` has no `limit`, so there is nothing to cross"));
                    }
                    _ => {}
                }
                if !(*at > 0.0 && *at <= 1.0) {
                    self.err(diag::BAD_MATCH, &p, format!("{at} is not a probability between 0 and 1"));
                } else if *at < mt.threshold {
                    self.warn(
                        diag::BAD_MATCH,
                        &p,
                        format!(
                            "{at} is below the match threshold {}: every match crosses `{k}`'s limit",
                            mt.threshold
                        ),
                    );
                    self.hint("crossing a limit should take stronger evidence than linking: a probability above the threshold, e.g. 0.995");
                }
            }
            if mt.block_on.is_empty() {
                self.key_err(diag::BAD_MATCH, &format!("{base}/block_on"), "`block_on` needs at least one rule".into());
                self.hint("comparing every pair of profiles does not scale; block on e.g. `[last_name, postcode]`");
            }
            for (i, rule) in mt.block_on.iter().enumerate() {
                if rule.is_empty() {
                    self.err(
                        diag::BAD_MATCH,
                        &format!("{base}/block_on/{i}"),
                        "an empty blocking rule matches every pair".into(),
                    );
                }
                for (j, f) in rule.iter().enumerate() {
                    self.trait_ref(&format!("{base}/block_on/{i}/{j}"), f);
                }
            }
            for (f, cmp) in &mt.compare {
                let p = format!("{base}/compare{}", push_segment("", f));
                if !m.model.traits.contains_key(f) && !self.g.covers("traits", f) {
                    let known: Vec<&str> = m.model.traits.keys().map(String::as_str).collect();
                    self.key_unknown(diag::UNKNOWN_TRAIT, &p, "trait", f, &known, "model.traits");
                }
                if let Comparison::Detailed(o) = cmp {
                    if let Some(w) = &o.swap_with
                        && (w == f || !mt.compare.contains_key(w))
                    {
                        self.err(
                            diag::BAD_MATCH,
                            &format!("{p}/swap_with"),
                            format!("`swap_with: {w}` must name another trait under `compare`"),
                        );
                        self.hint("e.g. `first_name: { method: jaro_winkler, swap_with: last_name }`");
                    }
                    for (key, v) in [("m", o.m), ("u", o.u)] {
                        if let Some(v) = v
                            && !(v > 0.0 && v < 1.0)
                        {
                            self.err(
                                diag::BAD_MATCH,
                                &format!("{p}/{key}"),
                                format!("{key} = {v} is not a probability strictly between 0 and 1"),
                            );
                        }
                    }
                    if let (Some(mm), Some(u)) = (o.m, o.u)
                        && mm <= u
                    {
                        self.err(diag::BAD_MATCH, &format!("{p}/m"), format!("m ({mm}) must be larger than u ({u})"));
                        self.hint("agreement on a field must be likelier among true matches than among non-matches");
                    }
                    if let Some(t) = &o.tolerance {
                        let tp = format!("{p}/tolerance");
                        match (o.method, t) {
                            (CompareMethod::Date, serde_json::Value::String(s)) => self.duration(&tp, s),
                            (CompareMethod::Numeric, serde_json::Value::Number(n))
                                if n.as_f64().is_some_and(|x| x >= 0.0) => {}
                            (CompareMethod::Date | CompareMethod::Numeric, _) => {
                                self.err(
                                    diag::BAD_MATCH,
                                    &tp,
                                    "tolerance must be a duration for `date` and a non-negative number for `numeric`"
                                        .into(),
                                );
                            }
                            _ => {
                                self.err(
                                    diag::BAD_MATCH,
                                    &tp,
                                    "only `date` and `numeric` comparisons take a tolerance".into(),
                                );
                            }
                        }
                    }
                }
            }
            if mt.compare.is_empty() {
                self.key_err(diag::BAD_MATCH, &format!("{base}/compare"), "`compare` needs at least one trait".into());
            }
            // A probabilistic link joins one identifier of each profile; with one
            // key, unique, two profiles' identifiers never fit one profile.
            if let [(key, k)] = m.identity.keys.iter().collect::<Vec<_>>()[..]
                && k.limit == Some(1)
                && !mt.cross_limits.contains_key(key)
            {
                self.warn(
                    diag::BAD_MATCH,
                    base,
                    format!(
                        "`{key}` is the only identity key and has `limit: 1`, so no probabilistic link can ever merge two profiles"
                    ),
                );
                self.hint(format!(
                    "let strong matches cross the limit (`cross_limits: {{ {key}: 0.995 }}`), raise it, or add the keys \
                     matched records carry (email, phone, …)"
                ));
            }
        }
    }

    /// Trait `format`s (read before matching compares dates) must be chrono
    /// formats on date or timestamp traits.
    fn trait_formats(&mut self) {
        for (name, t) in &self.m.model.traits {
            let Some(f) = &t.format else { continue };
            let p = format!("{}/format", ptr(&["model", "traits", name]));
            if !matches!(t.kind, TraitType::Date | TraitType::Timestamp) {
                self.err(diag::OUT_OF_RANGE, &p, "`format` only applies to `date` and `timestamp` traits".into());
            } else if f.is_empty()
                || chrono::format::StrftimeItems::new(f).any(|i| matches!(i, chrono::format::Item::Error))
            {
                self.err(diag::OUT_OF_RANGE, &p, format!("`{f}` is not a strftime format"));
                self.hint("e.g. `%Y%m%d` for 19921119, `%d/%m/%Y` for 19/11/1992");
            }
        }
    }

    fn trait_ref(&mut self, pointer: &str, name: &str) {
        if !self.m.model.traits.contains_key(name) && !self.g.covers("traits", name) {
            let known: Vec<&str> = self.m.model.traits.keys().map(String::as_str).collect();
            self.unknown(diag::UNKNOWN_TRAIT, pointer, "trait", name, known, "model.traits");
        }
    }

    fn source_ref(&mut self, pointer: &str, name: &str) {
        if !self.m.sources.contains_key(name) && !self.g.covers("sources", name) {
            let known: Vec<&str> = self.m.sources.keys().map(String::as_str).collect();
            self.unknown(diag::UNKNOWN_SOURCE, pointer, "source", name, known, "sources");
        }
    }

    fn model(&mut self) {
        let m = self.m;
        for (name, t) in &m.model.traits {
            let base = ptr(&["model", "traits", name]);
            if !t.allowed.is_empty() && t.kind != TraitType::String {
                self.key_err(
                    diag::BAD_ENUM,
                    &format!("{base}/enum"),
                    format!(
                        "`enum` needs `type: string`, but `{name}` is {}",
                        a(&format!("{:?}", t.kind).to_lowercase())
                    ),
                );
            }
            match &t.merge {
                Some(MergePolicy::Simple(p)) => {
                    let fits = match p {
                        SimpleMerge::Sum => matches!(t.kind, TraitType::Number | TraitType::Integer),
                        SimpleMerge::Max | SimpleMerge::Min => !matches!(t.kind, TraitType::Boolean | TraitType::List),
                        _ => true,
                    };
                    if !fits {
                        self.err(
                            diag::BAD_MERGE,
                            &format!("{base}/merge"),
                            format!(
                                "`{}` cannot merge {} trait",
                                format!("{p:?}").to_lowercase(),
                                a(&format!("{:?}", t.kind).to_lowercase())
                            ),
                        );
                        self.hint("`sum` needs a number; `max`/`min` need an ordered type; `latest` fits all");
                    }
                }
                Some(MergePolicy::Priority(sp)) => {
                    for (i, s) in sp.source_priority.iter().enumerate() {
                        self.source_ref(&format!("{base}/merge/source_priority/{i}"), s);
                    }
                }
                None => {}
            }
        }
        for (name, e) in &m.model.entities {
            let base = ptr(&["model", "entities", name]);
            if !e.fields.contains_key(&e.key) {
                self.err(
                    diag::UNKNOWN_ENTITY,
                    &format!("{base}/key"),
                    format!("key `{}` is not a field of `{name}`", e.key),
                );
                self.hint("add it under `fields`");
            }
            for (rel, r) in &e.relations {
                let rp = format!("{base}/relations{}", push_segment("", rel));
                if !e.fields.contains_key(&r.field) {
                    self.err(
                        diag::BAD_RELATION,
                        &format!("{rp}/field"),
                        format!("`{}` is not a field of `{name}`", r.field),
                    );
                }
                match m.model.entities.get(&r.entity) {
                    None if !self.g.covers("entities", &r.entity) => {
                        let known: Vec<&str> = m.model.entities.keys().map(String::as_str).collect();
                        self.unknown(
                            diag::UNKNOWN_ENTITY,
                            &format!("{rp}/entity"),
                            "entity",
                            &r.entity,
                            known,
                            "model.entities",
                        );
                    }
                    Some(target) => {
                        let key_type = target.fields.get(&target.key);
                        let field_type = e.fields.get(&r.field);
                        if let (Some(a), Some(b)) = (key_type, field_type)
                            && a != b
                        {
                            self.err(
                                diag::BAD_RELATION,
                                &format!("{rp}/field"),
                                format!("`{}` is a {b:?} but `{}.{}` is a {a:?}", r.field, r.entity, target.key)
                                    .to_lowercase(),
                            );
                        }
                    }
                    None => {}
                }
            }
        }
        for (name, c) in &m.model.computed {
            let base = ptr(&["model", "computed", name]);
            let aggs = c.aggregates();
            if aggs.len() != 1 {
                let set: Vec<&str> = aggs.iter().map(|(k, _)| k.as_str()).collect();
                let msg = if set.is_empty() {
                    format!("computed trait `{name}` has no aggregate")
                } else {
                    format!("computed trait `{name}` sets {} aggregates: {}", set.len(), set.join(", "))
                };
                self.key_err(diag::AGGREGATE, &base, msg);
                self.hint("set exactly one of count, sum, avg, min, max, first, last, distinct, last_seen");
            }
            let mut event_name = None;
            for (agg, spec) in &aggs {
                let p = format!("{base}/{}", agg.as_str());
                if agg.of_events() {
                    if self.event_ref(&p, spec).is_some() {
                        event_name = Some(spec.as_str());
                    }
                } else if let Some(t) = self.property_ref(&p, spec) {
                    event_name = spec.split_once('.').map(|(e, _)| e);
                    if matches!(*agg, Aggregate::Sum | Aggregate::Avg)
                        && !matches!(t, FieldType::Number | FieldType::Integer)
                    {
                        self.err(
                            diag::AGGREGATE,
                            &p,
                            format!("`{}` needs a numeric property; `{spec}` is a {t:?}", agg.as_str()).to_lowercase(),
                        );
                    }
                }
            }
            if let Some(w) = &c.within {
                self.duration(&format!("{base}/within"), w);
            }
            if let (Some(filter), Some(ev)) = (&c.filter, event_name.and_then(|e| m.model.events.get(e))) {
                let mut scope = Scope::new();
                for (p, t) in &ev.properties {
                    scope.var(p.clone(), field_type(*t));
                }
                self.expression(&format!("{base}/where"), filter, &scope);
            }
        }
        for (name, p) in &m.model.predicted {
            let base = ptr(&["model", "predicted", name]);
            self.duration(&format!("{base}/horizon"), &p.horizon);
            let ev = self.event_ref(&format!("{base}/event"), &p.event);
            match (&p.value, p.model) {
                (None, PredictModel::Clv) => {
                    self.key_err(
                        diag::BAD_PREDICTED,
                        &base,
                        "`model: clv` needs `value`: the property holding the amount".into(),
                    );
                    self.hint("e.g. `value: revenue`");
                }
                (Some(v), _) => {
                    if let Some(ev) = ev {
                        match ev.properties.get(v) {
                            Some(FieldType::Number | FieldType::Integer) => {}
                            Some(t) => {
                                self.err(
                                    diag::BAD_PREDICTED,
                                    &format!("{base}/value"),
                                    format!("`{v}` is a {t:?}, not a number").to_lowercase(),
                                );
                            }
                            None => {
                                let known: Vec<&str> = ev.properties.keys().map(String::as_str).collect();
                                let msg = format!("property of `{}`", p.event);
                                self.unknown(
                                    diag::UNKNOWN_EVENT,
                                    &format!("{base}/value"),
                                    &msg,
                                    v,
                                    known,
                                    &format!("model.events.{}.properties", p.event),
                                );
                            }
                        }
                    }
                }
                (None, _) => {}
            }
        }
    }

    fn consent(&mut self) {
        let m = self.m;
        if let Some(e) = &m.consent.expiry {
            self.duration("/consent/expiry", e);
        }
        let labels = self.labels();
        for (i, pol) in m.consent.policies.iter().enumerate() {
            let base = format!("/consent/policies/{i}");
            if pol.deny_labels.is_empty() {
                self.err(
                    diag::LABEL_DENIED,
                    &format!("{base}/deny_labels"),
                    "a policy needs at least one label to deny".into(),
                );
            }
            for (j, l) in pol.deny_labels.iter().enumerate() {
                if !labels.contains(l.as_str()) {
                    self.warn(
                        diag::UNUSED,
                        &format!("{base}/deny_labels/{j}"),
                        format!("no trait, event or entity carries the label `{l}`"),
                    );
                    let known: Vec<&str> = labels.iter().copied().collect();
                    if let Some(s) = suggest(l, known) {
                        self.hint(format!("did you mean `{s}`?"));
                    } else {
                        self.hint("label fields with `labels: [...]` in `model`");
                    }
                }
            }
            for (j, p) in pol.purposes.iter().enumerate() {
                self.purpose_ref(&format!("{base}/for/{j}"), p);
            }
        }
    }

    fn labels(&self) -> HashSet<&'a str> {
        let m = self.m;
        let mut out: HashSet<&str> =
            m.model.traits.values().flat_map(|t| t.labels.iter().map(String::as_str)).collect();
        out.extend(m.model.events.values().flat_map(|e| e.labels.iter().map(String::as_str)));
        out.extend(m.model.entities.values().flat_map(|e| e.labels.iter().map(String::as_str)));
        out.insert("pii");
        out
    }

    fn purpose_ref(&mut self, pointer: &str, p: &str) {
        if !self.m.consent.purposes.iter().any(|x| x == p) && !self.g.covers("consent", p) {
            let known: Vec<&str> = self.m.consent.purposes.iter().map(String::as_str).collect();
            self.unknown(diag::UNKNOWN_PURPOSE, pointer, "consent purpose", p, known, "consent.purposes");
        }
    }

    fn profile_scope(&self) -> Scope {
        audience_scope(self.m)
    }

    fn expression(&mut self, pointer: &str, src: &str, scope: &Scope) {
        if let Err(e) = audience::compile(src, scope) {
            let code = match e.kind {
                CheckErrorKind::Syntax => diag::EXPR_SYNTAX,
                CheckErrorKind::Unknown => diag::EXPR_UNKNOWN,
                CheckErrorKind::Type => diag::EXPR_TYPE,
            };
            let loc = self.spans.inside(pointer, e.offset);
            self.at(code, pointer, loc, e.message);
            if let Some(h) = e.hint {
                self.hint(h);
            }
        }
    }

    /// An audience rule that type-checks but cannot mean what it says: a
    /// string no `enum` trait can hold; a predicted trait (not computed yet,
    /// so the rule never sees a value).
    fn rule_lints(&mut self, pointer: &str, rule: &str) {
        let Ok(ast) = audience::expr::parse(rule) else { return };
        let m = self.m;
        let allowed = |n: &str| m.model.traits.get(n).map(|t| t.allowed.as_slice());
        for miss in super::lint::enum_misses(&ast, &allowed) {
            let loc = self.spans.inside(pointer, miss.offset);
            let allowed = allowed(&miss.name).unwrap_or_default().join(", ");
            self.at(
                diag::NOT_ALLOWED,
                pointer,
                loc,
                format!(
                    "`{}` is not one of the values of `{}`, so this comparison is never true",
                    miss.value, miss.name
                ),
            );
            match suggest(&miss.value, allowed.split(", ")) {
                Some(s) => self.hint(format!("did you mean `{s}`? allowed: {allowed}")),
                None => self.hint(format!("allowed: {allowed}")),
            }
        }
        for (offset, name) in super::lint::names(&ast) {
            if m.model.predicted.contains_key(name) {
                let loc = self.spans.inside(pointer, offset);
                self.out.push(
                    Diagnostic::warning(
                        diag::NOT_COMPUTED,
                        display_path(pointer),
                        format!("predicted trait `{name}` is not computed yet, so it is always null here"),
                    )
                    .at(loc)
                    .hint("until predictions are computed, the rule is false for everyone through this trait"),
                );
            }
        }
    }

    fn audiences(&mut self) {
        let m = self.m;
        let scope = self.profile_scope();
        for (name, a) in &m.audiences {
            let base = ptr(&["audiences", name]);
            self.expression(&format!("{base}/where"), &a.rule, &scope);
            self.rule_lints(&format!("{base}/where"), &a.rule);
            if let Some(r) = &a.refresh {
                self.cron(&format!("{base}/refresh"), r);
            }
        }
        // Audiences may refer to each other (`audiences.vip`), but not in a cycle.
        let deps: IndexMap<&str, Vec<&str>> = m
            .audiences
            .iter()
            .map(|(n, a)| {
                let refs = m
                    .audiences
                    .keys()
                    .filter(|o| mentions(&a.rule, &format!("audiences.{o}")))
                    .map(String::as_str)
                    .collect();
                (n.as_str(), refs)
            })
            .collect();
        let mut reported = HashSet::new();
        for start in deps.keys() {
            if let Some(cycle) = find_cycle(start, &deps)
                && reported.insert(cycle.iter().min().copied().unwrap_or_default())
            {
                let p = ptr(&["audiences", start, "where"]);
                self.err(
                    diag::AUDIENCE_CYCLE,
                    &p,
                    format!("audiences refer to each other in a cycle: {}", cycle.join(" → ")),
                );
                self.hint("break the cycle by writing one rule out in full");
            }
        }
    }

    fn field_ref(&mut self, pointer: &str, name: &str) -> Option<FieldKind> {
        let m = self.m;
        if m.model.traits.contains_key(name) || self.g.covers("traits", name) {
            Some(FieldKind::Trait)
        } else if m.model.computed.contains_key(name) {
            Some(FieldKind::Computed)
        } else if m.model.predicted.contains_key(name) {
            Some(FieldKind::Predicted)
        } else if m.identity.keys.contains_key(name) || self.g.covers("identity.keys", name) {
            Some(FieldKind::Identity)
        } else {
            let known: Vec<&str> = m
                .model
                .traits
                .keys()
                .chain(m.model.computed.keys())
                .chain(m.model.predicted.keys())
                .chain(m.identity.keys.keys())
                .map(String::as_str)
                .collect();
            self.unknown(diag::UNKNOWN_TRAIT, pointer, "trait or identity key", name, known, "model.traits");
            None
        }
    }

    fn retention(&mut self) {
        let m = self.m;
        let Some(r) = &m.retention else { return };
        if let Some(d) = &r.records {
            self.duration("/retention/records", d);
        }
        for (name, d) in &r.sources {
            let p = ptr(&["retention", "sources", name]);
            if !m.sources.contains_key(name) && !self.g.covers("sources", name) {
                let known: Vec<&str> = m.sources.keys().map(String::as_str).collect();
                self.unknown(diag::UNKNOWN_SOURCE, &p, "source", name, known, "sources");
            }
            self.duration(&p, d);
        }
        for (name, d) in &r.events {
            let p = ptr(&["retention", "events", name]);
            if !m.model.events.contains_key(name) {
                let known: Vec<&str> = m.model.events.keys().map(String::as_str).collect();
                self.unknown(diag::UNKNOWN_EVENT, &p, "event", name, known, "model.events");
            }
            self.duration(&p, d);
        }
        if let Some(s) = &r.schedule {
            self.cron("/retention/schedule", s);
        }
    }

    fn destinations(&mut self) {
        let m = self.m;
        for (name, d) in &m.destinations {
            let base = ptr(&["destinations", name]);
            self.plugin_ref(&format!("{base}/plugin"), &d.plugin);
            if let Some(a) = &d.audience
                && !m.audiences.contains_key(a)
                && !self.g.covers("audiences", a)
            {
                let known: Vec<&str> = m.audiences.keys().map(String::as_str).collect();
                self.unknown(diag::UNKNOWN_AUDIENCE, &format!("{base}/audience"), "audience", a, known, "audiences");
            }
            self.purpose_ref(&format!("{base}/purpose"), &d.purpose);
            if d.audience.is_none() && matches!(d.sync, Some(SyncMode::Membership | SyncMode::Mirror)) {
                self.err(diag::BAD_SYNC, &format!("{base}/sync"), "membership sync needs an `audience`".into());
                self.hint("add `audience: NAME`, or use `sync: upsert` to send every profile");
            }
            let mut kinds = HashMap::new();
            let mut seen = HashSet::new();
            for (i, f) in d.fields.iter().enumerate() {
                let p = format!("{base}/fields/{i}");
                if !seen.insert(f.as_str()) {
                    self.err(diag::DUPLICATE_NAME, &p, format!("field `{f}` is listed twice"));
                    continue;
                }
                if let Some(k) = self.field_ref(&p, f) {
                    kinds.insert(f.as_str(), (k, p));
                }
            }
            for (i, h) in d.hash.iter().enumerate() {
                if !d.fields.contains(h) {
                    self.err(
                        diag::UNKNOWN_TRAIT,
                        &format!("{base}/hash/{i}"),
                        format!("`{h}` is hashed but not sent: it is not in `fields`"),
                    );
                    self.hint(format!("add `{h}` to `fields`"));
                }
            }
            // Label flows: a field whose labels a policy denies for this
            // purpose (the rule activation applies to each delivery).
            for (f, (_, p)) in &kinds {
                let hashed = d.hash.iter().any(|h| h == f);
                let crate::consent::FieldUse::Deny { label, policy } =
                    crate::consent::field_use(m, &d.purpose, f, hashed)
                else {
                    continue;
                };
                let policy_line = self.spans.value(&format!("/consent/policies/{policy}")).line;
                self.err(
                    diag::LABEL_DENIED,
                    p,
                    format!(
                        "field `{f}` is labelled `{label}`, which the policy on line {policy_line} denies for purpose `{}`",
                        d.purpose
                    ),
                );
                if m.consent.policies[policy].unless == Some(PolicyException::Hashed) {
                    self.hint(format!("send it hashed: add `hash: [{f}]`, or remove it from `fields`"));
                } else {
                    self.hint("remove the field, or send to a destination with another purpose");
                }
            }
            if let Some(b) = &d.batch
                && let Some(w) = &b.max_wait
            {
                self.duration(&format!("{base}/batch/max_wait"), w);
            }
            if let Some(r) = &d.rate_limit
                && let Err(e) = parse_rate(r)
            {
                self.err(diag::BAD_RATE, &format!("{base}/rate_limit"), e);
                self.hint("write COUNT/UNIT: `20/s`, `1000/m`, `50000/h`");
            }
            if let Some(r) = &d.retry {
                for (k, v) in [("initial_backoff", &r.initial_backoff), ("max_backoff", &r.max_backoff)] {
                    if let Some(v) = v {
                        self.duration(&format!("{base}/retry/{k}"), v);
                    }
                }
                if let (Some(a), Some(b)) = (&r.initial_backoff, &r.max_backoff)
                    && let (Ok(a), Ok(b)) = (parse_duration(a), parse_duration(b))
                    && a > b
                {
                    self.err(
                        diag::BAD_DURATION,
                        &format!("{base}/retry/max_backoff"),
                        "`max_backoff` is shorter than `initial_backoff`".into(),
                    );
                }
            }
            self.sandbox(&base, &d.allow_hosts, &d.mount);
        }
    }
}

/// `a` or `an` before a type name.
fn a(word: &str) -> String {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) { format!("an {word}") } else { format!("a {word}") }
}

/// The names audience rules may use, with their types: traits, computed and
/// predicted traits, `consent.*`, `audiences.*` and `identities.*`.
pub fn audience_scope(m: &Manifest) -> Scope {
    let mut s = Scope::new();
    s.namespace("consent", "consent purpose")
        .namespace("audiences", "audience")
        .namespace("identities", "identity key");
    for (n, t) in &m.model.traits {
        s.var(n.clone(), trait_type(t.kind));
    }
    for (n, c) in &m.model.computed {
        s.var(n.clone(), computed_type(m, c));
    }
    for n in m.model.predicted.keys() {
        s.var(n.clone(), Type::Number);
    }
    for p in &m.consent.purposes {
        s.var(format!("consent.{p}"), Type::Bool);
    }
    for a in m.audiences.keys() {
        s.var(format!("audiences.{a}"), Type::Bool);
    }
    for k in m.identity.keys.keys() {
        s.var(format!("identities.{k}"), Type::List(Box::new(Type::String)));
    }
    s
}

/// The type a computed trait yields.
pub fn computed_type(m: &Manifest, c: &Computed) -> Type {
    let prop = |spec: &Option<String>| {
        let (ev, p) = spec.as_deref()?.split_once('.')?;
        m.model.events.get(ev)?.properties.get(p).copied()
    };
    if c.count.is_some() || c.distinct.is_some() {
        Type::Int
    } else if c.last_seen.is_some() {
        Type::Timestamp
    } else if c.avg.is_some() {
        Type::Number
    } else if c.sum.is_some() {
        match prop(&c.sum) {
            Some(FieldType::Integer) => Type::Int,
            _ => Type::Number,
        }
    } else {
        let spec = [&c.min, &c.max, &c.first, &c.last].into_iter().find(|s| s.is_some()).cloned().flatten();
        prop(&spec).map_or(Type::Number, field_type)
    }
}

fn trait_type(t: TraitType) -> Type {
    match t {
        TraitType::String => Type::String,
        TraitType::Number => Type::Number,
        TraitType::Integer => Type::Int,
        TraitType::Boolean => Type::Bool,
        TraitType::Date => Type::Date,
        TraitType::Timestamp => Type::Timestamp,
        TraitType::List => Type::List(Box::new(Type::String)),
    }
}

/// The expression type of an event property or entity field type.
pub fn field_type(t: FieldType) -> Type {
    match t {
        FieldType::String => Type::String,
        FieldType::Number => Type::Number,
        FieldType::Integer => Type::Int,
        FieldType::Boolean => Type::Bool,
        FieldType::Date => Type::Date,
        FieldType::Timestamp => Type::Timestamp,
    }
}

/// Whether `rule` mentions `name` as a whole dotted name.
fn mentions(rule: &str, name: &str) -> bool {
    rule.match_indices(name).any(|(i, _)| {
        let after = rule[i + name.len()..].chars().next();
        let before = rule[..i].chars().next_back();
        !after.is_some_and(|c| c.is_alphanumeric() || c == '_')
            && !before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '.')
    })
}

fn find_cycle<'s>(start: &'s str, deps: &IndexMap<&'s str, Vec<&'s str>>) -> Option<Vec<&'s str>> {
    fn dfs<'s>(
        n: &'s str,
        start: &'s str,
        deps: &IndexMap<&'s str, Vec<&'s str>>,
        path: &mut Vec<&'s str>,
        seen: &mut HashSet<&'s str>,
    ) -> bool {
        for &next in deps.get(n).map(Vec::as_slice).unwrap_or_default() {
            if next == start {
                path.push(next);
                return true;
            }
            if seen.insert(next) {
                path.push(next);
                if dfs(next, start, deps, path, seen) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    let mut path = vec![start];
    let mut seen = HashSet::new();
    dfs(start, start, deps, &mut path, &mut seen).then_some(path)
}

/// Whether phone normalisation refuses `region` (asked of the normaliser
/// itself, so validation accepts exactly the regions ingest can use).
fn unknown_region(region: &str) -> bool {
    !crate::identity::normalize::known_region(region)
}

/// A number outside its cron field's range, named with the range (the cron
/// parser's own messages are off by one: "must be less than 59").
fn cron_range(value: &str) -> Option<String> {
    const FIELDS: &[(&str, u32, u32)] =
        &[("second", 0, 59), ("minute", 0, 59), ("hour", 0, 23), ("day-of-month", 1, 31), ("month", 1, 12)];
    let fields: Vec<&str> = value.split_whitespace().collect();
    if fields.len() != 6 && fields.len() != 7 {
        return None;
    }
    for ((name, lo, hi), field) in FIELDS.iter().zip(&fields) {
        for part in field.split(',') {
            let range = part.split('/').next().unwrap_or(part);
            for n in range.split('-').filter_map(|x| x.parse::<u32>().ok()) {
                if n < *lo || n > *hi {
                    return Some(format!("the {name} field has {n}; it runs from {lo} to {hi}"));
                }
            }
        }
    }
    None
}

fn valid_listen(s: &str) -> bool {
    if s.parse::<std::net::SocketAddr>().is_ok() {
        return true;
    }
    match s.rsplit_once(':') {
        Some((host, port)) => {
            port.parse::<u16>().is_ok()
                && !host.is_empty()
                && host.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
        }
        None => false,
    }
}

/// `host`, `host:port`, `*.domain`, or an IP literal.
fn check_host(h: &str) -> Result<(), String> {
    if h.contains("://") {
        return Err("remove the scheme".into());
    }
    if h.contains('/') {
        return Err("remove the path".into());
    }
    let (host, port) = match h.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') || host.ends_with(']') => (host, Some(port)),
        _ => (h, None),
    };
    if let Some(p) = port
        && p.parse::<u16>().is_err()
    {
        return Err(format!("`{p}` is not a port"));
    }
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.parse::<std::net::IpAddr>().is_ok() {
        return Ok(());
    }
    let name = host.strip_prefix("*.").unwrap_or(host);
    if name == "*" {
        return Err("`*` would allow every host; list the hosts".into());
    }
    let ok = !name.is_empty()
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !l.starts_with('-')
        });
    if ok { Ok(()) } else { Err("not a valid host name".into()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_patterns() {
        assert!(check_host("hooks.example.com").is_ok());
        assert!(check_host("*.example.com").is_ok());
        assert!(check_host("127.0.0.1:8080").is_ok());
        assert!(check_host("[::1]:80").is_ok());
        assert!(check_host("https://x.com").is_err());
        assert!(check_host("*").is_err());
        assert!(check_host("x.com/path").is_err());
        assert!(check_host("bad_host.com").is_err());
    }

    #[test]
    fn mentions_whole_names() {
        assert!(mentions("audiences.vip && x", "audiences.vip"));
        assert!(!mentions("audiences.vip_plus", "audiences.vip"));
    }

    #[test]
    fn listen_addresses() {
        assert!(valid_listen("127.0.0.1:8080"));
        assert!(valid_listen("localhost:80"));
        assert!(!valid_listen("8080"));
        assert!(!valid_listen("host:99999"));
    }
}
