"""What the pages read: one precomputed table per lake state, and queries with a time limit.

A lake state is the list of part files of the tables the pages read plus the snapshot pointer
(parts never change once written, so their names are the state). For each state one
in-memory DuckDB (:func:`soundlake.catalog.sql.connect`: the lake's views, read-only,
no files outside the lake) gets ``list_rows``: every clip joined with its preferred caption
(the ``dataset`` view), caption count, captioners, tag labels and the runs that wrote it. A
page of the list then reads that table, not the Parquet parts. When the lake changes (a curate
commits parts, a review lands) the next state is built in a background thread while requests
keep reading the previous one; only the very first state is built while a request waits.

DuckDB has no statement timeout: :func:`run_limited` interrupts a statement past the limit.
"""
from __future__ import annotations

import hashlib
import itertools
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from soundlake.catalog import schema, snapshots, sql
from soundlake.catalog.lake import Lake
from soundlake.core.errors import UserError, one_line

# Tables whose parts make up the state the pages show.
STATE_TABLES = ("clips", "captions", "scores", "tags", "embeddings", "failures", "skipped", "runs",
                "exports", "export_members", "reviews")
PAGE_SIZES = (10, 25, 50, 100, 200)     # the row limit of a page
SORTS = ("clip_id", "source", "duration_s", "score", "created", "license", "n_captions", "similarity")
THRESHOLDS = (0.30, 0.35, 0.40, 0.45, 0.50)

LIST_ROWS = """
CREATE TABLE list_rows AS
WITH caps AS (SELECT clip_id, count(*) AS n_captions, list(DISTINCT captioner) AS captioners,
                     list(DISTINCT run_id) AS caption_runs FROM captions GROUP BY 1),
     tg AS (SELECT clip_id, list(DISTINCT label) AS tag_labels FROM tags GROUP BY 1),
     d AS (SELECT * FROM dataset QUALIFY row_number() OVER (PARTITION BY clip_id ORDER BY created, run_id) = 1)
SELECT row_number() OVER (ORDER BY d.clip_id) - 1 AS rn,
       d.clip_id, d.source, d.source_id, d.run_id, d.duration_s, d.license, d.labels, d.url, d.title,
       d.created, d.caption, d.captioner, d.score, coalesce(caps.n_captions, 0) AS n_captions,
       coalesce(caps.captioners, []) AS captioners, coalesce(tg.tag_labels, []) AS tag_labels,
       '|' || array_to_string(list_concat(d.labels, tg.tag_labels), '|') || '|' AS label_text,
       list_distinct(list_append(coalesce(caps.caption_runs, []), d.run_id)) AS runs
FROM d LEFT JOIN caps USING (clip_id) LEFT JOIN tg USING (clip_id)
ORDER BY rn"""
# Sorting by clip id is sorting by rn, the row's place in clip-id order (a number, and zone maps
# let an unfiltered page jump straight to its rows).
LIST_COLUMNS = ("clip_id", "source", "source_id", "license", "duration_s", "caption", "captioner", "score",
                "n_captions", "labels", "url", "title")


def run_limited(con: duckdb.DuckDBPyConnection, statement: str, params: list | None = None,
                limit_s: float = 5.0) -> list[dict]:
    """Rows of one statement as dicts; past ``limit_s`` the statement is interrupted. Errors are one line."""
    timer = threading.Timer(limit_s, con.interrupt)
    timer.start()
    try:
        table = sql.execute_arrow(con, statement, params)
    except duckdb.InterruptException:
        raise UserError(f"query stopped after {limit_s:g} s (the time limit): narrow it") from None
    except duckdb.Error as e:
        raise UserError(f"SQL error: {one_line(e)}") from None
    finally:
        timer.cancel()
    return table.to_pylist()


@dataclass
class State:
    """One lake state: its key, its DuckDB (lake views + ``list_rows``) and per-state caches.

    Its queries run one at a time (``lock``): the lake's views over empty or object-store tables
    are Arrow objects registered on this one connection, which a cursor would not see."""
    key: str
    con: duckdb.DuckDBPyConnection | None
    built_s: float
    facets: dict
    seq: int = 0             # builds are numbered as they start: a slower, older build never replaces a newer one
    audio_key: str = ""      # the clips parts only: what a clip's audio (and spectrogram) depends on
    dashboard: dict | None = None
    counts: dict = field(default_factory=dict)     # the list's total per filter
    lock: threading.Lock = field(default_factory=threading.Lock)

    def close(self) -> None:
        with self.lock:      # after the query in flight
            if self.con is not None:
                sql.close(self.con)
                self.con = None


