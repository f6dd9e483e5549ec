//! One column's register `(v, t, n)`, the value it guards, and the join of two registers.

use std::cmp::Ordering;

use super::NodeId;
use super::vector::{Causality, VersionVector};

/// The stamp of one write: when (`t`, µs, Lamport-corrected) and where (`node`).
///
/// Exists to order concurrent writes the same way on every node. The derived order is
/// lexicographic `(t, node)`: total, and no two writes share a stamp, because two writes of one
/// node to one row get strictly growing `t` (the Lamport `+ 1`) and writes of different nodes
/// differ in `node`. That uniqueness is what makes "the larger stamp wins" a choice of one
/// write, never a coin toss.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Stamp {
    /// Microseconds (PostgreSQL epoch in SQL; any fixed epoch works), after `local_write`'s
    /// Lamport rule: larger than every stamp the writing node had seen on the row.
    pub t: i64,
    /// The node where the write happened.
    pub node: NodeId,
}

/// A register that is not well-formed: a versions row that cannot have been written by the
/// capture trigger or the apply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegisterError {
    /// A non-empty vector must carry the stamp of the write that produced the value.
    #[error("register has version vector {0:?} but no stamp (t, n): the versions row is corrupt")]
    MissingStamp(VersionVector),
    /// The empty register is "never written": it has no stamp.
    #[error("register has stamp {0:?} but an empty version vector: the versions row is corrupt")]
    StampWithoutVersions(Stamp),
}

/// The register `(v, t, n)` of one column (or of `$row`) of one row: which writes it has seen
/// (`v`), and the stamp of the write whose value it holds.
///
/// It exists so that two nodes can decide, from data alone, which value of a column is newer,
/// or that neither is. Invariant: `stamp` is `None` exactly when `v` is empty. The empty
/// register ("nobody wrote this column": a row with no versions row, or a column an update never
/// touched) therefore has no stamp at all instead of a made-up `(0, "")`: `None` orders below
/// every real stamp, no fake node name is needed, and SQL's NULL `t`/`n` map onto it directly.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Register {
    v: VersionVector,
    stamp: Option<Stamp>,
}

impl Register {
    /// The empty register: no writes seen, no stamp.
    pub fn empty() -> Register {
        Register::default()
    }

    /// Builds a register from its parts (e.g. a versions row read from SQL), checking the
    /// invariant that a stamp is present exactly when the vector is not empty.
    pub fn new(v: VersionVector, stamp: Option<Stamp>) -> Result<Register, RegisterError> {
        match (v.is_empty(), stamp) {
            (false, None) => Err(RegisterError::MissingStamp(v)),
            (true, Some(stamp)) => Err(RegisterError::StampWithoutVersions(stamp)),
            _ => Ok(Register { v, stamp }),
        }
    }

    /// The version vector `v`.
    pub fn v(&self) -> &VersionVector {
        &self.v
    }

    /// The stamp `(t, n)` of the write whose value this register holds; `None` when empty.
    pub fn stamp(&self) -> Option<Stamp> {
        self.stamp
    }

    /// `t`, the stamp's time; `None` when empty.
    pub fn t(&self) -> Option<i64> {
        self.stamp.map(|s| s.t)
    }

    /// `n`, the node that wrote the current value; `None` when empty.
    pub fn n(&self) -> Option<NodeId> {
        self.stamp.map(|s| s.node)
    }

    /// True for the register nobody has written.
    pub fn is_empty(&self) -> bool {
        self.v.is_empty()
    }
}

/// A register together with the value it guards.
///
/// Generic in the value because the rule never looks at it: a column's datum in the apply, a
/// write id in the tests, [`Existence`](super::Existence) for `$row`. Keeping value and register
/// in one struct makes "take the remote register but keep the local value" unrepresentable.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Cell<V> {
    /// The register `(v, t, n)`.
    pub reg: Register,
    /// The value written by the write the register's stamp names.
    pub value: V,
}

