"""SQL over the lake with DuckDB.

Every command opens its own in-memory DuckDB whose views read the Parquet parts
directly. No DuckDB database file exists, so there is no file lock to fight over:
queries run while a curation job writes, and see every part committed so far.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import duckdb
import pyarrow.dataset as pads

from soundlake.catalog import delta, schema, snapshots
from soundlake.catalog.lake import Lake
from soundlake.core.errors import SKIP_REASONS, UserError, one_line

# The skip reasons as a SQL list: policy decisions that older lakes recorded as failures.
SKIP_REASONS_SQL = ", ".join(f"'{r}'" for r in SKIP_REASONS)
# The newest review of each target (a clip, or a caption: clip, captioner, text) in a reviews table.
REVIEW_LATEST = """SELECT * FROM {reviews} QUALIFY row_number() OVER (PARTITION BY target, clip_id,
                     coalesce(captioner, ''), coalesce(caption_text, '') ORDER BY created DESC, review_id DESC) = 1"""
# Views built on the raw tables (every table and view is declared here or in schema.py).
_VIEWS: dict[str, str] = {
    # The newest record of each run (a run writes one at start and one at the end).
    "runs": """SELECT * EXCLUDE (rn) FROM (
                 SELECT *, row_number() OVER (PARTITION BY run_id
                   ORDER BY ended IS NULL, ended DESC) AS rn FROM _runs) WHERE rn = 1""",
    # Failures not yet made good by a later success, one row (the latest attempt) each.
    # (Lakes written before `skipped` existed hold policy decisions as failures: not open ones.)
    "failures_open": f"""SELECT * EXCLUDE (rn) FROM (
                 SELECT f.*, row_number() OVER (PARTITION BY f.source, f.source_id, f.stage, f.clip_id
                   ORDER BY f.time DESC) AS rn FROM failures f
                 WHERE ((f.clip_id IS NULL AND NOT EXISTS (SELECT 1 FROM clips c
                          WHERE c.source = f.source AND c.source_id = f.source_id))
                    OR f.clip_id IS NOT NULL) AND f.error NOT IN ({SKIP_REASONS_SQL}))
                 WHERE rn = 1""",
    "audio": "SELECT clip_id, sample_rate, channels, flac FROM _clip_parts",
    # Reviews (soundlake serve --review): the newest per target; a caption is (clip, captioner, text).
    "review_latest": REVIEW_LATEST.format(reviews="reviews"),
    # For `export --where "clip_id NOT IN (SELECT clip_id FROM excluded_clips)"`.
    "excluded_clips": """SELECT clip_id, reason, reviewer, created FROM review_latest
                          WHERE target = 'clip' AND verdict = 'exclude'""",
    "caption_reviews": """SELECT clip_id, captioner, caption_text, verdict, reason, reviewer, created
                          FROM review_latest WHERE target = 'caption' AND verdict <> 'clear'""",
}
# The dataset view's first ordering key: captions reviewed good first, then unreviewed, partly wrong, wrong.
REVIEW_RANK = "CASE v.verdict WHEN 'good' THEN 0 WHEN 'partly_wrong' THEN 2 WHEN 'wrong' THEN 3 ELSE 1 END"
CAPTION_POLICIES = ("score", "priority")


def ranking_sql(ranking: Sequence[str], alias: str = "c") -> str:
    """A SQL expression ranking ``<alias>.captioner`` by ``ranking`` (most preferred first;
    captioners not in it come last)."""
    cases = " ".join("WHEN '" + n.replace("'", "''") + f"' THEN {i}" for i, n in enumerate(ranking))
    return f"CASE {alias}.captioner {cases} ELSE {len(ranking)} END" if ranking else "0"


def dataset_view(ranking: Sequence[str], policy: str = "score") -> str:
    """Each clip with its preferred caption: highest CLAP score from the newest CLAP model
    (``score``; captions without a score come after, by captioner ranking), or by
    captioner ranking alone (``priority``). Either way a caption a reviewer approved comes
    first and one flagged wrong last (``caption_reviews``)."""
    prio = ranking_sql(ranking)
    order = (f"s.score DESC NULLS LAST, {prio}, c.text" if policy == "score" else f"{prio}, s.score DESC NULLS LAST, c.text")
    order = f"{REVIEW_RANK}, {order}"   # a reviewer's verdict outranks both policies
    return f"""WITH newest AS (SELECT clap_model_id FROM scores GROUP BY 1 ORDER BY max(created) DESC LIMIT 1),
               ranked AS (
                 SELECT c.clip_id, c.text AS caption, c.captioner, c.model_id AS caption_model_id,
                        s.score, s.clap_model_id,
                        row_number() OVER (PARTITION BY c.clip_id ORDER BY {order}) AS rn
                 FROM captions c LEFT JOIN scores s ON s.clip_id = c.clip_id AND s.captioner = c.captioner
                      AND s.caption_text = c.text AND s.clap_model_id = (SELECT clap_model_id FROM newest)
                 LEFT JOIN caption_reviews v ON v.clip_id = c.clip_id AND v.captioner = c.captioner
                      AND v.caption_text = c.text)
               SELECT cl.*, r.caption, r.captioner, r.caption_model_id, r.score, r.clap_model_id
               FROM clips cl LEFT JOIN ranked r ON r.clip_id = cl.clip_id AND r.rn = 1"""


def parquet_list(files: list[str]) -> str:
    """``files`` as a DuckDB list literal for ``read_parquet([...])``."""
    return "[" + ", ".join("'" + f.replace("'", "''") + "'" for f in files) + "]"


def source_sql(con: duckdb.DuckDBPyConnection, lake: Lake, table: str, files: list[str] | None = None) -> str:
    """A FROM-able expression for a table's parts (all, or exactly ``files``), typed even when it has none."""
    pinned = files is not None
    files = lake.parts(table) if files is None else files
    if files and lake.is_local:
        if pinned or (delta.uses_log(table) and delta.has_log(lake, table)):
            return f"read_parquet({parquet_list(files)}, union_by_name = true)"
        glob = lake.path(table, "*.parquet").replace("'", "''")
        return f"read_parquet('{glob}', union_by_name = true)"
    name = f"_arrow_{table}"
    if files:
        con.register(name, pads.dataset(files, filesystem=lake.fs, format="parquet"))
    else:
        con.register(name, schema.TABLES[table].empty_table())
    return name


