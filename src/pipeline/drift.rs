//! Schema drift (DESIGN §6b), the stream side: which tables are paused, holding their changes,
//! and replaying them once the target matches the source again.
//!
//! A table is paused when a Relation message names columns the target lacks (or the target
//! lacks the table): from then on its changes are held in the target's
//! `pgduplex.paused_changes` (see [`crate::apply::Applier::hold_change`]), inside the apply
//! batch that advances the origin past them, while the other tables go on. The pause is
//! re-checked whenever a Relation message for the table arrives and every few seconds against
//! the target's catalog; once the target has every column, the held changes are replayed in
//! order, in a target transaction that also removes them, and the table resumes. Decisions
//! are taken between source transactions, so a transaction's changes of a table are either
//! all held or all applied.
//!
//! Two-way, the check also reads the source node's catalog: a pause caused by a column the
//! target dropped first ends once the source has dropped it too, even if the source does not
//! write the table again (no new Relation message would come).
//!
//! Two-way: a change lacking a column the target has is not drift (the column was added on
//! the target first; the merge keeps the target's value, see `apply::merge`), so an ALTER
//! TABLE ... ADD COLUMN on one node pauses only the direction towards the other node.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tracing::{error, info, warn};

use super::pair::{Pairer, RowChange};
use super::{PipelineError, RowMessage, State};
use crate::lsn::Lsn;
use crate::pgoutput::{self, Message, Relation, Truncate};

/// How often paused tables are checked against the target's catalog.
pub(super) const DRIFT_CHECK_INTERVAL: Duration = Duration::from_secs(3);
/// How long to wait after a replay failed before trying again.
const REPLAY_RETRY: Duration = Duration::from_secs(30);
/// Held changes read per query while replaying.
const REPLAY_PAGE: i64 = 5000;

/// The latest Relation message for a source OID.
pub(super) struct SourceRelation {
    /// The data table it belongs to (`schema.table`; a versions table's is its data table's).
    pub table: String,
    /// The message as received: held changes are stored with it.
    pub raw: Bytes,
    /// A two-way versions table's relation.
    pub versions: bool,
}

/// A table being added to the direction (see `pgduplex.table_sync`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Sync {
    /// `init` is copying it: its changes are held.
    Copying,
    /// Copied at the snapshot of `lsn`: changes of transactions that committed before it are
    /// skipped (the copy has them). Until `replayed`, later ones are still held, so that the
    /// held ones go first.
    Copied { lsn: Lsn, replayed: bool },
}

/// A paused table.
pub(super) struct Paused {
    /// The source's latest Relation message for it: what the target must match.
    relation: Relation,
    raw: Bytes,
    /// Why, as stored in `pgduplex.paused_tables`.
    error: String,
    retry_at: Instant,
}

