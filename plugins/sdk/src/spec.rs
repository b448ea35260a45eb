//! What a plugin tells the host about itself.

use serde_json::{Value, json};

/// The connector protocol version this SDK speaks (the WIT package version).
pub const PROTOCOL_VERSION: &str = "0.1.0";

/// Capability names a [`Spec`] may list.
pub mod capability {
    /// The plugin makes outbound HTTP calls (needs `allow_hosts`).
    pub const HTTP: &str = "http";
    /// The plugin reads or writes files inside a mount.
    pub const MOUNT: &str = "mount";
    /// The source resumes from checkpoints instead of re-reading everything.
    pub const INCREMENTAL: &str = "incremental";
    /// The source is long-running and uses `ack`.
    pub const STREAMING: &str = "streaming";
    /// The destination implements erasure (`delete`).
    pub const DELETE: &str = "delete";
}

/// A plugin's self-description, returned from `spec()`.
///
/// ```
/// use cdp_plugin_sdk::{Spec, capability};
/// use serde_json::json;
///
/// let spec = Spec::new(env!("CARGO_PKG_NAME"), env!("CARGO_PKG_VERSION"))
///     .description("Reads members from a CSV file")
///     .config_schema(json!({
///         "type": "object",
///         "required": ["file"],
///         "properties": { "file": { "type": "string" } }
///     }))
///     .capability(capability::MOUNT);
/// assert_eq!(spec.capabilities, ["mount"]);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    /// Plugin name, e.g. `source-csv`.
    pub name: String,
    /// Plugin version (semver).
    pub version: String,
    /// One sentence on what the plugin does.
    pub description: String,
    /// JSON Schema of the plugin's config; secret fields carry `"x-secret": true`.
    pub config_schema: Value,
    /// What the plugin needs or offers; see [`capability`].
    pub capabilities: Vec<String>,
}

impl Spec {
    /// A spec with an empty description, an open object schema and no
    /// capabilities.
    pub fn new(name: impl Into<String>, version: impl Into<String>) -> Self {
        Spec {
            name: name.into(),
            version: version.into(),
            description: String::new(),
            config_schema: json!({"type": "object"}),
            capabilities: Vec::new(),
        }
    }

    /// Sets the description.
    pub fn description(mut self, description: impl Into<String>) -> Self {
        self.description = description.into();
        self
    }

    /// Sets the JSON Schema of the config.
    pub fn config_schema(mut self, schema: Value) -> Self {
        self.config_schema = schema;
        self
    }

    /// Adds a capability (see [`capability`]).
    pub fn capability(mut self, capability: impl Into<String>) -> Self {
        let capability = capability.into();
        if !self.capabilities.contains(&capability) {
            self.capabilities.push(capability);
        }
        self
    }

    /// The protocol version sent to the host, [`PROTOCOL_VERSION`].
    pub fn protocol(&self) -> &'static str {
        PROTOCOL_VERSION
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_fills_fields_and_dedups_capabilities() {
        let spec = Spec::new("dest-x", "1.2.3")
            .description("d")
            .capability(capability::HTTP)
            .capability(capability::HTTP)
            .capability(capability::DELETE);
        assert_eq!(spec.name, "dest-x");
        assert_eq!(spec.version, "1.2.3");
        assert_eq!(spec.description, "d");
        assert_eq!(spec.capabilities, ["http", "delete"]);
        assert_eq!(spec.config_schema, json!({"type": "object"}));
        assert_eq!(spec.protocol(), "0.1.0");
    }
}
