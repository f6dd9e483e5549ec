//! A row's registers (`$row` plus one per column): the local write and the row merge.

use std::collections::BTreeMap;
use std::fmt;

use super::NodeId;
use super::register::{Cell, Outcome, Policy, Register, Side, Stamp};
use super::vector::Counter;

/// Name of the existence pseudo-column, as stored in versions tables and conflict records.
pub const ROW: &str = "$row";

/// The value guarded by the existence register `$row`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Existence {
    /// The row exists.
    Alive,
    /// The row was deleted; its registers stay as a tombstone.
    Dead,
}

/// Every register of one row, with the values they guard: `$row` and one [`Cell`] per column.
///
/// It exists because the apply decides row by row: the shipped versions row meets the locked
/// local one, every column is joined on its own, and the conflict to log depends on `$row` and
/// the columns together. Columns are keyed by name, as pgoutput relations are matched against the
/// target catalog by name (DESIGN §3).
///
/// A dead row keeps its column cells, values included. The merge needs them: an update a node
/// received while the row was dead there can still win a column after a concurrent re-insert
/// (see `sim::tombstone_values_matter`), and a node must then have its value.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RowVersions<V> {
    /// The existence register `$row`: bumped by inserts and deletes, never by updates.
    pub row: Cell<Existence>,
    /// One cell per column (not including `$row`).
    pub columns: BTreeMap<String, Cell<V>>,
}

impl<V> RowVersions<V> {
    /// A row with no versions row: every register empty. `existence` is whether the data row is
    /// there (a row that predates pgduplex is alive with no registers), `values` its columns.
    pub fn untracked(existence: Existence, values: impl IntoIterator<Item = (String, V)>) -> RowVersions<V> {
        RowVersions {
            row: Cell::untracked(existence),
            columns: values.into_iter().map(|(name, value)| (name, Cell::untracked(value))).collect(),
        }
    }

    /// True when `$row` says the row exists.
    pub fn is_alive(&self) -> bool {
        self.row.value == Existence::Alive
    }

    /// Every register of the row, `$row` first.
    pub fn registers(&self) -> impl Iterator<Item = &Register> {
        std::iter::once(&self.row.reg).chain(self.columns.values().map(|c| &c.reg))
    }

    /// The largest `t` over the row's registers; `None` when nothing was ever written.
    pub fn max_t(&self) -> Option<i64> {
        self.registers().filter_map(Register::t).max()
    }
}

/// Which statement a local write is; decides whether `$row` is bumped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WriteKind {
    /// Sets every column and `$row` (alive).
    Insert,
    /// Sets the columns whose value changed; never `$row`.
    Update,
    /// Sets `$row` (dead) only.
    Delete,
}

/// A local write that the capture trigger could not have produced.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    /// The write names a column the row does not have.
    #[error("write names column {column:?}, which the row does not have")]
    UnknownColumn {
        /// The column.
        column: String,
    },
    /// The write names a column twice.
    #[error("write names column {column:?} twice")]
    DuplicateColumn {
        /// The column.
        column: String,
    },
    /// An insert must give every column a value (the trigger has no OLD row to compare with).
    #[error("insert gives no value for column {column:?}: an insert writes every column")]
    InsertMissingColumn {
        /// The column.
        column: String,
    },
    /// A delete writes `$row` only.
    #[error("a delete changes no column, but column values were given")]
    DeleteWithColumns,
    /// Insert of a key that exists (the primary key would refuse it).
    #[error("insert of a row that exists")]
    InsertOfLiveRow,
    /// Update or delete of a row that does not exist (there is no data row to fire a trigger).
    #[error("{kind:?} of a row that does not exist")]
    RowNotAlive {
        /// Update or Delete.
        kind: WriteKind,
    },
    /// The counter is not larger than one the node already put in this row: the node's sequence
    /// went backwards (restored, reset or shared), and the new write would not dominate.
    #[error(
        "counter {counter} of node {node} is not above {seen}, already in this row: \
         pgduplex's sequence on {node} went backwards; set it above every counter in the versions tables"
    )]
    StaleCounter {
        /// The writing node.
        node: NodeId,
        /// The counter passed in.
        counter: Counter,
        /// The largest counter of `node` in the row's registers.
        seen: Counter,
    },
    /// A register's `t` is `i64::MAX`, so no later stamp exists.
    #[error("a register's stamp is i64::MAX µs; no later stamp can be made")]
    StampOverflow,
}

