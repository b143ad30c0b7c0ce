//! Fuzzes the redactor: any secrets and any output, given in any pieces, must give the same
//! lines, never a panic, and lines in which no form of a secret is left; sealing must give back
//! the text once the placeholders are filled in.
#![no_main]

use std::collections::BTreeMap;

use bakery_core::secret::{LineRedactor, Redactor, Sealer, MASK};
use libfuzzer_sys::fuzz_target;

fn lines(r: &Redactor, output: &[u8], pieces: &[usize]) -> Vec<String> {
    let mut l = LineRedactor::new(r.clone());
    let mut out = Vec::new();
    let mut rest = output;
    let mut i = 0;
    while !rest.is_empty() {
        let n = pieces
            .get(i)
            .copied()
            .unwrap_or(rest.len())
            .clamp(1, rest.len());
        out.extend(l.push(&rest[..n]));
        rest = &rest[n..];
        i += 1;
    }
    out.extend(l.finish());
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&head, data)) = data.split_first() else {
        return;
    };
    let count = usize::from(head % 3) + 1;
    let mut parts = data.split(|b| *b == 0xff);
    let mut secrets = Vec::new();
    for _ in 0..count {
        let Some(s) = parts.next().and_then(|p| std::str::from_utf8(p).ok()) else {
            return;
        };
        secrets.push(s.to_string());
    }
    let output: Vec<u8> = parts.collect::<Vec<_>>().join(&b'\n');
    let mut r = Redactor::default();
    for s in &secrets {
        r.add(s);
    }
    let whole = lines(&r, &output, &[]);
    let pieces: Vec<usize> = output.iter().map(|b| usize::from(b % 7) + 1).collect();
    assert_eq!(
        lines(&r, &output, &pieces),
        whole,
        "the pieces change nothing"
    );
    assert_eq!(lines(&r, &output, &[1; 4096]), whole);
    // What is shown holds no form of a secret, the masks themselves taken out: each replaced by
    // a character no secret has and no encoding makes, which no form can span.
    let Some(gap) = ['\u{1}', '\u{2}', '\u{3}', '\u{4}', ']', '{', '~']
        .into_iter()
        .find(|c| secrets.iter().all(|s| !s.contains(*c)))
    else {
        return;
    };
    let gap = gap.to_string();
    let shown = whole.join("").replace(MASK, &gap);
    assert!(!r.finds_in(shown.as_bytes()), "{secrets:?} in {whole:?}");
    let text = String::from_utf8_lossy(&output);
    let single = r.redact(&text).replace(MASK, &gap);
    assert!(!r.finds_in(single.as_bytes()), "{secrets:?} in {single:?}");

    // Sealing: every secret value out, and back when the instance fills the placeholders in.
    if text.contains("BAKERY_SECRET_") {
        return;
    }
    let resolved: BTreeMap<String, String> = secrets
        .iter()
        .enumerate()
        .map(|(i, s)| (format!("secret:s{i}"), s.clone()))
        .collect();
    let sealer = Sealer::new(&resolved, "f");
    let sealed = sealer.seal(text.as_bytes());
    let mut filled = String::from_utf8_lossy(&sealed).into_owned();
    for (placeholder, source) in sealer.sources() {
        let i: usize = source.id[1..].parse().unwrap_or(0);
        let value = match source.key {
            None => secrets[i].clone(),
            Some(key) => match serde_json::from_str::<serde_json::Value>(&secrets[i]) {
                Ok(serde_json::Value::Object(m)) => match m.get(&key) {
                    Some(serde_json::Value::String(s)) => s.clone(),
                    Some(other) => other.to_string(),
                    None => continue,
                },
                _ => continue,
            },
        };
        filled = filled.replace(&placeholder, &value);
    }
    assert_eq!(filled, text, "sealed and filled in: {secrets:?}");
});