impl<V> Cell<V> {
    /// A value nobody has written through pgduplex (no versions row): the empty register.
    pub fn untracked(value: V) -> Cell<V> {
        Cell { reg: Register::empty(), value }
    }
}

impl<V: Clone> Cell<V> {
    /// Joins `remote` into `self` (the local cell): the merged cell and which rule decided it.
    pub fn join(&self, remote: &Cell<V>, policy: Policy) -> (Cell<V>, Outcome) {
        let outcome = join(&self.reg, &remote.reg, policy);
        let cell = match outcome {
            Outcome::KeepLocal => self.clone(),
            Outcome::TakeRemote => remote.clone(),
            Outcome::Conflict { winner } => {
                let w = winner.pick(self, remote);
                Cell { reg: Register { v: self.reg.v.join(&remote.reg.v), stamp: w.reg.stamp }, value: w.value.clone() }
            }
        };
        (cell, outcome)
    }
}

/// How concurrent writes are settled, per table.
///
/// Exists because last-write-wins is the only rule that works for any number of nodes, and a
/// migration often wants "the old primary wins" instead. Both are joins; see the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Policy {
    /// The larger stamp `(t, n)` wins.
    LastWriteWins,
    /// The named node's side wins: of two concurrent registers, the one with the larger
    /// `v[owner]` (the one holding an owner's write the other has not seen); on a tie, the larger
    /// stamp.
    ///
    /// This is last-write-wins over the key `(v[owner], t, n)` instead of `(t, n)`, and that key
    /// also grows along every causal chain (an owner's write raises `v[owner]`; any other write
    /// keeps it and raises `t` by the Lamport rule), so the merge stays a join for any number of
    /// nodes (the scenario tests converge with three).
    ///
    /// Its *meaning*, "the owner's write wins", holds for two nodes only, which is why DESIGN
    /// defines `prefer` for two: with two nodes concurrent registers always differ in `v[owner]`
    /// (each has seen a write the other has not, and there are only two entries), and the side
    /// with the larger one holds the owner's write as its value. With three, a conflict between
    /// two other nodes falls back to the stamp, and a non-owner write that had seen more of the
    /// owner's writes beats one that had not. Config should refuse `prefer` for more than two.
    ///
    /// A merge under `prefer` can keep the smaller of two stamps, so a node's largest `t` on a
    /// row can go down and two of its writes could share a stamp, while the stamp tie-break in
    /// [`join`] assumes equal stamps mean one write. With two nodes the stamp is never consulted
    /// for concurrent registers (they differ in `v[owner]`); with three, only the tests (not an
    /// argument) exclude a problem.
    ///
    /// "The owner's register" is *not* "the register whose `n` is the owner": two concurrent
    /// registers can both carry `n = owner`, or neither; choosing by `n` agrees with this rule
    /// for two nodes but diverges with three (`sim::prefer_by_n_diverges_with_three_nodes`).
    Prefer(NodeId),
}

/// One side of a merge.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    /// The target's register (locked with the row).
    Local,
    /// The shipped register, from the change being applied.
    Remote,
}

impl Side {
    fn pick<'a, T>(self, local: &'a T, remote: &'a T) -> &'a T {
        match self {
            Side::Local => local,
            Side::Remote => remote,
        }
    }

    /// The other side.
    pub fn other(self) -> Side {
        match self {
            Side::Local => Side::Remote,
            Side::Remote => Side::Local,
        }
    }
}

/// What the join of two registers decided, for applying, logging and counting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// `remote.v <= local.v`: the remote write is stale, a duplicate, or our own echo.
    KeepLocal,
    /// `local.v < remote.v`: the remote has seen everything we have, and more.
    TakeRemote,
    /// Concurrent: vector `v_l ⊔ v_r`, stamp and value of `winner` (by the policy).
    Conflict {
        /// Whose stamp and value survive.
        winner: Side,
    },
}