def _names(con: duckdb.DuckDBPyConnection, statement: str) -> set[str] | None:
    """The tables a SELECT names, from DuckDB's parser alone (``json_serialize_sql``: nothing is
    bound or run); None if it is not one SELECT or names a table in another schema."""
    import json

    try:
        tree = json.loads(con.execute("SELECT json_serialize_sql(?)", [statement]).fetchall()[0][0])
    except duckdb.Error:
        return None
    if tree.get("error"):
        return None
    names, todo = set(), [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, dict):
            if node.get("type") == "BASE_TABLE":
                if node.get("schema_name") or node.get("catalog_name"):
                    return None
                names.add(node["table_name"])
            todo.extend(node.values())
        elif isinstance(node, list):
            todo.extend(node)
    return names


_DEPS: dict[str, set[str]] = {}   # view -> the names its SQL reads (the SQL never changes)


def _view_deps(name: str, con: duckdb.DuckDBPyConnection | None = None) -> set[str]:
    """The names a view reads (the raw tables' helper views count as their table)."""
    if name not in _DEPS:
        con = con or duckdb.connect(":memory:")
        if name == "dataset":
            _DEPS[name] = _names(con, dataset_view(())) or set()
        elif name in _VIEWS:
            _DEPS[name] = _names(con, _VIEWS[name].replace("_clip_parts", "clips").replace("_runs", "runs")) or set()
        else:
            _DEPS[name] = set()
    return _DEPS[name]


def tables_for(statement: str, con: duckdb.DuckDBPyConnection | None = None) -> set[str] | None:
    """The lake tables a statement needs, views followed to their tables; None (build them all)
    when it names anything else or names nothing (SHOW TABLES, information_schema, a CTE), so
    the cheap path is taken only when it is sure to be right. ``con``: a connection to parse
    with (opening one costs ~30 ms)."""
    con = con or duckdb.connect(":memory:")
    known = set(schema.TABLES) | set(_VIEWS) | {"dataset"}
    names = _names(con, statement)
    if not names or not names <= known:
        return None
    return needed(names, con)


