//! Placement and metadata stores (being written).
