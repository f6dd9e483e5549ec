//! Text of the walsender commands we send, and the typed results they return.
//!
//! Pure: building a command and reading its result rows need no connection, so quoting and
//! result parsing are tested here. The replication grammar (`repl_gram.y`/`repl_scanner.l`)
//! takes `"double-quoted"` identifiers and `'single-quoted'` strings in which a doubled quote
//! stands for itself and a backslash is an ordinary character; a NUL byte cannot be sent at all
//! (the query is a C string), so it is rejected.

use super::{Lsn, ProtocolError};

/// What `CREATE_REPLICATION_SLOT` should do with the snapshot taken at the slot's consistent
/// point. The initial table copy needs `Export` (read the snapshot from another session with
/// `SET TRANSACTION SNAPSHOT`) or `Use` (in this very session).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotAction {
    /// Export the snapshot until the next command on this connection; its name is returned.
    Export,
    /// Use the snapshot in the current transaction of this connection, which must have run
    /// `BEGIN ISOLATION LEVEL REPEATABLE READ` just before.
    Use,
    /// Do not keep the snapshot (cheapest, when no initial copy is needed).
    NoExport,
}

/// The result of `IDENTIFY_SYSTEM`: which cluster and timeline the connection reached, and its
/// current end of WAL. It exists so the caller can check that it talks to the node it expects
/// (the system identifier changes when a cluster is re-created or restored elsewhere).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentifySystem {
    /// The cluster's system identifier (a decimal u64, kept as text as the server sends it).
    pub systemid: String,
    /// The current timeline.
    pub timeline: u32,
    /// The current WAL flush position.
    pub xlogpos: Lsn,
    /// The database of a `replication=database` connection; `None` for physical ones.
    pub dbname: Option<String>,
}

/// The result of `CREATE_REPLICATION_SLOT ... LOGICAL`: where decoding of the new slot starts.
/// The initial copy must read the tables with `snapshot_name` (or in this session, with
/// [`SnapshotAction::Use`]), and streaming starts at `consistent_point`: together they see every
/// committed change exactly once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedSlot {
    /// The slot's name as the server created it.
    pub slot_name: String,
    /// First LSN at which every transaction committing later is decoded whole.
    pub consistent_point: Lsn,
    /// The exported snapshot, with [`SnapshotAction::Export`] only.
    pub snapshot_name: Option<String>,
}

/// `"ident"`, with embedded double quotes doubled. Slot names, option names.
pub fn quote_ident(ident: &str) -> Result<String, ProtocolError> {
    reject_nul(ident, "identifier")?;
    Ok(format!("\"{}\"", ident.replace('"', "\"\"")))
}

/// `'literal'`, with embedded single quotes doubled. Option values.
pub fn quote_literal(value: &str) -> Result<String, ProtocolError> {
    reject_nul(value, "string")?;
    Ok(format!("'{}'", value.replace('\'', "''")))
}

fn reject_nul(s: &str, what: &str) -> Result<(), ProtocolError> {
    if s.contains('\0') {
        return Err(ProtocolError::Config(format!(
            "a replication command {what} cannot contain a NUL byte: {s:?}"
        )));
    }
    Ok(())
}

/// `START_REPLICATION SLOT "slot" LOGICAL X/Y ("k" 'v', ...)`.
pub fn start_replication(
    slot: &str,
    start: Lsn,
    options: &[(&str, &str)],
) -> Result<String, ProtocolError> {
    let mut sql = format!(
        "START_REPLICATION SLOT {} LOGICAL {start}",
        quote_ident(slot)?
    );
    if !options.is_empty() {
        let rendered = options
            .iter()
            .map(|(k, v)| Ok(format!("{} {}", quote_ident(k)?, quote_literal(v)?)))
            .collect::<Result<Vec<_>, ProtocolError>>()?;
        sql.push_str(" (");
        sql.push_str(&rendered.join(", "));
        sql.push(')');
    }
    Ok(sql)
}

/// `CREATE_REPLICATION_SLOT "slot" [TEMPORARY] LOGICAL pgoutput ...`: the option list of PG 15+
/// (`(SNAPSHOT 'export')`), or the older keywords (`EXPORT_SNAPSHOT`) before 15.
pub fn create_logical_slot(
    slot: &str,
    temporary: bool,
    snapshot: SnapshotAction,
    server_version_num: u32,
) -> Result<String, ProtocolError> {
    let temporary = if temporary { " TEMPORARY" } else { "" };
    let snapshot = if server_version_num >= 150000 {
        match snapshot {
            SnapshotAction::Export => " (SNAPSHOT 'export')",
            SnapshotAction::Use => " (SNAPSHOT 'use')",
            SnapshotAction::NoExport => " (SNAPSHOT 'nothing')",
        }
    } else {
        match snapshot {
            SnapshotAction::Export => " EXPORT_SNAPSHOT",
            SnapshotAction::Use => " USE_SNAPSHOT",
            SnapshotAction::NoExport => " NOEXPORT_SNAPSHOT",
        }
    };
    Ok(format!(
        "CREATE_REPLICATION_SLOT {}{temporary} LOGICAL pgoutput{snapshot}",
        quote_ident(slot)?
    ))
}

