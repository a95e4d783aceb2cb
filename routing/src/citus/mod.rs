//! Citus: metadata, exact shard hashing, and the routing decision for a
//! statement (which group owns the row it touches).

pub mod hash;