def needed(names: set[str], con: duckdb.DuckDBPyConnection | None = None) -> set[str]:
    """``names`` with every table and view they read, for ``connect(only=...)``."""
    todo, seen = list(names), set()
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(_view_deps(name, con))
    return seen


def connect(lake: Lake | str, caption_policy: str | None = None, parts: dict[str, list[str]] | None = None,
            ranking: Sequence[str] = (), file_reads: bool = False,
            only: set[str] | None = None, statement: str | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with the lake's views. ``caption_policy`` (or
    $SOUNDLAKE_CAPTION_POLICY): how the ``dataset`` view picks a clip's caption;
    ``ranking``: captioner names, most preferred first (the captioner registry's order,
    handed in by the layers above: :func:`soundlake.stages.caption.captioner_ranking`).

    The connection reads only the lake's own folder (``file_reads``: any file too) and its
    configuration is locked: no statement can re-open file access or change settings.
    ``parts``: {table: part files} to read exactly those (one catalog state, e.g. for an
    export, even while a curation job adds parts); other tables read all their parts.
    ``only``: build just these tables and views, or those ``statement`` reads
    (:func:`tables_for`): each view costs the reads of its table's log and footers, which a
    short query should not pay 13 times."""
    import os

    lake = Lake(lake) if isinstance(lake, str) else lake
    policy = caption_policy or os.environ.get("SOUNDLAKE_CAPTION_POLICY", "score")
    if policy not in CAPTION_POLICIES:
        raise UserError(f"caption policy {policy!r}: expected one of {', '.join(CAPTION_POLICIES)}")
    if not lake.exists():
        raise UserError(f"no lake at {lake.uri}: run `soundlake curate demo --lake {lake.uri}` first")
    con = duckdb.connect(":memory:")
    # Parts never change once written: parse each one's footer once, not at every view and query.
    con.execute("SET parquet_metadata_cache = true")
    if statement is not None and only is None:
        only = tables_for(statement, con)
    for table in schema.TABLES:
        if only is not None and table not in only:
            continue
        files = (parts or {}).get(table)
        if files is None and table in schema.SNAPSHOT_TABLES:
            files = snapshots.table_parts(lake, table)   # the newest snapshot's parts, not a glob
        src = source_sql(con, lake, table, files)
        if table == "clips":
            con.execute(f"CREATE VIEW _clip_parts AS SELECT * FROM {src}")
            cols = ", ".join(schema.CLIP_COLUMNS)
            con.execute(f"CREATE VIEW clips AS SELECT {cols} FROM _clip_parts")
        elif table == "runs":
            con.execute(f"CREATE VIEW _runs AS SELECT * FROM {src}")
        elif table in schema.DEDUPE_KEYS:
            key, order = schema.DEDUPE_KEYS[table]
            con.execute(f"CREATE VIEW _{table}_all AS SELECT * FROM {src}")
            con.execute(f"""CREATE VIEW {table} AS SELECT * FROM _{table}_all
                            QUALIFY row_number() OVER (PARTITION BY {key} ORDER BY {order} DESC) = 1""")
        else:
            con.execute(f"CREATE VIEW {table} AS SELECT * FROM {src}")
    for name, view in _VIEWS.items():
        if only is None or name in only:
            con.execute(f"CREATE VIEW {name} AS {view}")
    if only is None or "dataset" in only:
        con.execute(f"CREATE VIEW dataset AS {dataset_view(ranking, policy)}")
    if not file_reads:
        if lake.is_local:
            con.execute("SET allowed_directories = [?]", [lake.root.rstrip("/") + "/"])
        con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


READ_STATEMENTS = "SELECT, WITH, FROM, VALUES, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN"


def check_read_only(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Refuse, in one line, anything but one read statement: no COPY, ATTACH, INSTALL, LOAD,
    SET, CREATE, EXPORT, PRAGMA, CALL, and no second statement (DuckDB's own parser decides)."""
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as e:
        raise UserError(f"SQL error: {one_line(e)}") from None
    if len(statements) != 1:
        raise UserError(f"one statement at a time, got {len(statements)}: run them one by one")
    kind = statements[0].type
    if kind == duckdb.StatementType.EXPLAIN:
        # EXPLAIN ANALYZE runs the statement it explains: that one must be a read too.
        inner = re.sub(r"^\s*EXPLAIN\s+(ANALYZE\s+)?", "", statements[0].query, flags=re.IGNORECASE)
        return check_read_only(con, inner)
    if kind != duckdb.StatementType.SELECT:
        raise UserError(f"read-only SQL: {kind.name} statements are refused; run one of {READ_STATEMENTS}")


