-- The pgduplex schema for two-way replication (DESIGN §6), installed by `pgduplex init` on both
-- nodes after target_schema.sql, removed by `pgduplex teardown`. Safe to run again.
--
-- Per replicated table T (primary key K, tracked columns c1..cn = every column that is neither
-- part of K nor generated) there is a versions table pgduplex."<schema>.<table>" with:
--   K                          the same columns and types as T's primary key
--   "<c>|<node>" bigint        v[node] of column c's register, one column per node
--   "<c>|t"      bigint        t: stamp of the write that produced the current value (µs)
--   "<c>|n"      text          n: node where that write happened
--   for c in ('$row', c1, ..., cn), where '$row' is the existence register, and
--   "$stamp"     bigint        the largest stamp the row has seen (the Lamport clock of the row;
--                              merged as a maximum)
--   "$dead"      jsonb         NULL while the row exists; for a deleted row (a tombstone), the
--                              values of its columns as text, which the merge still needs
-- and a capture trigger that writes exactly one versions change per data change.

CREATE SCHEMA IF NOT EXISTS pgduplex;

-- The capture triggers run as this role (SECURITY DEFINER), not as the superuser that ran
-- init: a trigger evaluates casts and output functions of the table's column types, which a
-- table owner may have written, and these must not run with superuser rights. It can write
-- the versions tables and take version numbers, nothing else. (Roles are per cluster: setups
-- in other databases share it.)
DO $role$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgduplex_capture') THEN
        CREATE ROLE pgduplex_capture NOLOGIN;
    END IF;
EXCEPTION
    -- Another database of the cluster created it at the same moment.
    WHEN duplicate_object OR unique_violation THEN NULL;
END
$role$;
GRANT USAGE ON SCHEMA pgduplex TO pgduplex_capture;

