//! [`VersionVector`]: which writes a register has seen, as one counter per node.

use std::cmp::Ordering;
use std::fmt;

use super::NodeId;

/// One node's write counter: a value of that node's `pgduplex` sequence (`nextval`), so it only
/// grows, across every row and column of the node. `0` means "no write of that node".
pub type Counter = u64;

/// How two version vectors relate in the causal (pointwise) order.
///
/// Exists so the merge rule can be written as one `match` over the four cases DESIGN §6
/// distinguishes, computed in a single pass over both vectors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Causality {
    /// Same counters: the same set of writes.
    Equal,
    /// `self < other`: `other` has seen everything `self` has, and more.
    Before,
    /// `self > other`: `self` has seen everything `other` has, and more.
    After,
    /// Each has seen a write the other has not.
    Concurrent,
}

/// A version vector `{node -> counter}`: the name of a set of writes to one column.
///
/// It exists because "which of two registers is newer" cannot be answered by clocks (they
/// wander, step back, and two nodes write at the same time); it can be answered by the writes
/// each register has seen. `v[N] = k` means the register has absorbed N's write with counter `k`
/// and, since N's writes to a row happen one after another on N and reach others in order, all of
/// N's earlier writes to that column. So `a.leq(b)` is "every write behind `a` is behind `b`".
///
/// Sparse: a sorted `Vec` of `(node, counter)` with no zero counters, so equal vectors are equal
/// values (`==`, `Hash`), the usual vector of a two-node pair is two entries, and comparing or
/// joining is one merge pass.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct VersionVector {
    /// Sorted by node, strictly; no counter is 0.
    entries: Vec<(NodeId, Counter)>,
}

impl VersionVector {
    /// The empty vector: no writes. The vector of every column of a row with no versions row.
    pub fn new() -> VersionVector {
        VersionVector::default()
    }

    /// Builds a vector from `(node, counter)` pairs, in any order; a node named twice keeps its
    /// larger counter and zero counters are dropped. For reading a stored vector.
    pub fn from_entries(entries: impl IntoIterator<Item = (NodeId, Counter)>) -> VersionVector {
        let mut v = VersionVector::new();
        for (node, counter) in entries {
            if counter > v.get(node) {
                v.set(node, counter);
            }
        }
        v
    }

    /// `v[node]`, 0 when the node has no write here.
    pub fn get(&self, node: NodeId) -> Counter {
        match self.entries.binary_search_by(|(n, _)| n.cmp(&node)) {
            Ok(i) => self.entries[i].1,
            Err(_) => 0,
        }
    }

    /// Sets `v[node] := counter`, as a local write does (0 removes the entry). Whether the new
    /// counter is fresh is the caller's business (`local_write` checks it).
    pub fn set(&mut self, node: NodeId, counter: Counter) {
        match self.entries.binary_search_by(|(n, _)| n.cmp(&node)) {
            Ok(i) if counter == 0 => {
                self.entries.remove(i);
            }
            Ok(i) => self.entries[i].1 = counter,
            Err(_) if counter == 0 => {}
            Err(i) => self.entries.insert(i, (node, counter)),
        }
    }

    /// True when no node has a write here: the vector of a register nobody has written.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The `(node, counter)` pairs, sorted by node, none zero. For storing the vector.
    pub fn iter(&self) -> impl Iterator<Item = (NodeId, Counter)> + '_ {
        self.entries.iter().copied()
    }

    /// Compares pointwise; the one primitive the other relations are defined by.
    pub fn causality(&self, other: &VersionVector) -> Causality {
        let (mut less, mut greater) = (false, false);
        let (mut a, mut b) = (self.entries.iter().peekable(), other.entries.iter().peekable());
        loop {
            match (a.peek(), b.peek()) {
                (None, None) => break,
                (Some(_), None) => {
                    greater = true;
                    break;
                }
                (None, Some(_)) => {
                    less = true;
                    break;
                }
                (Some(&&(na, ca)), Some(&&(nb, cb))) => match na.cmp(&nb) {
                    Ordering::Less => {
                        greater = true;
                        a.next();
                    }
                    Ordering::Greater => {
                        less = true;
                        b.next();
                    }
                    Ordering::Equal => {
                        match ca.cmp(&cb) {
                            Ordering::Less => less = true,
                            Ordering::Greater => greater = true,
                            Ordering::Equal => {}
                        }
                        a.next();
                        b.next();
                    }
                },
            }
            if less && greater {
                break;
            }
        }
        match (less, greater) {
            (false, false) => Causality::Equal,
            (true, false) => Causality::Before,
            (false, true) => Causality::After,
            (true, true) => Causality::Concurrent,
        }
    }

    /// `self <= other` pointwise: every write behind `self` is behind `other` (equal included).
    pub fn leq(&self, other: &VersionVector) -> bool {
        matches!(self.causality(other), Causality::Equal | Causality::Before)
    }

    /// `self > other` strictly: `self` has seen all of `other` and at least one write more.
    pub fn dominates(&self, other: &VersionVector) -> bool {
        self.causality(other) == Causality::After
    }

    /// Neither has seen all of the other: the two sides wrote without seeing each other.
    pub fn concurrent(&self, other: &VersionVector) -> bool {
        self.causality(other) == Causality::Concurrent
    }

    /// The pointwise maximum `self ⊔ other`: the union of the two sets of writes.
    pub fn join(&self, other: &VersionVector) -> VersionVector {
        let mut entries = Vec::with_capacity(self.entries.len().max(other.entries.len()));
        let (mut a, mut b) = (self.entries.iter().peekable(), other.entries.iter().peekable());
        loop {
            let next = match (a.peek(), b.peek()) {
                (None, None) => break,
                (Some(_), None) => a.next().copied(),
                (None, Some(_)) => b.next().copied(),
                (Some(&&(na, ca)), Some(&&(nb, cb))) => match na.cmp(&nb) {
                    Ordering::Less => a.next().copied(),
                    Ordering::Greater => b.next().copied(),
                    Ordering::Equal => {
                        a.next();
                        b.next();
                        Some((na, ca.max(cb)))
                    }
                },
            };
            entries.extend(next);
        }
        VersionVector { entries }
    }
}

