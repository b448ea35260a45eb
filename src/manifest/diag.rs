//! Diagnostics: what `cdp validate` reports. Every problem found while loading a
//! manifest becomes one [`Diagnostic`] with a stable code from [`CODES`], the key
//! path it concerns, its line and column, and a hint saying how to fix it.
//! The CLI renders them (human, JSON, GitHub annotations: `cli::render`).

use serde::Serialize;

/// How bad a diagnostic is. Warnings never make a manifest invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

/// A position in the manifest file: 1-based line and column (in characters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Loc {
    pub line: usize,
    pub column: usize,
}

/// One problem found in a manifest.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Diagnostic {
    pub severity: Severity,
    /// Stable code, `CDP0xx`; see [`CODES`].
    pub code: &'static str,
    pub message: String,
    /// Dotted key path, e.g. `destinations.vip_webhook.audience`; empty for the whole file.
    pub path: String,
    pub line: usize,
    pub column: usize,
    pub hint: Option<String>,
}

impl Diagnostic {
    pub fn error(code: &'static str, path: impl Into<String>, message: impl Into<String>) -> Self {
        Diagnostic {
            severity: Severity::Error,
            code,
            message: message.into(),
            path: path.into(),
            line: 0,
            column: 0,
            hint: None,
        }
    }

    pub fn warning(code: &'static str, path: impl Into<String>, message: impl Into<String>) -> Self {
        Diagnostic { severity: Severity::Warning, ..Self::error(code, path, message) }
    }

    pub fn at(mut self, loc: Loc) -> Self {
        self.line = loc.line;
        self.column = loc.column;
        self
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

/// A code and what it means; the README's table of codes is this registry.
pub struct CodeInfo {
    pub code: &'static str,
    pub title: &'static str,
}

macro_rules! codes {
    ($($name:ident = $code:literal : $title:literal;)*) => {
        $(pub const $name: &str = $code;)*
        /// Every diagnostic code cdp emits, in order.
        pub const CODES: &[CodeInfo] = &[$(CodeInfo { code: $code, title: $title },)*];
    };
}

codes! {
    READ = "CDP001": "the manifest file cannot be read";
    TOO_LARGE = "CDP002": "the manifest is larger than the size limit";
    NOT_UTF8 = "CDP003": "the manifest is not valid UTF-8";
    SYNTAX = "CDP004": "YAML syntax error";
    EMPTY = "CDP005": "the manifest is empty";
    TOO_DEEP = "CDP006": "nesting deeper than the limit";
    TOO_MANY_NODES = "CDP007": "too many values (alias expansion or size)";
    DUPLICATE_KEY = "CDP008": "the same key appears twice in one mapping";
    MULTI_DOC = "CDP009": "more than one YAML document in the file";
    UNSUPPORTED_YAML = "CDP010": "unsupported YAML feature (tag, complex key, merge key of the wrong shape)";
    NOT_A_MAPPING = "CDP011": "the document is not a mapping";
    UNKNOWN_KEY = "CDP020": "unknown key";
    WRONG_TYPE = "CDP021": "value has the wrong type";
    MISSING_KEY = "CDP022": "a required key is missing";
    NOT_ALLOWED = "CDP023": "value is not one of the allowed values";
    OUT_OF_RANGE = "CDP024": "value is out of range or malformed";
    VERSION = "CDP025": "unsupported manifest version";
    BAD_NAME = "CDP030": "invalid name";
    DUPLICATE_NAME = "CDP031": "a name is defined twice";
    UNKNOWN_PLUGIN = "CDP032": "reference to an undefined plugin";
    UNKNOWN_AUDIENCE = "CDP033": "reference to an undefined audience";
    UNKNOWN_PURPOSE = "CDP034": "reference to an undefined consent purpose";
    UNKNOWN_TRAIT = "CDP035": "reference to an undefined trait or field";
    UNKNOWN_IDENTITY = "CDP036": "reference to an undefined identity key";
    UNKNOWN_EVENT = "CDP037": "reference to an undefined event or event property";
    UNKNOWN_SOURCE = "CDP038": "reference to an undefined source";
    UNKNOWN_ENTITY = "CDP039": "reference to an undefined entity or entity field";
    EXPR_SYNTAX = "CDP040": "audience expression syntax error";
    EXPR_TYPE = "CDP041": "audience expression type error";
    EXPR_UNKNOWN = "CDP042": "audience expression names something undefined";
    BAD_CRON = "CDP043": "invalid cron schedule";
    BAD_DURATION = "CDP044": "invalid duration";
    BAD_RATE = "CDP045": "invalid rate";
    PLUGIN_MISSING = "CDP046": "plugin file not found";
    PLUGIN_DIGEST = "CDP047": "plugin file does not match its sha256";
    LABEL_DENIED = "CDP048": "a consent policy denies a field for this destination's purpose";
    ENV_MISSING = "CDP049": "environment variable is not set";
    ENV_SYNTAX = "CDP050": "malformed ${env:…} reference";
    SOURCE_KIND = "CDP051": "a source needs exactly one of `collector` or `plugin`";
    AGGREGATE = "CDP052": "a computed trait needs exactly one aggregate";
    BAD_REGEX = "CDP053": "invalid regular expression";
    BAD_ENUM = "CDP054": "`enum` on a trait that is not a string";
    BAD_STORAGE = "CDP055": "unsupported storage URL";
    BAD_ADDRESS = "CDP056": "invalid listen address";
    BAD_MATCH = "CDP057": "invalid probabilistic match settings";
    BAD_HOST = "CDP058": "invalid allow_hosts entry";
    BAD_MOUNT = "CDP059": "invalid mount";
    AUDIENCE_CYCLE = "CDP060": "audiences refer to each other in a cycle";
    PLAIN_SECRET = "CDP061": "a secret is written in plain text";
    UNUSED = "CDP062": "defined but never used";
    BAD_SYNC = "CDP063": "destination sync mode does not fit its target";
    BAD_PRIORITY = "CDP064": "invalid identity priority";
    BAD_RELATION = "CDP065": "invalid entity relation";
    BAD_PREDICTED = "CDP066": "invalid predicted trait";
    BAD_MERGE = "CDP067": "merge policy does not fit the trait type";
    UNPINNED = "CDP068": "plugin is not pinned by sha256";
    PLUGIN_LOAD = "CDP069": "plugin cannot be loaded";
    PLUGIN_KIND = "CDP070": "plugin used as the wrong kind of connector";
    PLUGIN_CONFIG = "CDP071": "config does not match the plugin's config schema";
    PLUGIN_CHECK = "CDP072": "the plugin refused its config";
    YAML11_BOOLEAN = "CDP073": "an unquoted word YAML 1.1 reads as a boolean (`yes`, `no`, `on`, `off`, …)";
    NOT_COMPUTED = "CDP074": "a rule reads a predicted trait, which is not computed yet";
    UNRESOLVED = "CDP075": "a setting passed its checks but cannot be resolved";
}

/// Looks up the title of a code.
pub fn title(code: &str) -> Option<&'static str> {
    CODES.iter().find(|c| c.code == code).map(|c| c.title)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_ordered() {
        for pair in CODES.windows(2) {
            assert!(pair[0].code < pair[1].code, "{} then {}", pair[0].code, pair[1].code);
        }
    }
}
