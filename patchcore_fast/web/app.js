// The operator's page of `patchcore-fast serve`: plain JavaScript, no libraries, no build
// step. Chosen or dropped images are sent one by one to POST /v1/predict?overlay=png; each
// answer is shown beside its photo. A token (when the server needs one) is kept for this
// tab only (sessionStorage).
"use strict";

const $ = (selector, root = document) => root.querySelector(selector);
let token = sessionStorage.getItem("patchcore-fast-token") || "";

function headers(extra = {}) {
  return token ? { ...extra, Authorization: `Bearer ${token}` } : extra;
}

function fmt(x, digits = 4) {
  return x === null || x === undefined ? "-" : Number(x).toPrecision(digits);
}

async function loadModel() {
  const box = $("#model");
  const answer = await fetch("/v1/model", { headers: headers() });
  if (answer.status === 401) {
    $("#access").hidden = false;
    box.textContent = "this server needs its access token";
    return;
  }
  const m = await answer.json();
  if (!answer.ok) {
    box.textContent = `model summary unavailable: ${m.error}`;
    return;
  }
  const c = m.config;
  const cal = m.calibration;
  box.textContent = `${m.name}: ${c.backbone}${c.pretrained ? "" : " (random weights)"}, ` +
    `${m.bank_rows.toLocaleString()} x ${m.embed_dim} memory bank, ` +
    `${c.resize} ${c.image_size} px${c.crop ? `, crop ${c.crop}` : ""}; ` +
    (cal ? `threshold ${fmt(cal.image_threshold)}` : "not calibrated (scores only, no verdict)") +
    `; ${m.serving.device}, batch ${m.serving.batch_size}; patchcore-fast ${m.version}`;
  $("#access").hidden = true;
}

function showRegions(table, regions) {
  const body = $("tbody", table);
  body.textContent = "";
  regions.forEach((r, i) => {
    const row = body.insertRow();
    for (const v of [i + 1, r.area, r.bbox.join(", "), fmt(r.peak), fmt(r.mean)]) {
      row.insertCell().textContent = v;
    }
  });
  table.hidden = regions.length === 0;
}

function showAnswer(card, a) {
  const verdict = $(".verdict", card);
  if (a.label) {
    verdict.textContent = `${a.label.toUpperCase()} (normalised score ${fmt(a.normalised, 3)})`;
    verdict.className = `verdict ${a.label}`;
  } else {
    verdict.textContent = "no verdict: the model has no calibration (raw score only)";
    verdict.className = "verdict uncalibrated";
  }
  $(".score", card).textContent = `score ${fmt(a.score)}` +
    (a.threshold === null ? "" : ` (threshold ${fmt(a.threshold)})`) +
    `; ${a.regions.length} region${a.regions.length === 1 ? "" : "s"}; ` +
    `${a.width} x ${a.height} px`;
  showRegions($(".regions", card), a.regions);
  $(".overlay", card).src = `data:image/png;base64,${a.overlay_png}`;
  const t = a.timing;
  $(".timing", card).textContent = `${fmt(t.total_ms, 3)} ms on the server ` +
    `(decode ${fmt(t.decode_ms, 3)}, queue ${fmt(t.queue_ms, 3)}, model ${fmt(t.model_ms, 3)} ` +
    `in a batch of ${t.batch_size})`;
  card.dataset.score = String(a.score);
}

async function score(file) {
  const card = $("#result-template").content.firstElementChild.cloneNode(true);
  $(".name", card).textContent = file.name;
  $(".photo", card).src = URL.createObjectURL(file);
  $("#results").prepend(card);
  try {
    const answer = await fetch("/v1/predict?overlay=png", {
      method: "POST",
      headers: headers({ "Content-Type": file.type || "application/octet-stream" }),
      body: file,
    });
    const a = await answer.json();
    if (!answer.ok) throw new Error(a.error || `HTTP ${answer.status}`);
    showAnswer(card, a);
    card.classList.add("done");
  } catch (err) {
    const verdict = $(".verdict", card);
    verdict.textContent = `error: ${err.message}`;
    verdict.className = "verdict error";
    card.classList.add("failed");
    if (String(err.message).includes("token")) $("#access").hidden = false;
  }
}

async function scoreAll(files) {
  for (const file of files) await score(file);  // in order; the server batches clients
}

function setUp() {
  const input = $("#files");
  input.addEventListener("change", () => { scoreAll([...input.files]); input.value = ""; });
  const drop = $("#drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    scoreAll([...e.dataTransfer.files]);
  });
  $("#token-save").addEventListener("click", () => {
    token = $("#token").value.trim();
    sessionStorage.setItem("patchcore-fast-token", token);
    loadModel();
  });
  loadModel().catch((err) => { $("#model").textContent = `cannot reach the server: ${err}`; });
}

setUp();