-- The nodes of this setup; exactly one row is this node.
CREATE TABLE IF NOT EXISTS pgduplex.nodes (
    name text PRIMARY KEY,
    is_self boolean NOT NULL,
    -- Added to this node's stamp clock, in µs, baked into the capture triggers when they are
    -- (re)generated. Tests use it to make a clock step back; a superuser setting on purpose,
    -- not a session one, so no writer can move its own stamps.
    clock_skew_us bigint NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX IF NOT EXISTS nodes_one_self ON pgduplex.nodes (is_self) WHERE is_self;
ALTER TABLE pgduplex.nodes ADD COLUMN IF NOT EXISTS clock_skew_us bigint NOT NULL DEFAULT 0;

-- The node-wide version counter: one nextval per local write. No CACHE: values handed out in
-- one session must still be below those of any later session.
CREATE SEQUENCE IF NOT EXISTS pgduplex.version_seq AS bigint NO CYCLE;
GRANT USAGE ON SEQUENCE pgduplex.version_seq TO pgduplex_capture;

-- Tables replicated both ways, and their versions tables.
CREATE TABLE IF NOT EXISTS pgduplex.tracked (
    table_schema text NOT NULL,
    table_name text NOT NULL,
    versions_table text NOT NULL UNIQUE,
    key_columns text[] NOT NULL,
    tracked_columns text[] NOT NULL,
    -- The table's OID on this node: the event trigger recognises a renamed table by it.
    relid oid NOT NULL,
    PRIMARY KEY (table_schema, table_name)
);
ALTER TABLE pgduplex.tracked ADD COLUMN IF NOT EXISTS relid oid;

-- Every conflict the apply resolved on this node (one row per contested column).
CREATE TABLE IF NOT EXISTS pgduplex.conflicts (
    id bigserial PRIMARY KEY,
    at timestamptz NOT NULL DEFAULT now(),
    source_node text NOT NULL,
    source_lsn pg_lsn NOT NULL,
    table_name text NOT NULL,
    key jsonb NOT NULL,
    column_name text NOT NULL,
    kind text NOT NULL,
    resolution text NOT NULL,
    local_register text,
    local_value text,
    remote_register text,
    remote_value text,
    winner text NOT NULL
);

-- Changes that could not be applied (DESIGN §6b), kept until `pgduplex resolve` applies or
-- discards them. Written in the transaction that advances the origin past them.
CREATE TABLE IF NOT EXISTS pgduplex.parked (
    id bigserial PRIMARY KEY,
    at timestamptz NOT NULL DEFAULT now(),
    source_node text NOT NULL,
    source_lsn pg_lsn NOT NULL,
    table_name text NOT NULL,
    key jsonb NOT NULL,
    change jsonb NOT NULL,
    error text NOT NULL,
    sqlstate text
);
CREATE INDEX IF NOT EXISTS parked_key ON pgduplex.parked (table_name, key);

-- TRUNCATE fires no row triggers: the other node would never learn of it.
CREATE OR REPLACE FUNCTION pgduplex.refuse_truncate() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $f$
BEGIN
    -- pgduplex's own sessions (starting an interrupted initial copy over) may.
    IF current_setting('pgduplex.apply', true) = 'on' THEN
        RETURN NULL;
    END IF;
    RAISE EXCEPTION 'TRUNCATE of %.% is not allowed while pgduplex replicates it both ways', TG_TABLE_SCHEMA, TG_TABLE_NAME
        USING HINT = 'Use DELETE (it is replicated), or remove the table from two-way replication first.',
              ERRCODE = 'feature_not_supported';
END
$f$;

-- Whether `OLD.col IS DISTINCT FROM NEW.col` resolves with only pg_catalog on the search path
-- (json, xml, point and many extension types have no such "=" operator): the trigger compares
-- their text otherwise.
CREATE OR REPLACE FUNCTION pgduplex.comparable(rel regclass, col text) RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $f$
DECLARE
    typ text;
BEGIN
    SELECT format_type(a.atttypid, NULL) INTO typ FROM pg_attribute a WHERE a.attrelid = rel AND a.attname = col;
    EXECUTE format('SELECT NULL::%s IS DISTINCT FROM NULL::%s', typ, typ);
    RETURN true;
EXCEPTION WHEN undefined_function OR feature_not_supported OR datatype_mismatch THEN
    RETURN false;
END
$f$;

-- (Re)generates the versions table and the capture trigger of one table from its current
-- columns. Called by init and by the ddl_command_end event trigger below.
CREATE OR REPLACE FUNCTION pgduplex.track(rel regclass) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $gen$
DECLARE
    me text;
    nodes text[];
    sch text;
    tbl text;
    kind "char";
    vt text;
    fn text;
    keys text[];
    cols text[];
    regs text[];
    reg text;
    nd text;
    c text;
    key_defs text;
    key_list text;
    new_keys text;
    old_keys text;
    stamp text;
    dead text;
    chunk text[];
    full_cols text;
    full_vals text;
    full_set text;
    del_set text;
    upd_cols text;
    upd_vals text;
    upd_set text;
    flags text;
    flag_decls text;
    flag_sum text;
    flag_any text;
    single text;
    ins_stmt text;
    del_stmt text;
    upd_stmt text;
    changed text;
    body text;
    existing text[];
    skew bigint;
BEGIN
    SELECT name, clock_skew_us INTO me, skew FROM pgduplex.nodes WHERE is_self;
    SELECT array_agg(name ORDER BY name) INTO nodes FROM pgduplex.nodes;
    IF me IS NULL OR cardinality(nodes) <> 2 THEN
        RAISE EXCEPTION 'pgduplex.nodes must list two nodes, one of them this one: run pgduplex init';
    END IF;
    SELECT n.nspname, c2.relname, c2.relkind INTO sch, tbl, kind
      FROM pg_class c2 JOIN pg_namespace n ON n.oid = c2.relnamespace WHERE c2.oid = rel;
    IF position('.' in sch) > 0 OR position('.' in tbl) > 0 THEN
        RAISE EXCEPTION 'table %.%: names containing "." cannot be replicated both ways (they would share a versions table name); rename the table or schema', quote_ident(sch), quote_ident(tbl);
    END IF;
    IF kind <> 'r' THEN
        RAISE EXCEPTION 'table %.% cannot be replicated both ways: only plain tables are supported (not partitioned tables, views or foreign tables)', sch, tbl;
    END IF;
    vt := sch || '.' || tbl;
    IF octet_length(vt) > 63 THEN
        RAISE EXCEPTION 'table %.%: "schema.table" is longer than 63 bytes, too long for the name of its versions table; rename the table or schema', sch, tbl;
    END IF;
    fn := 'capture ' || vt;
    IF octet_length(fn) > 63 THEN
        -- Truncation alone could give two tables one function: keep a hash of the full name.
        fn := left(fn, 45) || ' ' || left(md5(vt), 16);
    END IF;
    SELECT array_agg(a.attname::text ORDER BY k.ord) INTO keys
      FROM pg_index i
      CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
      JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
     WHERE i.indrelid = rel AND i.indisprimary;
    IF keys IS NULL THEN
        RAISE EXCEPTION 'table %.% has no primary key: two-way replication needs one to match rows and keep their versions', sch, tbl
            USING HINT = 'ALTER TABLE ... ADD PRIMARY KEY (...)';
    END IF;
    SELECT coalesce(array_agg(a.attname::text ORDER BY a.attnum), '{}') INTO cols
      FROM pg_attribute a
     WHERE a.attrelid = rel AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
       AND NOT a.attname = ANY (keys);
    regs := ARRAY['$row'] || cols;
    IF cardinality(regs) * 4 + cardinality(keys) + 2 > 1600 THEN
        RAISE EXCEPTION 'table %.% has too many columns (%) for its versions table (4 per column, at most 1600 in all); replicate it one way',
            sch, tbl, cardinality(cols) + cardinality(keys);
    END IF;

    -- Register column names must fit and must not collide with key columns.
    FOREACH reg IN ARRAY regs LOOP
        FOREACH nd IN ARRAY nodes || ARRAY['t', 'n'] LOOP
            IF octet_length(reg || '|' || nd) > 63 THEN
                RAISE EXCEPTION 'table %.%, column %: name too long for its register column "%|%" (63 bytes); rename the column', sch, tbl, reg, reg, nd;
            END IF;
            IF (reg || '|' || nd) = ANY (keys) THEN
                RAISE EXCEPTION 'table %.%: key column % has the name of a register column; rename it', sch, tbl, reg || '|' || nd;
            END IF;
        END LOOP;
    END LOOP;
    IF '$dead' = ANY (keys) OR '$stamp' = ANY (keys) OR '$row' = ANY (cols) OR '$row' = ANY (keys) THEN
        RAISE EXCEPTION 'table %.%: a column named "$dead", "$stamp" or "$row" collides with pgduplex''s versions columns; rename it', sch, tbl;
    END IF;

    -- The versions table: keys, then registers; columns of dropped columns go, new ones come.
    SELECT string_agg(format('%I %s NOT NULL', a.attname, format_type(a.atttypid, a.atttypmod)), ', ' ORDER BY k.ord),
           string_agg(format('%I', a.attname), ', ' ORDER BY k.ord),
           string_agg(format('NEW.%I', a.attname), ', ' ORDER BY k.ord),
           string_agg(format('OLD.%I', a.attname), ', ' ORDER BY k.ord)
      INTO key_defs, key_list, new_keys, old_keys
      FROM pg_index i
      CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
      JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
     WHERE i.indrelid = rel AND i.indisprimary;
    IF to_regclass(format('pgduplex.%I', vt)) IS NULL THEN
        -- Free space on each page keeps the trigger's updates of a versions row HOT.
        EXECUTE format('CREATE TABLE pgduplex.%I (%s, "$stamp" bigint, "$dead" jsonb, PRIMARY KEY (%s)) WITH (fillfactor = 80)', vt, key_defs, key_list);
        EXECUTE format('GRANT SELECT, INSERT, UPDATE ON pgduplex.%I TO pgduplex_capture', vt);
    END IF;
    SELECT coalesce(array_agg(a.attname::text), '{}') INTO existing
      FROM pg_attribute a
     WHERE a.attrelid = format('pgduplex.%I', vt)::regclass AND a.attnum > 0 AND NOT a.attisdropped
       AND a.attname LIKE '%|%' AND NOT a.attname = ANY (keys);
    FOREACH reg IN ARRAY regs LOOP
        FOREACH nd IN ARRAY nodes || ARRAY['t', 'n'] LOOP
            IF NOT (reg || '|' || nd) = ANY (existing) THEN
                EXECUTE format('ALTER TABLE pgduplex.%I ADD COLUMN %I %s', vt, reg || '|' || nd,
                               CASE nd WHEN 'n' THEN 'text' ELSE 'bigint' END);
            END IF;
        END LOOP;
    END LOOP;
    -- Registers of columns that no longer exist (split at the last '|': column names may hold one).
    FOREACH c IN ARRAY existing LOOP
        IF NOT regexp_replace(c, '\|[^|]*$', '') = ANY (regs) THEN
            EXECUTE format('ALTER TABLE pgduplex.%I DROP COLUMN %I', vt, c);
        END IF;
    END LOOP;

    -- The stamp of a write: the clock, but above every stamp the row has seen (Lamport
    -- condition). "$stamp" keeps the largest stamp of the row, so this costs one column, not
    -- one per register.
    stamp := 'greatest(k, v."$stamp" + 1)';
    -- Values of a deleted row, as text (jsonb_build_object takes at most 100 arguments).
    SELECT coalesce(string_agg(part, ' || '), '''{}''::jsonb') INTO dead FROM (
        SELECT 'jsonb_build_object(' || string_agg(format('%L, OLD.%I::text', col, col), ', ') || ')' AS part
          FROM (SELECT col, (row_number() OVER () - 1) / 50 AS grp FROM unnest(cols) col) s GROUP BY grp ORDER BY grp) p;
    changed := format('(%s) IS DISTINCT FROM (%s)', old_keys, new_keys);

    -- An insert (or the new key of a key change): every register and $row.
    SELECT string_agg(format('%I, %I, %I', r || '|' || me, r || '|t', r || '|n'), ', '),
           string_agg(format('c, k, %L', me), ', '),
           string_agg(format('%I = c, %I = %s, %I = %L', r || '|' || me, r || '|t', stamp, r || '|n', me), ', ')
      INTO full_cols, full_vals, full_set FROM unnest(regs) r;
    ins_stmt := format($s$
        INSERT INTO pgduplex.%1$I (%2$s, %3$s, "$stamp") VALUES (%4$s, %5$s, k) ON CONFLICT DO NOTHING;
        IF NOT FOUND THEN
            UPDATE pgduplex.%1$I AS v SET %6$s, "$stamp" = %7$s, "$dead" = NULL WHERE (%2$s) = (%4$s);
        END IF;$s$, vt, key_list, full_cols, new_keys, full_vals, full_set, stamp);

    -- A delete (or the old key of a key change): $row only, and the tombstone values.
    del_set := format('%I = c, %I = %s, %I = %L, "$stamp" = %s, "$dead" = %s', '$row|' || me, '$row|t', stamp, '$row|n', me, stamp, dead);
    del_stmt := format($s$
        UPDATE pgduplex.%1$I AS v SET %2$s WHERE (%3$s) = (%4$s);
        IF NOT FOUND THEN
            INSERT INTO pgduplex.%1$I (%3$s, %5$I, %6$I, %7$I, "$stamp", "$dead") VALUES (%4$s, c, k, %8$L, k, %9$s)
            ON CONFLICT DO NOTHING;
            IF NOT FOUND THEN
                UPDATE pgduplex.%1$I AS v SET %2$s WHERE (%3$s) = (%4$s);
            END IF;
        END IF;$s$, vt, del_set, key_list, old_keys, '$row|' || me, '$row|t', '$row|n', me, dead);

    -- An update: the registers of the columns whose value changed (flag d<i> per column,
    -- computed once). One changed column, the common case, gets a statement of its own: the
    -- executor then builds four assignments, not three per column.
    IF cardinality(cols) = 0 THEN
        upd_stmt := format($s$
        UPDATE pgduplex.%1$I AS v SET "$stamp" = v."$stamp" WHERE (%2$s) = (%3$s);
        IF NOT FOUND THEN
            INSERT INTO pgduplex.%1$I (%2$s) VALUES (%3$s) ON CONFLICT DO NOTHING;
        END IF;$s$, vt, key_list, new_keys);
        flag_decls := '';
    ELSE
        SELECT string_agg(format(', %I, %I, %I', col || '|' || me, col || '|t', col || '|n'), '' ORDER BY i),
               string_agg(format(', CASE WHEN d%1$s THEN c END, CASE WHEN d%1$s THEN k END, CASE WHEN d%1$s THEN %2$L END', i, me), '' ORDER BY i),
               string_agg(format('%2$I = CASE WHEN d%1$s THEN c ELSE v.%2$I END, '
                                 '%3$I = CASE WHEN d%1$s THEN %5$s ELSE v.%3$I END, '
                                 '%4$I = CASE WHEN d%1$s THEN %6$L ELSE v.%4$I END',
                                 i, col || '|' || me, col || '|t', col || '|n', stamp, me), ', ' ORDER BY i),
               string_agg(CASE WHEN pgduplex.comparable(rel, col)
                               THEN format('        d%1$s := OLD.%2$I IS DISTINCT FROM NEW.%2$I;', i, col)
                               ELSE format('        d%1$s := OLD.%2$I::text IS DISTINCT FROM NEW.%2$I::text;', i, col) END,
                          E'\n' ORDER BY i),
               string_agg(format('    d%s boolean;', i), E'\n' ORDER BY i),
               string_agg(format('d%s::int', i), ' + ' ORDER BY i),
               string_agg(format('d%s', i), ' OR ' ORDER BY i),
               string_agg(format(E'            %1$s d%2$s THEN\n                UPDATE pgduplex.%3$I AS v SET %4$I = c, %5$I = %6$s, %7$I = %8$L, "$stamp" = %6$s WHERE (%9$s) = (%10$s);',
                                 CASE WHEN i = 1 THEN 'IF' ELSE 'ELSIF' END, i, vt, col || '|' || me, col || '|t', stamp,
                                 col || '|n', me, key_list, new_keys), E'\n' ORDER BY i)
          INTO upd_cols, upd_vals, upd_set, flags, flag_decls, flag_sum, flag_any, single
          FROM unnest(cols) WITH ORDINALITY AS u(col, i);
        upd_set := format('%s, "$stamp" = CASE WHEN %s THEN %s ELSE v."$stamp" END', upd_set, flag_any, stamp);
        upd_stmt := format($s$
%1$s
        IF %2$s = 1 THEN
%3$s
            END IF;
        ELSE
            UPDATE pgduplex.%4$I AS v SET %5$s WHERE (%6$s) = (%7$s);
        END IF;
        IF NOT FOUND THEN
            INSERT INTO pgduplex.%4$I (%6$s%8$s, "$stamp") VALUES (%7$s%9$s, CASE WHEN %10$s THEN k END)
            ON CONFLICT DO NOTHING;
            IF NOT FOUND THEN
                UPDATE pgduplex.%4$I AS v SET %5$s WHERE (%6$s) = (%7$s);
            END IF;
        END IF;$s$, flags, flag_sum, single, vt, upd_set, key_list, new_keys, upd_cols, upd_vals, flag_any);
    END IF;

    -- Existing versions rows are the common case for updates and deletes, new ones for inserts:
    -- each path tries the likely statement first. (An upsert, INSERT ... ON CONFLICT DO UPDATE,
    -- costs more: it locks the row with a WAL record of its own and builds both projections.)
    body := format($body$
DECLARE
    c bigint;
    k bigint;
%1$s
BEGIN
    IF current_setting('pgduplex.apply', true) = 'on' THEN
        RETURN NULL;
    END IF;
    c := nextval('pgduplex.version_seq');
    -- µs since 1970 (a double holds them exactly until the year 2255)
    k := (date_part('epoch', clock_timestamp()) * 1000000)::bigint%6$s;
    IF TG_OP = 'UPDATE' AND NOT %2$s THEN
%3$s
        RETURN NULL;
    END IF;
    IF TG_OP <> 'INSERT' THEN
%4$s
    END IF;
    IF TG_OP <> 'DELETE' THEN
%5$s
    END IF;
    RETURN NULL;
END
$body$, flag_decls, changed, upd_stmt, del_stmt, ins_stmt,
        CASE WHEN skew = 0 THEN '' ELSE format(' + (%s)', skew) END);

    EXECUTE format('CREATE OR REPLACE FUNCTION pgduplex.%I() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER '
                   'SET search_path = pg_catalog, pg_temp AS %L', fn, body);
    EXECUTE format('ALTER FUNCTION pgduplex.%I() OWNER TO pgduplex_capture', fn);
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = rel AND tgname = 'pgduplex_capture') THEN
        EXECUTE format('CREATE TRIGGER pgduplex_capture AFTER INSERT OR UPDATE OR DELETE ON %s '
                       'FOR EACH ROW EXECUTE FUNCTION pgduplex.%I()', rel, fn);
        EXECUTE format('ALTER TABLE %s ENABLE ALWAYS TRIGGER pgduplex_capture', rel);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = rel AND tgname = 'pgduplex_no_truncate') THEN
        EXECUTE format('CREATE TRIGGER pgduplex_no_truncate BEFORE TRUNCATE ON %s '
                       'FOR EACH STATEMENT EXECUTE FUNCTION pgduplex.refuse_truncate()', rel);
        EXECUTE format('ALTER TABLE %s ENABLE ALWAYS TRIGGER pgduplex_no_truncate', rel);
    END IF;
    INSERT INTO pgduplex.tracked (table_schema, table_name, versions_table, key_columns, tracked_columns, relid)
    VALUES (sch, tbl, vt, keys, cols, rel)
    ON CONFLICT (table_schema, table_name) DO UPDATE
       SET versions_table = excluded.versions_table, key_columns = excluded.key_columns, relid = excluded.relid,
           tracked_columns = excluded.tracked_columns;
END
$gen$;

-- Removes the capture trigger and the guard of one table (teardown, or a table leaving the set).
CREATE OR REPLACE FUNCTION pgduplex.untrack(sch text, tbl text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $f$
DECLARE
    rel regclass := to_regclass(format('%I.%I', sch, tbl));
BEGIN
    IF rel IS NOT NULL THEN
        EXECUTE format('DROP TRIGGER IF EXISTS pgduplex_capture ON %s', rel);
        EXECUTE format('DROP TRIGGER IF EXISTS pgduplex_no_truncate ON %s', rel);
    END IF;
    DELETE FROM pgduplex.tracked WHERE table_schema = sch AND table_name = tbl;
END
$f$;

-- Keeps capture triggers in step with their tables: a stale trigger would break the
-- application's writes (e.g. after DROP COLUMN) or miss a new column.
CREATE OR REPLACE FUNCTION pgduplex.on_ddl() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $f$
DECLARE
    cmd record;
    keys text[];
    key_types text[];
    old_types text[];
BEGIN
    IF current_setting('pgduplex.in_ddl', true) = 'on' THEN
        RETURN;
    END IF;
    PERFORM set_config('pgduplex.in_ddl', 'on', true);
    FOR cmd IN
        SELECT DISTINCT d.objid, n.nspname::text AS nsp, c.relname::text AS rel, t.table_schema, t.table_name,
               t.key_columns, t.versions_table
          FROM pg_event_trigger_ddl_commands() d
          JOIN pg_class c ON c.oid = d.objid
          JOIN pg_namespace n ON n.oid = c.relnamespace
          JOIN pgduplex.tracked t ON t.relid = d.objid
         WHERE d.classid = 'pg_class'::regclass
    LOOP
        IF (cmd.nsp, cmd.rel) IS DISTINCT FROM (cmd.table_schema, cmd.table_name) THEN
            RAISE EXCEPTION 'table %.% is replicated both ways by pgduplex and cannot be renamed or moved (to %.%)',
                quote_ident(cmd.table_schema), quote_ident(cmd.table_name), quote_ident(cmd.nsp), quote_ident(cmd.rel)
                USING HINT = 'Remove it from two-way replication first, or keep its name.';
        END IF;
        SELECT array_agg(a.attname::text ORDER BY k.ord), array_agg(format_type(a.atttypid, a.atttypmod) ORDER BY k.ord)
          INTO keys, key_types
          FROM pg_index i
          CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
          JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
         WHERE i.indrelid = cmd.objid AND i.indisprimary;
        SELECT array_agg(format_type(a.atttypid, a.atttypmod) ORDER BY k.ord) INTO old_types
          FROM unnest(cmd.key_columns) WITH ORDINALITY AS k(name, ord)
          JOIN pg_attribute a ON a.attrelid = format('pgduplex.%I', cmd.versions_table)::regclass AND a.attname = k.name;
        IF keys IS DISTINCT FROM cmd.key_columns OR key_types IS DISTINCT FROM old_types THEN
            RAISE EXCEPTION 'the primary key of %.% (replicated both ways by pgduplex) cannot be changed, renamed or retyped',
                quote_ident(cmd.table_schema), quote_ident(cmd.table_name)
                USING HINT = 'Rows and their versions are matched by the key on both nodes. Remove the table from two-way replication first.';
        END IF;
        PERFORM pgduplex.track(cmd.objid::regclass);
    END LOOP;
    PERFORM set_config('pgduplex.in_ddl', 'off', true);
END
$f$;

REVOKE ALL ON FUNCTION pgduplex.track(regclass), pgduplex.untrack(text, text), pgduplex.comparable(regclass, text) FROM PUBLIC;

DROP EVENT TRIGGER IF EXISTS pgduplex_ddl;
CREATE EVENT TRIGGER pgduplex_ddl ON ddl_command_end WHEN TAG IN ('ALTER TABLE')
    EXECUTE FUNCTION pgduplex.on_ddl();
