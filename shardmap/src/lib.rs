//! Placement and metadata stores (being written).
pub mod model;
pub mod placement;