/// The new registers and values of `row` after a write on `node` (what the capture trigger
/// records), so tests can model whole scenarios with the same rule the SQL applies.
///
/// - ONE `counter` for the whole write, from the node-wide sequence (passed in): never "old
///   counter + 1", which a purged and recreated register would repeat. It must exceed every
///   counter of `node` already in the row ([`WriteError::StaleCounter`]).
/// - ONE stamp for the whole write: `t = max(clock_now_us, every t in the row's registers + 1)`.
///   The `+ 1` makes the write's stamp exceed every write it supersedes (so "largest stamp wins"
///   agrees with causality and the merge is a join); one stamp for all columns keeps two
///   concurrent whole-row writes from ending as a mix.
/// - Sets `v[node] := counter` and the stamp on every changed column (an update skips values
///   that are not distinct, like `IS DISTINCT FROM`; an insert writes every column, there being
///   no OLD row), and on `$row` for an insert or a delete. An update never touches `$row`.
///
/// `changed` gives `(column, new value)`: every column for an insert, the assigned ones for an
/// update, none for a delete (a dead row keeps its values). A no-op update returns the row as is.
pub fn local_write<V: Clone + PartialEq>(
    row: &RowVersions<V>,
    node: NodeId,
    counter: Counter,
    clock_now_us: i64,
    changed: &[(&str, V)],
    kind: WriteKind,
) -> Result<RowVersions<V>, WriteError> {
    match (kind, row.is_alive()) {
        (WriteKind::Insert, true) => return Err(WriteError::InsertOfLiveRow),
        (WriteKind::Update | WriteKind::Delete, false) => return Err(WriteError::RowNotAlive { kind }),
        _ => {}
    }
    for (i, (column, _)) in changed.iter().enumerate() {
        if !row.columns.contains_key(*column) {
            return Err(WriteError::UnknownColumn { column: column.to_string() });
        }
        if changed[..i].iter().any(|(c, _)| c == column) {
            return Err(WriteError::DuplicateColumn { column: column.to_string() });
        }
    }
    match kind {
        WriteKind::Delete if !changed.is_empty() => return Err(WriteError::DeleteWithColumns),
        WriteKind::Insert => {
            if let Some(column) = row.columns.keys().find(|c| !changed.iter().any(|(n, _)| n == c)) {
                return Err(WriteError::InsertMissingColumn { column: column.clone() });
            }
        }
        _ => {}
    }
    let seen = row.registers().map(|r| r.v().get(node)).max().unwrap_or(0);
    if counter <= seen {
        return Err(WriteError::StaleCounter { node, counter, seen });
    }
    let t = match row.max_t() {
        None => clock_now_us,
        Some(max_t) => clock_now_us.max(max_t.checked_add(1).ok_or(WriteError::StampOverflow)?),
    };
    let stamp = Stamp { t, node };
    let bump = |reg: &Register| {
        let mut v = reg.v().clone();
        v.set(node, counter);
        Register::new(v, Some(stamp)).expect("a register with a counter has a stamp")
    };

    let mut new = row.clone();
    for (column, value) in changed {
        let cell = new.columns.get_mut(*column).expect("checked above");
        if kind == WriteKind::Update && cell.value == *value {
            continue; // not IS DISTINCT FROM: the trigger leaves the register alone
        }
        *cell = Cell { reg: bump(&cell.reg), value: value.clone() };
    }
    match kind {
        WriteKind::Insert => new.row = Cell { reg: bump(&row.row.reg), value: Existence::Alive },
        WriteKind::Delete => new.row = Cell { reg: bump(&row.row.reg), value: Existence::Dead },
        WriteKind::Update => {}
    }
    debug_assert!(new.registers().zip(row.registers()).all(|(n, o)| o.v().leq(n.v())), "a write only adds");
    Ok(new)
}

