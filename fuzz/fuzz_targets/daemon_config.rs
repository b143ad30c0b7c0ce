//! Fuzzes the daemon's configuration: any text must give a configuration or located errors,
//! never a panic, and every error's line and column must point inside the text.
#![no_main]

use std::path::Path;

use bakery_core::daemon_config;
use bakery_core::diag::FileError;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match daemon_config::parse(Path::new("daemon.toml"), text) {
        Ok(_) => {}
        Err(FileError::Invalid(diags)) => {
            let lines = text.split('\n').count().max(1);
            for d in diags {
                assert!(d.line >= 1 && d.line <= lines, "line {} of {lines}: {d}", d.line);
                assert!(d.column >= 1, "column {}: {d}", d.column);
                assert!(!d.message.is_empty());
            }
        }
        Err(_) => {}
    }
});
