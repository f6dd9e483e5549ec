//! Decoding of pgoutput streams captured from real PostgreSQL 15 and 18 servers by
//! `scripts/capture-pgoutput-fixtures.sh`, checked against the workload that produced them.
//!
//! Each fixture is decoded message by message while a small state machine checks the
//! stream's guarantees (Begin/Commit pairing and LSNs, Relation before changes, xids inside
//! stream chunks, prepared transactions matched by gid), then the test asserts that every case
//! of the workload shows up with the shape it must have.

use std::collections::{HashMap, HashSet};

use bytes::Bytes;

use super::*;

const PG15_V1: &str = include_str!("../../tests/fixtures/pgoutput/pg15_v1.hex");
const PG18_V1: &str = include_str!("../../tests/fixtures/pgoutput/pg18_v1.hex");
const PG18_V4: &str = include_str!("../../tests/fixtures/pgoutput/pg18_v4.hex");
const PG18_V4_BINARY: &str = include_str!("../../tests/fixtures/pgoutput/pg18_v4_binary.hex");
const PG18_V4_STREAM_2PC: &str =
    include_str!("../../tests/fixtures/pgoutput/pg18_v4_stream_parallel_2pc.hex");

fn unhex(line: &str) -> Vec<u8> {
    assert!(line.len().is_multiple_of(2), "odd-length hex line {line:?}");
    (0..line.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(&line[i..i + 2], 16)
                .unwrap_or_else(|e| panic!("bad hex {line:?}: {e}"))
        })
        .collect()
}

/// What a fixture contained, counted while its invariants were checked.
#[derive(Debug, Default)]
struct Summary {
    messages: usize,
    transactions: usize,
    inserts: usize,
    updates_plain: usize,
    updates_old_key: usize,
    updates_old_row: usize,
    deletes_old_key: usize,
    deletes_old_row: usize,
    truncates: Vec<Truncate>,
    types: Vec<TypeMessage>,
    origins: Vec<Origin>,
    transactional_messages: Vec<LogicalMessage>,
    non_transactional_messages: Vec<LogicalMessage>,
    relations_seen: Vec<Relation>,
    /// Relation messages that changed a table's columns mid-stream.
    schema_changes: usize,
    nulls: usize,
    unchanged_toast: usize,
    text: usize,
    binary: usize,
    stream_chunks: usize,
    streamed_changes: usize,
    /// Changes inside a chunk whose xid is not the chunk's top-level xid.
    subtransaction_changes: usize,
    stream_commits: usize,
    stream_aborts: Vec<StreamAbort>,
    prepares: usize,
    stream_prepares: usize,
    commit_prepared: usize,
    rollback_prepared: usize,
}

impl Summary {
    fn count_values(&mut self, tuple: &TupleData) {
        for value in &tuple.columns {
            match value {
                ColumnValue::Null => self.nulls += 1,
                ColumnValue::UnchangedToast => self.unchanged_toast += 1,
                ColumnValue::Text(_) => self.text += 1,
                ColumnValue::Binary(_) => self.binary += 1,
            }
        }
    }
}

/// Where the stream is between messages.
#[derive(Debug)]
enum Frame {
    Idle,
    Transaction { final_lsn: Lsn, first: bool },
    Preparing { begin: BeginPrepare },
}

