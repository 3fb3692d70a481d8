//! Usage accounting: token counts read from backend responses as they stream by, aggregated per
//! deployment and key, and reported to the control plane.

pub mod scan;
