// The station page: polls the run's JSON API, draws the live views, the counters, health and the gallery, and
// sends the operator's labels and decisions. Plain JavaScript, no build step, nothing fetched from elsewhere.
"use strict";

const TOKEN = new URLSearchParams(location.search).get("token");
const STATUS_EVERY_MS = 1000;
const GALLERY_EVERY_MS = 500; // a judgement appears within this plus the database's half-second batch
const GALLERY_KEEP = 60;
const LABELS = {
  "false-alarm": "False alarm",
  "real-defect": "Real defect",
  "missed-defect": "Missed defect",
};

const state = { sources: [], newestAnomaly: 0, newestPassed: 0, cards: new Map() };

function headers(json) {
  const h = {};
  if (TOKEN) h["X-Station-Token"] = TOKEN;
  if (json) h["Content-Type"] = "application/json";
  return h;
}

async function getJson(path) {
  const response = await fetch(path, { headers: headers(false), cache: "no-store" });
  if (!response.ok) throw new Error(`${path}: ${response.status} ${await response.text()}`);
  return response.json();
}

async function post(action, body) {
  const operator = document.getElementById("operator").value.trim();
  const response = await fetch(`/api/${action}`, {
    method: "POST",
    headers: headers(true),
    body: JSON.stringify({ ...body, operator }),
  });
  const answer = await response.json().catch(() => ({ error: `${response.status}` }));
  if (!response.ok) {
    notice(answer.error || `${action} failed`);
    throw new Error(answer.error);
  }
  notice("");
  return answer;
}