/// Reads the single row of `IDENTIFY_SYSTEM` (systemid, timeline, xlogpos, dbname).
pub fn parse_identify_system(
    rows: &[Vec<Option<String>>],
) -> Result<IdentifySystem, ProtocolError> {
    let row = single_row(rows, "IDENTIFY_SYSTEM", 4)?;
    Ok(IdentifySystem {
        systemid: required(row, 0, "IDENTIFY_SYSTEM", "systemid")?.to_owned(),
        timeline: required(row, 1, "IDENTIFY_SYSTEM", "timeline")?
            .parse()
            .map_err(|e| ProtocolError::Protocol(format!("IDENTIFY_SYSTEM timeline: {e}")))?,
        xlogpos: parse_lsn(
            required(row, 2, "IDENTIFY_SYSTEM", "xlogpos")?,
            "IDENTIFY_SYSTEM",
        )?,
        dbname: row[3].clone(),
    })
}

/// Reads the single row of `CREATE_REPLICATION_SLOT` (slot_name, consistent_point,
/// snapshot_name, output_plugin).
pub fn parse_created_slot(rows: &[Vec<Option<String>>]) -> Result<CreatedSlot, ProtocolError> {
    let what = "CREATE_REPLICATION_SLOT";
    let row = single_row(rows, what, 4)?;
    Ok(CreatedSlot {
        slot_name: required(row, 0, what, "slot_name")?.to_owned(),
        consistent_point: parse_lsn(required(row, 1, what, "consistent_point")?, what)?,
        snapshot_name: row[2].clone(),
    })
}

fn single_row<'a>(
    rows: &'a [Vec<Option<String>>],
    what: &str,
    columns: usize,
) -> Result<&'a [Option<String>], ProtocolError> {
    match rows {
        [row] if row.len() == columns => Ok(row),
        _ => Err(ProtocolError::Protocol(format!(
            "{what} returned {} rows ({} columns in the first), expected 1 row of {columns}",
            rows.len(),
            rows.first().map_or(0, Vec::len)
        ))),
    }
}

fn required<'a>(
    row: &'a [Option<String>],
    i: usize,
    what: &str,
    column: &str,
) -> Result<&'a str, ProtocolError> {
    row[i]
        .as_deref()
        .ok_or_else(|| ProtocolError::Protocol(format!("{what} returned NULL {column}")))
}

fn parse_lsn(text: &str, what: &str) -> Result<Lsn, ProtocolError> {
    text.parse()
        .map_err(|e| ProtocolError::Protocol(format!("{what}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Reverses [`quote_ident`]/[`quote_literal`] the way the replication scanner reads them.
    fn unquote(quoted: &str, q: char) -> Option<String> {
        let inner = quoted.strip_prefix(q)?.strip_suffix(q)?;
        let mut out = String::new();
        let mut chars = inner.chars();
        while let Some(c) = chars.next() {
            if c == q {
                // a lone quote would end the token early
                if chars.next() != Some(q) {
                    return None;
                }
            }
            out.push(c);
        }
        Some(out)
    }

    #[test]
    fn start_replication_text() {
        assert_eq!(
            start_replication(
                "pgduplex_a",
                Lsn(0x1_0000_00AB),
                &[("proto_version", "1"), ("publication_names", "p,\"q'")]
            )
            .unwrap(),
            "START_REPLICATION SLOT \"pgduplex_a\" LOGICAL 1/AB \
             (\"proto_version\" '1', \"publication_names\" 'p,\"q''')"
        );
        assert_eq!(
            start_replication("s", Lsn::ZERO, &[]).unwrap(),
            "START_REPLICATION SLOT \"s\" LOGICAL 0/0"
        );
        assert!(matches!(
            start_replication("s", Lsn::ZERO, &[("k", "a\0b")]),
            Err(ProtocolError::Config(_))
        ));
    }

    #[test]
    fn create_slot_text_by_version() {
        assert_eq!(
            create_logical_slot("s", true, SnapshotAction::Export, 150018).unwrap(),
            "CREATE_REPLICATION_SLOT \"s\" TEMPORARY LOGICAL pgoutput (SNAPSHOT 'export')"
        );
        assert_eq!(
            create_logical_slot("s", false, SnapshotAction::NoExport, 180006).unwrap(),
            "CREATE_REPLICATION_SLOT \"s\" LOGICAL pgoutput (SNAPSHOT 'nothing')"
        );
        assert_eq!(
            create_logical_slot("s", false, SnapshotAction::Use, 140010).unwrap(),
            "CREATE_REPLICATION_SLOT \"s\" LOGICAL pgoutput USE_SNAPSHOT"
        );
    }

    #[test]
    fn result_rows() {
        let s = |v: &str| Some(v.to_owned());
        let id =
            parse_identify_system(&[vec![s("7312"), s("1"), s("0/16B3748"), s("db")]]).unwrap();
        assert_eq!(id.timeline, 1);
        assert_eq!(id.xlogpos, Lsn(0x16B3748));
        assert_eq!(id.dbname.as_deref(), Some("db"));
        assert!(parse_identify_system(&[]).is_err());
        assert!(parse_identify_system(&[vec![s("1"), None, s("0/1"), None]]).is_err());
        let slot = parse_created_slot(&[vec![s("s"), s("0/1"), None, s("pgoutput")]]).unwrap();
        assert_eq!(slot.consistent_point, Lsn(1));
        assert_eq!(slot.snapshot_name, None);
        assert!(parse_created_slot(&[vec![s("s"), s("zz"), None, s("pgoutput")]]).is_err());
    }

    proptest! {
        #[test]
        fn quoting_round_trips(s in "[^\u{0}]{0,20}") {
            prop_assert_eq!(unquote(&quote_ident(&s).unwrap(), '"'), Some(s.clone()));
            prop_assert_eq!(unquote(&quote_literal(&s).unwrap(), '\''), Some(s));
        }
    }
}
