//! The manifest a bake leaves for the next step of a pipeline (`bakery rollout --manifest`):
//! what was made, from what, and how long each step took. It holds ids and timings only, never
//! a variable's value, so it is safe to publish as a build artifact.

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
}

impl Manifest {
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
