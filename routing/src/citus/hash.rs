//! PostgreSQL's hash functions for the types a Citus distribution column may
//! have, so a key maps to the shard Citus itself would pick.
//!
//! Interface (filled in by the hashing work):
//! - [`DistType::from_oid`]: the column's type OID, None when unsupported;
//! - [`hash_text`]: a value in text format (a literal, a text parameter);
//! - [`hash_binary`]: a value in binary format (a binary Bind parameter).
//!
//! Both return None whenever the value cannot be hashed with certainty
//! (the caller then routes to the coordinator, never guesses).

/// The supported distribution column types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DistType {
    Int2,
    Int4,
    Int8,
    /// text and varchar (hashtext over the bytes).
    Text,
    /// char(n): trailing spaces do not count.
    Bpchar,
    Uuid,
    Numeric,
    Date,
    Timestamp,
    Timestamptz,
    Bool,
}

impl DistType {
    pub fn from_oid(oid: u32) -> Option<DistType> {
        Some(match oid {
            21 => DistType::Int2,
            23 => DistType::Int4,
            20 => DistType::Int8,
            25 | 1043 => DistType::Text,
            1042 => DistType::Bpchar,
            2950 => DistType::Uuid,
            1700 => DistType::Numeric,
            1082 => DistType::Date,
            1114 => DistType::Timestamp,
            1184 => DistType::Timestamptz,
            16 => DistType::Bool,
            _ => return None,
        })
    }
}

/// Hashes a text-format value of type `ty` as PostgreSQL would after
/// converting it to that type.
pub fn hash_text(_ty: DistType, _value: &[u8]) -> Option<i32> {
    None
}

/// Hashes a binary-format value of type `ty`.
pub fn hash_binary(_ty: DistType, _value: &[u8]) -> Option<i32> {
    None
}
