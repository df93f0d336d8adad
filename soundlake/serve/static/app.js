// soundlake serve: the clip list, the clip page and the dashboards in one page (hash routes).
// Plain JS, no build step. Every value from the lake goes into the page as text (textContent),
// never as HTML.
"use strict";

const $ = (sel) => document.querySelector(sel);
const S = { meta: null, rows: [], total: 0, selected: 0, params: new URLSearchParams(), clip: null, undo: [],
            clipCaption: 0 };

async function api(path, options) {
  const r = await fetch(path, { credentials: "same-origin", ...(options || {}) });
  const body = await r.json().catch(() => ({ error: `${r.status} ${r.statusText}` }));
  if (!r.ok) throw new Error(body.error || `${r.status}`);
  return body;
}

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function row(tbody, cells) {
  const tr = el("tr");
  for (const c of cells) {
    const td = el("td");
    if (c instanceof Node) td.appendChild(c); else td.textContent = c === null || c === undefined ? "" : String(c);
    tr.appendChild(td);
  }
  tbody.appendChild(tr);
  return tr;
}

function fill(tbody, rows, cells, empty) {
  tbody.replaceChildren();
  for (const r of rows) row(tbody, cells(r));
  if (!rows.length && empty) row(tbody, [empty]).className = "muted";
}

const fmt = (v, d = 3) => (v === null || v === undefined ? "" : Number(v).toFixed(d));
const when = (t) => (t ? String(t).replace("T", " ").slice(0, 19) : "");
const clipHref = (id) => "#/clip/" + encodeURIComponent(id);
const clipUrl = (id, what) => "/api/clips/" + encodeURIComponent(id) + "/" + what;

function toast(msg, bad) {
  const t = $("#toast");
  t.textContent = msg;
  t.className = bad ? "error" : "";
  t.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { t.hidden = true; }, bad ? 6000 : 2500);
}

function show(view) {
  for (const v of ["list", "clip", "dash"]) $("#view-" + v).hidden = v !== view;
  document.querySelectorAll("audio").forEach((a) => { if (!a.closest("#view-" + view)) a.pause(); });
}

// ---- start ----------------------------------------------------------------------------------
async function start() {
  try {
    S.meta = await api("/api/meta");
  } catch (e) {
    document.body.replaceChildren(el("p", "soundlake: " + e.message, "error"));
    return;
  }
  const m = S.meta;
  $("#lake").textContent = m.lake;
  $("#mode").textContent = m.review ? `reviewing as ${m.reviewer}` : "read-only";
  for (const [id, values] of [["#f-source", m.facets.sources], ["#f-license", m.facets.licenses],
                              ["#f-captioner", m.facets.captioners], ["#f-run", m.facets.runs]]) {
    for (const v of values) { const o = el("option", v); o.value = v; $(id).appendChild(o); }
  }
  for (const v of m.facets.labels) { const o = el("option"); o.value = v; $("#labels").appendChild(o); }
  for (const n of m.page_sizes) { const o = el("option", n); o.value = n; $("#f-page-size").appendChild(o); }
  $("#f-page-size").value = "50";
  if (m.text_search) {
    $("#f-text").disabled = true;
    $("#f-text").title = m.text_search;
    $("#text-off").textContent = "(" + m.text_search + ")";
  }
  $("#filters").addEventListener("submit", (ev) => { ev.preventDefault(); applyFilters(0); });
  $("#reset").addEventListener("click", () => { location.hash = "#/"; });
  $("#prev").addEventListener("click", () => applyFilters(Math.max(0, page() - 1)));
  $("#next").addEventListener("click", () => applyFilters(page() + 1));
  document.querySelectorAll("#clips th[data-sort]").forEach((th) => th.addEventListener("click", () => {
    const same = $("#f-sort").value === th.dataset.sort;
    $("#f-sort").value = th.dataset.sort;
    $("#f-order").value = same && $("#f-order").value !== "desc" ? "desc" : "asc";
    applyFilters(0);
  }));
  $("#help-btn").addEventListener("click", () => { $("#help").hidden = !$("#help").hidden; });
  $("#exclude-clip").addEventListener("click", () => excludeClip(S.clip && S.clip.clip.clip_id));
  $("#keep-clip").addEventListener("click", () => S.clip && review({ target: "clip", clip_id: S.clip.clip.clip_id,
                                                                     verdict: "keep" }));
  document.addEventListener("keydown", onKey);
  window.addEventListener("hashchange", route);
  route();
}