/// The kinds of conflict DESIGN §6 names, for `pgduplex.conflicts` and the conflicts metric.
///
/// Names read `<remote change>/<local change>` (the change arriving / what this node did), as
/// PostgreSQL's own `update_deleted`, `update_missing` do. How each is read off the registers is
/// in [`merge_row`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ConflictKind {
    /// Both nodes inserted the key without seeing each other.
    InsertInsert,
    /// Both nodes wrote the same column(s) of a live row without seeing each other.
    UpdateUpdate,
    /// The remote wrote the row (update, or a re-insert) while this node deleted it.
    UpdateDelete,
    /// The remote deleted the row while this node wrote it.
    DeleteUpdate,
    /// The remote has a live row this node lacks, with registers that say this node has already
    /// seen every insert and delete of it: the registers do not describe the rows (a row that
    /// predates pgduplex and is missing here, or registers dropped). No rule can decide; keep
    /// the local state and report.
    UpdateMissing,
}

impl ConflictKind {
    /// The label used in `pgduplex.conflicts.kind` and the metric.
    pub fn as_str(self) -> &'static str {
        match self {
            ConflictKind::InsertInsert => "insert/insert",
            ConflictKind::UpdateUpdate => "update/update",
            ConflictKind::UpdateDelete => "update/delete",
            ConflictKind::DeleteUpdate => "delete/update",
            ConflictKind::UpdateMissing => "update-missing",
        }
    }

    /// The kind as the other node sees the same pair of rows (update/delete <-> delete/update).
    pub fn mirrored(self) -> ConflictKind {
        match self {
            ConflictKind::UpdateDelete => ConflictKind::DeleteUpdate,
            ConflictKind::DeleteUpdate => ConflictKind::UpdateDelete,
            other => other,
        }
    }
}

impl fmt::Display for ConflictKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whose writes survived a conflict, for the `resolution` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Resolution {
    /// This node's writes won every contested register.
    Local,
    /// The remote's writes won every contested register.
    Remote,
    /// Column by column, some of each: both survive where they touched different columns, and
    /// the contested ones went different ways.
    Mixed,
}

impl Resolution {
    fn of(winners: impl IntoIterator<Item = Side>) -> Resolution {
        let (mut local, mut remote) = (false, false);
        for side in winners {
            match side {
                Side::Local => local = true,
                Side::Remote => remote = true,
            }
        }
        match (local, remote) {
            (true, true) => Resolution::Mixed,
            (false, true) => Resolution::Remote,
            _ => Resolution::Local,
        }
    }
}

/// One conflict found while merging a row: what to write to `pgduplex.conflicts`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RowConflict {
    /// Which kind (see [`merge_row`] for how it is classified).
    pub kind: ConflictKind,
    /// The contested columns (`$row` included when existence itself was concurrent).
    pub columns: Vec<String>,
    /// Whose writes survived.
    pub resolution: Resolution,
}

/// The two sides do not have the same columns: schema drift, which the merge cannot settle.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "columns differ between the nodes (only here: {local_only:?}, only on the remote: {remote_only:?}): \
     park changes of this table until both sides have the same columns (DESIGN §6b)"
)]
pub struct ColumnsDiffer {
    /// Columns only the local row has.
    pub local_only: Vec<String>,
    /// Columns only the remote row has.
    pub remote_only: Vec<String>,
}

/// The result of merging a remote row into the local one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowMerge<V> {
    /// The merged registers and values: what the apply writes to the row and its versions row.
    pub row: RowVersions<V>,
    /// What decided `$row`.
    pub row_outcome: Outcome,
    /// What decided each column.
    pub column_outcomes: BTreeMap<String, Outcome>,
    /// The conflict to log, if any. At most one per merge: a merge is one change meeting one
    /// row, and its kind is a property of the pair (see [`merge_row`]); the contested columns
    /// are listed inside.
    pub conflict: Option<RowConflict>,
}

