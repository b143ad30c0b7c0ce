//! Fuzzes the audit's IAM evaluation: any policy document and any action or resource must give
//! an answer, never a panic or a hang (the wildcard matcher is linear), and the answers must
//! keep IAM's basic laws.
#![no_main]

use bakery_core::audit::{policies_allow, wildcard};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Split into a pattern and a value, and try the whole text as a policy document.
    let (pattern, value) = text.split_once('\n').unwrap_or((text, ""));
    let _ = wildcard(pattern, value);
    assert!(wildcard("*", value));
    if !value.contains(['*', '?']) {
        assert!(wildcard(value, value));
    }
    if let Ok(doc) = serde_json::from_str::<serde_json::Value>(text) {
        // An explicit deny of everything wins over whatever the document allows.
        let deny = serde_json::json!({"Statement": {"Effect": "Deny", "Action": "*", "Resource": "*"}});
        assert!(!policies_allow(&[doc.clone(), deny], "secretsmanager:GetSecretValue", value));
        // A document never allows an action it does not name: evaluating must not panic.
        let _ = policies_allow(std::slice::from_ref(&doc), value, "*");
    }
});
