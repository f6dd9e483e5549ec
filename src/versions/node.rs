//! [`NodeId`]: which node a counter or a stamp belongs to.

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

/// Longest node name, in bytes. The same limit and alphabet as `config::NodeName`, so every node
/// name the config accepts is a `NodeId` and the other way round.
pub const MAX_NODE_NAME_LEN: usize = 20;

/// The name of a node, as stored in version vectors, stamps and `pgduplex.conflicts`.
///
/// It exists because a register must say *which* node wrote, in a form that means the same thing
/// on both databases for as long as the versions tables live. A name (not a `u16` index) was
/// chosen because:
/// - it is what the capture trigger already knows (the node's name in the `pgduplex` schema), so
///   SQL and Rust write the same vector keys with no lookup table to keep in step;
/// - an index would be a second, implicit agreement between the nodes: reordering or adding a
///   node in the config would silently re-label every stored register and flip `(t, n)`
///   tie-breaks that were already decided;
/// - names of `[a-z0-9_]` compare the same way bytewise, in Rust and under `COLLATE "C"` in SQL,
///   so the stamp order `(t, n)` is identical on both sides (an ASCII-only alphabet leaves no
///   room for locale-dependent collation).
///
/// It is stored inline (21 bytes, `Copy`) so registers and stamps can be copied freely; the cost
/// over a `u16` is irrelevant next to one row read.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct NodeId {
    len: u8,
    bytes: [u8; MAX_NODE_NAME_LEN],
}

/// A string that cannot be a node name; says which rule it breaks and why the rule exists.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "node name {name:?} must be 1-{MAX_NODE_NAME_LEN} characters of a-z, 0-9 and '_', starting with a letter \
     (it is stored in every version vector and becomes part of slot, publication and origin names)"
)]
pub struct InvalidNodeId {
    /// The rejected text.
    pub name: String,
}

impl NodeId {
    /// Validates `name` (1-20 bytes of `[a-z0-9_]`, starting with a letter).
    pub fn new(name: &str) -> Result<NodeId, InvalidNodeId> {
        let ok = !name.is_empty()
            && name.len() <= MAX_NODE_NAME_LEN
            && name.starts_with(|c: char| c.is_ascii_lowercase())
            && name.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_');
        if !ok {
            return Err(InvalidNodeId { name: name.to_string() });
        }
        let mut bytes = [0u8; MAX_NODE_NAME_LEN];
        bytes[..name.len()].copy_from_slice(name.as_bytes());
        Ok(NodeId { len: name.len() as u8, bytes })
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        // Only ASCII is ever stored (checked in `new`), so this cannot fail.
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).expect("node names are ASCII")
    }
}

impl Ord for NodeId {
    /// Bytewise order of the names: the same as SQL's `COLLATE "C"`, on every node.
    fn cmp(&self, other: &Self) -> Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl PartialOrd for NodeId {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for NodeId {
    type Err = InvalidNodeId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        NodeId::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::NodeName;

    #[test]
    fn validates_like_the_config() {
        for name in [
            "a",
            "b",
            "old",
            "new_2",
            "n0",
            "a2345678901234567890",
            "",
            "A",
            "1a",
            "_a",
            "a-b",
            "é",
            "a b",
            "a23456789012345678901",
        ] {
            assert_eq!(NodeId::new(name).is_ok(), NodeName::new(name).is_ok(), "{name:?}");
        }
    }

    #[test]
    fn orders_bytewise_and_round_trips() {
        let a: NodeId = "a".parse().unwrap();
        let a_: NodeId = "a_".parse().unwrap();
        let b: NodeId = "b".parse().unwrap();
        assert!(a < a_ && a_ < b);
        assert_eq!(a_.as_str(), "a_");
        assert_eq!(format!("{b} {b:?}"), "b b");
        assert!(NodeId::new("Bad").unwrap_err().to_string().contains("\"Bad\""));
    }
}