/// Merges a shipped row into the local one, register by register ([`Cell::join`]), and
/// classifies the conflict, if any.
///
/// The registers are joined independently; that is the whole merge and it is a join (module
/// docs). The conflict kind is read off the same registers, where "remote has unseen writes on
/// c" means `!(remote.c.v <= local.c.v)` and the other way round:
///
/// 1. `$row` vectors equal but existence differs, remote alive: **update-missing** (the registers
///    do not describe the rows; local kept). Remote dead with local alive cannot be shipped by
///    any write (a delete bumps `$row`) and is not reported.
/// 2. `$row` concurrent (both inserted or deleted without seeing each other):
///    both alive: **insert/insert** over `$row` (unless both hold the same insert) and the
///    concurrent columns; both dead: nothing to resolve;
///    remote alive, local dead: **update/delete**; remote dead, local alive: **delete/update**
///    (resolved by the `$row` winner).
/// 3. `$row` ordered and the merged row dead: if the dead side is local and the remote is alive
///    with unseen column writes, those were concurrent with our delete: **update/delete**
///    (resolution Local); mirrored, **delete/update** (resolution Remote). The delete wins
///    because updates never bump `$row`: the delete's `$row` dominates.
/// 4. merged row alive with concurrent columns: **update/update**. This includes a re-insert
///    meeting an update made to the previous incarnation: `$row` is ordered, so it is not
///    insert/insert.
///
/// "Concurrent columns" (the contested ones in cases 2 and 4) leaves out concurrent registers
/// with equal stamps: both hold the same write, only the vectors merge, nothing is contested.
///
/// So `merge_row(a, b)` and `merge_row(b, a)` report mirrored kinds ([`ConflictKind::mirrored`]).
pub fn merge_row<V: Clone>(
    local: &RowVersions<V>,
    remote: &RowVersions<V>,
    policy: Policy,
) -> Result<RowMerge<V>, ColumnsDiffer> {
    if !local.columns.keys().eq(remote.columns.keys()) {
        let only = |a: &RowVersions<V>, b: &RowVersions<V>| {
            a.columns.keys().filter(|c| !b.columns.contains_key(*c)).cloned().collect::<Vec<_>>()
        };
        return Err(ColumnsDiffer { local_only: only(local, remote), remote_only: only(remote, local) });
    }
    let (row, row_outcome) = local.row.join(&remote.row, policy);
    let mut columns = BTreeMap::new();
    let mut column_outcomes = BTreeMap::new();
    for ((name, l), r) in local.columns.iter().zip(remote.columns.values()) {
        let (cell, outcome) = l.join(r, policy);
        columns.insert(name.clone(), cell);
        column_outcomes.insert(name.clone(), outcome);
    }
    let merged = RowVersions { row, columns };
    let conflict = classify(local, remote, row_outcome, &column_outcomes, merged.is_alive());
    Ok(RowMerge { row: merged, row_outcome, column_outcomes, conflict })
}

fn classify<V>(
    local: &RowVersions<V>,
    remote: &RowVersions<V>,
    row_outcome: Outcome,
    column_outcomes: &BTreeMap<String, Outcome>,
    merged_alive: bool,
) -> Option<RowConflict> {
    let unseen = |a: &RowVersions<V>, b: &RowVersions<V>| -> Vec<String> {
        a.columns
            .iter()
            .filter(|(name, cell)| !cell.reg.v().leq(b.columns[*name].reg.v()))
            .map(|(n, _)| n.clone())
            .collect()
    };
    // Concurrent columns whose two sides hold different writes. Concurrent registers with the
    // same stamp hold the same write (and value) beside different older ones: only their
    // vectors merge, there is nothing to contest, and which side "won" is meaningless.
    let concurrent = || -> (Vec<String>, Resolution) {
        let contested = column_outcomes.iter().filter(|(name, o)| {
            o.is_conflict() && local.columns[*name].reg.stamp() != remote.columns[*name].reg.stamp()
        });
        let columns = contested.clone().map(|(n, _)| n.clone()).collect();
        (columns, Resolution::of(contested.map(|(_, o)| o.winner())))
    };
    let conflict = |kind, columns, resolution| Some(RowConflict { kind, columns, resolution });
    let side = |s: Side| match s {
        Side::Local => Resolution::Local,
        Side::Remote => Resolution::Remote,
    };
    let (local_alive, remote_alive) = (local.is_alive(), remote.is_alive());

    if local.row.reg.v() == remote.row.reg.v() && local_alive != remote_alive {
        return if remote_alive {
            conflict(ConflictKind::UpdateMissing, unseen(remote, local), Resolution::Local)
        } else {
            None
        };
    }
    match (row_outcome, remote_alive, local_alive) {
        (Outcome::Conflict { winner }, true, true) => {
            // Two inserts. Their columns may all have been settled already (e.g. a later write
            // both sides saw), leaving only `$row` contested, or `$row` may hold the same insert
            // on both sides: then nothing is contested at all.
            let (mut columns, mut resolution) = concurrent();
            if local.row.reg.stamp() != remote.row.reg.stamp() {
                columns = with_row(columns);
                if columns.len() == 1 {
                    resolution = side(winner);
                }
            }
            nonempty(ConflictKind::InsertInsert, columns, resolution)
        }
        (Outcome::Conflict { .. }, false, false) => None,
        (Outcome::Conflict { winner }, true, false) => {
            conflict(ConflictKind::UpdateDelete, with_row(unseen(remote, local)), side(winner))
        }
        (Outcome::Conflict { winner }, false, true) => {
            conflict(ConflictKind::DeleteUpdate, with_row(unseen(local, remote)), side(winner))
        }
        // Ordered `$row`, merged row dead: the delete dominates; the other side's unseen column
        // writes were concurrent with it (had they seen it, their `$row` would be dead too).
        (Outcome::KeepLocal, true, false) if !merged_alive => {
            nonempty(ConflictKind::UpdateDelete, unseen(remote, local), Resolution::Local)
        }
        (Outcome::TakeRemote, false, true) if !merged_alive => {
            nonempty(ConflictKind::DeleteUpdate, unseen(local, remote), Resolution::Remote)
        }
        _ if merged_alive => {
            let (columns, resolution) = concurrent();
            nonempty(ConflictKind::UpdateUpdate, columns, resolution)
        }
        _ => None,
    }
}

