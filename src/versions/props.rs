//! Property tests of the join, on two kinds of well-formed input:
//!
//! - *free histories*: per node a chain of writes with arbitrary distinct stamps; a register is
//!   the summary of a prefix of each chain (`v` = last counter of each prefix, value = the write
//!   with the largest stamp). This is the module docs' reading of a register, so the test
//!   `join_is_union` checks the argument itself: `join(summary(A), summary(B)) = summary(A ∪ B)`.
//! - *scenario histories*: every row state any node held in a run of `sim` (any policy), so the
//!   inputs are exactly what `local_write` and `merge_row` produce.
//!
//! Arbitrary registers are not a fair input: two different rows with equal vectors cannot come
//! from the rule (that is the update-missing case), and on them no rule can be commutative.

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::FileFailurePersistence;

use super::sim::{self, Row, Variant};
use super::*;

/// Per node, its writes in order: (counter, t). Counters grow; `t`s are distinct per node.
#[derive(Clone, Debug)]
struct History(Vec<Vec<(Counter, i64)>>);

fn arb_history() -> impl Strategy<Value = History> {
    let chain = proptest::collection::vec((1..4 as Counter, -40..40i64), 0..5).prop_map(|raw| {
        let mut counter = 0;
        raw.into_iter()
            .enumerate()
            .map(|(i, (gap, t))| {
                counter += gap;
                (counter, t * 8 + i as i64) // distinct stamps, in no particular order
            })
            .collect::<Vec<_>>()
    });
    proptest::collection::vec(chain, 1..=3).prop_map(History)
}

/// A register's write set: how many of each node's writes it holds.
type Prefixes = Vec<usize>;

fn arb_prefixes(h: &History) -> Vec<std::ops::RangeInclusive<usize>> {
    h.0.iter().map(|chain| 0..=chain.len()).collect()
}

/// The value is the write: (node index, position in its chain).
type Written = Option<(usize, usize)>;

fn summary(h: &History, prefixes: &[usize]) -> Cell<Written> {
    let mut v = VersionVector::new();
    let mut best: Option<(Stamp, (usize, usize))> = None;
    for (i, (&k, chain)) in prefixes.iter().zip(&h.0).enumerate() {
        for (j, &(counter, t)) in chain[..k].iter().enumerate() {
            v.set(sim::node(i), counter);
            let stamp = Stamp { t, node: sim::node(i) };
            if best.is_none_or(|(s, _)| stamp > s) {
                best = Some((stamp, (i, j)));
            }
        }
    }
    Cell { reg: Register::new(v, best.map(|(s, _)| s)).unwrap(), value: best.map(|(_, w)| w) }
}

fn union(a: &[usize], b: &[usize]) -> Prefixes {
    a.iter().zip(b).map(|(x, y)| *x.max(y)).collect()
}

fn arb_free() -> impl Strategy<Value = (History, Prefixes, Prefixes, Prefixes)> {
    arb_history().prop_flat_map(|h| {
        let p = arb_prefixes(&h);
        (Just(h), p.clone(), p.clone(), p)
    })
}

const LWW: Policy = Policy::LastWriteWins;

fn a() -> NodeId {
    sim::node(0)
}

/// Row states from one scenario run of `sim` with `policy` on `nodes` nodes.
fn scenario(seed: u64, nodes: usize, policy: Policy) -> Vec<Row> {
    sim::run(seed, nodes, Variant { policy, ..Variant::DESIGNED }, 40).history
}

fn arb_policy_and_nodes() -> impl Strategy<Value = (Policy, usize)> {
    prop_oneof![
        (2..=3usize).prop_map(|n| (Policy::LastWriteWins, n)),
        (0..2usize, 2..=3usize).prop_map(|(owner, n)| (Policy::Prefer(sim::node(owner)), n)),
    ]
}

fn pick(rows: &[Row], i: Index) -> &Row {
    &rows[i.index(rows.len())]
}

fn joined(l: &Cell<Written>, r: &Cell<Written>) -> Cell<Written> {
    l.join(r, LWW).0
}