class Catalog:
    """The server's view of the lake. Thread-safe: requests take turns on a state's connection
    (:meth:`cursor`), and states are swapped under a lock."""

    def __init__(self, lake: Lake | str, load_model: Callable[[str], Any] | None = None,
                 clap_model: str | None = None, limit_s: float = 5.0, check_every_s: float = 1.0):
        self.lake = Lake(lake) if isinstance(lake, str) else lake
        self.load_model, self.clap_model, self.limit_s = load_model, clap_model, limit_s
        self.check_every_s = check_every_s
        self._state: State | None = None
        self._key_checked = (0.0, "")
        self._build_lock, self._swap_lock = threading.Lock(), threading.Lock()
        self._seq = itertools.count()
        self._building = False
        self.text_search = None      # None, or why the similarity box is off
        self._review_parts: dict[str, pa.Table] = {}
        self._reviews_lock = threading.Lock()
        self.current()               # the first state now: a lake that cannot be read fails at start

    # ---- state -------------------------------------------------------------
    def state_key(self, fresh: bool = False) -> str:
        now = time.monotonic()
        checked, key = self._key_checked
        if fresh or now - checked > self.check_every_s or not key:
            names = [p for t in STATE_TABLES for p in self.lake.parts(t)]
            names.append(repr(snapshots.read_pointer(self.lake)))
            key = hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]
            self._key_checked = (now, key)
        return key

    def _build(self, key: str) -> State:
        from soundlake.stages.caption import captioner_ranking

        t0 = time.perf_counter()
        seq = next(self._seq)
        con = sql.connect(self.lake, ranking=captioner_ranking())
        try:
            con.execute(LIST_ROWS)
            self._add_text_search(con)
            facets = {
                "sources": [r[0] for r in con.execute("SELECT DISTINCT source FROM list_rows ORDER BY 1").fetchall()],
                "licenses": [r[0] for r in con.execute(
                    "SELECT DISTINCT license FROM list_rows WHERE license IS NOT NULL ORDER BY 1").fetchall()],
                "captioners": [r[0] for r in con.execute("SELECT DISTINCT captioner FROM captions ORDER BY 1").fetchall()],
                "runs": [r[0] for r in con.execute(
                    "SELECT DISTINCT r FROM (SELECT unnest(runs) AS r FROM list_rows) ORDER BY 1").fetchall()],
                "labels": [r[0] for r in con.execute(
                    """SELECT l FROM (SELECT unnest(list_concat(labels, tag_labels)) AS l FROM list_rows)
                       WHERE l IS NOT NULL GROUP BY 1 ORDER BY count(*) DESC, 1 LIMIT 300""").fetchall()],
                "clips": con.execute("SELECT count(*) FROM list_rows").fetchall()[0][0],
            }
        except BaseException:
            sql.close(con)
            raise
        audio_key = hashlib.sha256("\n".join(self.lake.parts("clips")).encode()).hexdigest()[:16]
        return State(key=key, con=con, built_s=time.perf_counter() - t0, facets=facets, audio_key=audio_key, seq=seq)

    def _add_text_search(self, con) -> None:
        if self.load_model is None:
            self.text_search = "text search needs a CLAP model: start the server with --clap MODEL_DIR"
            return
        try:
            sql.add_text_search(con, self.load_model, self.clap_model)
            self.text_search = None
        except UserError as e:
            self.text_search = str(e)

    def _swap(self, new: State) -> State:
        """Make ``new`` the current state unless a newer build is; returns the current state."""
        with self._swap_lock:
            if self._state is not None and self._state.seq > new.seq:
                old = new
            else:
                old, self._state = self._state, new
            current = self._state
        if old is not None:   # closed once its query in flight (if any) ends, without waiting here
            threading.Thread(target=old.close, daemon=True).start()
        return current

    def _rebuild(self, key: str) -> None:
        try:
            while True:
                state = self._build(key)
                self._swap(state)
                # While a run keeps committing, rebuild at most half the time (a large lake's build
                # takes seconds of CPU the run needs too).
                time.sleep(min(60.0, state.built_s))
                latest = self.state_key(fresh=True)
                if latest == key:
                    return
                key = latest
        finally:
            self._building = False

    def current(self, wait: bool = False) -> State:
        """The newest built state; a changed lake starts a background build (``wait``: build now)."""
        key = self.state_key(fresh=wait)
        with self._build_lock:
            if self._state is None or (wait and self._state.key != key):
                return self._swap(self._build(key))
            elif self._state.key != key and not self._building:
                self._building = True
                threading.Thread(target=self._rebuild, args=(key,), daemon=True, name="soundlake-serve-build").start()
            return self._state

    @contextmanager
    def cursor(self, wait: bool = False):
        """(state, its DuckDB connection), held by this request until the block ends."""
        while True:
            state = self.current(wait)
            state.lock.acquire()
            if state.con is not None:
                break
            state.lock.release()   # replaced and closed meanwhile: take the newer one
        try:
            yield state, state.con
        finally:
            state.lock.release()

    def close(self) -> None:
        if self._state is not None:
            self._state.close()

    # ---- the list ------------------------------------------------------------
    def page(self, params: dict[str, str], fresh: bool = False) -> dict:
        """One page of the clip list: filters, SQL WHERE, text similarity, sort and paging (``params``
        as the query string gives them)."""
        conds, args = filters(params)
        where = (params.get("where") or "").strip()
        if where:
            conds.append(f"({sql.where_expression(where)})")
        sort = params.get("sort") or "clip_id"
        if sort not in SORTS:
            raise UserError(f"sort {sort!r}: expected one of {', '.join(SORTS)}")
        order = "ASC" if (params.get("order") or "asc").lower() == "asc" else "DESC"
        size = _int(params, "page_size", 50)
        if size not in PAGE_SIZES:
            raise UserError(f"page_size {size}: expected one of {', '.join(map(str, PAGE_SIZES))}")
        page = max(0, _int(params, "page", 0))
        text = (params.get("text") or "").strip()
        with self.cursor(fresh) as (state, cur):
            src, src_args = "list_rows", []
            if text:
                if self.text_search:
                    raise UserError(self.text_search)
                src = """(SELECT l.*, array_cosine_similarity(e.embedding::FLOAT[{dim}], clap_text(?)) AS similarity
                          FROM list_rows l JOIN embeddings e ON e.clip_id = l.clip_id AND e.model_id = ?)"""
                dim, model_id = cur.execute("""SELECT any_value(dim), model_id FROM embeddings GROUP BY model_id
                                               ORDER BY max(created) DESC LIMIT 1""").fetchall()[0]
                src, src_args = src.format(dim=int(dim)), [text, model_id]
            elif sort == "similarity":
                raise UserError("sort by similarity needs a text in the similarity box")
            cond = " AND ".join(conds) or "TRUE"
            cols = ", ".join(LIST_COLUMNS + (("similarity",) if text else ()))
            key = "rn" if sort == "clip_id" else sort
            if not conds and not text and sort == "clip_id" and order == "ASC":
                window = f"rn >= {page * size} ORDER BY rn LIMIT {size}"       # the whole list, in order
            else:
                window = f"{cond} ORDER BY {key} {order} NULLS LAST, rn LIMIT {size} OFFSET {page * size}"
            statement = f"SELECT {cols} FROM {src} WHERE {window}"
            sql.check_read_only(cur, statement)    # the WHERE box: one read statement, whatever it holds
            rows = run_limited(cur, statement, src_args + args, self.limit_s)
            count_key = (cond, repr(src_args + args))
            if count_key not in state.counts:       # paging does not count again
                if len(state.counts) > 1000:
                    state.counts.clear()
                state.counts[count_key] = run_limited(cur, f"SELECT count(*) AS n FROM {src} WHERE {cond}",
                                                      src_args + args, self.limit_s)[0]["n"]
            total = state.counts[count_key]
            verdicts = self._verdicts(cur, rows)
            for r in rows:
                r.update(verdicts.get(r["clip_id"], {}))
            return {"rows": rows, "total": total, "page": page, "page_size": size, "state": state.key}

    def reviews_now(self) -> pa.Table:
        """The reviews table as it is now; each part (one review) is read once."""
        parts = self.lake.parts("reviews")
        with self._reviews_lock:
            for path in parts:
                if path not in self._review_parts:
                    self._review_parts[path] = pq.read_table(path, filesystem=self.lake.fs, schema=schema.REVIEWS)
            tables = [self._review_parts[path] for path in parts]
        return pa.concat_tables(tables) if tables else schema.REVIEWS.empty_table()

    def _reviews_now(self, con) -> str:
        """The newest reviews as they are now, not as the state saw them (a review lands between two
        states): registers the reviews table on ``con``; returns a FROM-able latest-per-target query."""
        con.register("_reviews_now", self.reviews_now())
        return "(" + sql.REVIEW_LATEST.format(reviews="_reviews_now") + ")"

    def _verdicts(self, cur, rows: list[dict]) -> dict[str, dict]:
        """The newest review of each clip on the page and of its captions."""
        if not rows:
            return {}
        ids = [r["clip_id"] for r in rows]
        out: dict[str, dict] = {}
        for clip_id, target, captioner, text, verdict, reason in cur.execute(
                f"""SELECT clip_id, target, captioner, caption_text, verdict, reason FROM {self._reviews_now(cur)}
                    WHERE clip_id IN (SELECT unnest(?::VARCHAR[]))""", [ids]).fetchall():
            if target == "clip":
                out.setdefault(clip_id, {}).update(clip_verdict=verdict, clip_reason=reason)
            else:
                out.setdefault(clip_id, {}).setdefault("caption_verdicts", []).append(
                    {"captioner": captioner, "text": text, "verdict": verdict})
        for r in rows:   # the verdict of the caption the row shows
            for v in out.get(r["clip_id"], {}).get("caption_verdicts", []):
                if v["captioner"] == r["captioner"] and v["text"] == r["caption"]:
                    out[r["clip_id"]]["caption_verdict"] = v["verdict"]
        return out

    # ---- one clip --------------------------------------------------------------
    def clip(self, clip_id: str) -> dict | None:
        with self.cursor() as (state, cur):
            def q(statement, *params):
                return run_limited(cur, statement, [clip_id, *params], self.limit_s)

            latest = self._reviews_now(cur)
            row = q("SELECT * FROM clips WHERE clip_id = ? ORDER BY created LIMIT 1")
            if not row:
                return None
            captions = q(f"""SELECT c.captioner, c.model_id, c.prompt_version, c.text, c.run_id, c.created,
                                   s.score, s.clap_model_id, v.verdict, v.reason, v.reviewer
                            FROM captions c
                            LEFT JOIN (SELECT clip_id, captioner, caption_text, clap_model_id, max(score) AS score
                                       FROM scores WHERE clip_id = $1 GROUP BY ALL) s
                              ON s.clip_id = c.clip_id AND s.captioner = c.captioner AND s.caption_text = c.text
                            LEFT JOIN {latest} v ON v.target = 'caption' AND v.verdict <> 'clear'
                              AND v.clip_id = c.clip_id AND v.captioner = c.captioner AND v.caption_text = c.text
                            WHERE c.clip_id = $1 ORDER BY s.score DESC NULLS LAST, c.captioner, c.text""")
            best = q("SELECT caption, captioner FROM list_rows WHERE clip_id = ?")
            tags = q("""SELECT label, prob, rank, model_id, label_set FROM tags WHERE clip_id = ?
                        ORDER BY model_id, label_set, rank""")
            runs = q("""WITH ids AS (SELECT run_id FROM clips WHERE clip_id = $1
                          UNION SELECT run_id FROM captions WHERE clip_id = $1
                          UNION SELECT run_id FROM tags WHERE clip_id = $1
                          UNION SELECT run_id FROM scores WHERE clip_id = $1
                          UNION SELECT run_id FROM embeddings WHERE clip_id = $1)
                        SELECT ids.run_id, r.pipeline, r.status, r.started, r.ended FROM ids
                        LEFT JOIN runs r USING (run_id) ORDER BY r.started NULLS LAST, ids.run_id""")
            exports = q("""SELECT e.export_id, e.name, e.out, e.created, m.split, m.shard
                           FROM export_members m JOIN exports e USING (export_id) WHERE m.clip_id = ?
                           ORDER BY e.created""")
            reviews = q("""SELECT target, captioner, caption_text, verdict, reason, reviewer, created
                           FROM _reviews_now WHERE clip_id = ? ORDER BY created DESC""")
            excluded = q(f"""SELECT reason, reviewer, created FROM {latest} WHERE clip_id = ? AND target = 'clip'
                             AND verdict = 'exclude'""")
        return {"clip": row[0], "captions": captions, "best": best[0] if best else None, "tags": tags,
                "runs": runs, "exports": exports, "reviews": reviews, "excluded": excluded[0] if excluded else None,
                "state": state.key}

    def audio(self, clip_id: str) -> tuple[bytes, str] | None:
        """(FLAC bytes, the state's audio key) of a clip, or None."""
        with self.cursor() as (state, cur):
            rows = cur.execute("SELECT flac FROM audio WHERE clip_id = ? LIMIT 1", [clip_id]).fetchall()
        return (rows[0][0], state.audio_key) if rows else None

    def has_caption(self, clip_id: str, captioner: str, text: str) -> dict | None:
        with self.cursor() as (_, cur):
            rows = run_limited(cur, """SELECT model_id, prompt_version FROM captions WHERE clip_id = ? AND captioner = ?
                                       AND text = ? LIMIT 1""", [clip_id, captioner, text], self.limit_s)
        return rows[0] if rows else None

    def has_clip(self, clip_id: str) -> bool:
        with self.cursor() as (_, cur):
            return bool(cur.execute("SELECT 1 FROM list_rows WHERE clip_id = ?", [clip_id]).fetchall())

    # ---- dashboards ------------------------------------------------------------
    def dashboard(self) -> dict:
        with self.cursor() as (state, cur):
            if state.dashboard is None:
                def q(statement):
                    return run_limited(cur, statement, None, self.limit_s * 4)

                ts = ", ".join(f"count(*) FILTER (score >= {t}) AS \"{t:.2f}\"" for t in THRESHOLDS)
                state.dashboard = {
                    "sources": q("""SELECT source, count(*) AS clips, round(sum(duration_s) / 3600, 3) AS hours
                                    FROM list_rows GROUP BY 1 ORDER BY 1"""),
                    "failures": q("""SELECT stage, error, permanent, count(*) AS inputs, any_value(message) AS example
                                     FROM failures_open GROUP BY stage, error, permanent ORDER BY inputs DESC"""),
                    "histograms": q("""SELECT captioner, clap_model_id, least(19, greatest(0, floor(score * 20)))::INT AS bin,
                                       count(*) AS n FROM scores GROUP BY ALL ORDER BY captioner, clap_model_id, bin"""),
                    "thresholds": q(f"""SELECT captioner, clap_model_id, count(*) AS pairs, round(avg(score), 3) AS mean,
                                        {ts} FROM scores GROUP BY ALL ORDER BY captioner, clap_model_id"""),
                    "threshold_values": [f"{t:.2f}" for t in THRESHOLDS],
                    "exports": q("""SELECT export_id, name, out, created, clips, shards, bytes, splits_json, args_json,
                                    manifest_sha256, catalog_sha256 FROM exports ORDER BY created DESC"""),
                    "runs": q("""SELECT run_id, pipeline, status, started, ended, counts_json FROM runs
                                 ORDER BY started DESC LIMIT 50"""),
                    "reviews": q("""SELECT target, verdict, count(*) AS n FROM review_latest GROUP BY ALL
                                    ORDER BY target, verdict"""),
                }
            return {**state.dashboard, "state": state.key, "built_s": round(state.built_s, 3)}


