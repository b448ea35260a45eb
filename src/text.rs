//! Small text helpers shared by the manifest's diagnostics and the
//! audience language: "did you mean" suggestions.

/// The closest candidate to `word` by Jaro–Winkler similarity, if close enough
/// to be what was meant.
pub fn suggest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<String> {
    candidates
        .into_iter()
        .map(|c| (strsim::jaro_winkler(word, c), c))
        .filter(|(score, c)| *score >= 0.8 && *c != word)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_close_names_only() {
        assert_eq!(suggest("schedul", ["schedule", "plugin"]).as_deref(), Some("schedule"));
        assert_eq!(suggest("zzz", ["schedule", "plugin"]), None);
    }
}