impl PartialOrd for VersionVector {
    /// The causal order; `None` when concurrent.
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        match self.causality(other) {
            Causality::Equal => Some(Ordering::Equal),
            Causality::Before => Some(Ordering::Less),
            Causality::After => Some(Ordering::Greater),
            Causality::Concurrent => None,
        }
    }
}

impl fmt::Debug for VersionVector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.entries.iter().map(|(n, c)| (n, c))).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn n(name: &str) -> NodeId {
        NodeId::new(name).unwrap()
    }

    fn vv(entries: &[(&str, Counter)]) -> VersionVector {
        VersionVector::from_entries(entries.iter().map(|&(name, c)| (n(name), c)))
    }

    #[test]
    fn relations() {
        let empty = VersionVector::new();
        let a1 = vv(&[("a", 1)]);
        let a2b1 = vv(&[("a", 2), ("b", 1)]);
        let b3 = vv(&[("b", 3)]);
        assert_eq!(empty.causality(&empty), Causality::Equal);
        assert!(empty.leq(&a1) && a1.dominates(&empty) && !empty.dominates(&empty));
        assert!(a1.leq(&a2b1) && a2b1.dominates(&a1) && !a1.concurrent(&a2b1));
        assert!(a2b1.concurrent(&b3) && b3.concurrent(&a2b1));
        assert!(!a2b1.leq(&b3) && !b3.leq(&a2b1));
        assert_eq!(a2b1.partial_cmp(&b3), None);
        assert!(a1 < a2b1);
        assert_eq!(a2b1.join(&b3), vv(&[("a", 2), ("b", 3)]));
        assert_eq!(format!("{:?}", a2b1), "{a: 2, b: 1}");
    }

    #[test]
    fn sparse_and_normalized() {
        let mut v = vv(&[("b", 2), ("a", 0), ("b", 1), ("c", 4)]);
        assert_eq!(v, vv(&[("c", 4), ("b", 2)]));
        assert_eq!(v.get(n("a")), 0);
        v.set(n("a"), 7);
        v.set(n("c"), 0);
        assert_eq!(v.iter().collect::<Vec<_>>(), vec![(n("a"), 7), (n("b"), 2)]);
    }

    fn arb_vector() -> impl Strategy<Value = VersionVector> {
        proptest::collection::vec((0..4usize, 0..5 as Counter), 0..5).prop_map(|pairs| {
            const NAMES: [&str; 4] = ["a", "b", "c", "d"];
            VersionVector::from_entries(pairs.into_iter().map(|(i, c)| (NodeId::new(NAMES[i]).unwrap(), c)))
        })
    }

    proptest! {
        /// Vector join is the least upper bound: a semilattice, consistent with `leq`.
        #[test]
        fn join_is_least_upper_bound(a in arb_vector(), b in arb_vector(), c in arb_vector()) {
            let ab = a.join(&b);
            prop_assert_eq!(&ab, &b.join(&a));
            prop_assert_eq!(ab.join(&c), a.join(&b.join(&c)));
            prop_assert_eq!(a.join(&a), a.clone());
            prop_assert!(a.leq(&ab) && b.leq(&ab));
            if a.leq(&c) && b.leq(&c) {
                prop_assert!(ab.leq(&c));
            }
            prop_assert_eq!(a.leq(&b), a.join(&b) == b);
            prop_assert_eq!(a.concurrent(&b), !a.leq(&b) && !b.leq(&a));
            prop_assert_eq!(a.dominates(&b), b.leq(&a) && a != b);
        }
    }
}