def filters(params: dict[str, str]) -> tuple[list[str], list]:
    """The list's filter fields as SQL conditions over ``list_rows`` and their parameters."""
    conds, args = [], []
    for name, cond in (("source", "source = ?"), ("license", "license = ?"), ("run", "list_contains(runs, ?)"),
                       ("captioner", "list_contains(captioners, ?)"),
                       ("label", "contains(label_text, '|' || ? || '|')")):   # a source label or a tag
        value = (params.get(name) or "").strip()
        if value:
            conds.append(cond)
            args.append(value)
    for name, cond in (("score_min", "score >= ?"), ("score_max", "score <= ?"),
                       ("dur_min", "duration_s >= ?"), ("dur_max", "duration_s <= ?")):
        value = (params.get(name) or "").strip()
        if value:
            try:
                args.append(float(value))
            except ValueError:
                raise UserError(f"{name} {value!r}: expected a number") from None
            conds.append(cond)
    return conds, args


def _int(params: dict[str, str], name: str, default: int) -> int:
    value = params.get(name)
    try:
        return default if value in (None, "") else int(value)
    except ValueError:
        raise UserError(f"{name} {value!r}: expected a whole number") from None


class LRU:
    """A small thread-safe least-recently-used cache (spectrograms, audio bytes)."""

    def __init__(self, size: int):
        self.size, self.items, self.lock = size, OrderedDict(), threading.Lock()

    def get(self, key):
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        return None

    def put(self, key, value) -> None:
        with self.lock:
            self.items[key] = value
            self.items.move_to_end(key)
            while len(self.items) > self.size:
                self.items.popitem(last=False)
