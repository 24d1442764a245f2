// laion-spark search page: plain JS, no build step, no CDN. The search state lives in the URL
// (shareable); results come from /api/search (first page with metadata, the rest as ids) and
// further pages from /metadata as the user scrolls.
"use strict";

const PAGE = 40;
const $ = (id) => document.getElementById(id);
const state = { indice: "", results: [], shown: 0, loading: false, imageB64: null, seq: 0,
                similarId: null };

const FIELDS = [ // [url key, element id, kind]
  ["q", "q", "text"], ["imageUrl", "image-url", "text"], ["index", "indice", "text"],
  ["safe", "safe", "bool"], ["dedupUrls", "dedup-urls", "bool"], ["dedup", "dedup", "bool"],
  ["mclip", "mclip", "bool"], ["lang", "lang", "text"], ["minSim", "min-sim", "text"],
  ["maxWm", "max-wm", "text"], ["k", "k", "text"], ["captions", "show-captions", "bool"],
  ["sims", "show-sims", "bool"],
];

function modality() { return document.querySelector("input[name=modality]:checked").value; }

function writeUrl() {
  const p = new URLSearchParams();
  for (const [key, id, kind] of FIELDS) {
    const el = $(id);
    if (kind === "bool") p.set(key, el.checked ? "1" : "0");
    else if (el.value) p.set(key, el.value);
  }
  p.set("modality", modality());
  if (state.similarId != null) p.set("similar", state.similarId);
  history.replaceState(null, "", "?" + p.toString());
}

function readUrl() {
  const p = new URLSearchParams(location.search);
  for (const [key, id, kind] of FIELDS) {
    if (!p.has(key)) continue;
    if (kind === "bool") $(id).checked = p.get(key) === "1";
    else $(id).value = p.get(key);
  }
  if (p.get("modality")) {
    const r = document.querySelector(`input[name=modality][value=${p.get("modality")}]`);
    if (r) r.checked = true;
  }
  if (p.has("similar")) state.similarId = parseInt(p.get("similar"), 10);
  return p.has("q") || p.has("imageUrl") || p.has("similar");
}

function applyDisplay() {
  document.body.classList.toggle("hide-captions", !$("show-captions").checked);
  document.body.classList.toggle("hide-sims", !$("show-sims").checked);
}

function status(text) { $("status").textContent = text; }

async function postJson(path, body) {
  const r = await fetch(path, { method: "POST", headers: { "Content-Type": "application/json" },
                                body: JSON.stringify(body) });
  if (!r.ok) {
    let msg = r.statusText;
    try { const e = await r.json(); msg = e.message || JSON.stringify(e); } catch (_) {}
    throw new Error(`${r.status}: ${msg}`);
  }
  return r;
}

function queryBody(extra) {
  const body = {
    indice_name: $("indice").value, modality: modality(), num_images: PAGE,
    num_result_ids: Math.max(PAGE, Math.min(10000, parseInt($("k").value || "1000", 10))),
    use_safety_model: $("safe").checked, dedup_urls: $("dedup-urls").checked,
    deduplicate: $("dedup").checked, use_mclip: $("mclip").checked,
  };
  if ($("lang").value) body.language_groups = [$("lang").value];
  if ($("min-sim").value) body.min_similarity = parseFloat($("min-sim").value);
  if ($("max-wm").value) body.max_pwatermark = parseFloat($("max-wm").value);
  return Object.assign(body, extra);
}

async function search(extra) {
  if (!extra) {
    if (state.imageB64) extra = { image: state.imageB64 };
    else if ($("image-url").value) extra = { image_url: $("image-url").value };
    else if ($("q").value) extra = { text: $("q").value };
    else return;
  }
  writeUrl();
  status("searching…");
  const seq = ++state.seq;  // a newer search wins; a late answer to an older one is dropped
  try {
    const r = await postJson("/api/search", queryBody(extra));
    const out = await r.json();
    if (seq !== state.seq) return;
    $("grid").innerHTML = "";
    state.results = out.results; state.shown = 0;
    const removed = Object.entries(out.removed).filter(([, n]) => n > 0)
      .map(([k, n]) => `${k.replace("_", " ")} ${n}`).join(", ");
    status(`${out.results.length} results of ${out.retrieved} retrieved` +
           (removed ? ` — removed: ${removed}` : "") + ` (${Math.round(out.timings_ms.total_ms)} ms)`);
    if (!out.results.length) status("no results" + (removed ? ` — removed: ${removed}` : ""));
    render(out.results.filter((x) => x.url !== undefined));
  } catch (e) {
    if (seq === state.seq) status("error " + e.message);
  }
}

function render(rows) {
  const grid = $("grid");
  for (const row of rows) {
    const card = document.createElement("div");
    card.className = "card";
    card.dataset.id = row.id;
    const img = document.createElement("img");
    img.loading = "lazy";
    img.alt = row.caption || "";
    img.src = `/api/image/${encodeURIComponent(state.indice)}/${row.id}`;
    img.title = row.url || "";
    img.onerror = () => { card.classList.add("broken"); };
    const cap = document.createElement("div");
    cap.className = "caption";
    cap.textContent = row.caption || "";
    const sim = document.createElement("div");
    sim.className = "sim";
    const s = state.results.find((x) => x.id === row.id);
    sim.textContent = `sim ${(s ? s.similarity : row.similarity || 0).toFixed(4)}` +
      (row.punsafe != null ? ` · unsafe ${row.punsafe.toFixed(2)}` : "") +
      (row.language ? ` · ${row.language}` : "");
    const actions = document.createElement("div");
    actions.className = "actions";
    const byImage = document.createElement("button");
    byImage.textContent = "similar image";
    byImage.className = "similar-image";
    byImage.onclick = () => searchSimilarImage(row.id);
    const byText = document.createElement("button");
    byText.textContent = "similar caption";
    byText.onclick = () => { $("q").value = row.caption || ""; clearImage(); search({ text: row.caption || "" }); };
    actions.append(byImage, byText);
    card.append(img, cap, sim, actions);
    grid.append(card);
  }
  state.shown += rows.length;
}