const page = () => Number(S.params.get("page") || 0);

function applyFilters(p) {
  const q = new URLSearchParams();
  for (const [k, v] of new FormData($("#filters"))) if (String(v).trim() !== "") q.set(k, String(v).trim());
  if (q.get("page_size") === "50") q.delete("page_size");
  if (p) q.set("page", String(p));
  const hash = "#/?" + q.toString();
  if (location.hash === hash) loadList(q); else location.hash = hash;
}

function route() {
  const h = location.hash || "#/";
  if (h.startsWith("#/clip/")) return openClip(decodeURIComponent(h.slice(7)));
  if (h.startsWith("#/dashboard")) return openDashboard();
  const q = new URLSearchParams(h.includes("?") ? h.slice(h.indexOf("?") + 1) : "");
  for (const f of $("#filters").elements) {
    if (f.name) f.value = q.get(f.name) || (f.name === "page_size" ? "50" : "");
  }
  show("list");
  if (S.params.toString() !== q.toString() || !S.rows.length || S.stale) loadList(q);
}

// ---- the list -------------------------------------------------------------------------------
async function loadList(q, keepSelection) {
  S.params = q;
  S.stale = false;
  $("#error").hidden = true;
  $("#status").textContent = "loading…";
  try {
    const data = await api("/api/clips?" + q.toString());
    S.rows = data.rows;
    S.total = data.total;
    if (!keepSelection) S.selected = 0;
    renderList(data);
  } catch (e) {
    $("#error").textContent = e.message;
    $("#error").hidden = false;
    $("#status").textContent = "";
  }
}

function renderList(data) {
  const first = data.page * data.page_size;
  const similarity = S.params.get("text");
  $("#th-similarity").hidden = !similarity;
  $("#status").textContent = data.total === 0 ? "no clips match"
    : `${first + 1}–${first + data.rows.length} of ${data.total} clips`;
  $("#page-info").textContent = `page ${data.page + 1} of ${Math.max(1, Math.ceil(data.total / data.page_size))}`;
  $("#prev").disabled = data.page === 0;
  $("#next").disabled = first + data.rows.length >= data.total;
  document.querySelectorAll("#clips th[data-sort]").forEach((th) => {
    th.classList.toggle("sorted", th.dataset.sort === (S.params.get("sort") || "clip_id"));
    th.classList.toggle("desc", S.params.get("order") === "desc");
  });
  const tbody = $("#clips tbody");
  tbody.replaceChildren();
  S.rows.forEach((r, i) => {
    const audio = el("audio");
    audio.controls = true;
    audio.preload = "none";
    audio.src = clipUrl(r.clip_id, "audio");
    const link = el("a", r.clip_id);
    link.href = clipHref(r.clip_id);
    const cap = el("span", r.caption);
    if (r.captioner) cap.appendChild(el("span", " · " + r.captioner, "muted"));
    const cells = [audio, link, r.source, fmt(r.duration_s, 1), r.license, cap, fmt(r.score), r.n_captions];
    if (similarity) cells.push(fmt(r.similarity));
    cells.push(verdictBadges(r));
    const tr = row(tbody, cells);
    tr.dataset.index = i;
    tr.dataset.clipId = r.clip_id;
    tr.addEventListener("click", (ev) => { if (ev.target.tagName !== "A") select(i); });
  });
  select(Math.min(S.selected, Math.max(0, S.rows.length - 1)));
  window.soundlakeRenderedAt = performance.now();   // read by benchmarks/browser_latency.py
}

function verdictBadges(r) {
  const span = el("span");
  if (r.clip_verdict === "exclude") span.appendChild(el("span", "excluded", "badge bad"));
  // Every flagged caption of the clip: flagging the shown one wrong makes another one preferred.
  for (const v of r.caption_verdicts || []) {
    if (v.verdict === "clear") continue;
    const b = el("span", `${v.captioner} ${v.verdict.replace("_", " ")}`, "badge " + v.verdict);
    b.title = v.text;
    span.appendChild(b);
  }
  return span;
}