impl Outcome {
    /// Whose stamp and value the merged register carries.
    pub fn winner(self) -> Side {
        match self {
            Outcome::KeepLocal => Side::Local,
            Outcome::TakeRemote => Side::Remote,
            Outcome::Conflict { winner } => winner,
        }
    }

    /// True when the two sides wrote concurrently (a conflict to log).
    pub fn is_conflict(self) -> bool {
        matches!(self, Outcome::Conflict { .. })
    }
}

/// The apply rule of DESIGN §6 for one register: which of `local` and `remote` survives.
///
/// ```text
///   remote.v <= local.v   -> KeepLocal   (stale, duplicate, echo)
///   local.v  <  remote.v  -> TakeRemote
///   concurrent            -> Conflict { winner }: larger (t, n), or by `v[owner]` under Prefer
/// ```
/// With the merged register built as in [`Cell::join`] this is the join of the two sets of
/// writes (module docs), so any order of arrival gives the same register.
pub fn join(local: &Register, remote: &Register, policy: Policy) -> Outcome {
    match remote.v.causality(&local.v) {
        Causality::Equal | Causality::Before => Outcome::KeepLocal,
        Causality::After => Outcome::TakeRemote,
        Causality::Concurrent => Outcome::Conflict { winner: concurrent_winner(local, remote, policy) },
    }
}

