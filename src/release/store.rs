//! Where the release's record lives: a JSON file beside the plan (`web.toml` ->
//! `web.release.json`), written atomically (temporary file, then rename), and, with a lease
//! table, an item of that table (`record#release#NAME`, attribute `record`), so a release can be
//! resumed or aborted from another machine. With a table, the table's copy is the one read.

use std::path::{Path, PathBuf};

use aws_sdk_dynamodb::types::AttributeValue;
use bakery_core::release::record::Record;

use crate::aws::Aws;

pub struct Store {
    file: PathBuf,
    table: Option<(Aws, String)>,
    key: String,
}

/// The record file of a plan.
pub fn file_of(plan: &Path) -> PathBuf {
    plan.with_extension("release.json")
}

impl Store {
    pub fn new(plan: &Path, name: &str, table: Option<(Aws, String)>) -> Self {
        Self {
            file: file_of(plan),
            table,
            key: format!("record#release#{name}"),
        }
    }

    pub fn file(&self) -> &Path {
        &self.file
    }

    /// One driver per record on this machine: an exclusive lock on `<record>.lock`, held while
    /// the returned file is open (the kernel drops it with the process, SIGKILL included).
    /// Across machines, the lease table is what fences a release.
    pub fn lock(&self) -> Result<std::fs::File, String> {
        let path = self.file.with_extension("lock");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        match f.try_lock() {
            Ok(()) => Ok(f),
            Err(std::fs::TryLockError::WouldBlock) => Err(format!(
                "another bakery process on this machine is driving this release (it holds {}); \
                 wait for it to finish, or stop it (a rerun resumes)",
                path.display()
            )),
            Err(std::fs::TryLockError::Error(e)) => {
                Err(format!("cannot lock {}: {e}", path.display()))
            }
        }
    }

    pub async fn read(&self) -> Result<Option<Record>, String> {
        if let Some((aws, table)) = &self.table {
            let db = aws.dynamodb.clone();
            let out = crate::aws::call("dynamodb:GetItem", table, || {
                db.get_item()
                    .table_name(table)
                    .key(
                        bakery_core::lease::PARTITION_KEY,
                        AttributeValue::S(self.key.clone()),
                    )
                    .consistent_read(true)
                    .send()
            })
            .await
            .map_err(|e| format!("reading the release record from table {table}: {e}"))?;
            if let Some(AttributeValue::S(text)) = out.item().and_then(|i| i.get("record")) {
                return serde_json::from_str(text).map(Some).map_err(|e| {
                    format!("the release record in table {table} is unreadable: {e}")
                });
            }
        }
        match std::fs::read_to_string(&self.file) {
            Ok(text) => serde_json::from_str(&text).map(Some).map_err(|e| {
                format!(
                    "{} is not a release record ({e}); move it away to start the release afresh",
                    self.file.display()
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("cannot read {}: {e}", self.file.display())),
        }
    }

    /// Writes the record everywhere it lives; called before each action it describes.
    pub async fn write(&self, rec: &Record) -> Result<(), String> {
        let text = serde_json::to_string_pretty(rec).map_err(|e| e.to_string())?;
        let tmp = self.file.with_extension("json.tmp");
        std::fs::write(&tmp, &text)
            .and_then(|_| std::fs::rename(&tmp, &self.file))
            .map_err(|e| {
                format!(
                    "cannot write the release record {}: {e}; the release stopped before its next change",
                    self.file.display()
                )
            })?;
        if let Some((aws, table)) = &self.table {
            let db = aws.dynamodb.clone();
            crate::aws::call("dynamodb:PutItem", table, || {
                db.put_item()
                    .table_name(table)
                    .item(
                        bakery_core::lease::PARTITION_KEY,
                        AttributeValue::S(self.key.clone()),
                    )
                    .item("record", AttributeValue::S(text.clone()))
                    .send()
            })
            .await
            .map_err(|e| format!("writing the release record to table {table}: {e}"))?;
        }
        Ok(())
    }
}