/// Decodes every message of `fixture` under `protocol_version` and checks the stream's
/// invariants, panicking with the line number on the first violation.
fn walk(fixture: &str, protocol_version: u32) -> Summary {
    let mut summary = Summary::default();
    let mut cache = RelationCache::new();
    let mut frame = Frame::Idle;
    let mut chunk_xid: Option<u32> = None;
    let mut streamed_xids = HashSet::new();
    // For each streamed top-level xid, the (sub)transaction xids its changes carried.
    let mut change_xids: HashMap<u32, HashSet<u32>> = HashMap::new();
    let mut prepared_gids = HashSet::new();
    let lines = fixture
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'));
    for (index, line) in lines {
        let line_no = index + 1;
        let ctx = DecodeContext {
            protocol_version,
            in_streamed_transaction: chunk_xid.is_some(),
        };
        let message = decode(&Bytes::from(unhex(line)), &ctx)
            .unwrap_or_else(|e| panic!("line {line_no}: {e}\n{line}"));
        summary.messages += 1;
        let in_data_frame = chunk_xid.is_some() || !matches!(frame, Frame::Idle);
        let mut check_xid = |xid: Option<u32>| match chunk_xid {
            None => assert_eq!(xid, None, "line {line_no}: xid outside a stream chunk"),
            Some(top) => {
                let xid =
                    xid.unwrap_or_else(|| panic!("line {line_no}: no xid inside chunk of {top}"));
                change_xids.entry(top).or_default().insert(xid);
            }
        };
        let was_first = matches!(frame, Frame::Transaction { first: true, .. });
        if let Frame::Transaction { first, .. } = &mut frame {
            *first = false;
        }
        match message {
            Message::Begin(begin) => {
                assert!(
                    matches!(frame, Frame::Idle) && chunk_xid.is_none(),
                    "line {line_no}: nested Begin"
                );
                assert!(
                    begin.commit_time > 0,
                    "line {line_no}: commit time before 2000"
                );
                frame = Frame::Transaction {
                    final_lsn: begin.final_lsn,
                    first: true,
                };
            }
            Message::Commit(commit) => {
                let Frame::Transaction { final_lsn, .. } = frame else {
                    panic!("line {line_no}: Commit outside a transaction")
                };
                assert_eq!(
                    commit.commit_lsn, final_lsn,
                    "line {line_no}: Commit LSN differs from Begin's final LSN"
                );
                assert!(commit.end_lsn > commit.commit_lsn, "line {line_no}");
                assert_eq!(commit.flags, 0, "line {line_no}");
                summary.transactions += 1;
                frame = Frame::Idle;
            }
            Message::Origin(origin) => {
                assert!(was_first, "line {line_no}: Origin not right after Begin");
                summary.origins.push(origin);
            }
            Message::Relation(relation) => {
                assert!(
                    in_data_frame,
                    "line {line_no}: Relation outside a transaction"
                );
                check_xid(relation.xid);
                if let Some(previous) = cache.update(relation.clone())
                    && previous.columns != relation.columns
                {
                    summary.schema_changes += 1;
                }
                summary.relations_seen.push(relation);
            }
            Message::Type(type_message) => {
                assert!(in_data_frame, "line {line_no}: Type outside a transaction");
                check_xid(type_message.xid);
                summary.types.push(type_message);
            }
            Message::Insert(insert) => {
                assert!(
                    in_data_frame,
                    "line {line_no}: Insert outside a transaction"
                );
                check_xid(insert.xid);
                cache
                    .resolve(insert.relation_oid, &insert.new)
                    .unwrap_or_else(|e| panic!("line {line_no}: {e}"));
                summary.count_values(&insert.new);
                summary.inserts += 1;
                summary.streamed_changes += usize::from(insert.xid.is_some());
                summary.subtransaction_changes +=
                    usize::from(insert.xid.is_some() && insert.xid != chunk_xid);
            }
            Message::Update(update) => {
                assert!(
                    in_data_frame,
                    "line {line_no}: Update outside a transaction"
                );
                check_xid(update.xid);
                let relation = cache
                    .resolve(update.relation_oid, &update.new)
                    .unwrap_or_else(|e| panic!("line {line_no}: {e}"));
                let is_full = relation.replica_identity == ReplicaIdentity::Full;
                match (&update.old_key, &update.old_row) {
                    (None, None) => summary.updates_plain += 1,
                    (Some(key), None) => {
                        assert!(
                            !is_full,
                            "line {line_no}: old key under REPLICA IDENTITY FULL"
                        );
                        check_old_key(relation, key, line_no);
                        summary.updates_old_key += 1;
                    }
                    (None, Some(row)) => {
                        assert!(
                            is_full,
                            "line {line_no}: old row without REPLICA IDENTITY FULL"
                        );
                        cache
                            .resolve(update.relation_oid, row)
                            .unwrap_or_else(|e| panic!("line {line_no}: {e}"));
                        summary.updates_old_row += 1;
                    }
                    (Some(_), Some(_)) => unreachable!("the decoder never yields both"),
                }
                summary.count_values(&update.new);
            }
            Message::Delete(delete) => {
                assert!(
                    in_data_frame,
                    "line {line_no}: Delete outside a transaction"
                );
                check_xid(delete.xid);
                let relation = cache
                    .get(delete.relation_oid)
                    .unwrap_or_else(|| panic!("line {line_no}: unknown relation"));
                match (&delete.old_key, &delete.old_row) {
                    (Some(key), None) => {
                        check_old_key(relation, key, line_no);
                        summary.deletes_old_key += 1;
                    }
                    (None, Some(row)) => {
                        assert_eq!(
                            relation.replica_identity,
                            ReplicaIdentity::Full,
                            "line {line_no}"
                        );
                        cache
                            .resolve(delete.relation_oid, row)
                            .unwrap_or_else(|e| panic!("line {line_no}: {e}"));
                        summary.deletes_old_row += 1;
                    }
                    _ => unreachable!("the decoder yields exactly one"),
                }
            }
            Message::Truncate(truncate) => {
                assert!(
                    in_data_frame,
                    "line {line_no}: Truncate outside a transaction"
                );
                check_xid(truncate.xid);
                for oid in &truncate.relation_oids {
                    assert!(
                        cache.get(*oid).is_some(),
                        "line {line_no}: truncate of undescribed relation {oid}"
                    );
                }
                summary.truncates.push(truncate);
            }
            Message::LogicalMessage(message) => {
                check_xid(message.xid);
                if message.transactional {
                    assert!(
                        in_data_frame,
                        "line {line_no}: transactional message outside a transaction"
                    );
                    summary.transactional_messages.push(message);
                } else {
                    assert!(
                        !in_data_frame,
                        "line {line_no}: non-transactional message inside a transaction"
                    );
                    summary.non_transactional_messages.push(message);
                }
            }
            Message::StreamStart(start) => {
                assert!(
                    chunk_xid.is_none() && matches!(frame, Frame::Idle),
                    "line {line_no}: nested Stream Start"
                );
                assert_eq!(
                    start.first_segment,
                    streamed_xids.insert(start.xid),
                    "line {line_no}: first_segment"
                );
                chunk_xid = Some(start.xid);
                summary.stream_chunks += 1;
            }
            Message::StreamStop => {
                assert!(
                    chunk_xid.take().is_some(),
                    "line {line_no}: Stream Stop outside a chunk"
                );
            }
            Message::StreamCommit(commit) => {
                assert!(
                    chunk_xid.is_none(),
                    "line {line_no}: Stream Commit inside a chunk"
                );
                assert!(
                    streamed_xids.remove(&commit.xid),
                    "line {line_no}: commit of unstreamed {}",
                    commit.xid
                );
                assert!(commit.end_lsn > commit.commit_lsn, "line {line_no}");
                summary.stream_commits += 1;
            }
            Message::StreamAbort(abort) => {
                assert!(
                    chunk_xid.is_none(),
                    "line {line_no}: Stream Abort inside a chunk"
                );
                assert!(
                    streamed_xids.contains(&abort.xid),
                    "line {line_no}: abort of unstreamed {}",
                    abort.xid
                );
                if abort.subxid == abort.xid {
                    streamed_xids.remove(&abort.xid);
                } else {
                    let seen = change_xids
                        .get(&abort.xid)
                        .is_some_and(|xids| xids.contains(&abort.subxid));
                    assert!(
                        seen,
                        "line {line_no}: abort of subtransaction {} that sent no change",
                        abort.subxid
                    );
                }
                summary.stream_aborts.push(abort);
            }
            Message::BeginPrepare(begin) => {
                assert!(
                    matches!(frame, Frame::Idle) && chunk_xid.is_none(),
                    "line {line_no}: nested Begin Prepare"
                );
                assert!(begin.end_lsn > begin.prepare_lsn, "line {line_no}");
                frame = Frame::Preparing { begin };
            }
            Message::Prepare(prepare) => {
                let Frame::Preparing { begin } = frame else {
                    panic!("line {line_no}: Prepare without Begin Prepare")
                };
                assert_eq!(
                    (
                        prepare.prepare_lsn,
                        prepare.end_lsn,
                        prepare.xid,
                        &prepare.gid
                    ),
                    (begin.prepare_lsn, begin.end_lsn, begin.xid, &begin.gid),
                    "line {line_no}"
                );
                assert!(
                    prepared_gids.insert(prepare.gid),
                    "line {line_no}: gid prepared twice"
                );
                summary.prepares += 1;
                frame = Frame::Idle;
            }
            Message::StreamPrepare(prepare) => {
                assert!(
                    chunk_xid.is_none(),
                    "line {line_no}: Stream Prepare inside a chunk"
                );
                assert!(
                    streamed_xids.remove(&prepare.xid),
                    "line {line_no}: prepare of unstreamed {}",
                    prepare.xid
                );
                assert!(
                    prepared_gids.insert(prepare.gid),
                    "line {line_no}: gid prepared twice"
                );
                summary.stream_prepares += 1;
            }
            Message::CommitPrepared(commit) => {
                assert!(
                    matches!(frame, Frame::Idle) && chunk_xid.is_none(),
                    "line {line_no}"
                );
                assert!(
                    prepared_gids.remove(&commit.gid),
                    "line {line_no}: commit of unknown gid {}",
                    commit.gid
                );
                summary.commit_prepared += 1;
            }
            Message::RollbackPrepared(rollback) => {
                assert!(
                    matches!(frame, Frame::Idle) && chunk_xid.is_none(),
                    "line {line_no}"
                );
                assert!(
                    prepared_gids.remove(&rollback.gid),
                    "line {line_no}: rollback of unknown gid {}",
                    rollback.gid
                );
                assert!(
                    rollback.rollback_end_lsn > rollback.prepare_end_lsn,
                    "line {line_no}"
                );
                summary.rollback_prepared += 1;
            }
        }
    }
    assert!(
        matches!(frame, Frame::Idle) && chunk_xid.is_none(),
        "fixture ends inside a transaction"
    );
    assert!(
        streamed_xids.is_empty(),
        "streamed transactions never finished: {streamed_xids:?}"
    );
    assert!(
        prepared_gids.is_empty(),
        "prepared transactions never finished: {prepared_gids:?}"
    );
    summary
}

