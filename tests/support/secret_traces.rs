//! Every trace of a secret value that bakery must never show or send: as it is, each of its
//! lines, fragments as `fold` splits it, base64 at every alignment (standard and URL-safe), hex
//! in either case, and URL-encoded the usual ways (`quote` with and without `/` safe,
//! `quote_plus`, lowercase escapes). Included by the secret tests with `#[path]`.

#![allow(dead_code)]

use base64::Engine;

/// `s` percent-encoded, leaving ASCII letters, digits, `_.-~` and the bytes of `safe` as they are.
fn percent(s: &str, safe: &str, plus: bool, lower: bool) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"_.-~".contains(&b) || safe.as_bytes().contains(&b) {
            out.push(b as char);
        } else if plus && b == b' ' {
            out.push('+');
        } else if lower {
            out.push_str(&format!("%{b:02x}"));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The traces of `secret` (fragments of at least `fragment` bytes).
pub fn traces(secret: &str, fragment: usize) -> Vec<String> {
    let mut t = vec![secret.to_string()];
    t.extend(
        secret
            .lines()
            .filter(|l| l.len() >= fragment)
            .map(str::to_string),
    );
    let flat: String = secret.lines().collect();
    t.extend(
        flat.as_bytes()
            .chunks(fragment)
            .filter(|c| c.len() == fragment)
            .map(|c| String::from_utf8_lossy(c).into_owned()),
    );
    for prefix in ["", "x", "xy"] {
        for engine in [
            base64::engine::general_purpose::STANDARD,
            base64::engine::general_purpose::URL_SAFE,
        ] {
            let b64 = engine.encode(format!("{prefix}{secret}"));
            if b64.len() > 8 {
                t.push(b64[4..b64.len() - 4].to_string());
            }
        }
    }
    let hex: String = secret.bytes().map(|b| format!("{b:02x}")).collect();
    t.push(hex.to_uppercase());
    t.push(hex);
    for (safe, plus) in [("", false), ("/", false), ("", true), ("/", true)] {
        t.push(percent(secret, safe, plus, false));
        t.push(percent(secret, safe, plus, true));
    }
    t.sort();
    t.dedup();
    t
}

/// The first trace of any of `secrets` found in `text`, if one is.
pub fn trace_in(text: &str, secrets: &[&str], fragment: usize) -> Option<String> {
    secrets
        .iter()
        .flat_map(|s| traces(s, fragment))
        .find(|t| text.contains(t.as_str()))
}