/// Chooses between two concurrent registers.
///
/// Equal stamps on concurrent registers mean both hold the same write (stamps are unique per
/// write) beside different older writes, so their values are the same and `Local` is as good as
/// `Remote`: the merged cell is identical either way, which keeps the join commutative.
fn concurrent_winner(local: &Register, remote: &Register, policy: Policy) -> Side {
    if let Policy::Prefer(owner) = policy {
        match local.v.get(owner).cmp(&remote.v.get(owner)) {
            Ordering::Greater => return Side::Local,
            Ordering::Less => return Side::Remote,
            Ordering::Equal => {} // only with three or more nodes; see Policy::Prefer
        }
    }
    if remote.stamp > local.stamp { Side::Remote } else { Side::Local }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(name: &str) -> NodeId {
        NodeId::new(name).unwrap()
    }

    fn reg(entries: &[(&str, u64)], t: i64, node: &str) -> Register {
        let v = VersionVector::from_entries(entries.iter().map(|&(name, c)| (n(name), c)));
        Register::new(v, Some(Stamp { t, node: n(node) })).unwrap()
    }

    fn cell(entries: &[(&str, u64)], t: i64, node: &str, value: &'static str) -> Cell<&'static str> {
        Cell { reg: reg(entries, t, node), value }
    }

    const LWW: Policy = Policy::LastWriteWins;

    #[test]
    fn stamps_order_by_time_then_node() {
        let s = |t, node| Stamp { t, node: n(node) };
        assert!(s(1, "b") < s(2, "a"));
        assert!(s(2, "a") < s(2, "b"));
        assert!(None < Some(s(i64::MIN, "a")), "the empty register's missing stamp is below every stamp");
    }

    #[test]
    fn register_invariant_is_checked() {
        assert!(matches!(Register::new(VersionVector::new(), None), Ok(r) if r.is_empty() && r.t().is_none()));
        let v = VersionVector::from_entries([(n("a"), 1)]);
        assert!(matches!(Register::new(v, None), Err(RegisterError::MissingStamp(_))));
        let s = Stamp { t: 1, node: n("a") };
        assert!(matches!(Register::new(VersionVector::new(), Some(s)), Err(RegisterError::StampWithoutVersions(_))));
    }

    #[test]
    fn stale_duplicate_and_echo_keep_local() {
        let local = cell(&[("a", 2), ("b", 1)], 50, "a", "new");
        // Stale: an older write, even with a far larger (wrong) clock.
        let stale = cell(&[("b", 1)], 9_000, "b", "old");
        assert_eq!(local.join(&stale, LWW), (local.clone(), Outcome::KeepLocal));
        // Duplicate / our own write echoed back: equal vectors.
        assert_eq!(local.join(&local.clone(), LWW), (local.clone(), Outcome::KeepLocal));
        // Anything joined with the empty register.
        assert_eq!(local.join(&Cell::untracked("x"), LWW).1, Outcome::KeepLocal);
    }

    #[test]
    fn newer_remote_is_taken_whatever_its_clock() {
        let local = cell(&[("a", 2)], 900, "a", "mine");
        let remote = cell(&[("a", 2), ("b", 5)], 10, "b", "theirs"); // causally newer, clock behind
        assert_eq!(local.join(&remote, LWW), (remote.clone(), Outcome::TakeRemote));
        assert_eq!(Cell::untracked("x").join(&remote, LWW), (remote, Outcome::TakeRemote));
    }

    #[test]
    fn concurrent_last_write_wins_merges_vectors() {
        let local = cell(&[("a", 3), ("b", 1)], 100, "a", "a3");
        let remote = cell(&[("a", 1), ("b", 4)], 200, "b", "b4");
        let (merged, outcome) = local.join(&remote, LWW);
        assert_eq!(outcome, Outcome::Conflict { winner: Side::Remote });
        assert_eq!(merged, cell(&[("a", 3), ("b", 4)], 200, "b", "b4"));
        // The same from the other end.
        let (merged2, outcome2) = remote.join(&local, LWW);
        assert_eq!(outcome2, Outcome::Conflict { winner: Side::Local });
        assert_eq!(merged2, merged);
    }

    #[test]
    fn equal_time_is_broken_by_node_name() {
        let local = cell(&[("a", 1)], 100, "a", "a1");
        let remote = cell(&[("b", 1)], 100, "b", "b1");
        assert_eq!(local.join(&remote, LWW).0.value, "b1");
        assert_eq!(remote.join(&local, LWW).0.value, "b1");
    }

    #[test]
    fn prefer_decides_concurrent_only_by_the_owners_writes() {
        let prefer_a = Policy::Prefer(n("a"));
        let prefer_b = Policy::Prefer(n("b"));
        // b's write is later by clock, but a is preferred.
        let local = cell(&[("a", 3), ("b", 1)], 100, "a", "a3");
        let remote = cell(&[("a", 1), ("b", 4)], 200, "b", "b4");
        assert_eq!(local.join(&remote, prefer_a).0.value, "a3");
        assert_eq!(remote.join(&local, prefer_a).0.value, "a3");
        assert_eq!(local.join(&remote, prefer_b).0.value, "b4");
        // Both registers carry n = b, yet the left one holds a's write #3 the right lacks.
        let left = cell(&[("a", 3), ("b", 2)], 500, "b", "b2");
        let right = cell(&[("a", 2), ("b", 4)], 400, "b", "b4");
        assert_eq!(left.join(&right, prefer_a).1, Outcome::Conflict { winner: Side::Local });
        // Not concurrent: prefer changes nothing, a causally newer write of b beats a.
        let older = cell(&[("a", 3)], 100, "a", "a3");
        let newer = cell(&[("a", 3), ("b", 1)], 50, "b", "b1");
        assert_eq!(older.join(&newer, prefer_a), (newer.clone(), Outcome::TakeRemote));
        assert_eq!(newer.join(&older, prefer_a), (newer, Outcome::KeepLocal));
    }

    #[test]
    fn prefer_falls_back_to_stamp_on_a_tie_of_the_owner() {
        // Only possible with three nodes: neither holds an a-write the other lacks.
        let local = cell(&[("b", 1)], 100, "b", "b1");
        let remote = cell(&[("c", 1)], 200, "c", "c1");
        assert_eq!(local.join(&remote, Policy::Prefer(n("a"))).1, Outcome::Conflict { winner: Side::Remote });
    }
}