function notice(text) {
  const box = document.getElementById("notice");
  box.textContent = text;
  box.hidden = !text;
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function fmt(value, digits = 5) {
  return value === null || value === undefined ? "-" : Number(value).toPrecision(digits);
}

function when(seconds) {
  return new Date(seconds * 1000).toLocaleTimeString();
}

// ------------------------------------------------------------------ sources: live view, counters, health

function buildSources(sources) {
  const root = document.getElementById("sources");
  root.textContent = "";
  state.sources = sources.map((source) => {
    const node = document.getElementById("source-template").content.firstElementChild.cloneNode(true);
    node.id = `source-${source.index}`;
    node.querySelector(".source-name").textContent = source.name;
    const img = node.querySelector(".live");
    img.id = `live-${source.index}`;
    root.appendChild(node);
    const entry = { index: source.index, node, img, seq: 0 };
    liveLoop(entry);
    return entry;
  });
}

async function liveLoop(entry) {
  const select = entry.node.querySelector(".rate-select");
  for (;;) {
    const rate = Number(select.value);
    if (!rate) {
      await sleep(500);
      continue;
    }
    const started = performance.now();
    try {
      const width = Math.max(160, Math.round(entry.img.clientWidth * (window.devicePixelRatio || 1)) || 640);
      const response = await fetch(`/api/live/${entry.index}.jpg?width=${width}`, { headers: headers(false) });
      if (response.ok) {
        const seq = Number(response.headers.get("X-Frame-Seq"));
        if (seq !== entry.seq) {
          const url = URL.createObjectURL(await response.blob());
          const old = entry.img.src;
          entry.img.src = url;
          if (old.startsWith("blob:")) URL.revokeObjectURL(old);
          entry.seq = seq;
          entry.img.dataset.seq = String(seq);
          entry.img.dataset.frame = response.headers.get("X-Frame-Index");
          const verdict = response.headers.get("X-Frame-Verdict");
          const caption = entry.node.querySelector(".live-caption");
          caption.textContent = `frame ${entry.img.dataset.frame}: ${verdict === "anomaly" ? "REJECT" : "pass"}, ` +
            `score ${response.headers.get("X-Frame-Score")}`;
          caption.className = `live-caption ${verdict}`;
        }
      }
    } catch (error) {
      // the run ended or the network hiccuped: try again at the same rate
    }
    await sleep(Math.max(0, 1000 / rate - (performance.now() - started)));
  }
}

function showHealth(node, health) {
  node.textContent = "";
  if (!health) {
    node.className = "health unknown";
    node.textContent = "health: not watched";
    return;
  }
  const problems = health.problems || [];
  node.className = `health ${problems.length ? "alarm" : "ok"}`;
  const title = document.createElement("div");
  title.className = "health-title";
  title.textContent = problems.length ? "ATTENTION: the run may not make sense" : "health: ok";
  node.appendChild(title);
  for (const problem of problems) {
    const line = document.createElement("div");
    line.className = "problem";
    line.dataset.code = problem.code;
    line.textContent = problem.message;
    node.appendChild(line);
  }
  if ((health.unknown || []).length) {
    const line = document.createElement("div");
    line.className = "unknown-checks";
    line.textContent = `not checked (the bundle does not record it): ${health.unknown.join(", ")}`;
    node.appendChild(line);
  }
}

function showStatus(status) {
  if (state.sources.length !== status.sources.length) buildSources(status.sources);
  const model = status.model;
  const judging = status.sources.map((s) => s.model_version).filter((v) => v !== null && v !== undefined);
  const version = judging.length ? Math.max(...judging) : model.version;
  const modelBox = document.getElementById("model");
  modelBox.dataset.version = version === null || version === undefined ? "" : String(version);
  modelBox.textContent = `model ${model.name} (${model.category})` +
    (version !== null && version !== undefined ? `, version ${version}` : "") + `, ${model.backend}`;
  const links = [];
  if (status.mqtt) {
    const m = status.mqtt;
    links.push(`MQTT ${m.connected ? "connected" : "NOT CONNECTED"}: ${m.delivered} delivered, ` +
      `${m.queued} queued, ${m.dropped} dropped`);
  }
  if (status.database) {
    const d = status.database;
    links.push(`records ${d.recorded}` + (d.not_recorded ? `, ${d.not_recorded} NOT recorded` : "") +
      (d.problem ? ` (${d.problem})` : ""));
  }
  const latency = status.latency && status.latency.station;
  if (latency) links.push(`capture to here p50 ${Math.round(latency.p50_ms)} ms, p99 ${Math.round(latency.p99_ms)} ms`);
  document.getElementById("links").textContent = links.join(" | ");
  for (const source of status.sources) {
    const node = document.getElementById(`source-${source.index}`);
    node.querySelector(".count-frames").textContent = source.frames;
    node.querySelector(".count-ok").textContent = source.ok;
    node.querySelector(".count-anomalies").textContent =
      `${source.anomalies}` + (source.frames ? ` (${(100 * source.anomalies / source.frames).toFixed(1)} %)` : "");
    node.querySelector(".count-fps").textContent = source.ended ? "ended" : `${source.fps.toFixed(1)} FPS`;
    node.querySelector(".count-threshold").textContent =
      source.threshold === null ? "-" : `${fmt(source.threshold)} (${source.threshold_rule})`;
    showHealth(node.querySelector(".health"), source.health);
  }
}

async function statusLoop() {
  for (;;) {
    try {
      showStatus(await getJson("/api/status"));
    } catch (error) {
      notice("the run does not answer (it may have ended)");
    }
    await sleep(STATUS_EVERY_MS);
  }
}

// ------------------------------------------------------------------ gallery and labels

function card(frame, labels) {
  const node = document.getElementById("card-template").content.firstElementChild.cloneNode(true);
  node.dataset.id = String(frame.id);
  node.classList.add(frame.verdict);
  const img = node.querySelector(".overlay");
  const link = node.querySelector(".frame-link");
  if (frame.images) {
    img.src = `/api/frames/${frame.id}/overlay` + (TOKEN ? `?token=${encodeURIComponent(TOKEN)}` : "");
    link.href = `/api/frames/${frame.id}/frame` + (TOKEN ? `?token=${encodeURIComponent(TOKEN)}` : "");
  } else {
    img.remove();
    link.textContent = "no picture kept";
  }
  node.querySelector(".card-title").textContent =
    `${frame.verdict === "anomaly" ? "REJECT" : "pass"} score ${fmt(frame.score)}`;
  const regions = (frame.regions || []).map((r) => `${r.bbox.join(",")} (${r.area} px)`).join("; ");
  node.querySelector(".card-facts").textContent =
    `${frame.lane} frame ${frame.frame}, ${when(frame.timestamp)}` + (regions ? `; regions ${regions}` : "");
  const buttons = node.querySelector(".buttons");
  for (const label of labels) {
    const button = document.createElement("button");
    button.dataset.label = label;
    button.textContent = LABELS[label];
    button.addEventListener("click", () => label_(frame.id, label));
    buttons.appendChild(button);
  }
  showLabel(node, frame.label);
  return node;
}

function showLabel(node, label) {
  node.dataset.label = label || "";
  node.querySelector(".label").textContent = label ? `marked: ${LABELS[label]}` : "";
}

async function label_(frameId, label) {
  const answer = await post("label", { frame: frameId, label });
  for (const node of document.querySelectorAll(`.card[data-id="${frameId}"]`)) showLabel(node, answer.frame.label);
  refreshReview();
}

async function galleryLoop(verdict, rootId, labels, newestKey) {
  const root = document.getElementById(rootId);
  for (;;) {
    try {
      const answer = await getJson(`/api/gallery?verdict=${verdict}&after=${state[newestKey]}&limit=24`);
      for (const frame of answer.frames.slice().reverse()) {
        root.insertBefore(card(frame, labels), root.firstChild);
        state[newestKey] = Math.max(state[newestKey], frame.id);
      }
      while (root.children.length > GALLERY_KEEP) root.lastChild.remove();
    } catch (error) {
      // shown by the status loop
    }
    await sleep(GALLERY_EVERY_MS);
  }
}

// ------------------------------------------------------------------ review: the trade, export, apply, teach, roll back

async function refreshReview() {
  let answer;
  try {
    answer = await getJson("/api/review");
  } catch (error) {
    return;
  }
  document.getElementById("review-counts").textContent =
    `${answer.normal + answer.defect} frames marked: ${answer.normal} normal (false alarms), ` +
    `${answer.defect} defects; the threshold in force is ${fmt(answer.threshold)}`;
  const body = document.querySelector("#trade tbody");
  body.textContent = "";
  for (const row of answer.trade) {
    const line = document.createElement("tr");
    line.className = row.in_force ? "current" : "";
    for (const value of [fmt(row.threshold), row.caught, row.misses, row.false_alarms]) {
      const cell = document.createElement("td");
      cell.textContent = value;
      line.appendChild(cell);
    }
    const note = document.createElement("td");
    note.textContent = row.in_force ? "in force" : row.suggested ? "suggested: misses none" : "";
    line.appendChild(note);
    const action = document.createElement("td");
    if (!row.in_force) {
      const button = document.createElement("button");
      button.textContent = "Apply";
      button.dataset.threshold = String(row.threshold);
      button.addEventListener("click", () => act("apply", { threshold: row.threshold }));
      action.appendChild(button);
    }
    line.appendChild(action);
    body.appendChild(line);
  }
}

async function act(action, body) {
  const result = document.getElementById("review-result");
  result.textContent = `${action}: working...`;
  try {
    const answer = await post(action, body);
    result.textContent = answer.message || JSON.stringify(answer);
  } catch (error) {
    result.textContent = `${action} failed: ${error.message}`;
  }
  refreshReview();
}

async function reviewLoop() {
  for (;;) {
    await refreshReview();
    await sleep(5000);
  }
}

async function actionsLoop() {
  const root = document.getElementById("actions");
  for (;;) {
    try {
      const answer = await getJson("/api/actions");
      root.textContent = "";
      for (const action of answer.actions) {
        const item = document.createElement("li");
        item.textContent = `${when(action.at)} ${action.operator} (${action.address}): ${action.action} ` +
          JSON.stringify(action.detail);
        root.appendChild(item);
      }
    } catch (error) {
      // shown by the status loop
    }
    await sleep(3000);
  }
}

const operator = document.getElementById("operator");
operator.value = localStorage.getItem("protoad-operator") || "";
operator.addEventListener("change", () => localStorage.setItem("protoad-operator", operator.value.trim()));
statusLoop();
galleryLoop("anomaly", "gallery", ["false-alarm", "real-defect"], "newestAnomaly");
galleryLoop("ok", "passed", ["missed-defect"], "newestPassed");
actionsLoop();
reviewLoop();
document.getElementById("export").addEventListener("click", () => act("export", {}));
document.getElementById("teach").addEventListener("click", () => act("teach", {}));
document.getElementById("rollback").addEventListener("click", () => act("rollback", {}));
