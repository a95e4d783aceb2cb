//! Topology and routing.