/// An old key carries the replica identity columns and NULL for every other column.
fn check_old_key(relation: &Relation, key: &TupleData, line_no: usize) {
    assert_eq!(key.columns.len(), relation.columns.len(), "line {line_no}");
    for (column, value) in relation.columns.iter().zip(&key.columns) {
        if !column.is_key {
            assert_eq!(
                value,
                &ColumnValue::Null,
                "line {line_no}: non-key column {} in old key",
                column.name
            );
        } else {
            assert!(
                matches!(value, ColumnValue::Text(_) | ColumnValue::Binary(_)),
                "line {line_no}: key column {}",
                column.name
            );
        }
    }
}

fn relation<'a>(summary: &'a Summary, name: &str) -> &'a Relation {
    summary
        .relations_seen
        .iter()
        .find(|r| r.name == name)
        .unwrap_or_else(|| panic!("no Relation for {name}"))
}

/// The main workload (see the capture script), the same on every server and protocol version.
fn assert_main_workload(summary: &Summary, binary: bool) {
    assert_eq!(summary.messages, 60, "{summary:#?}");
    assert_eq!(summary.transactions, 15);
    assert_eq!(summary.inserts, 10);
    // kinds: t changed (TOASTed big untouched), id changed (old key); pair_key: b changed (old
    // key, composite); full_ident: old row.
    assert_eq!(
        (
            summary.updates_plain,
            summary.updates_old_key,
            summary.updates_old_row
        ),
        (1, 2, 1)
    );
    assert_eq!((summary.deletes_old_key, summary.deletes_old_row), (2, 1));
    assert!(summary.unchanged_toast >= 1, "no unchanged TOAST column");
    assert!(summary.nulls > 0);
    if binary {
        assert!(summary.binary > 0, "binary mode sent no binary value");
    } else {
        assert_eq!(summary.binary, 0, "text mode sent a binary value");
    }

    let [mood] = summary.types.as_slice() else {
        panic!("expected one Type message: {:?}", summary.types)
    };
    assert_eq!(
        (mood.namespace.as_str(), mood.name.as_str()),
        ("public", "mood")
    );
    let kinds = relation(summary, "kinds");
    assert_eq!(kinds.namespace, "public");
    let names: Vec<_> = kinds.columns.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        ["id", "t", "n", "ts", "b", "j", "flag", "arr", "m", "big"]
    );
    assert_eq!(
        kinds
            .key_columns()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>(),
        ["id"]
    );
    let m = &kinds.columns[8];
    assert_eq!(
        m.type_oid, mood.oid,
        "the enum column refers to the Type message's OID"
    );
    let n = &kinds.columns[2];
    assert_eq!(
        (n.type_oid, n.type_modifier),
        (1700, (10 << 16 | 2) + 4),
        "numeric(10,2)"
    );
    assert_eq!(kinds.columns[0].type_oid, 23, "int4");

    let pair_key = relation(summary, "pair_key");
    assert_eq!(pair_key.replica_identity, ReplicaIdentity::Default);
    assert_eq!(
        pair_key
            .key_columns()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>(),
        ["a", "b"]
    );
    assert_eq!(
        summary.schema_changes, 1,
        "ALTER TABLE pair_key ADD COLUMN resends its Relation"
    );
    let altered = summary
        .relations_seen
        .iter()
        .rfind(|r| r.name == "pair_key")
        .map(|r| r.columns.len());
    assert_eq!(altered, Some(4));

    let full = relation(summary, "full_ident");
    assert_eq!(full.replica_identity, ReplicaIdentity::Full);
    assert!(
        full.columns.iter().all(|c| c.is_key),
        "every column is key under REPLICA IDENTITY FULL"
    );

    let [truncate] = summary.truncates.as_slice() else {
        panic!("expected one Truncate")
    };
    assert!(truncate.cascade && truncate.restart_identity);
    assert_eq!(truncate.options, 3);
    assert_eq!(truncate.relation_oids.len(), 2);

    let payloads: Vec<_> = summary
        .transactional_messages
        .iter()
        .map(|m| (m.prefix.as_str(), &m.content[..]))
        .collect();
    assert_eq!(
        payloads,
        [
            ("pgduplex", &b"transactional payload"[..]),
            ("pgduplex", &b"\x00\xff\x00"[..])
        ]
    );
    let [non_transactional] = summary.non_transactional_messages.as_slice() else {
        panic!("expected one")
    };
    assert_eq!(&non_transactional.content[..], b"non-transactional payload");

    let [origin] = summary.origins.as_slice() else {
        panic!("expected one Origin message")
    };
    assert_eq!(origin.name, "pgduplex_peer");
    assert_eq!(origin.commit_lsn, Lsn(0xAB_CDEF));
}

