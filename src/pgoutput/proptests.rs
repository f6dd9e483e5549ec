//! Property tests: every message the format can express round-trips, and no input, random or a
//! mutation of a valid message, makes the decoder panic.

use bytes::Bytes;
use proptest::prelude::*;
use proptest::strategy::Union;

use super::*;

/// A context the server could really be in: versions 1-4, streaming only from version 2.
pub(super) fn arb_context() -> impl Strategy<Value = DecodeContext> {
    (1u32..=DecodeContext::MAX_PROTOCOL_VERSION, any::<bool>()).prop_map(
        |(protocol_version, streamed)| DecodeContext {
            protocol_version,
            in_streamed_transaction: streamed && protocol_version >= 2,
        },
    )
}

/// Any context, including ones the decoder must refuse.
fn arb_any_context() -> impl Strategy<Value = DecodeContext> {
    (0u32..=6, any::<bool>()).prop_map(|(protocol_version, in_streamed_transaction)| {
        DecodeContext {
            protocol_version,
            in_streamed_transaction,
        }
    })
}

fn arb_lsn() -> impl Strategy<Value = Lsn> {
    any::<u64>().prop_map(Lsn)
}

/// Strings the format can carry: any UTF-8 without NUL.
fn arb_name() -> impl Strategy<Value = String> {
    "[^\u{0}]{0,12}"
}

/// Namespaces: "" would come back as "pg_catalog", so it is not a round-trippable value.
fn arb_namespace() -> impl Strategy<Value = String> {
    prop_oneof![Just("pg_catalog".to_owned()), "[^\u{0}]{1,12}"]
}

fn arb_bytes() -> impl Strategy<Value = Bytes> {
    prop::collection::vec(any::<u8>(), 0..24).prop_map(Bytes::from)
}

fn arb_tuple() -> impl Strategy<Value = TupleData> {
    let value = prop_oneof![
        Just(ColumnValue::Null),
        Just(ColumnValue::UnchangedToast),
        arb_bytes().prop_map(ColumnValue::Text),
        arb_bytes().prop_map(ColumnValue::Binary),
    ];
    prop::collection::vec(value, 0..6).prop_map(|columns| TupleData { columns })
}

fn arb_streamed_xid(ctx: DecodeContext) -> BoxedStrategy<Option<u32>> {
    if ctx.in_streamed_transaction {
        any::<u32>().prop_map(Some).boxed()
    } else {
        Just(None).boxed()
    }
}

fn arb_relation(ctx: DecodeContext) -> impl Strategy<Value = Relation> {
    let column = (any::<u8>(), arb_name(), any::<u32>(), any::<i32>()).prop_map(
        |(flags, name, type_oid, type_modifier)| RelationColumn {
            flags,
            is_key: flags & 1 != 0,
            name,
            type_oid,
            type_modifier,
        },
    );
    let identity = prop_oneof![
        Just(ReplicaIdentity::Default),
        Just(ReplicaIdentity::Nothing),
        Just(ReplicaIdentity::Full),
        Just(ReplicaIdentity::Index),
    ];
    (
        arb_streamed_xid(ctx),
        any::<u32>(),
        arb_namespace(),
        arb_name(),
        identity,
        prop::collection::vec(column, 0..5),
    )
        .prop_map(
            |(xid, oid, namespace, name, replica_identity, columns)| Relation {
                xid,
                oid,
                namespace,
                name,
                replica_identity,
                columns,
            },
        )
}