async function searchSimilarImage(id) {
  const r = await fetch(`/api/image/${encodeURIComponent(state.indice)}/${id}`);
  const blob = await r.blob();
  const b64 = await blobToB64(blob);
  clearImage();
  state.imageB64 = b64;
  state.similarId = id;  // shareable: ?similar=<id> repeats this search
  $("q").value = "";
  await search({ image: b64 });
}

function blobToB64(blob) {
  return new Promise((resolve, reject) => {
    const fr = new FileReader();
    fr.onload = () => resolve(String(fr.result).split(",", 2)[1]);
    fr.onerror = reject;
    fr.readAsDataURL(blob);
  });
}

function clearImage() {
  state.imageB64 = null; state.similarId = null; $("image-file").value = ""; $("image-url").value = "";
}

async function more() {
  if (state.loading || state.shown >= state.results.length) return;
  state.loading = true;
  const seq = state.seq;
  try {
    const ids = state.results.slice(state.shown, state.shown + PAGE).map((x) => x.id);
    const r = await postJson("/metadata", { indice_name: state.indice, ids });
    const rows = (await r.json()).map((m) => Object.assign({ id: m.id }, m.metadata));
    if (seq === state.seq) render(rows);
  } catch (e) {
    status("error " + e.message);
  } finally {
    state.loading = false;
  }
}

async function exportAs(format) {
  const ids = state.results.slice(0, 10000).map((x) => x.id);
  if (!ids.length) { status("nothing to export: search first"); return; }
  const similarities = state.results.slice(0, 10000).map((x) => x.similarity);
  try {
    const r = await postJson("/api/export", { indice_name: state.indice, ids, similarities, format });
    const blob = await r.blob();
    const name = (r.headers.get("Content-Disposition") || "").match(/filename="([^"]+)"/);
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = name ? name[1] : `subset.${format}`;
    document.body.append(a);
    a.click();
    a.remove();
    status(`exported ${ids.length} rows as ${format}`);
  } catch (e) {
    status("export error " + e.message);
  }
}

async function loadStats() {
  const r = await fetch(`/api/stats?indice_name=${encodeURIComponent(state.indice)}`);
  if (!r.ok) return;
  const s = await r.json();
  const groups = s.language_groups || {};
  let html = `<div>${s.rows} rows, ${s.dim}-d, ${s.clip_model || "no model recorded"}</div>`;
  html += "<table>" + Object.entries(groups).map(([g, n]) => `<tr><td>${g}</td><td>${n}</td></tr>`).join("") + "</table>";
  const h = s.similarity_histogram;
  if (h) {
    const max = Math.max(1, ...h.counts), w = 240, bh = 60, bw = w / h.counts.length;
    html += `<svg width="${w}" height="${bh + 14}" aria-label="similarity histogram">` +
      h.counts.map((c, i) => `<rect x="${i * bw}" y="${bh - (c / max) * bh}" width="${bw - 1}" height="${(c / max) * bh}" fill="#5a7"><title>${h.edges[i]}–${h.edges[i + 1]}: ${c}</title></rect>`).join("") +
      `<text x="0" y="${bh + 12}" font-size="10">${h.edges[0]}</text><text x="${w - 20}" y="${bh + 12}" font-size="10">${h.edges[h.edges.length - 1]}</text></svg>`;
  }
  $("stats").innerHTML = html;
  const lang = $("lang"), keep = lang.value;
  lang.innerHTML = '<option value="">all</option>' + Object.keys(groups).map((g) => `<option>${g}</option>`).join("");
  lang.value = keep;
}

async function init() {
  const names = await (await fetch("/indices-list")).json();
  $("indice").innerHTML = names.map((n) => `<option>${n}</option>`).join("");
  const run = readUrl();
  if (!names.includes($("indice").value)) $("indice").value = names[0];
  state.indice = $("indice").value;
  applyDisplay();
  await loadStats();
  readUrl();
  $("search-form").addEventListener("submit", (e) => {
    e.preventDefault();
    if ($("q").value) clearImage();
    else if ($("image-url").value) { state.imageB64 = null; state.similarId = null; }
    search();
  });
  $("image-file").addEventListener("change", async () => {
    const f = $("image-file").files[0];
    if (!f) return;
    const b64 = await blobToB64(f);
    state.similarId = null; $("image-url").value = "";
    state.imageB64 = b64;
    $("q").value = "";
    search();
  });
  $("indice").addEventListener("change", () => { state.indice = $("indice").value; loadStats(); search(); });
  for (const id of ["safe", "dedup-urls", "dedup", "mclip", "lang"]) $(id).addEventListener("change", () => search());
  for (const r of document.querySelectorAll("input[name=modality]")) r.addEventListener("change", () => search());
  for (const id of ["show-captions", "show-sims"]) $(id).addEventListener("change", () => { applyDisplay(); writeUrl(); });
  $("export-parquet").onclick = () => exportAs("parquet");
  $("export-img2dataset").onclick = () => exportAs("img2dataset");
  $("export-sql").onclick = () => exportAs("sql");
  new IntersectionObserver((entries) => { if (entries.some((e) => e.isIntersecting)) more(); })
    .observe($("sentinel"));
  if (run && state.similarId != null && !$("q").value && !$("image-url").value) {
    searchSimilarImage(state.similarId);
  } else if (run) search();
}

init();
