//! The merge rule of DESIGN §6: per-column registers, their join, the local write, the row merge.
//!
//! Pure: no I/O, no clock, no tokio. The capture trigger and the apply (SQL) do what
//! [`local_write`] and [`merge_row`] do here; having the rule in Rust lets the tests run whole
//! scenarios (two or three nodes, wandering clocks, any delivery order) against it.
//!
//! # What a register stands for
//!
//! Every column of every row (and the existence pseudo-column `$row`) has a [`Register`]
//! `(v, t, n)` guarding a value ([`Cell`]). Read it as a summary of a *set of writes*: the writes
//! to that column the node has absorbed, locally or by merging.
//!
//! - `v[N] = k` says the set holds N's write with counter `k` and N's earlier writes to the
//!   column. The set is closed under "happened before": a node writes after seeing its own row,
//!   and each change ships the row's full register set, so whoever has a write has what it
//!   superseded. Counters come from one node-wide sequence, so distinct writes of N never share
//!   a counter. Hence `v_a <= v_b` exactly when set A ⊆ set B.
//! - `(t, n)` and the value are those of the write with the largest [`Stamp`] in the set. That
//!   holds for a fresh local write only if its stamp exceeds every stamp in the set, which is the
//!   Lamport condition of [`local_write`]: `t >= every t in the row + 1` (each register's `t` is
//!   its set's maximum). Stamps are unique per write: `n` separates nodes, and one node's writes
//!   to a row get strictly growing `t` (under last-write-wins a node's largest `t` on a row never
//!   goes down, since a join keeps the larger stamp; under `prefer` it can: see
//!   [`Policy::Prefer`]).
//!
//! # Why the merge is a join
//!
//! [`join`] computes the summary of the *union* of the two sets:
//! `remote.v <= local.v` means R ⊆ L, the union is L: keep local (a stale write, a duplicate, our
//! own echo); `local.v < remote.v` means L ⊂ R: take remote; otherwise the union's vector is
//! `v_l ⊔ v_r` and its largest stamp is the larger of the two maxima: the larger `(t, n)` wins.
//! Set union is commutative, associative and idempotent, so the join is too, on registers and
//! values alike: every order of arrival, every duplicate and every echo end in the same cell, and
//! nodes that have received the same writes hold the same row. The property tests check exactly
//! this homomorphism (`join(summary(A), summary(B)) == summary(A ∪ B)`), and the scenario tests
//! (a port of `models/register_join_model.py`) check convergence end to end.
//!
//! # Why each rule of DESIGN §6 is there
//!
//! Each is an assumption of the argument above; the scenario tests (`sim.rs`) turn each off and
//! show what breaks: the nodes diverge, or a row ends as a mix of two whole-row writes.
//!
//! - **Lamport `+ 1`.** Without it a write can supersede (by `v`) a write with a larger stamp.
//!   A node that receives both *in order* keeps the newer write; a node that sees them only as
//!   part of concurrent registers keeps the larger stamp: divergence.
//! - **One counter per write from the node-wide sequence, never `old + 1`.** A per-register
//!   counter restarts when a register is recreated, so two different sets get the same vector and
//!   `<=` no longer means ⊆. While registers are never dropped, per-register counters happen to
//!   be safe (`sim::per_register_counters_alone_converge`); the rule is for the purge to come.
//! - **One stamp per write.** Each column ends with the largest-stamped write that touched it. With
//!   one stamp per write, two whole-row writes compare the same way on every column; with a stamp
//!   per column (each column's own `t + 1`), an earlier partial update can make x prefer one
//!   whole-row write and y the other: a row nobody wrote.
//! - **Updates never touch `$row`; `$row` is plain last-write-wins.** `$row`'s set then holds
//!   only inserts and deletes: a delete dominates the insert it saw, a concurrent update leaves
//!   `$row` alone and cannot resurrect the row, and a re-insert dominates the delete it saw.
//!   "Delete always wins" breaks the last point (a stale delete kills a newer re-insert on some
//!   nodes only) and is not a join of the writes.
//! - **Purge registers only when causally stable.** A dropped register is the empty set: a node
//!   that purged takes back writes every other node has already superseded. Stability alone is
//!   not enough either: a node that drops a tombstone every node holds forgets the other nodes'
//!   counters and the row's largest `t`, so its re-insert can be concurrent with, and lose to,
//!   the tombstone still held elsewhere (`sim::one_node_purging_a_stable_tombstone_still_diverges`).
//!   No purge exists yet; the one that comes must keep what a purged register stood for.
//! - **`prefer` for two nodes only** (see [`Policy::Prefer`]): the concurrent winner is the side
//!   with the larger `v[owner]`, then the larger stamp, i.e. last-write-wins over the key
//!   `(v[owner], t, n)`, which local writes also raise; so it is a join for any number of nodes.
//!   "The owner's write wins" is what it *means* only with two nodes.
//!
//! Values of a dead row are kept with its registers (see [`RowVersions`]); a tombstone with
//! registers but no values diverges.

mod node;
mod register;
mod row;
mod vector;

#[cfg(test)]
mod props;
#[cfg(test)]
mod sim;

pub use node::{InvalidNodeId, MAX_NODE_NAME_LEN, NodeId};
pub use register::{Cell, Outcome, Policy, Register, RegisterError, Side, Stamp, join};
pub use row::{
    ColumnsDiffer, ConflictKind, Existence, ROW, Resolution, RowConflict, RowMerge, RowVersions, WriteError, WriteKind,
    local_write, merge_row,
};
pub use vector::{Causality, Counter, VersionVector};
