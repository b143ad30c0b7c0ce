//! Secrets never appear in logs, events, manifests or error messages. Values resolved from
//! Secrets Manager are registered with a [`Redactor`], and every line of provisioner output
//! passes through a [`LineRedactor`] before it is printed, logged or kept for an error message.
//!
//! A secret is caught as printed, base64-encoded (at any alignment inside a longer encoding) and
//! URL-encoded, and also when the output splits it across lines (`fold`, a progress bar): lines
//! are held back just long enough to see a secret that continues on the next one.

use std::collections::VecDeque;
use std::fmt;

use base64::Engine;

/// What a redacted stretch of output is replaced with.
pub const MASK: &str = "[REDACTED]";
/// Shorter values are not redacted as substrings: masking every "1" or "ab" in the output would
/// destroy it without protecting anything.
const MIN_SECRET_LEN: usize = 4;

/// A value that must not be shown: `Debug` and `Display` print a mask.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(v: impl Into<String>) -> Self {
        Self(v.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(MASK)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(MASK)
    }
}

/// The forms of every registered secret that output may contain.
#[derive(Debug, Clone, Default)]
pub struct Redactor {
    needles: Vec<String>,
}

fn url_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Substrings of base64 output that appear whenever `secret` is encoded, wherever it starts in
/// the encoded data: one per alignment (0, 1 or 2 bytes before it), without the characters at
/// each end that also depend on the neighbouring bytes.
fn base64_forms(secret: &[u8]) -> Vec<String> {
    let mut forms = Vec::new();
    for offset in 0..3usize {
        let mut data = vec![0u8; offset];
        data.extend_from_slice(secret);
        let encoded = base64::engine::general_purpose::STANDARD_NO_PAD.encode(&data);
        // Characters fully determined by the secret: skip those covering the padding prefix.
        let start = (offset * 8).div_ceil(6);
        let end = ((offset + secret.len()) * 8) / 6;
        if end > start + MIN_SECRET_LEN {
            let core = &encoded[start..end];
            forms.push(core.to_string());
            forms.push(core.replace('+', "-").replace('/', "_"));
        }
    }
    forms
}

impl Redactor {
    pub fn add(&mut self, secret: &str) {
        if secret.len() < MIN_SECRET_LEN {
            return;
        }
        let mut forms = vec![secret.to_string(), url_encode(secret)];
        forms.extend(base64_forms(secret.as_bytes()));
        for f in forms {
            if f.len() >= MIN_SECRET_LEN && !self.needles.contains(&f) {
                self.needles.push(f);
            }
        }
        // Longest first, so a longer form wins over a shorter one inside it.
        self.needles.sort_by_key(|n| std::cmp::Reverse(n.len()));
    }

    pub fn is_empty(&self) -> bool {
        self.needles.is_empty()
    }

    fn max_len(&self) -> usize {
        self.needles.iter().map(String::len).max().unwrap_or(0)
    }

    /// Marks the bytes of `text` that belong to any registered form.
    fn mask(&self, text: &str) -> Vec<bool> {
        let mut masked = vec![false; text.len()];
        for n in &self.needles {
            let mut from = 0;
            while let Some(pos) = text[from..].find(n.as_str()) {
                let at = from + pos;
                masked[at..at + n.len()].iter_mut().for_each(|m| *m = true);
                from = at + 1;
                while !text.is_char_boundary(from) {
                    from += 1;
                }
            }
        }
        masked
    }

    /// Redacts one self-contained text (an error message, a single value).
    pub fn redact(&self, text: &str) -> String {
        if self.needles.is_empty() {
            return text.to_string();
        }
        apply(text, &self.mask(text))
    }
}

fn apply(text: &str, masked: &[bool]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_mask = false;
    for (i, c) in text.char_indices() {
        if masked[i] {
            if !in_mask {
                out.push_str(MASK);
                in_mask = true;
            }
        } else {
            in_mask = false;
            out.push(c);
        }
    }
    out
}