def where_expression(where: str) -> str:
    """A ``--where`` option as one boolean SQL expression, parsed by DuckDB: a string that closes
    the parentheses around it or adds a statement is refused before anything runs."""
    try:
        duckdb.SQLExpression(where)   # a single expression is balanced: safe inside parentheses
    except duckdb.Error as e:
        raise UserError(f"--where must be one SQL condition, e.g. \"license = 'CC0'\": {one_line(e)}") from None
    return where


TEXT_SEARCH_NAMES = ("text_similarity", "clap_text")


def add_text_search(con: duckdb.DuckDBPyConnection, load_model: Callable[[str], Any],
                    model: str | None = None) -> None:
    """``clap_text('dog barking')`` -> the CLAP text vector, and the macro
    ``text_similarity(clip_id, 'dog barking')`` -> cosine with the clip's audio embedding.

    The model is the one that wrote the newest embeddings (or ``model`` /
    $SOUNDLAKE_CLAP_MODEL), loaded on first use with ``load_model(path)`` (an object with
    ``embed_text(texts)``, e.g. :func:`soundlake.models.clap.load.load_clap`); each text
    is embedded once.
    """
    import os

    row = con.execute("""SELECT model_id, any_value(dim) FROM embeddings GROUP BY 1
                         ORDER BY max(created) DESC LIMIT 1""").fetchall()
    row = row[0] if row else None
    if row is None:
        raise UserError("text_similarity needs audio embeddings: curate with --set clap.model=PATH first")
    model_id, dim = row
    path = model or os.environ.get("SOUNDLAKE_CLAP_MODEL") or model_id
    state: dict = {}

    def clap_text(text: str):
        if text not in state:
            if "model" not in state:
                try:
                    state["model"] = load_model(path)
                except (OSError, ValueError) as e:
                    raise UserError(f"cannot load CLAP model {path!r} for text search ({e}); "
                                    "set SOUNDLAKE_CLAP_MODEL to its folder") from None
            state[text] = state["model"].embed_text([text])[0].astype("float32").tolist()
        return state[text]

    con.create_function("clap_text", clap_text, ["VARCHAR"], f"FLOAT[{int(dim)}]", side_effects=False)
    mid = str(model_id).replace("'", "''")
    con.execute(f"""CREATE MACRO text_similarity(clip, q) AS (
                      SELECT array_cosine_similarity(e.embedding::FLOAT[{int(dim)}], clap_text(q))
                      FROM embeddings e WHERE e.clip_id = clip AND e.model_id = '{mid}' LIMIT 1)""")


def close(con: duckdb.DuckDBPyConnection) -> None:
    """Close a connection (and drop Python UDFs first, which DuckDB needs for a clean exit)."""
    try:
        con.remove_function("clap_text")
    except duckdb.Error:
        pass
    con.close()


def as_of_instant(lake: Lake, text: str):
    """The instant ``--as-of`` names: an ISO time (UTC unless it says otherwise), or a run id
    (the time of that run's last commit)."""
    from datetime import datetime, timezone

    try:
        when = datetime.fromisoformat(text)
        return when if when.tzinfo else when.replace(tzinfo=timezone.utc)
    except ValueError:
        pass
    for run in delta.history(lake):
        if run["run_id"] == text:
            return run["time"]
    raise UserError(f"--as-of {text!r}: neither an ISO time (2026-12-01T14:00:00), a run nor an export of "
                    f"this lake (see `soundlake snapshots --lake {lake.uri}`)")


