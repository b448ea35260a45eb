//! Parsing a plugin's JSON config into its typed `Config`.

use serde::de::DeserializeOwned;

use crate::error::ConnectorError;

/// Parses `json` into `T`, naming the offending field on failure.
///
/// An empty string or `null` is read as `{}`, so a config whose fields all
/// have defaults may be omitted from the manifest. Errors are `config`
/// errors with code `invalid_config`; the message names the field path
/// (`pagination.size: invalid type: string "x", expected u32 …`).
///
/// ```
/// use serde::Deserialize;
/// use cdp_plugin_sdk::parse_config;
///
/// #[derive(Debug, Deserialize)]
/// struct Config { file: String, #[serde(default)] has_header: Option<bool> }
///
/// let cfg: Config = parse_config(r#"{"file": "/input/a.csv"}"#)?;
/// assert_eq!(cfg.file, "/input/a.csv");
/// let err = parse_config::<Config>(r#"{"file": "/a", "has_header": "yes"}"#).unwrap_err();
/// assert!(err.message.contains("has_header"), "{}", err.message);
/// # Ok::<(), cdp_plugin_sdk::ConnectorError>(())
/// ```
pub fn parse_config<T: DeserializeOwned>(json: &str) -> Result<T, ConnectorError> {
    let text = match json.trim() {
        "" | "null" => "{}",
        other => other,
    };
    let mut de = serde_json::Deserializer::from_str(text);
    let value = serde_path_to_error::deserialize::<_, T>(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." || path.is_empty() {
            ConnectorError::config("invalid_config", format!("config: {inner}"))
        } else {
            ConnectorError::config("invalid_config", format!("config.{path}: {inner}"))
        }
    })?;
    de.end()
        .map_err(|e| ConnectorError::config("invalid_config", format!("config: {e}")))?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        size: u32,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Cfg {
        url: String,
        #[serde(default)]
        pagination: Option<Inner>,
    }

    #[derive(Debug, Deserialize, PartialEq, Default)]
    struct AllDefault {
        #[serde(default)]
        n: u32,
    }

    #[test]
    fn parses_and_names_fields() {
        let cfg: Cfg = parse_config(r#"{"url":"https://a","pagination":{"size":3}}"#).unwrap();
        assert_eq!(cfg.pagination, Some(Inner { size: 3 }));

        let e = parse_config::<Cfg>(r#"{"url":"https://a","pagination":{"size":"x"}}"#).unwrap_err();
        assert_eq!(e.code, "invalid_config");
        assert!(
            e.message.starts_with("config.pagination.size: invalid type"),
            "{}",
            e.message
        );

        let e = parse_config::<Cfg>(r#"{}"#).unwrap_err();
        assert!(e.message.contains("missing field `url`"), "{}", e.message);

        let e = parse_config::<Cfg>(r#"{"url":"u","urll":"v"}"#).unwrap_err();
        assert!(e.message.contains("unknown field `urll`"), "{}", e.message);

        let e = parse_config::<Cfg>(r#"{"url":"u"} trailing"#).unwrap_err();
        assert_eq!(e.code, "invalid_config");
    }

    #[test]
    fn empty_and_null_mean_empty_object() {
        assert_eq!(parse_config::<AllDefault>("").unwrap(), AllDefault::default());
        assert_eq!(parse_config::<AllDefault>(" null ").unwrap(), AllDefault::default());
    }
}