fn nonempty(kind: ConflictKind, columns: Vec<String>, resolution: Resolution) -> Option<RowConflict> {
    (!columns.is_empty()).then_some(RowConflict { kind, columns, resolution })
}

fn with_row(mut columns: Vec<String>) -> Vec<String> {
    columns.insert(0, ROW.to_string());
    columns
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::versions::VersionVector;

    fn n(name: &str) -> NodeId {
        NodeId::new(name).unwrap()
    }

    const LWW: Policy = Policy::LastWriteWins;
    type Row = RowVersions<&'static str>;

    fn fresh() -> Row {
        RowVersions::untracked(Existence::Dead, [("x".to_string(), ""), ("y".to_string(), "")])
    }

    fn write(
        row: &Row,
        node: &str,
        counter: Counter,
        clock: i64,
        changed: &[(&str, &'static str)],
        kind: WriteKind,
    ) -> Row {
        local_write(row, n(node), counter, clock, changed, kind).unwrap()
    }

    fn insert(row: &Row, node: &str, counter: Counter, clock: i64, x: &'static str, y: &'static str) -> Row {
        write(row, node, counter, clock, &[("x", x), ("y", y)], WriteKind::Insert)
    }

    fn merge(local: &Row, remote: &Row) -> RowMerge<&'static str> {
        merge_row(local, remote, LWW).unwrap()
    }

    fn values(row: &Row) -> (Existence, &'static str, &'static str) {
        (row.row.value, row.columns["x"].value, row.columns["y"].value)
    }

    #[test]
    fn one_counter_and_one_stamp_per_write() {
        let r = insert(&fresh(), "a", 7, 1_000, "x1", "y1");
        for reg in r.registers() {
            assert_eq!(reg.v(), &VersionVector::from_entries([(n("a"), 7)]));
            assert_eq!(reg.stamp(), Some(Stamp { t: 1_000, node: n("a") }));
        }
        // An update of x only; the clock stepped back 500 µs: t = max t + 1, on x alone.
        let u = write(&r, "a", 9, 500, &[("x", "x2"), ("y", "y1")], WriteKind::Update);
        assert_eq!(u.columns["x"].reg.stamp(), Some(Stamp { t: 1_001, node: n("a") }));
        assert_eq!(u.columns["x"].reg.v().get(n("a")), 9);
        assert_eq!(u.columns["y"], r.columns["y"], "y is not distinct: untouched");
        assert_eq!(u.row, r.row, "an update never touches $row");
        // The clock ahead: it is used as is.
        let d = write(&u, "a", 10, 5_000, &[], WriteKind::Delete);
        assert_eq!(d.row.reg.stamp(), Some(Stamp { t: 5_000, node: n("a") }));
        assert_eq!((d.row.value, d.columns["x"].value), (Existence::Dead, "x2"), "a tombstone keeps values");
        // A no-op update changes nothing.
        assert_eq!(write(&u, "a", 11, 0, &[("x", "x2")], WriteKind::Update), u);
    }

    #[test]
    fn lamport_takes_every_register_of_the_row() {
        let r = insert(&fresh(), "a", 1, 100, "x1", "y1");
        let r = write(&r, "a", 2, 900, &[("y", "y2")], WriteKind::Update); // y at 900
        let r = write(&r, "a", 3, 10, &[("x", "x3")], WriteKind::Update); // x must pass y's 900
        assert_eq!(r.columns["x"].reg.t(), Some(901));
    }

    #[test]
    fn local_write_refuses_what_the_trigger_cannot_do() {
        let r = insert(&fresh(), "a", 5, 100, "x1", "y1");
        let err = |row: &Row, counter, changed: &[(&str, &'static str)], kind| {
            local_write(row, n("a"), counter, 0, changed, kind).unwrap_err()
        };
        assert_eq!(
            err(&r, 5, &[("x", "x2")], WriteKind::Update),
            WriteError::StaleCounter { node: n("a"), counter: 5, seen: 5 }
        );
        assert_eq!(err(&r, 6, &[("z", "?")], WriteKind::Update), WriteError::UnknownColumn { column: "z".into() });
        assert_eq!(
            err(&r, 6, &[("x", "1"), ("x", "2")], WriteKind::Update),
            WriteError::DuplicateColumn { column: "x".into() }
        );
        assert_eq!(err(&r, 6, &[("x", "1"), ("y", "2")], WriteKind::Insert), WriteError::InsertOfLiveRow);
        assert_eq!(err(&r, 6, &[("x", "1")], WriteKind::Delete), WriteError::DeleteWithColumns);
        assert_eq!(
            err(&fresh(), 6, &[("x", "1")], WriteKind::Insert),
            WriteError::InsertMissingColumn { column: "y".into() }
        );
        assert_eq!(err(&fresh(), 6, &[], WriteKind::Delete), WriteError::RowNotAlive { kind: WriteKind::Delete });
        let far = write(&r, "b", 1, i64::MAX, &[("x", "x9")], WriteKind::Update);
        assert_eq!(err(&far, 6, &[("y", "y9")], WriteKind::Update), WriteError::StampOverflow);
        assert!(WriteError::StaleCounter { node: n("a"), counter: 1, seen: 2 }.to_string().contains("sequence on a"));
    }

    #[test]
    fn different_columns_both_survive() {
        let base = insert(&fresh(), "a", 1, 100, "x1", "y1");
        let on_a = write(&base, "a", 2, 200, &[("x", "xa")], WriteKind::Update);
        let on_b = write(&base, "b", 1, 300, &[("y", "yb")], WriteKind::Update);
        let at_a = merge(&on_a, &on_b);
        assert_eq!(values(&at_a.row), (Existence::Alive, "xa", "yb"));
        assert_eq!(at_a.conflict, None);
        assert_eq!(at_a.column_outcomes["x"], Outcome::KeepLocal);
        assert_eq!(at_a.column_outcomes["y"], Outcome::TakeRemote);
        assert_eq!(merge(&on_b, &on_a).row, at_a.row);
    }

    #[test]
    fn update_update_last_write_wins_per_column() {
        let base = insert(&fresh(), "a", 1, 100, "x1", "y1");
        let on_a = write(&base, "a", 2, 200, &[("x", "xa"), ("y", "ya")], WriteKind::Update);
        let on_b = write(&base, "b", 1, 300, &[("x", "xb")], WriteKind::Update);
        let at_a = merge(&on_a, &on_b);
        assert_eq!(values(&at_a.row), (Existence::Alive, "xb", "ya"));
        assert_eq!(
            at_a.conflict,
            Some(RowConflict {
                kind: ConflictKind::UpdateUpdate,
                columns: vec!["x".into()],
                resolution: Resolution::Remote
            })
        );
        let at_b = merge(&on_b, &on_a);
        assert_eq!(at_b.row, at_a.row);
        assert_eq!(at_b.conflict.unwrap().resolution, Resolution::Local);
    }

    #[test]
    fn insert_insert() {
        let on_a = insert(&fresh(), "a", 1, 100, "xa", "ya");
        let on_b = insert(&fresh(), "b", 1, 100, "xb", "yb"); // same µs: node name decides
        let at_a = merge(&on_a, &on_b);
        assert_eq!(values(&at_a.row), (Existence::Alive, "xb", "yb"));
        let c = at_a.conflict.unwrap();
        assert_eq!(
            (c.kind, c.columns, c.resolution),
            (ConflictKind::InsertInsert, vec![ROW.into(), "x".into(), "y".into()], Resolution::Remote)
        );
    }

    #[test]
    fn delete_beats_concurrent_update_without_resurrecting() {
        let base = insert(&fresh(), "a", 1, 100, "x1", "y1");
        let deleted_on_a = write(&base, "a", 2, 200, &[], WriteKind::Delete);
        // b's update is later by the clock, but it never touches $row.
        let updated_on_b = write(&base, "b", 1, 9_000, &[("x", "xb")], WriteKind::Update);
        let at_a = merge(&deleted_on_a, &updated_on_b);
        let at_b = merge(&updated_on_b, &deleted_on_a);
        assert_eq!(at_a.row, at_b.row);
        assert_eq!(at_a.row.row.value, Existence::Dead);
        assert_eq!(at_a.row.columns["x"].value, "xb", "the tombstone keeps the newest value of x");
        assert_eq!(
            at_a.conflict,
            Some(RowConflict {
                kind: ConflictKind::UpdateDelete,
                columns: vec!["x".into()],
                resolution: Resolution::Local
            })
        );
        assert_eq!(
            at_b.conflict,
            Some(RowConflict {
                kind: ConflictKind::DeleteUpdate,
                columns: vec!["x".into()],
                resolution: Resolution::Remote
            })
        );
    }

    #[test]
    fn a_delete_that_saw_the_update_is_no_conflict() {
        let base = insert(&fresh(), "a", 1, 100, "x1", "y1");
        let updated = write(&base, "b", 1, 200, &[("x", "xb")], WriteKind::Update);
        let deleted = write(&updated, "a", 2, 150, &[], WriteKind::Delete);
        assert_eq!(merge(&updated, &deleted).conflict, None);
        assert_eq!(merge(&updated, &deleted).row.row.value, Existence::Dead);
        assert_eq!(merge(&deleted, &updated).conflict, None);
    }

    #[test]
    fn reinsert_beats_the_delete_it_saw_and_concurrent_delete_is_a_conflict() {
        let base = insert(&fresh(), "a", 1, 100, "x1", "y1");
        let deleted = write(&base, "a", 2, 200, &[], WriteKind::Delete);
        let reinserted = insert(&deleted, "a", 3, 50, "x3", "y3"); // clock behind: t = 201
        assert_eq!(reinserted.row.reg.t(), Some(201));
        // A stale copy of the delete arriving later changes nothing.
        let m = merge(&reinserted, &deleted);
        assert_eq!((m.row_outcome, m.row.clone(), m.conflict), (Outcome::KeepLocal, reinserted.clone(), None));
        // b deleted concurrently with a's delete + re-insert: $row concurrent, existence differs.
        let deleted_on_b = write(&base, "b", 1, 300, &[], WriteKind::Delete);
        let at_a = merge(&reinserted, &deleted_on_b);
        assert_eq!(at_a.row.row.value, Existence::Dead, "b's delete has the larger stamp");
        let c = at_a.conflict.unwrap();
        assert_eq!((c.kind, c.resolution), (ConflictKind::DeleteUpdate, Resolution::Remote));
        assert_eq!(c.columns[0], ROW);
        let at_b = merge(&deleted_on_b, &reinserted);
        assert_eq!(at_b.row, at_a.row);
        assert_eq!(at_b.conflict.unwrap().kind, ConflictKind::UpdateDelete);
    }

    #[test]
    fn update_of_the_old_incarnation_can_win_over_a_reinsert() {
        // a deletes and re-inserts; b, not having seen either, updates x with a later clock.
        // LWW per column keeps b's x in the re-inserted row (it converges; DESIGN does not
        // say whether this is wanted).
        let base = insert(&fresh(), "a", 1, 100, "x1", "y1");
        let reinserted = insert(&write(&base, "a", 2, 200, &[], WriteKind::Delete), "a", 3, 210, "x3", "y3");
        let updated_on_b = write(&base, "b", 1, 5_000, &[("x", "xb")], WriteKind::Update);
        let at_a = merge(&reinserted, &updated_on_b);
        assert_eq!(values(&at_a.row), (Existence::Alive, "xb", "y3"));
        assert_eq!(at_a.conflict.unwrap().kind, ConflictKind::UpdateUpdate);
        assert_eq!(merge(&updated_on_b, &reinserted).row, at_a.row);
    }

    #[test]
    fn concurrent_registers_holding_the_same_write_are_not_contested() {
        // Both sides hold a's write "xa" (the largest stamp) beside an older write of b or c
        // that the other lacks: the vectors merge, the value is the same, no conflict.
        let base = insert(&fresh(), "a", 1, 100, "x1", "y1");
        let on_a = write(&base, "a", 2, 900, &[("x", "xa")], WriteKind::Update);
        let at_b = merge(&write(&base, "b", 1, 200, &[("x", "xb")], WriteKind::Update), &on_a).row;
        let at_c = merge(&write(&base, "c", 1, 300, &[("x", "xc")], WriteKind::Update), &on_a).row;
        for (l, r) in [(&at_b, &at_c), (&at_c, &at_b)] {
            let m = merge(l, r);
            assert_eq!(m.column_outcomes["x"], Outcome::Conflict { winner: Side::Local });
            assert_eq!(m.row.columns["x"].value, "xa");
            assert_eq!(
                m.row.columns["x"].reg.v(),
                &VersionVector::from_entries([(n("a"), 2), (n("b"), 1), (n("c"), 1)])
            );
            assert_eq!(m.conflict, None);
        }
    }

    #[test]
    fn update_missing() {
        // The row predates pgduplex (no versions row) and is missing on this node.
        let here: Row = RowVersions::untracked(Existence::Dead, [("x".into(), ""), ("y".into(), "")]);
        let there: Row = RowVersions::untracked(Existence::Alive, [("x".into(), "x0"), ("y".into(), "y0")]);
        let updated = write(&there, "b", 4, 100, &[("x", "xb")], WriteKind::Update);
        let m = merge(&here, &updated);
        assert_eq!(m.row.row.value, Existence::Dead, "kept local");
        assert_eq!(
            m.conflict,
            Some(RowConflict {
                kind: ConflictKind::UpdateMissing,
                columns: vec!["x".into()],
                resolution: Resolution::Local
            })
        );
    }

    #[test]
    fn columns_must_match() {
        let a = fresh();
        let b: Row = RowVersions::untracked(Existence::Dead, [("x".into(), ""), ("z".into(), "")]);
        let err = merge_row(&a, &b, LWW).unwrap_err();
        assert_eq!((err.local_only, err.remote_only), (vec!["y".to_string()], vec!["z".to_string()]));
    }

    #[test]
    fn prefer_owner_wins_concurrent_columns_and_rows() {
        let base = insert(&fresh(), "a", 1, 100, "x1", "y1");
        let on_a = write(&base, "a", 2, 200, &[("x", "xa")], WriteKind::Update);
        let on_b = write(&base, "b", 1, 300, &[("x", "xb")], WriteKind::Update);
        let prefer_a = Policy::Prefer(n("a"));
        assert_eq!(merge_row(&on_b, &on_a, prefer_a).unwrap().row.columns["x"].value, "xa");
        assert_eq!(merge_row(&on_a, &on_b, prefer_a).unwrap().row.columns["x"].value, "xa");
        // But prefer cannot save a's update from b's delete: $row is not concurrent.
        let deleted_on_b = write(&base, "b", 1, 300, &[], WriteKind::Delete);
        assert_eq!(merge_row(&on_a, &deleted_on_b, prefer_a).unwrap().row.row.value, Existence::Dead);
    }
}