#[test]
fn pg15_protocol_1() {
    assert_main_workload(&walk(PG15_V1, 1), false);
}

#[test]
fn pg18_protocol_1() {
    assert_main_workload(&walk(PG18_V1, 1), false);
}

#[test]
fn pg18_protocol_4() {
    assert_main_workload(&walk(PG18_V4, 4), false);
}

#[test]
fn pg18_protocol_4_binary() {
    let summary = walk(PG18_V4_BINARY, 4);
    assert_main_workload(&summary, true);
}

#[test]
fn first_insert_values_are_text_slices() {
    let line = PG18_V4
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with("49"))
        .expect("an Insert");
    let data = Bytes::from(unhex(line));
    let Ok(Message::Insert(insert)) = decode(&data, &DecodeContext::new(4)) else {
        panic!("not an Insert: {line}")
    };
    let text = |i: usize| match &insert.new.columns[i] {
        ColumnValue::Text(v) => std::str::from_utf8(v).expect("utf-8").to_owned(),
        other => panic!("column {i}: {other:?}"),
    };
    assert_eq!(
        [
            text(0),
            text(1),
            text(2),
            text(3),
            text(4),
            text(5),
            text(6),
            text(7),
            text(8)
        ],
        [
            "1",
            "hello",
            "12.34",
            "2024-01-02 03:04:05+00",
            "\\x0102ff",
            "{\"a\": [1, null]}",
            "t",
            "{1,2,3}",
            "happy"
        ]
    );
    assert_eq!(
        text(9).len(),
        300 * 32,
        "the TOASTed value is sent whole on insert"
    );
}