function select(i) {
  S.selected = i;
  document.querySelectorAll("#clips tbody tr").forEach((tr) => tr.classList.toggle("selected", Number(tr.dataset.index) === i));
  const tr = document.querySelector(`#clips tbody tr[data-index="${i}"]`);
  if (tr) tr.scrollIntoView({ block: "nearest" });
}

function selectedAudio() {
  if (!$("#view-clip").hidden) return $("#clip-audio");
  const tr = document.querySelector(`#clips tbody tr[data-index="${S.selected}"]`);
  return tr ? tr.querySelector("audio") : null;
}

// ---- one clip -------------------------------------------------------------------------------
async function openClip(id) {
  show("clip");
  $("#clip-title").textContent = id;
  try {
    S.clip = await api("/api/clips/" + encodeURIComponent(id));
  } catch (e) {
    $("#clip-title").textContent = id + ": " + e.message;
    return;
  }
  const d = S.clip, c = d.clip;
  const audio = $("#clip-audio");
  if (audio.dataset.clipId !== id) {
    audio.src = clipUrl(id, "audio");
    audio.dataset.clipId = id;
    $("#clip-spectrogram").src = clipUrl(id, "spectrogram.png");
  }
  const i = S.rows.findIndex((r) => r.clip_id === id);
  if (i >= 0) S.selected = i;
  $("#clip-excluded").hidden = !d.excluded;
  if (d.excluded) $("#clip-excluded").textContent = `excluded by ${d.excluded.reviewer}: ${d.excluded.reason || ""}`;
  $("#clip-review").hidden = !S.meta.review;
  const best = d.best || {};
  if (S.clipCaptionFor !== id) {
    S.clipCaption = Math.max(0, d.captions.findIndex((x) => x.captioner === best.captioner && x.text === best.caption));
    S.clipCaptionFor = id;
  }
  const tbody = $("#clip-captions tbody");
  tbody.replaceChildren();
  d.captions.forEach((x, k) => {
    const verdict = el("span");
    if (x.verdict) verdict.appendChild(el("span", x.verdict.replace("_", " "), "badge " + x.verdict));
    if (S.meta.review) {
      for (const v of S.meta.caption_verdicts) {
        const b = el("button", v.replace("_", " "), "flag");
        b.type = "button";
        b.dataset.verdict = v;
        b.addEventListener("click", (ev) => { ev.stopPropagation(); flagCaption(x, v, id); });
        verdict.appendChild(b);
      }
    }
    const text = el("span", x.text);
    if (x.captioner === best.captioner && x.text === best.caption) text.appendChild(el("span", " (preferred)", "muted"));
    const tr = row(tbody, [x.captioner, x.model_id, x.prompt_version, text, fmt(x.score), x.clap_model_id, verdict]);
    tr.classList.toggle("selected", k === S.clipCaption);
    tr.addEventListener("click", () => { S.clipCaption = k; openClip(id); });
  });
  fill($("#clip-tags tbody"), d.tags, (t) => [t.label, fmt(t.prob), t.rank, t.model_id, t.label_set], "no tags");
  const meta = $("#clip-meta");
  meta.replaceChildren();
  const link = (url) => {
    if (!/^https?:\/\//i.test(url || "")) return url || "";
    const a = el("a", url);
    a.href = url;
    a.rel = "noopener noreferrer";
    a.target = "_blank";
    return a;
  };
  const fields = [["source", `${c.source} · ${c.source_id}`], ["license", c.license], ["original", link(c.url)],
    ["title", c.title], ["description", c.description], ["uploader", c.uploader], ["upload date", c.upload_date],
    ["labels", (c.labels || []).join(", ")], ["tags", (c.tags || []).join(", ")],
    ["window", `${fmt(c.start_s, 2)} s + ${fmt(c.duration_s, 2)} s (content ${fmt(c.content_s, 2)} s)`],
    ["audio", `${c.sample_rate} Hz · ${c.channels} ch · ${c.flac_bytes} bytes FLAC`],
    ["source file", `${c.src_codec || ""} ${c.src_sample_rate || ""} Hz · ${c.src_channels || ""} ch · ${fmt(c.src_duration_s, 2)} s`],
    ["levels", `peak ${fmt(c.peak_dbfs, 1)} dBFS · rms ${fmt(c.rms_dbfs, 1)} dBFS · ${fmt(c.loudness_lufs, 1)} LUFS`],
    ["metadata", c.meta_json], ["written", `${when(c.created)} by run ${c.run_id}`]];
  for (const [k, v] of fields) {
    if (v === null || v === undefined || v === "") continue;
    meta.appendChild(el("dt", k));
    const dd = el("dd");
    if (v instanceof Node) dd.appendChild(v); else dd.textContent = v;
    meta.appendChild(dd);
  }
  fill($("#clip-runs tbody"), d.runs, (r) => [r.run_id, r.pipeline, r.status, when(r.started), when(r.ended)], "no runs");
  fill($("#clip-exports tbody"), d.exports, (x) => [x.export_id, x.name, x.out, when(x.created), x.split, x.shard],
       "in no export");
  fill($("#clip-reviews tbody"), d.reviews, (x) => [when(x.created), x.reviewer, x.target, x.verdict, x.reason, x.caption_text],
       "no reviews");
}

// ---- reviews --------------------------------------------------------------------------------
async function review(body, quiet) {
  if (!S.meta.review) { toast("read-only: start the server with --review to flag", true); return false; }
  try {
    await api("/api/reviews", { method: "POST", headers: { "content-type": "application/json" },
                                body: JSON.stringify(body) });
  } catch (e) {
    toast(e.message, true);
    return false;
  }
  if (!quiet) toast(`${body.target} ${body.verdict.replace("_", " ")} · recorded`);
  S.stale = true;
  if (!$("#view-clip").hidden && S.clip) openClip(S.clip.clip.clip_id);
  else loadList(S.params, true);
  return true;
}

async function flagCaption(caption, verdict, clipId) {
  const previous = caption.verdict || "clear";
  if (await review({ target: "caption", clip_id: clipId, captioner: caption.captioner, caption_text: caption.text, verdict })) {
    S.undo.push({ target: "caption", clip_id: clipId, captioner: caption.captioner, caption_text: caption.text,
                  verdict: previous });
  }
}

async function excludeClip(clipId) {
  if (!clipId) return;
  const reason = prompt("Why exclude this clip?", "");
  if (!reason) return;
  const row = S.rows.find((r) => r.clip_id === clipId);
  const wasExcluded = (S.clip && S.clip.clip.clip_id === clipId && S.clip.excluded) || (row && row.clip_verdict === "exclude");
  if (await review({ target: "clip", clip_id: clipId, verdict: "exclude", reason })) {
    S.undo.push({ target: "clip", clip_id: clipId, verdict: wasExcluded ? "exclude" : "keep",
                  reason: wasExcluded ? reason : undefined });
  }
}

function currentCaption() {
  if (!$("#view-clip").hidden && S.clip) {
    const x = S.clip.captions[S.clipCaption];
    return x ? [x, S.clip.clip.clip_id] : null;
  }
  const r = S.rows[S.selected];
  if (!r || !r.caption) return null;
  return [{ captioner: r.captioner, text: r.caption, verdict: r.caption_verdict }, r.clip_id];
}

// ---- dashboards -----------------------------------------------------------------------------
async function openDashboard() {
  show("dash");
  let d;
  try {
    d = await api("/api/dashboard");
  } catch (e) {
    toast(e.message, true);
    return;
  }
  fill($("#dash-sources tbody"), d.sources, (r) => [r.source, r.clips, r.hours]);
  fill($("#dash-failures tbody"), d.failures, (r) => [r.stage, r.error, r.permanent ? "yes" : "no", r.inputs, r.example],
       "no open failures");
  const hist = $("#dash-histograms");
  hist.replaceChildren();
  const groups = new Map();
  for (const h of d.histograms) {
    const k = `${h.captioner} · ${h.clap_model_id}`;
    if (!groups.has(k)) groups.set(k, new Array(20).fill(0));
    groups.get(k)[h.bin] = h.n;
  }
  if (!groups.size) hist.appendChild(el("p", "no CLAP scores in the lake (curate with --set clap.model=PATH)", "muted"));
  for (const [k, bins] of groups) {
    const box = el("figure", null, "hist");
    const bars = el("div", null, "bars");
    const top = Math.max(...bins, 1);
    bins.forEach((n, b) => {
      const bar = el("div", null, "bar");
      bar.style.height = `${(100 * n) / top}%`;
      bar.title = `${(b / 20).toFixed(2)}–${((b + 1) / 20).toFixed(2)}: ${n}`;
      bars.appendChild(bar);
    });
    box.appendChild(bars);
    box.appendChild(el("figcaption", `${k} (0 → 1)`));
    hist.appendChild(box);
  }
  const head = $("#dash-thresholds thead");
  head.replaceChildren();
  row(head, ["captioner", "CLAP model", "pairs", "mean", ...d.threshold_values.map((t) => "≥ " + t)]);
  fill($("#dash-thresholds tbody"), d.thresholds, (r) => [r.captioner, r.clap_model_id, r.pairs, r.mean,
       ...d.threshold_values.map((t) => `${r[t]} (${Math.round((100 * r[t]) / Math.max(1, r.pairs))}%)`)]);
  fill($("#dash-reviews tbody"), d.reviews, (r) => [r.target, r.verdict, r.n], "no reviews");
  fill($("#dash-exports tbody"), d.exports, (r) => {
    const details = el("details");
    details.appendChild(el("summary", (r.manifest_sha256 || "").slice(0, 12)));
    details.appendChild(el("pre", JSON.stringify({ out: r.out, export_id: r.export_id, args: JSON.parse(r.args_json || "{}"),
                                                   catalog_sha256: r.catalog_sha256, manifest_sha256: r.manifest_sha256 }, null, 1)));
    return [r.name, when(r.created), r.clips, r.shards, r.bytes, r.splits_json, details];
  }, "no exports");
  fill($("#dash-runs tbody"), d.runs, (r) => [r.run_id, r.pipeline, r.status, when(r.started), when(r.ended)], "no runs");
}

// ---- keys -----------------------------------------------------------------------------------
function onKey(ev) {
  const t = ev.target;
  if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
  if (t.tagName === "INPUT" || t.tagName === "SELECT" || t.tagName === "TEXTAREA") {
    if (ev.key === "Escape") t.blur();
    return;
  }
  const onClip = !$("#view-clip").hidden, onList = !$("#view-list").hidden;
  if (!onClip && !onList) return;
  const k = ev.key;
  const move = (d) => {
    if (onList) { select(Math.max(0, Math.min(S.rows.length - 1, S.selected + d))); return; }
    const i = S.selected + d;
    if (i >= 0 && i < S.rows.length) location.hash = clipHref(S.rows[i].clip_id);
  };
  const handlers = {
    " ": () => { const a = selectedAudio(); if (a) { if (a.paused) { pauseAll(a); a.play(); } else a.pause(); } },
    j: () => move(1), ArrowDown: () => move(1), k: () => move(-1), ArrowUp: () => move(-1),
    Enter: () => { if (onList && S.rows[S.selected]) location.hash = clipHref(S.rows[S.selected].clip_id); },
    Escape: () => { if (onClip) history.length > 1 ? history.back() : (location.hash = "#/"); },
    g: () => flagCurrent("good"), p: () => flagCurrent("partly_wrong"), w: () => flagCurrent("wrong"),
    c: () => flagCurrent("clear"),
    x: () => excludeClip(onClip ? S.clip && S.clip.clip.clip_id : S.rows[S.selected] && S.rows[S.selected].clip_id),
    u: () => { const last = S.undo.pop(); if (last) review(last).then((ok) => ok && toast("undone")); else toast("nothing to undo"); },
    "/": () => { if (onList) $("#f-where").focus(); },
    "?": () => { $("#help").hidden = !$("#help").hidden; },
  };
  if (handlers[k]) { ev.preventDefault(); handlers[k](); }
}

function flagCurrent(verdict) {
  const cur = currentCaption();
  if (cur) flagCaption(cur[0], verdict, cur[1]); else toast("no caption to flag", true);
}

function pauseAll(except) {
  document.querySelectorAll("audio").forEach((a) => { if (a !== except) a.pause(); });
}

document.addEventListener("play", (ev) => pauseAll(ev.target), true);
start();