impl State<'_> {
    fn decode_relation(&self, raw: &Bytes, lsn: Lsn) -> Result<Relation, PipelineError> {
        match self.decode(raw, lsn)? {
            Message::Relation(r) => Ok(r),
            other => Err(self.violation(lsn, format!("held change refers to a {} message, not a Relation", other.name()))),
        }
    }

    fn decode(&self, raw: &Bytes, lsn: Lsn) -> Result<Message, PipelineError> {
        pgoutput::decode(raw, &self.ctx).map_err(|source| PipelineError::Decode { direction: self.label.clone(), lsn, source })
    }

    fn set_paused_gauge(&self, table: &str, paused: bool) {
        self.metrics.table_paused.with_label_values(&[&self.label, table]).set(i64::from(paused));
    }

    /// Reads the tables paused on the target by an earlier run.
    pub(super) async fn load_paused(&mut self) -> Result<(), PipelineError> {
        let source = self.direction.source.to_string();
        let rows = self.applier.paused_tables(&source).await.map_err(|e| self.apply_err(e))?;
        for p in rows {
            let relation = self.decode_relation(&p.relation, Lsn::ZERO)?;
            warn!(direction = %self.label, table = %p.table, error = %p.error, "table paused (schema drift): its changes are held");
            self.set_paused_gauge(&p.table, true);
            self.paused.insert(p.table, Paused { relation, raw: p.relation, error: p.error, retry_at: Instant::now() });
        }
        self.refresh_syncing().await
    }

    /// Reads the tables being added (`pgduplex.table_sync`) into `syncing`.
    async fn refresh_syncing(&mut self) -> Result<(), PipelineError> {
        let source = self.direction.source.to_string();
        let rows = self.applier.table_sync(&source).await.map_err(|e| self.apply_err(e))?;
        let before = std::mem::take(&mut self.syncing);
        for (table, lsn) in rows {
            let state = match (lsn, before.get(&table)) {
                (None, _) => Sync::Copying,
                (Some(lsn), Some(&Sync::Copied { lsn: l, replayed })) if l == lsn => Sync::Copied { lsn, replayed },
                (Some(lsn), _) => Sync::Copied { lsn, replayed: false },
            };
            self.syncing.insert(table, state);
        }
        Ok(())
    }

    /// Between source transactions: picks up tables `init` started or finished copying;
    /// replays the held changes of a copied one (skipping what the copy has), and forgets it
    /// once the origin is past its copy.
    pub(super) async fn recheck_syncing(&mut self) -> Result<(), PipelineError> {
        self.refresh_syncing().await?;
        let source = self.direction.source.to_string();
        let tables: Vec<(String, Sync)> = self.syncing.iter().map(|(t, s)| (t.clone(), *s)).collect();
        for (table, state) in tables {
            let Sync::Copied { lsn, replayed } = state else { continue };
            if self.paused.contains_key(&table) {
                // Paused for drift as well: its resumption replays (with the same skipping).
                continue;
            }
            if !replayed {
                if self.sync_retry_at.is_some_and(|at| Instant::now() < at) {
                    continue;
                }
                self.applier.commit_batch().await.map_err(|e| self.apply_err(e))?;
                self.applier.settle().await.map_err(|e| self.apply_err(e))?;
                let latest = self.stream_relation(&table)?;
                let replayed = match self.replay(&table, latest.as_ref()).await {
                    Ok(n) => n,
                    Err(e) => {
                        // Rolled back whole: the changes stay held; the other tables go on.
                        warn!(direction = %self.label, table, error = %e, retry_in = ?REPLAY_RETRY,
                            "cannot replay the held changes of an added table yet");
                        self.applier.rollback_batch().await.map_err(|e| self.apply_err(e))?;
                        self.sync_retry_at = Some(Instant::now() + REPLAY_RETRY);
                        continue;
                    }
                };
                self.applier.commit_batch().await.map_err(|e| self.apply_err(e))?;
                self.applier.settle().await.map_err(|e| self.apply_err(e))?;
                self.syncing.insert(table.clone(), Sync::Copied { lsn, replayed: true });
                info!(direction = %self.label, table, replayed, copied_at = %lsn, "added table copied: its held changes were replayed, it streams now");
            }
            if self.applier.committed_lsn() >= lsn {
                self.applier.end_table_sync(&source, &table).await.map_err(|e| self.apply_err(e))?;
                self.applier.commit_batch().await.map_err(|e| self.apply_err(e))?;
                self.syncing.remove(&table);
            }
        }
        Ok(())
    }

    /// The stream's latest Relation message of a data table, if one came in this session.
    fn stream_relation(&self, table: &str) -> Result<Option<Relation>, PipelineError> {
        match self.relations.values().find(|r| r.table == table && !r.versions) {
            Some(r) => Ok(Some(self.decode_relation(&r.raw, Lsn::ZERO)?)),
            None => Ok(None),
        }
    }

    /// A Relation message: remembered, and checked against the target (pausing the table, or
    /// marking a paused one for resumption after this transaction).
    pub(super) async fn on_relation(&mut self, rel: Relation, raw: &Bytes) -> Result<(), PipelineError> {
        let versions = self.pairer.is_some() && rel.namespace == super::pair::VERSIONS_SCHEMA;
        let table = if versions { rel.name.clone() } else { format!("{}.{}", rel.namespace, rel.name) };
        self.relations.insert(rel.oid, SourceRelation { table: table.clone(), raw: raw.clone(), versions });
        if let Some(pairer) = &mut self.pairer {
            pairer.relation(&rel);
            self.applier.forget_two_way_table(&table);
        }
        if versions {
            return Ok(());
        }
        if !self.syncing.contains_key(&table) {
            // A table just added to the publication: `init` may be copying it.
            self.refresh_syncing().await?;
        }
        let source = self.direction.source.to_string();
        // One way, a matching relation is also installed for applying (paused or not: a paused
        // table's changes are held, and resuming installs its latest relation again).
        let drift = self.applier.relation_or_drift(&rel, &source).await.map_err(|e| self.apply_err(e))?;
        match drift {
            Some(error) => {
                self.resume_wanted.retain(|t| *t != table);
                if !self.paused.contains_key(&table) {
                    error!(direction = %self.label, table = %table, error = %error, "schema drift: table paused, its changes are held");
                    self.set_paused_gauge(&table, true);
                }
                self.applier.pause_table(&source, &table, &error, raw).await.map_err(|e| self.apply_err(e))?;
                self.paused.insert(table, Paused { relation: rel, raw: raw.clone(), error, retry_at: Instant::now() });
            }
            None => {
                if let Some(p) = self.paused.get_mut(&table) {
                    p.relation = rel;
                    p.raw = raw.clone();
                    p.retry_at = Instant::now();
                    if !self.resume_wanted.contains(&table) {
                        self.resume_wanted.push(table);
                    }
                }
            }
        }
        Ok(())
    }

    /// Holds a change of a paused table (returns true), or leaves it to the caller.
    /// Also drops (returns true) a change of an added table that its copy already has.
    pub(super) async fn held(&mut self, oid: u32, raw: &Bytes) -> Result<bool, PipelineError> {
        if self.paused.is_empty() && self.syncing.is_empty() {
            return Ok(false);
        }
        let Some(r) = self.relations.get(&oid) else { return Ok(false) };
        let commit_lsn = self.open.as_ref().map_or(Lsn::ZERO, |t| t.final_lsn);
        let hold = match self.syncing.get(&r.table) {
            Some(Sync::Copied { lsn, .. }) if commit_lsn < *lsn => return Ok(true),
            Some(Sync::Copying | Sync::Copied { replayed: false, .. }) => true,
            _ => self.paused.contains_key(&r.table),
        };
        if !hold {
            return Ok(false);
        }
        let (table, relation) = (r.table.clone(), r.raw.clone());
        let source = self.direction.source.to_string();
        self.applier
            .hold_change(&source, &table, commit_lsn, &relation, raw)
            .await
            .map_err(|e| self.apply_err(e))?;
        Ok(true)
    }

    /// Holds a TRUNCATE for each paused table it names; returns it for the other tables.
    pub(super) async fn hold_truncate(&mut self, mut tr: Truncate, raw: &Bytes) -> Result<Truncate, PipelineError> {
        let mut rest = Vec::with_capacity(tr.relation_oids.len());
        for oid in std::mem::take(&mut tr.relation_oids) {
            if !self.held(oid, raw).await? {
                rest.push(oid);
            }
        }
        tr.relation_oids = rest;
        Ok(tr)
    }

    /// After a source transaction: resumes the paused tables whose latest Relation matched.
    pub(super) async fn resume_wanted_tables(&mut self) -> Result<(), PipelineError> {
        for table in std::mem::take(&mut self.resume_wanted) {
            self.resume(&table, true).await?;
        }
        Ok(())
    }

    /// Between source transactions: checks the paused tables against the target's catalog
    /// (the same ALTER TABLE may have run there) and resumes those that match now.
    pub(super) async fn recheck_paused(&mut self) -> Result<(), PipelineError> {
        let now = Instant::now();
        let due: Vec<(String, Relation, Bytes, String)> = self
            .paused
            .iter()
            .filter(|(_, p)| p.retry_at <= now)
            .map(|(t, p)| (t.clone(), p.relation.clone(), p.raw.clone(), p.error.clone()))
            .collect();
        let source = self.direction.source.to_string();
        for (table, rel, raw, stored) in due {
            match self.applier.drift(&rel, &source).await.map_err(|e| self.apply_err(e))? {
                None => self.resume(&table, true).await?,
                // Two-way, a column dropped on the target first: the source may have dropped it
                // too without writing the table since (no new Relation message tells us).
                Some(_) if self.pairer.is_some() && self.source_catalog_matches(&rel).await? => self.resume(&table, false).await?,
                Some(error) if error != stored => {
                    // Keep the stored reason current (the target changed, but not enough).
                    self.applier.pause_table(&source, &table, &error, &raw).await.map_err(|e| self.apply_err(e))?;
                    self.applier.commit_batch().await.map_err(|e| self.apply_err(e))?;
                    if let Some(p) = self.paused.get_mut(&table) {
                        p.error = error;
                    }
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// Whether the source's catalog, as it is now, has no column the target lacks (the stream's
    /// latest Relation message may be older).
    async fn source_catalog_matches(&mut self, rel: &Relation) -> Result<bool, PipelineError> {
        let source: Vec<String> = self
            .source_sql
            .query(crate::apply::TARGET_COLUMNS_SQL, &[&rel.namespace, &rel.name])
            .await
            .map_err(|e| PipelineError::Db {
                direction: self.label.clone(),
                source: crate::db::DbError::new(self.direction.source.as_str(), format!("cannot read columns of {}.{}", rel.namespace, rel.name), e),
            })?
            .iter()
            .filter(|r| !r.get::<_, bool>(1))
            .map(|r| r.get(0))
            .collect();
        if source.is_empty() {
            return Ok(false);
        }
        let target = self.applier.target_columns(&rel.namespace, &rel.name).await.map_err(|e| self.apply_err(e))?;
        Ok(source.iter().all(|c| target.iter().any(|t| &t.name == c)))
    }

    /// Replays a paused table's held changes in a target transaction of its own and resumes
    /// it (`recheck`: only if its latest Relation matches the target). A replay that fails is
    /// rolled back (nothing is lost: the changes stay held) and tried again later.
    async fn resume(&mut self, table: &str, recheck: bool) -> Result<(), PipelineError> {
        let Some(p) = self.paused.get(table) else { return Ok(()) };
        if self.syncing.get(table) == Some(&Sync::Copying) {
            // Still being copied: nothing of it may be applied yet (replay skips what a
            // finished copy has).
            return Ok(());
        }
        let latest = p.relation.clone();
        let source = self.direction.source.to_string();
        if recheck && self.applier.drift(&latest, &source).await.map_err(|e| self.apply_err(e))?.is_some() {
            return Ok(());
        }
        self.applier.commit_batch().await.map_err(|e| self.apply_err(e))?;
        self.applier.settle().await.map_err(|e| self.apply_err(e))?;
        let replayed = match self.replay(table, Some(&latest)).await {
            Ok(n) => n,
            Err(e) => {
                warn!(direction = %self.label, table, error = %e, retry_in = ?REPLAY_RETRY,
                    "cannot replay the held changes of a paused table yet; it stays paused");
                self.applier.rollback_batch().await.map_err(|e| self.apply_err(e))?;
                if let Some(p) = self.paused.get_mut(table) {
                    p.retry_at = Instant::now() + REPLAY_RETRY;
                }
                return Ok(());
            }
        };
        self.applier.commit_batch().await.map_err(|e| self.apply_err(e))?;
        self.applier.settle().await.map_err(|e| self.apply_err(e))?;
        self.paused.remove(table);
        self.set_paused_gauge(table, false);
        info!(direction = %self.label, table, replayed, "schema matches again: held changes replayed, table resumed");
        Ok(())
    }

    /// Applies the held changes of `table` in order and removes them and the pause, in the
    /// open batch; returns how many there were.
    async fn replay(&mut self, table: &str, latest: Option<&Relation>) -> Result<u64, PipelineError> {
        let source = self.direction.source.to_string();
        let two_way = self.pairer.is_some();
        // The target's table changed since its facts were cached.
        self.applier.forget_two_way_table(table);
        // Columns dropped on both nodes since a change was held are left out of it.
        let target: HashSet<String> = match latest {
            Some(latest) => self
                .applier
                .target_columns(&latest.namespace, &latest.name)
                .await
                .map_err(|e| self.apply_err(e))?
                .into_iter()
                .map(|c| c.name)
                .collect(),
            None if two_way => return Err(self.violation(Lsn::ZERO, format!("no Relation message for {table} to replay its held changes"))),
            None => HashSet::new(),
        };
        // An added table's copy has the changes of transactions that committed before it.
        let skip_before = match self.syncing.get(table) {
            Some(Sync::Copied { lsn, .. }) => Some(*lsn),
            _ => None,
        };
        self.applier.begin_if_needed().await.map_err(|e| self.apply_err(e))?;
        let mut after = 0i64;
        let mut count = 0u64;
        let mut group: Option<(Lsn, Pairer)> = None;
        let mut last_relation: Option<Bytes> = None;
        loop {
            let page = self.applier.held_changes(&source, table, after, REPLAY_PAGE).await.map_err(|e| self.apply_err(e))?;
            if page.is_empty() {
                break;
            }
            for h in page {
                after = h.id;
                if skip_before.is_some_and(|l| h.commit_lsn < l) {
                    continue;
                }
                count += 1;
                let rel = self.decode_relation(&h.relation, h.commit_lsn)?;
                let msg = self.decode(&h.message, h.commit_lsn)?;
                if two_way {
                    if let Some((lsn, pairer)) = group.take_if(|(lsn, _)| *lsn != h.commit_lsn) {
                        self.apply_group(lsn, pairer, &target).await?;
                    }
                    let (_, pairer) = group.get_or_insert_with(|| (h.commit_lsn, Pairer::new()));
                    pairer.relation(&rel);
                    match RowMessage::of(msg) {
                        Ok(row) => row.pair(pairer),
                        Err(other) => return Err(self.violation(h.commit_lsn, format!("held {} message in a two-way direction", other.name()))),
                    }
                    continue;
                }
                if last_relation.as_ref() != Some(&h.relation) {
                    self.applier.replay_relation(&rel).await.map_err(|e| self.apply_err(e))?;
                    last_relation = Some(h.relation.clone());
                }
                let r = match RowMessage::of(msg) {
                    Ok(row) => row.apply(&mut self.applier).await,
                    Err(Message::Truncate(mut m)) => {
                        m.relation_oids.retain(|&o| o == rel.oid);
                        self.applier.truncate(&m).await
                    }
                    Err(other) => return Err(self.violation(h.commit_lsn, format!("held {} message", other.name()))),
                };
                r.map_err(|e| self.apply_err(e))?;
            }
        }
        if let Some((lsn, pairer)) = group.take() {
            self.apply_group(lsn, pairer, &target).await?;
        }
        self.applier.check_deferred_constraints().await.map_err(|e| self.apply_err(e))?;
        self.applier.end_pause(&source, table, after).await.map_err(|e| self.apply_err(e))?;
        if two_way {
            self.applier.forget_two_way_table(table);
        } else if let Some(latest) = latest {
            self.applier.relation(latest).await.map_err(|e| self.apply_err(e))?;
        }
        Ok(count)
    }

    /// Applies one held source transaction of a two-way table.
    async fn apply_group(&mut self, commit_lsn: Lsn, mut pairer: Pairer, target: &HashSet<String>) -> Result<(), PipelineError> {
        let keep = |c: &str| target.contains(c);
        let trim = |changes: &mut Vec<RowChange>| changes.iter_mut().for_each(|c| c.retain_columns(keep));
        let changes = match pairer.finish() {
            Ok(mut c) => {
                trim(&mut c);
                Ok(c)
            }
            Err((e, mut c)) => {
                trim(&mut c);
                Err((e, c))
            }
        };
        self.applier.apply_paired(changes, commit_lsn).await.map_err(|e| self.apply_err(e))
    }
}
