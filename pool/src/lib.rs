//! Server connections and pools.
