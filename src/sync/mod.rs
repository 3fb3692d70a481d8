//! Keeping the registry in step with the control plane.
//!
//! Each source is a background loop that feeds [`crate::registry::Registry`] through its one
//! writer, stops on shutdown, and keeps the last good state when a source fails.

pub mod file;