/// Any message that can appear under `ctx`.
pub(super) fn arb_message(ctx: DecodeContext) -> BoxedStrategy<Message> {
    let xid = move || arb_streamed_xid(ctx);
    let mut choices: Vec<BoxedStrategy<Message>> = vec![
        (arb_lsn(), any::<i64>(), any::<u32>())
            .prop_map(|(final_lsn, commit_time, xid)| {
                Message::Begin(Begin {
                    final_lsn,
                    commit_time,
                    xid,
                })
            })
            .boxed(),
        (any::<u8>(), arb_lsn(), arb_lsn(), any::<i64>())
            .prop_map(|(flags, commit_lsn, end_lsn, commit_time)| {
                Message::Commit(Commit {
                    flags,
                    commit_lsn,
                    end_lsn,
                    commit_time,
                })
            })
            .boxed(),
        (arb_lsn(), arb_name())
            .prop_map(|(commit_lsn, name)| Message::Origin(Origin { commit_lsn, name }))
            .boxed(),
        arb_relation(ctx).prop_map(Message::Relation).boxed(),
        (xid(), any::<u32>(), arb_namespace(), arb_name())
            .prop_map(|(xid, oid, namespace, name)| {
                Message::Type(TypeMessage {
                    xid,
                    oid,
                    namespace,
                    name,
                })
            })
            .boxed(),
        (xid(), any::<u32>(), arb_tuple())
            .prop_map(|(xid, relation_oid, new)| {
                Message::Insert(Insert {
                    xid,
                    relation_oid,
                    new,
                })
            })
            .boxed(),
        (xid(), any::<u32>(), 0..3u8, arb_tuple(), arb_tuple())
            .prop_map(|(xid, relation_oid, old, old_tuple, new)| {
                let (old_key, old_row) = match old {
                    0 => (None, None),
                    1 => (Some(old_tuple), None),
                    _ => (None, Some(old_tuple)),
                };
                Message::Update(Update {
                    xid,
                    relation_oid,
                    old_key,
                    old_row,
                    new,
                })
            })
            .boxed(),
        (xid(), any::<u32>(), any::<bool>(), arb_tuple())
            .prop_map(|(xid, relation_oid, by_key, old)| {
                let (old_key, old_row) = if by_key {
                    (Some(old), None)
                } else {
                    (None, Some(old))
                };
                Message::Delete(Delete {
                    xid,
                    relation_oid,
                    old_key,
                    old_row,
                })
            })
            .boxed(),
        (
            xid(),
            any::<u8>(),
            prop::collection::vec(any::<u32>(), 0..5),
        )
            .prop_map(|(xid, options, relation_oids)| {
                Message::Truncate(Truncate {
                    xid,
                    options,
                    cascade: options & 1 != 0,
                    restart_identity: options & 2 != 0,
                    relation_oids,
                })
            })
            .boxed(),
        (xid(), any::<bool>(), arb_lsn(), arb_name(), arb_bytes())
            .prop_map(|(xid, transactional, lsn, prefix, content)| {
                Message::LogicalMessage(LogicalMessage {
                    xid,
                    transactional,
                    lsn,
                    prefix,
                    content,
                })
            })
            .boxed(),
    ];
    if ctx.protocol_version >= 2 {
        let abort_info = if ctx.protocol_version >= 4 {
            prop::option::of((arb_lsn(), any::<i64>())).boxed()
        } else {
            Just(None).boxed()
        };
        choices.extend([
            (any::<u32>(), any::<bool>())
                .prop_map(|(xid, first_segment)| {
                    Message::StreamStart(StreamStart { xid, first_segment })
                })
                .boxed(),
            Just(Message::StreamStop).boxed(),
            (
                any::<u32>(),
                any::<u8>(),
                arb_lsn(),
                arb_lsn(),
                any::<i64>(),
            )
                .prop_map(|(xid, flags, commit_lsn, end_lsn, commit_time)| {
                    Message::StreamCommit(StreamCommit {
                        xid,
                        flags,
                        commit_lsn,
                        end_lsn,
                        commit_time,
                    })
                })
                .boxed(),
            (any::<u32>(), any::<u32>(), abort_info)
                .prop_map(|(xid, subxid, info)| {
                    Message::StreamAbort(StreamAbort {
                        xid,
                        subxid,
                        abort_lsn: info.map(|(lsn, _)| lsn),
                        abort_time: info.map(|(_, time)| time),
                    })
                })
                .boxed(),
        ]);
    }
    if ctx.protocol_version >= 3 {
        choices.extend([
            (arb_lsn(), arb_lsn(), any::<i64>(), any::<u32>(), arb_name())
                .prop_map(|(prepare_lsn, end_lsn, prepare_time, xid, gid)| {
                    Message::BeginPrepare(BeginPrepare {
                        prepare_lsn,
                        end_lsn,
                        prepare_time,
                        xid,
                        gid,
                    })
                })
                .boxed(),
            (
                any::<u8>(),
                arb_lsn(),
                arb_lsn(),
                any::<i64>(),
                any::<u32>(),
                arb_name(),
            )
                .prop_map(|(flags, prepare_lsn, end_lsn, prepare_time, xid, gid)| {
                    Message::Prepare(Prepare {
                        flags,
                        prepare_lsn,
                        end_lsn,
                        prepare_time,
                        xid,
                        gid,
                    })
                })
                .boxed(),
            (
                any::<u8>(),
                arb_lsn(),
                arb_lsn(),
                any::<i64>(),
                any::<u32>(),
                arb_name(),
            )
                .prop_map(|(flags, commit_lsn, end_lsn, commit_time, xid, gid)| {
                    Message::CommitPrepared(CommitPrepared {
                        flags,
                        commit_lsn,
                        end_lsn,
                        commit_time,
                        xid,
                        gid,
                    })
                })
                .boxed(),
            (
                any::<u8>(),
                arb_lsn(),
                arb_lsn(),
                (any::<i64>(), any::<i64>()),
                any::<u32>(),
                arb_name(),
            )
                .prop_map(
                    |(
                        flags,
                        prepare_end_lsn,
                        rollback_end_lsn,
                        (prepare_time, rollback_time),
                        xid,
                        gid,
                    )| {
                        Message::RollbackPrepared(RollbackPrepared {
                            flags,
                            prepare_end_lsn,
                            rollback_end_lsn,
                            prepare_time,
                            rollback_time,
                            xid,
                            gid,
                        })
                    },
                )
                .boxed(),
            (
                any::<u8>(),
                arb_lsn(),
                arb_lsn(),
                any::<i64>(),
                any::<u32>(),
                arb_name(),
            )
                .prop_map(|(flags, prepare_lsn, end_lsn, prepare_time, xid, gid)| {
                    Message::StreamPrepare(StreamPrepare {
                        flags,
                        prepare_lsn,
                        end_lsn,
                        prepare_time,
                        xid,
                        gid,
                    })
                })
                .boxed(),
        ]);
    }
    Union::new(choices).boxed()
}