/// Redacts a stream of lines, holding back the newest ones only as long as a secret could still
/// continue into the next line.
#[derive(Debug)]
pub struct LineRedactor {
    redactor: Redactor,
    held: VecDeque<(String, Vec<bool>)>,
}

impl LineRedactor {
    pub fn new(redactor: Redactor) -> Self {
        Self {
            redactor,
            held: VecDeque::new(),
        }
    }

    /// Takes one line; returns the lines now safe to show, redacted.
    pub fn push(&mut self, line: &str) -> Vec<String> {
        if self.redactor.is_empty() {
            return vec![line.to_string()];
        }
        self.held
            .push_back((line.to_string(), vec![false; line.len()]));
        // Look for secrets across the held lines joined without separators.
        let joined: String = self.held.iter().map(|(l, _)| l.as_str()).collect();
        let masked = self.redactor.mask(&joined);
        let mut offset = 0;
        for (l, m) in self.held.iter_mut() {
            for (i, flag) in m.iter_mut().enumerate() {
                *flag |= masked[offset + i];
            }
            offset += l.len();
        }
        let keep = self.redactor.max_len().saturating_sub(1);
        let mut out = Vec::new();
        while self.held.len() > 1 {
            let rest: usize = self.held.iter().skip(1).map(|(l, _)| l.len()).sum();
            if rest < keep {
                break;
            }
            let (l, m) = self.held.pop_front().expect("more than one held");
            out.push(apply(&l, &m));
        }
        out
    }

    /// The stream ended: everything held back, redacted.
    pub fn finish(&mut self) -> Vec<String> {
        self.held.drain(..).map(|(l, m)| apply(&l, &m)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PW: &str = "s3cr3t-Pa55w0rd!";

    fn redactor() -> Redactor {
        let mut r = Redactor::default();
        r.add(PW);
        r
    }

    fn stream(lines: &[&str]) -> Vec<String> {
        let mut l = LineRedactor::new(redactor());
        let mut out: Vec<String> = lines.iter().flat_map(|x| l.push(x)).collect();
        out.extend(l.finish());
        out
    }

    #[test]
    fn plain_url_encoded_and_base64_forms_are_masked() {
        let r = redactor();
        assert_eq!(
            r.redact(&format!("password={PW}")),
            format!("password={MASK}")
        );
        assert_eq!(r.redact("u=s3cr3t-Pa55w0rd%21"), format!("u={MASK}"));
        for prefix in ["", "x", "xy", "user:"] {
            let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{prefix}{PW}tail"));
            let shown = r.redact(&b64);
            assert!(shown.contains(MASK), "{prefix:?}: {b64} -> {shown}");
            assert!(!shown
                .contains(&base64::engine::general_purpose::STANDARD_NO_PAD.encode(PW)[2..20]));
        }
        assert_eq!(
            format!("{:?} {}", Secret::new(PW), Secret::new(PW)),
            format!("{MASK} {MASK}")
        );
    }

    #[test]
    fn a_secret_split_across_lines_is_masked_in_every_line() {
        let out = stream(&["before", "s3cr3t-P", "a55w0", "rd!", "after"]);
        assert_eq!(
            out,
            vec![
                "before".to_string(),
                MASK.into(),
                MASK.into(),
                MASK.into(),
                "after".into()
            ]
        );
        let joined = out.join("\n");
        for piece in ["s3cr3t", "a55w0", "rd!"] {
            assert!(!joined.contains(piece), "{joined}");
        }
    }

    #[test]
    fn clean_output_passes_unchanged_and_in_order() {
        let lines: Vec<String> = (0..50)
            .map(|i| format!("line {i} of a long enough output"))
            .collect();
        let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
        assert_eq!(stream(&refs), lines);
    }

    #[test]
    fn short_values_are_not_masked_everywhere() {
        let mut r = Redactor::default();
        r.add("ab");
        assert_eq!(r.redact("abc"), "abc");
    }
}
