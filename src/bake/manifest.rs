//! The manifest a bake leaves for the next step of a pipeline (`bakery rollout --manifest`):
//! what was made, from what, and how long each step took. It holds ids and timings only, never
//! a variable's value, so it is safe to publish as a build artifact.
//!
//! A promotion (`bakery promote`, or a build with `[distribute]`) adds, without changing the
//! fields above: `regions` (every region's image, the source region's too), `shares` and
//! `deprecation_time`. A pipeline that reads only `ami_id` keeps working.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Step {
    pub name: String,
    pub started_at: String,
    pub duration_s: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub bakery_version: String,
    pub build_id: String,
    pub recipe: String,
    pub recipe_sha256: String,
    pub region: String,
    pub source_ami: String,
    pub ami_id: String,
    pub ami_name: String,
    pub snapshot_ids: Vec<String>,
    pub started_at: String,
    pub finished_at: String,
    pub duration_s: f64,
    pub steps: Vec<Step>,
    /// What a promotion added; empty for a bake that was not promoted.
    #[serde(flatten)]
    pub promotion: Promotion,
}

/// A promotion's results, in the manifest (all optional, so older manifests still read).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Promotion {
    /// Region -> its image: the source region's (the baked image) and every copy.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub regions: BTreeMap<String, RegionImage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shares: Option<Shares>,
    /// When every image is deprecated (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deprecation_time: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deregistration_protection: bool,
}

/// One region's image.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RegionImage {
    pub ami_id: String,
    pub snapshot_ids: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssm_parameter: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub encrypted: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kms_key_id: Option<String>,
}

/// Who may launch the images (and create volumes from their snapshots).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Shares {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub accounts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub organization_arns: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ou_arns: Vec<String>,
}

impl Manifest {
    /// The image to use in `region`: its entry in `regions`, else the baked image when
    /// `region` is the one it was baked in.
    pub fn ami_for(&self, region: &str) -> Option<&str> {
        match self.promotion.regions.get(region) {
            Some(r) => Some(r.ami_id.as_str()),
            None => (self.region == region).then_some(self.ami_id.as_str()),
        }
    }

    /// Every region the manifest has an image for.
    pub fn image_regions(&self) -> Vec<String> {
        let mut r: Vec<String> = self.promotion.regions.keys().cloned().collect();
        if !r.contains(&self.region) {
            r.insert(0, self.region.clone());
        }
        r
    }

    pub fn read(path: &std::path::Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        serde_json::from_str(&text)
            .map_err(|e| format!("{} is not a bakery manifest: {e}", path.display()))
    }

    /// Checks, before a bake starts, that its manifest can be written where asked (the folder
    /// exists and is writable), so a bake never fails for it after making an image.
    pub fn check_writable(path: &std::path::Path) -> Result<(), String> {
        let tmp = path.with_extension("json.tmp");
        match std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp) {
            Ok(_) => std::fs::remove_file(&tmp).map_err(|e| format!("{}: {e}", tmp.display())),
            // Left by a bake that died while writing: writable all the same.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(format!(
                "cannot write the manifest {}: {e}; pass --manifest with a path in a writable folder",
                path.display()
            )),
        }
    }

    /// Writes the manifest atomically (temp file + rename), so a reader never sees half of it.
    pub fn write(&self, path: &std::path::Path) -> std::io::Result<()> {
        let tmp = path.with_extension("json.tmp");
        let mut text = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        text.push('\n');
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: &str = r#"{"bakery_version":"0.1.0","build_id":"b1","recipe":"r.toml",
        "recipe_sha256":"x","region":"us-east-1","source_ami":"ami-0base","ami_id":"ami-0us",
        "ami_name":"web-1","snapshot_ids":["snap-1"],"started_at":"t0","finished_at":"t1",
        "duration_s":1.0,"steps":[]}"#;

    #[test]
    fn a_manifest_without_a_promotion_reads_and_writes_as_before() {
        let m: Manifest = serde_json::from_str(OLD).unwrap();
        assert_eq!(m.promotion, Promotion::default());
        let out = serde_json::to_value(&m).unwrap();
        for absent in [
            "regions",
            "shares",
            "deprecation_time",
            "deregistration_protection",
        ] {
            assert!(out.get(absent).is_none(), "{absent} in {out}");
        }
        assert_eq!(m.ami_for("us-east-1"), Some("ami-0us"));
        assert_eq!(m.ami_for("eu-west-1"), None);
        assert_eq!(m.image_regions(), ["us-east-1"]);
    }

    #[test]
    fn a_promoted_manifest_names_each_region_s_image() {
        let mut m: Manifest = serde_json::from_str(OLD).unwrap();
        m.promotion.regions.insert(
            "eu-west-1".into(),
            RegionImage {
                ami_id: "ami-0eu".into(),
                snapshot_ids: vec!["snap-2".into()],
                ssm_parameter: Some("/web/latest".into()),
                ..RegionImage::default()
            },
        );
        m.promotion.shares = Some(Shares {
            accounts: vec!["111122223333".into()],
            ..Shares::default()
        });
        let v = serde_json::to_value(&m).unwrap();
        assert_eq!(v["ami_id"], "ami-0us", "the old field stays");
        assert_eq!(v["regions"]["eu-west-1"]["ami_id"], "ami-0eu");
        assert_eq!(v["shares"]["accounts"][0], "111122223333");
        let back: Manifest = serde_json::from_value(v).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.ami_for("eu-west-1"), Some("ami-0eu"));
        assert_eq!(back.ami_for("us-east-1"), Some("ami-0us"));
        assert_eq!(back.image_regions(), ["us-east-1", "eu-west-1"]);
    }
}
