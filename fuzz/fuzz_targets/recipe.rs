//! Fuzzes the recipe parser and validator: any text must give a recipe or located errors, never
//! a panic, and every error's line and column must point inside the text.
#![no_main]

use bakery_core::recipe;

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let vars = recipe::VarSources {
        args: vec!["subnet=subnet-0abc".into()],
        ..Default::default()
    };
    match recipe::parse(Path::new("fuzz.toml"), text, &vars) {
        Ok(_) => {}
        Err(recipe::RecipeError::Invalid(diags)) => {
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