def recorded_versions(lake: Lake, name: str) -> dict[str, int] | None:
    """The table versions a run wrote or an export read, as their records keep them (None:
    no such record, or one written before soundlake recorded versions)."""
    import json

    table, key, column = ("exports", "export_id", "as_of") if name.startswith("exp-") else ("runs", "run_id",
                                                                                          "wrote_as_of")
    con = connect(lake, only=needed({table}))
    try:
        if column not in {d[0] for d in con.execute(f"SELECT * FROM {table} LIMIT 0").description}:
            return None
        row = con.execute(f"SELECT {column} FROM {table} WHERE {key} = ? AND {column} IS NOT NULL", [name]).fetchall()
    finally:
        close(con)
    return json.loads(row[0][0]) if row else None


def as_of_state(lake: Lake, text: str) -> delta.State:
    """Every table as ``--as-of`` names it: a run (the versions it wrote) or an export (the
    versions it read), exactly; an ISO time, or an older run, by commit time. The snapshot
    tables likewise (:func:`snapshot_seq`)."""
    versions = recorded_versions(lake, text)
    if versions is not None and not text.startswith("exp-") and "runs" in versions:
        # A run records its versions in its end record, so they precede that record's own
        # commit: read `runs` as of the record, so the run shows as it ended.
        end = delta.last_commit(lake, "runs", text)
        versions = versions if end is None else {**versions, "runs": end}
    if versions is not None:
        state = delta.state_at(lake, versions)
    else:
        state = delta.state_as_of(lake, as_of_instant(lake, text))
    return {**state, **snapshots.state(lake, snapshot_seq(lake, text, versions))}


def snapshot_seq(lake: Lake, text: str, versions: dict | None = None) -> int | str | None:
    """The snapshot tables' seq as of ``--as-of`` (see :func:`snapshots.pointer_at`): the one a
    run or an export recorded, else by time (an export recorded before they were: as of now)."""
    if versions is not None and snapshots.KEY in versions:
        return versions[snapshots.KEY]
    if text.startswith("exp-"):
        return snapshots.NOW
    return snapshots.seq_as_of(lake, as_of_instant(lake, text))


def query(lake: Lake | str, sql: str, ranking: Sequence[str] = (),
          load_model: Callable[[str], Any] | None = None, allow_file_reads: bool = False, as_of: str | None = None):
    """Run one read statement (:func:`check_read_only`) and return its result as an Arrow
    table; errors are one line. ``load_model`` enables text search (:func:`add_text_search`);
    ``allow_file_reads`` lets the statement read files outside the lake (``read_csv(...)``);
    ``as_of`` (a run, an export or an ISO time: :func:`as_of_state`) reads every logged table
    as of that instant."""
    lake = Lake(lake) if isinstance(lake, str) else lake
    parts = {t: files for t, (_, files) in as_of_state(lake, as_of).items()} if as_of else None
    text_search = any(name in sql for name in TEXT_SEARCH_NAMES)   # its macro reads embeddings
    con = connect(lake, ranking=ranking, file_reads=allow_file_reads, parts=parts,
                  statement=None if text_search else sql)
    try:
        check_read_only(con, sql)
        if text_search:
            if load_model is None:
                raise UserError("text search (text_similarity, clap_text) is not available here: "
                                "run it through `soundlake sql`")
            add_text_search(con, load_model)
        result = con.sql(sql)
        if result is None:
            return None
        table = result.arrow()
        return table.read_all() if hasattr(table, "read_all") else table
    except duckdb.PermissionException as e:
        raise UserError(f"SQL error: {one_line(e)} (reading files outside the lake is off: pass "
                        "--allow-file-reads to allow it)") from None
    except duckdb.Error as e:
        raise UserError(f"SQL error: {one_line(e)}") from None
    finally:
        close(con)


def fetchall(lake: Lake | str, sql: str, **kw) -> list[tuple]:
    """Rows of a query as tuples (small results: tests, status, scripts); ``kw`` as for :func:`query`."""
    table = query(lake, sql, **kw)
    if table is None:
        return []
    cols = table.to_pydict()
    return list(zip(*cols.values())) if cols else []


def execute_arrow(con: duckdb.DuckDBPyConnection, sql: str, params=None):
    """Run a parameterised query and return an Arrow table (DuckDB 1.x and 2.x)."""
    rel = con.sql(sql, params=params)
    table = rel.to_arrow_table() if hasattr(rel, "to_arrow_table") else rel.arrow()
    return table.read_all() if hasattr(table, "read_all") else table