#[test]
fn same_messages_from_every_server_and_version() {
    // Only LSNs, xids, OIDs and times differ between servers, so the shapes match one for one.
    let shape = |fixture: &str, version| -> Vec<u8> {
        fixture
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| {
                decode(&Bytes::from(unhex(l)), &DecodeContext::new(version))
                    .map(|m| m.tag())
                    .expect("decodes")
            })
            .collect()
    };
    let pg15 = shape(PG15_V1, 1);
    assert_eq!(pg15, shape(PG18_V1, 1));
    assert_eq!(pg15, shape(PG18_V4, 4));
}

#[test]
fn pg18_protocol_4_parallel_streaming_and_two_phase() {
    let summary = walk(PG18_V4_STREAM_2PC, 4);
    // Three streamed transactions: committed, with a rolled-back subtransaction, and prepared.
    assert_eq!(summary.stream_commits, 2);
    assert_eq!(summary.stream_prepares, 1);
    assert!(summary.stream_chunks >= 4, "{summary:#?}");
    assert_eq!(
        summary.streamed_changes,
        summary.inserts - 2,
        "all but the two small prepared inserts"
    );
    // Rows made by top-level xids: two streamed transactions of 700, the row before the
    // savepoint, and the two small prepared ones. The savepoint's rows carry its own xid and
    // were sent only as far as they were streamed before its abort was decoded (some, not all
    // 700); the row after ROLLBACK TO is in a new subtransaction, since ROLLBACK TO re-opens
    // the savepoint.
    let whole = 700 + 1 + 2 + 700;
    assert!(
        summary.subtransaction_changes > 1,
        "changes of the savepoint carry its own xid"
    );
    assert!(summary.subtransaction_changes < 700 + 1);
    assert_eq!(summary.inserts, whole + summary.subtransaction_changes);
    let [abort] = summary.stream_aborts.as_slice() else {
        panic!("expected one Stream Abort")
    };
    assert_ne!(
        abort.subxid, abort.xid,
        "the subtransaction, not the transaction, aborted"
    );
    assert!(
        abort.abort_lsn.is_some_and(|lsn| lsn > Lsn::ZERO),
        "parallel streaming sends the abort LSN"
    );
    assert!(
        abort.abort_time.is_some_and(|t| t > 0),
        "parallel streaming sends the abort time"
    );
    // Two-phase: one small transaction committed, one rolled back, one streamed and committed.
    assert_eq!(summary.prepares, 2);
    assert_eq!((summary.commit_prepared, summary.rollback_prepared), (2, 1));
}

#[test]
fn real_stream_abort_without_parallel_info_decodes_under_version_2() {
    // The captured abort minus the protocol-4 fields is a protocol-2 Stream Abort.
    let line = PG18_V4_STREAM_2PC
        .lines()
        .find(|l| l.starts_with("41"))
        .expect("a Stream Abort");
    let data = Bytes::from(unhex(line));
    assert_eq!(data.len(), 25);
    let Ok(Message::StreamAbort(abort)) = decode(&data.slice(..9), &DecodeContext::new(2)) else {
        panic!()
    };
    assert_eq!((abort.abort_lsn, abort.abort_time), (None, None));
    assert!(matches!(
        decode(&data, &DecodeContext::new(3)),
        Err(DecodeError::TrailingBytes { count: 16, .. })
    ));
}