proptest! {
    // Failing cases are kept next to this file (`props.regressions`) and replayed first.
    #![proptest_config(ProptestConfig {
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("regressions"))),
        ..ProptestConfig::default()
    })]

    /// The module docs' argument: a register is the summary of a set of writes and the join is
    /// the summary of the union.
    #[test]
    fn join_is_union((h, pa, pb, _) in arb_free()) {
        let (a, b) = (summary(&h, &pa), summary(&h, &pb));
        prop_assert_eq!(joined(&a, &b), summary(&h, &union(&pa, &pb)));
    }

    /// Commutative, associative, idempotent, on registers and values (free histories).
    #[test]
    fn register_join_is_a_join((h, pa, pb, pc) in arb_free()) {
        let (a, b, c) = (summary(&h, &pa), summary(&h, &pb), summary(&h, &pc));
        prop_assert_eq!(joined(&a, &b), joined(&b, &a));
        prop_assert_eq!(joined(&joined(&a, &b), &c), joined(&a, &joined(&b, &c)));
        prop_assert_eq!(a.join(&a, LWW), (a.clone(), Outcome::KeepLocal));
    }

    /// The same on the registers the rule really produces, under both policies, for `$row`,
    /// x and y.
    #[test]
    fn register_join_is_a_join_on_scenarios(
        seed in any::<u64>(), (policy, nodes) in arb_policy_and_nodes(), i in any::<Index>(), j in any::<Index>(), k in any::<Index>()
    ) {
        let rows = scenario(seed, nodes, policy);
        let (ra, rb, rc) = (pick(&rows, i), pick(&rows, j), pick(&rows, k));
        let j2 = |l: &Cell<Existence>, r: &Cell<Existence>| l.join(r, policy).0;
        prop_assert_eq!(j2(&ra.row, &rb.row), j2(&rb.row, &ra.row));
        prop_assert_eq!(j2(&j2(&ra.row, &rb.row), &rc.row), j2(&ra.row, &j2(&rb.row, &rc.row)));
        prop_assert_eq!(ra.row.join(&ra.row, policy), (ra.row.clone(), Outcome::KeepLocal));
        for col in ["x", "y"] {
            let (a, b, c) = (&ra.columns[col], &rb.columns[col], &rc.columns[col]);
            let j = |l: &Cell<sim::Value>, r: &Cell<sim::Value>| l.join(r, policy).0;
            prop_assert_eq!(j(a, b), j(b, a));
            prop_assert_eq!(j(&j(a, b), c), j(a, &j(b, c)));
            prop_assert_eq!(a.join(a, policy), (a.clone(), Outcome::KeepLocal));
        }
    }

    /// `Prefer` changes nothing unless the registers are concurrent; when they are (two nodes),
    /// the side with the larger `v[owner]` wins, whatever the stamps say.
    #[test]
    fn prefer_only_decides_concurrent_registers(seed in any::<u64>(), owner in 0..2usize, i in any::<Index>(), j in any::<Index>()) {
        let owner = sim::node(owner);
        let prefer = Policy::Prefer(owner);
        let rows = scenario(seed, 2, prefer);
        let (ra, rb) = (pick(&rows, i), pick(&rows, j));
        for col in ["x", "y"] {
            let (l, r) = (&ra.columns[col], &rb.columns[col]);
            let with_prefer = l.join(r, prefer);
            if l.reg.v().concurrent(r.reg.v()) {
                let (lo, ro) = (l.reg.v().get(owner), r.reg.v().get(owner));
                prop_assert_ne!(lo, ro, "two nodes: concurrent registers differ in v[owner]");
                let winner = if lo > ro { Side::Local } else { Side::Remote };
                prop_assert_eq!(with_prefer.1, Outcome::Conflict { winner });
            } else {
                prop_assert_eq!(&with_prefer, &l.join(r, LWW));
            }
        }
    }

    /// On free histories too: ordered registers ignore the policy entirely.
    #[test]
    fn policy_is_ignored_when_ordered((h, pa, pb, _) in arb_free(), owner in 0..3usize) {
        let (a, b) = (summary(&h, &pa), summary(&h, &pb));
        let prefer = a.join(&b, Policy::Prefer(sim::node(owner)));
        if a.reg.v().concurrent(b.reg.v()) {
            prop_assert!(prefer.1.is_conflict());
        } else {
            prop_assert_eq!(prefer, a.join(&b, LWW));
        }
    }

    /// Row merge: commutative, associative, idempotent on registers and values; conflicts are
    /// reported mirrored from the two ends; merging a row with itself reports nothing.
    #[test]
    fn row_merge_is_a_join(
        seed in any::<u64>(), (policy, nodes) in arb_policy_and_nodes(), i in any::<Index>(), j in any::<Index>(), k in any::<Index>()
    ) {
        let rows = scenario(seed, nodes, policy);
        let (a, b, c) = (pick(&rows, i), pick(&rows, j), pick(&rows, k));
        let m = |l: &Row, r: &Row| merge_row(l, r, policy).unwrap();
        let (ab, ba) = (m(a, b), m(b, a));
        prop_assert_eq!(&ab.row, &ba.row);
        prop_assert_eq!(m(&ab.row, c).row, m(a, &m(b, c).row).row);
        let aa = m(a, a);
        prop_assert_eq!(&aa.row, a);
        prop_assert_eq!(aa.conflict, None);
        prop_assert!(aa.column_outcomes.values().chain([&aa.row_outcome]).all(|o| *o == Outcome::KeepLocal));
        let mirror = |c: RowConflict| RowConflict {
            kind: c.kind.mirrored(),
            columns: c.columns,
            resolution: match c.resolution {
                Resolution::Local => Resolution::Remote,
                Resolution::Remote => Resolution::Local,
                Resolution::Mixed => Resolution::Mixed,
            },
        };
        prop_assert_eq!(ab.conflict.map(mirror), ba.conflict);
    }

    /// A local write is inflationary: every register of the new row dominates or equals the
    /// old one, each written register gets the one stamp, larger than every t in the old row.
    #[test]
    fn local_write_dominates_what_it_saw(seed in any::<u64>(), i in any::<Index>(), clock in -1000..1000i64, x in any::<bool>()) {
        let rows = scenario(seed, 3, LWW);
        let row = pick(&rows, i);
        let counter = row.registers().flat_map(|r| r.v().iter().map(|(_, c)| c)).max().unwrap_or(0) + 1;
        let (kind, changed): (WriteKind, Vec<(&str, sim::Value)>) = if !row.is_alive() {
            (WriteKind::Insert, vec![("x", Some(999)), ("y", Some(999))])
        } else if x {
            (WriteKind::Update, vec![("x", Some(999))])
        } else {
            (WriteKind::Delete, vec![])
        };
        let new = local_write(row, a(), counter, clock, &changed, kind).unwrap();
        let t = clock.max(row.max_t().map_or(i64::MIN, |t| t + 1));
        for (old, new) in row.registers().zip(new.registers()) {
            if old != new {
                prop_assert!(new.v().dominates(old.v()));
                prop_assert_eq!(new.stamp(), Some(Stamp { t, node: a() }));
            }
        }
        prop_assert_eq!(new.row != row.row, kind != WriteKind::Update);
    }
}
