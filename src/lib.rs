//! bakery: bake AMIs, roll them into Auto Scaling Groups, keep fleets healthy.
//!
//! The binary (`main.rs`) is a thin edge over this library. The layout follows the product:
//! [`recipe`] (the file format), [`bake`] (the bake pipeline), [`rollout`] (the rollout engine), [`health`] (the health daemon), [`comm`] (how commands reach an
//! instance), [`aws`] (clients and typed wrappers), [`output`] (progress and NDJSON events) and
//! [`wait`] (adaptive polling).

pub mod audit;
pub mod aws;
pub mod bake;
pub mod cli;
pub mod comm;
pub mod gc;
pub mod health;
pub mod host;
pub mod lease;
pub mod output;
pub mod promote;
pub mod prune;
pub mod release;
pub use bakery_core::recipe;
pub mod rollout;
pub mod secret;
pub mod signals;
pub mod wait;
