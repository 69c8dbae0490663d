//! RPC request parameters: a flat list of `name=value` pairs, with Alibaba's conventions for
//! lists (`Tag.1.Key`, `Tag.1.Value`, `DiskDeviceMapping.2.SnapshotId`, 1-based) and for id
//! lists in Describe calls (a JSON array in one parameter: `DiskIds=["d-1","d-2"]`).

use super::types::Tag;

/// The parameters of one call, in insertion order (they are sorted when signed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Params(Vec<(String, String)>);

impl Params {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `name` (replacing an earlier value).
    pub fn set(&mut self, name: impl Into<String>, value: impl ToString) -> &mut Self {
        let name = name.into();
        let value = value.to_string();
        match self.0.iter_mut().find(|(k, _)| *k == name) {
            Some(slot) => slot.1 = value,
            None => self.0.push((name, value)),
        }
        self
    }

    /// Sets `name` when `value` is `Some`.
    pub fn opt(&mut self, name: &str, value: Option<impl ToString>) -> &mut Self {
        if let Some(v) = value {
            self.set(name, v);
        }
        self
    }

    /// `Tag.N.Key` / `Tag.N.Value` for each tag, N from 1.
    pub fn tags(&mut self, tags: &[Tag]) -> &mut Self {
        for (i, t) in tags.iter().enumerate() {
            self.set(format!("Tag.{}.Key", i + 1), &t.key);
            self.set(format!("Tag.{}.Value", i + 1), &t.value);
        }
        self
    }

    /// `prefix.N.field` for the `N`th item (from 1).
    pub fn indexed(
        &mut self,
        prefix: &str,
        n: usize,
        field: &str,
        value: impl ToString,
    ) -> &mut Self {
        self.set(format!("{prefix}.{n}.{field}"), value)
    }

    /// A JSON array of strings in one parameter, when `ids` is not empty.
    pub fn json_list(&mut self, name: &str, ids: &[String]) -> &mut Self {
        if !ids.is_empty() {
            // Serializing a slice of strings cannot fail.
            let json = serde_json::to_string(ids).unwrap_or_default();
            self.set(name, json);
        }
        self
    }

    /// The value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The pairs.
    pub fn pairs(&self) -> &[(String, String)] {
        &self.0
    }
}

impl From<Vec<(String, String)>> for Params {
    fn from(v: Vec<(String, String)>) -> Self {
        Self(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_flatten_the_alibaba_way() {
        let mut p = Params::new();
        p.set("RegionId", "cn-hangzhou")
            .tags(&[Tag::new("a", "1"), Tag::new("b", "2")])
            .json_list("DiskIds", &["d-1".into(), "d-2".into()])
            .json_list("Empty", &[])
            .opt("Skipped", None::<&str>)
            .indexed("DiskDeviceMapping", 1, "SnapshotId", "s-1");
        assert_eq!(p.get("Tag.2.Value"), Some("2"));
        assert_eq!(p.get("DiskIds"), Some(r#"["d-1","d-2"]"#));
        assert_eq!(p.get("Empty"), None);
        assert_eq!(p.get("Skipped"), None);
        assert_eq!(p.get("DiskDeviceMapping.1.SnapshotId"), Some("s-1"));
        p.set("RegionId", "cn-beijing");
        assert_eq!(p.get("RegionId"), Some("cn-beijing"));
        assert_eq!(p.pairs().len(), 7);
    }
}
