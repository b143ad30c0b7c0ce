//! Located diagnostics: one problem in a file the user wrote (a recipe, a variable file, the
//! daemon's configuration, a release plan), with its file, line and column and what to write
//! instead. Every file format bakery reads reports its mistakes this way, all at once.

use std::fmt;
use std::path::PathBuf;

/// One problem found in a recipe (or a variable file), located in its source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    pub message: String,
    pub hint: Option<String>,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.column,
            self.message
        )?;
        if let Some(hint) = &self.hint {
            write!(f, "\n  hint: {hint}")?;
        }
        Ok(())
    }
}

pub fn render_diagnostics(d: &[Diagnostic]) -> String {
    let n = d.len();
    let file = d
        .first()
        .map(|f| f.file.display().to_string())
        .unwrap_or_default();
    let mut s = format!("{file} has {n} error{}:", if n == 1 { "" } else { "s" });
    for diag in d {
        s.push('\n');
        s.push_str(&diag.to_string());
    }
    s
}

/// A TOML error's message without the location header and source snippet that its `Display`
/// adds (bakery prints its own `file:line:column`). Some syntax errors carry an empty
/// `message()` (found by fuzzing): the description is then in the `Display` form only.
pub fn toml_message(e: &toml::de::Error) -> String {
    toml_message_in(e, None)
}

/// [`toml_message`], naming the offending character when the parser gave no description.
pub fn toml_message_in(e: &toml::de::Error, text: Option<&str>) -> String {
    let m = e.message().trim();
    if !m.is_empty() {
        return m.to_string();
    }
    if let (Some(text), Some(span)) = (text, e.span()) {
        if let Some(c) = text.get(span.start..).and_then(|t| t.chars().next()) {
            if c.is_control() && c != '\n' && c != '\t' {
                return format!("control character U+{:04X} is not allowed here", c as u32);
            }
            return format!("unexpected {c:?} here: this is not valid TOML");
        }
    }
    let text = e.to_string();
    let described: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("TOML parse error") && !l.contains('|'))
        .collect();
    if described.is_empty() {
        "this is not valid TOML".into()
    } else {
        described.join("; ")
    }
}

/// 1-based line and column (in characters) of a byte offset.
pub fn locate(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    (line, before[line_start..].chars().count() + 1)
}

/// A file that could not be read, or that has mistakes (each located).
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}", render_diagnostics(.0))]
    Invalid(Vec<Diagnostic>),
}