fn arb_context_and_message() -> impl Strategy<Value = (DecodeContext, Message)> {
    arb_context().prop_flat_map(|ctx| (Just(ctx), arb_message(ctx)))
}

/// An edit of a valid encoding; positions are taken modulo the length.
#[derive(Clone, Debug)]
enum Mutation {
    Flip { at: usize, mask: u8 },
    Set { at: usize, byte: u8 },
    Insert { at: usize, byte: u8 },
    Remove { at: usize },
    Truncate { len: usize },
}

fn arb_mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1..=u8::MAX).prop_map(|(at, mask)| Mutation::Flip { at, mask }),
        (
            any::<usize>(),
            prop_oneof![Just(0u8), Just(0xff), Just(0x7f), any::<u8>()]
        )
            .prop_map(|(at, byte)| Mutation::Set { at, byte }),
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Insert { at, byte }),
        any::<usize>().prop_map(|at| Mutation::Remove { at }),
        any::<usize>().prop_map(|len| Mutation::Truncate { len }),
    ]
}

fn apply(bytes: &mut Vec<u8>, mutation: &Mutation) {
    let len = bytes.len();
    match *mutation {
        Mutation::Flip { at, mask } if len > 0 => {
            if let Some(b) = bytes.get_mut(at % len) {
                *b ^= mask;
            }
        }
        Mutation::Set { at, byte } if len > 0 => {
            if let Some(b) = bytes.get_mut(at % len) {
                *b = byte;
            }
        }
        Mutation::Insert { at, byte } => bytes.insert(at % (len + 1), byte),
        Mutation::Remove { at } if len > 0 => {
            bytes.remove(at % len);
        }
        Mutation::Truncate { len: new_len } => bytes.truncate(new_len % (len + 1)),
        _ => {}
    }
}

/// Whatever decodes must re-encode to something that decodes to the same message.
fn assert_stable(message: &Message, ctx: &DecodeContext) -> Result<(), TestCaseError> {
    let again = decode(&Bytes::from(encode(message, ctx)), ctx);
    prop_assert_eq!(again.as_ref(), Ok(message));
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn every_message_round_trips((ctx, message) in arb_context_and_message()) {
        let wire = encode(&message, &ctx);
        let data = Bytes::from(wire.clone());
        prop_assert_eq!(decode(&data, &ctx), Ok(message.clone()));
        // Every strict prefix fails, but for Stream Abort without the protocol-4 fields.
        for len in 0..wire.len() {
            if let Ok(shorter) = decode(&data.slice(..len), &ctx) {
                let short_abort =
                    matches!(shorter, Message::StreamAbort(StreamAbort { abort_lsn: None, .. }));
                prop_assert!(short_abort && len == 9, "prefix {} decoded as {:?}", len, shorter);
            }
        }
    }

    #[test]
    fn random_bytes_never_panic(
        ctx in arb_any_context(),
        tag in prop_oneof![any::<u8>(), prop::sample::select(b"BCORYIUDTMSEcAbPKrp".to_vec())],
        body in prop::collection::vec(any::<u8>(), 0..96),
    ) {
        let mut bytes = vec![tag];
        bytes.extend(body);
        if let Ok(message) = decode(&Bytes::from(bytes), &ctx) {
            assert_stable(&message, &ctx)?;
        }
    }

    #[test]
    fn mutated_messages_never_panic(
        (ctx, message) in arb_context_and_message(),
        mutations in prop::collection::vec(arb_mutation(), 1..4),
        decode_ctx in prop_oneof![3 => Just(None), 1 => arb_any_context().prop_map(Some)],
    ) {
        let mut bytes = encode(&message, &ctx);
        for mutation in &mutations {
            apply(&mut bytes, mutation);
        }
        let ctx = decode_ctx.unwrap_or(ctx);
        if let Ok(decoded) = decode(&Bytes::from(bytes), &ctx) {
            assert_stable(&decoded, &ctx)?;
        }
    }
}
