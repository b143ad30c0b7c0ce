//! Secrets never appear in logs, events, manifests or error messages: the typed [`Secret`], the
//! [`Redactor`] every secret value is registered with, and the [`LineRedactor`] every byte of
//! provisioner output passes through before it is printed, logged or kept for an error message.
//! They are pure, so they live in the core crate (`bakery_core::secret`, where they are
//! unit-tested and fuzzed); the bake shares them through the fail-closed [`SharedRedactor`] and
//! [`OutputRedactor`].

pub use bakery_core::secret::*;
