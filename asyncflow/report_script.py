"""The run report's script: it draws the page from the JSON blob.

Up to ``DETAIL_LIMIT`` tasks the DAG has a node per task; above it, a node per
task name with counts per state, because a browser lays out a few hundred SVG
nodes at once but not 10,000.  The timeline is one canvas whatever the size,
drawn again on zoom and pan: 10,000 rectangles on a canvas take milliseconds,
10,000 DOM nodes do not.  Counts the tests and tools read are ``data-``
attributes, and ``body[data-ready]`` is set once everything is drawn.
"""

from __future__ import annotations

__all__ = ["SCRIPT"]

SCRIPT = r"""
"use strict";
(() => {
const t0 = performance.now();
const D = JSON.parse(document.getElementById("report-data").textContent);
const T = D.tasks, N = T.uid.length, S = D.states, DETAIL_LIMIT = 300;
const COLOR = {pending: "#9aa5b1", running: "#3b82f6", done: "#2f9e66",
  failed: "#e03131", cancelled: "#f59f00"};
const $ = (id) => document.getElementById(id);
function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "text") e.textContent = v; else e.setAttribute(k, v);
  }
  e.append(...kids);
  return e;
}
function svg(tag, attrs) {
  const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
}
const fmt = (ms) => ms == null ? "-" : ms === 0 ? "0" : ms < 1 ? ms.toFixed(3) + " ms"
  : ms < 1000 ? ms.toFixed(1) + " ms" : (ms / 1000).toFixed(2) + " s";
const st = (i) => S[T.state[i]];
const dur = (i) => T.start[i] == null ? null : T.run_end[i] - T.start[i];
const critical = new Set(D.critical);
const link = (i) => { const a = el("a", {class: "uid", text: T.uid[i]});
  a.onclick = () => details(i); return a; };
const counts = S.map(() => 0);
for (const s of T.state) counts[s]++;

function header() {
  const [fail, open] = [counts[S.indexOf("failed")],
    counts[S.indexOf("pending")] + counts[S.indexOf("running")]];
  const [text, color] = fail ? ["failures", COLOR.failed] : open
    ? ["incomplete", COLOR.cancelled] : ["finished", COLOR.done];
  $("title").textContent = D.title;
  Object.assign($("status"), {textContent: text, style: "background:" + color});
  $("note").textContent = (D.note ? D.note + " · " : "") + "written " +
    new Date(D.generated * 1000).toLocaleString();
  const box = $("summary");
  box.dataset.tasks = N;
  const card = (label, value, color) => el("div", {class: "card",
    style: color ? "border-left:4px solid " + color : ""},
    el("b", {text: String(value)}), el("span", {text: label}));
  box.append(card("tasks", N));
  S.forEach((s, k) => { box.dataset[s] = counts[k];
    box.append(card(s, counts[k], COLOR[s])); });
  box.append(card("makespan", fmt(D.makespan)),
    card("critical path (" + D.critical.length + " tasks)", fmt(D.critical_ms)));
  for (const k of ["cached", "stored"])
    if (D.summary[k] != null) box.append(card(k, D.summary[k]));
  $("legend").append(...S.map((s) => el("span", {},
    el("i", {style: "background:" + COLOR[s]}), s)),
    el("span", {}, el("i", {style: "background:var(--crit)"}), "critical path"));
}

function utilisation() {
  const t = $("utilisation");
  t.append(el("tr", {}, ...["backend", "slots", "busy", "utilisation"]
    .map((h) => el("th", {text: h}))));
  for (const u of D.utilisation) {
    const pct = (u.utilisation * 100).toFixed(1) + "%";
    t.append(el("tr", {"data-backend": u.backend, "data-utilisation": u.utilisation},
      el("td", {text: u.backend}), el("td", {text: String(u.slots)}),
      el("td", {text: fmt(u.busy_ms)}), el("td", {}, el("span", {class: "bar"},
        el("i", {style: "width:" + Math.min(100, u.utilisation * 100) + "%"})), pct)));
  }
}

function failures() {
  const box = $("failures"), failed = Object.keys(D.errors).map(Number);
  box.dataset.failed = failed.length;
  if (!failed.length) { box.append(el("p", {text: "No task failed."})); return; }
  const dependents = {};
  for (const r of Object.values(D.roots)) dependents[r] = (dependents[r] || 0) + 1;
  const own = failed.filter((i) => !(i in D.roots));
  const rest = failed.filter((i) => i in D.roots);
  const table = el("table", {}, el("tr", {}, el("th", {text: "task"}),
    el("th", {text: "error"}), el("th", {text: "caused by"})));
  const shown = [...own, ...rest].slice(0, 200);
  for (const i of shown) {
    const root = D.roots[i];
    const cause = root == null ? (dependents[i] ? dependents[i] +
      " dependent task(s) not run" : "its own code") : el("span", {},
      link(root), ": " + D.errors[root]);
    table.append(el("tr", {class: "failed-task", "data-uid": T.uid[i]},
      el("td", {}, link(i)), el("td", {class: "err", text: D.errors[i]}),
      el("td", {class: "err"}, cause)));
  }
  box.append(el("p", {text: own.length + " task(s) failed in their own code, " +
    rest.length + " were not run because an upstream task failed."}), table);
  if (failed.length > shown.length)
    box.append(el("p", {text: "... and " + (failed.length - shown.length) + " more"}));
}

function details(i) {
  const p = $("details"), lane = D.lanes[T.lane[i]];
  const rows = [["uid", T.uid[i]], ["name", D.names[T.name[i]]], ["state", st(i)],
    ["backend", D.backends[T.backend[i]]], ["slot", lane ? lane.name : "-"],
    ["attempts", T.attempts[i] || 1], ["created", fmt(T.created[i])],
    ["started", fmt(T.start[i])], ["ended", fmt(T.end[i])], ["ran", fmt(dur(i))],
    ["upstream", T.deps[i].slice(0, 20).map((d) => T.uid[d]).join(", ") || "-"],
    ["on critical path", critical.has(i) ? "yes" : "no"]];
  if (i in D.errors) rows.push(["error", D.errors[i]]);
  if (i in D.roots) rows.push(["root cause", T.uid[D.roots[i]] + ": " +
    D.errors[D.roots[i]]]);
  const close = el("button", {text: "close"});
  close.onclick = () => { p.hidden = true; };
  p.replaceChildren(close, el("table", {}, ...rows.map(([k, v]) => el("tr", {},
    el("th", {text: k}), el("td", {class: k.endsWith("error") ||
      k === "root cause" ? "err" : "", text: String(v)})))));
  p.hidden = false;
}

function layers() {
  const layer = new Int32Array(N);
  for (let i = 0; i < N; i++)
    for (const d of T.deps[i]) if (layer[d] + 1 > layer[i]) layer[i] = layer[d] + 1;
  return layer;
}

function taskGraph(layer) {
  const nodes = [], edges = [];
  for (let i = 0; i < N; i++) {
    nodes.push({id: i, task: i, layer: layer[i], count: 1, label: D.names[T.name[i]],
      color: COLOR[st(i)], crit: critical.has(i)});
    for (const d of T.deps[i]) edges.push({from: d, to: i,
      crit: critical.has(d) && critical.has(i)});
  }
  return {nodes, edges};
}

function groupGraph(layer) {
  const size = new Map();
  for (const n of T.name) size.set(n, (size.get(n) || 0) + 1);
  const kept = [...size.keys()].sort((a, b) => size.get(b) - size.get(a))
    .slice(0, DETAIL_LIMIT - 1);
  const gid = new Map(kept.map((n, k) => [n, k]));
  const group = (i) => gid.has(T.name[i]) ? gid.get(T.name[i]) : kept.length;
  const nodes = [...kept.map((n) => D.names[n]), "(other names)"].map((label, id) =>
    ({id, label, layer: Infinity, count: 0, states: S.map(() => 0), crit: false}));
  const edges = new Map();
  for (let i = 0; i < N; i++) {
    const g = nodes[group(i)];
    g.count++; g.states[T.state[i]]++; g.layer = Math.min(g.layer, layer[i]);
    g.crit ||= critical.has(i);
    for (const d of T.deps[i]) {
      const key = group(d) + ":" + group(i);
      if (group(d) === group(i)) continue;
      const e = edges.get(key) || {from: group(d), to: group(i), n: 0, crit: false};
      e.n++; e.crit ||= critical.has(d) && critical.has(i); edges.set(key, e);
    }
  }
  const used = nodes.filter((g) => g.count > 0);
  const renum = new Map(used.map((g, k) => [g.id, k]));
  used.forEach((g, k) => { g.id = k; });
  return {nodes: used, edges: [...edges.values()].filter((e) => renum.has(e.from))
    .map((e) => ({...e, from: renum.get(e.from), to: renum.get(e.to)}))};
}

function layout(g, w, h) {
  const cols = [...new Set(g.nodes.map((n) => n.layer))].sort((a, b) => a - b);
  const rank = new Map(cols.map((l, k) => [l, k])), byCol = cols.map(() => []);
  for (const n of g.nodes) { n.col = rank.get(n.layer); byCol[n.col].push(n); }
  const preds = g.nodes.map(() => []);
  for (const e of g.edges) preds[e.to].push(e.from);
  for (const col of byCol) {
    col.forEach((n, k) => {
      const ps = preds[n.id].map((p) => g.nodes[p]).filter((p) => p.col < n.col);
      n.bary = ps.length ? ps.reduce((a, p) => a + p.pos, 0) / ps.length : k;
    });
    col.sort((a, b) => a.bary - b.bary).forEach((n, k) => { n.pos = k; });
  }
  const tall = Math.max(...byCol.map((c) => c.length));
  for (const n of g.nodes) {
    n.x = 10 + n.col * (w + 40);
    n.y = 10 + (n.pos + (tall - byCol[n.col].length) / 2) * (h + 8);
  }
  return [20 + cols.length * (w + 40), 20 + tall * (h + 8)];
}

function dag() {
  const edges = T.deps.reduce((a, d) => a + d.length, 0);
  const grouped = N > DETAIL_LIMIT || edges > 10 * DETAIL_LIMIT, layer = layers();
  const g = grouped ? groupGraph(layer) : taskGraph(layer);
  const [w, h] = grouped ? [180, 36] : [120, 22];
  const [width, height] = N ? layout(g, w, h) : [10, 10];
  const box = $("dag"), root = svg("svg", {width, height});
  Object.assign(box.dataset, {mode: grouped ? "grouped" : "tasks",
    nodes: g.nodes.length, tasksShown: g.nodes.reduce((a, n) => a + n.count, 0)});
  $("dag-mode").textContent = grouped ? N + " tasks, grouped by name into " +
    g.nodes.length + " nodes (counts per state)" : N + " tasks";
  for (const e of g.edges) {
    const a = g.nodes[e.from], b = g.nodes[e.to], x1 = a.x + w, y1 = a.y + h / 2;
    const x2 = b.x, y2 = b.y + h / 2, mid = Math.max(30, Math.abs(x2 - x1) / 2);
    root.append(svg("path", {class: e.crit ? "edge crit" : "edge",
      d: `M${x1},${y1} C${x1 + mid},${y1} ${x2 - mid},${y2} ${x2},${y2}`}));
  }
  const node = grouped ? groupNode : taskNode;
  for (const n of g.nodes) root.append(node(n, w, h));
  box.append(root);
}

function taskNode(n, w, h) {
  const i = n.task, node = svg("g", {class: "node" + (n.crit ? " crit" : ""),
    "data-uid": T.uid[i], "data-state": st(i)});
  const title = svg("title", {});
  title.textContent = `${T.uid[i]} (${st(i)}, ran ${fmt(dur(i))})` +
    (i in D.errors ? "\n" + D.errors[i] : "") +
    (i in D.roots ? "\nroot cause: " + T.uid[D.roots[i]] : "");
  const label = svg("text", {x: n.x + 6, y: n.y + h / 2 + 4,
    fill: st(i) === "pending" ? "#1f2933" : "#fff"});
  label.textContent = n.label.length > 17 ? n.label.slice(0, 16) + "…" : n.label;
  node.append(svg("rect", {x: n.x, y: n.y, width: w, height: h, rx: 4,
    fill: n.color}), label, title);
  node.onclick = () => details(i);
  return node;
}

function groupNode(n, w, h) {
  const node = svg("g", {class: "node" + (n.crit ? " crit" : ""),
    "data-name": n.label, "data-count": n.count});
  node.append(svg("rect", {x: n.x, y: n.y, width: w, height: h, rx: 4,
    fill: "#fff", stroke: "#9aa5b1"}));
  let x = n.x + 4;
  n.states.forEach((c, k) => { if (!c) return;
    const part = (w - 8) * c / n.count;
    node.append(svg("rect", {x, y: n.y + h - 12, width: part, height: 8,
      fill: COLOR[S[k]]})); x += part; });
  const label = svg("text", {x: n.x + 6, y: n.y + 14});
  const text = n.label.length > 20 ? n.label.slice(0, 19) + "…" : n.label;
  label.textContent = `${text} \u00d7${n.count}`;
  const title = svg("title", {});
  title.textContent = n.label + "\n" + S.map((s, k) => n.states[k] ? s + ": " +
    n.states[k] : "").filter(Boolean).join(", ");
  node.append(label, title);
  return node;
}

function timeline() {
  const canvas = $("timeline"), L = D.lanes.length, byLane = D.lanes.map(() => []);
  for (let i = 0; i < N; i++) if (T.lane[i] >= 0) byLane[T.lane[i]].push(i);
  const bars = byLane.reduce((a, l) => a + l.length, 0);
  Object.assign(canvas.dataset, {lanes: L, bars});
  const rowH = Math.max(3, Math.min(22, Math.floor(480 / Math.max(1, L))));
  const full = [0, Math.max(D.makespan, 0.001)];
  const tl = {canvas, byLane, rowH, full, view: full.slice(), width: 0, drag: 0};
  tl.x = (ms) => LEFT + (ms - tl.view[0]) / (tl.view[1] - tl.view[0]) *
    (tl.width - LEFT - 10);
  tl.ms = (px) => tl.view[0] + (px - LEFT) / (tl.width - LEFT - 10) *
    (tl.view[1] - tl.view[0]);
  tl.draw = () => drawTimeline(tl);
  interact(tl);
  window.addEventListener("resize", tl.draw);
  tl.draw();
}
const LEFT = 250, AXIS = 22;

function drawTimeline(tl) {
  const {canvas, byLane, rowH, x} = tl, dpr = window.devicePixelRatio || 1;
  tl.width = Math.max(400, $("timeline-wrap").clientWidth);
  const width = tl.width, height = AXIS + Math.max(1, byLane.length) * rowH + 4;
  Object.assign(canvas, {width: width * dpr, height: height * dpr});
  Object.assign(canvas.style, {width: width + "px", height: height + "px"});
  const c = canvas.getContext("2d");
  c.setTransform(dpr, 0, 0, dpr, 0, 0);
  c.clearRect(0, 0, width, height);
  axis(tl, c, height);
  c.save();
  c.beginPath(); c.rect(LEFT, 0, width - LEFT, height); c.clip();
  byLane.forEach((tasks, lane) => tasks.forEach((i) => {
    c.fillStyle = COLOR[st(i)];
    const a = x(T.start[i]), w = Math.max(1, x(T.run_end[i]) - a);
    c.fillRect(a, AXIS + lane * rowH, w, rowH - 1);
  }));
  c.strokeStyle = getComputedStyle(document.body).getPropertyValue("--crit");
  c.lineWidth = 2;
  for (const i of D.critical) {
    if (T.lane[i] < 0) continue;
    const a = x(T.start[i]), w = Math.max(2, x(T.run_end[i]) - a);
    c.strokeRect(a, AXIS + T.lane[i] * rowH + 1, w, Math.max(1, rowH - 3));
  }
  c.restore();
}

function axis(tl, c, height) {
  const {view, x, rowH} = tl, raw = (view[1] - view[0]) / 8;
  const p = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map((m) => m * p).find((s) => s >= raw);
  c.font = "11px system-ui,sans-serif";
  c.fillStyle = "#616e7c";
  c.strokeStyle = "#e4e7eb";
  for (let t = Math.ceil(view[0] / step) * step; t <= view[1]; t += step) {
    c.beginPath(); c.moveTo(x(t), AXIS - 4); c.lineTo(x(t), height); c.stroke();
    const label = fmt(t), room = tl.width - x(t) - 2;
    if (x(t) < LEFT || c.measureText(label).width > room) continue;
    c.fillText(label, x(t) + 2, 12);
  }
  D.lanes.forEach((lane, k) => {
    const y = AXIS + k * rowH, first = !k || D.lanes[k - 1].backend !== lane.backend;
    const base = y + Math.min(rowH, 14) - 3;
    if (first && k) {
      c.strokeStyle = "#1f2933";
      c.beginPath(); c.moveTo(0, y); c.lineTo(tl.width, y); c.stroke();
    }
    if (first) {
      c.fillStyle = "#1f2933";
      c.fillText(fit(c, D.backends[lane.backend], 128), 4, base);
    }
    if (rowH >= 10) {
      c.fillStyle = "#616e7c";
      c.fillText(fit(c, lane.name, LEFT - 146), 138, base);
    }
  });
}

function fit(c, text, width) {
  if (c.measureText(text).width <= width) return text;
  let n = text.length;
  while (n > 1 && c.measureText(text.slice(0, n) + "…").width > width) n--;
  return text.slice(0, n) + "…";
}

function hit(tl, ev) {
  const r = tl.canvas.getBoundingClientRect(), px = ev.clientX - r.left;
  const tasks = tl.byLane[Math.floor((ev.clientY - r.top - AXIS) / tl.rowH)];
  if (!tasks || px < LEFT) return -1;
  const t = tl.ms(px), slack = tl.ms(LEFT + 3) - tl.ms(LEFT);
  let lo = 0, hi = tasks.length - 1, found = -1;
  while (lo <= hi) {
    const mid = (lo + hi) >> 1;
    if (T.start[tasks[mid]] <= t + slack) { found = mid; lo = mid + 1; }
    else hi = mid - 1;
  }
  for (let k = found; k >= 0 && k > found - 8; k--)
    if (T.run_end[tasks[k]] >= t - slack) return tasks[k];
  return -1;
}

function interact(tl) {
  const {canvas} = tl, tip = $("tip");
  canvas.onmousemove = (ev) => {
    if (tl.drag) {
      const d = tl.ms(tl.drag) - tl.ms(ev.offsetX);
      tl.view = [tl.view[0] + d, tl.view[1] + d];
      tl.drag = ev.offsetX;
      tl.draw();
      return;
    }
    const i = hit(tl, ev);
    tip.hidden = i < 0;
    if (i < 0) return;
    tip.textContent = `${T.uid[i]} · ${st(i)} · ran ${fmt(dur(i))}` +
      (i in D.errors ? "\n" + D.errors[i].slice(0, 300) : "");
    tip.style.left = ev.clientX + 12 + "px";
    tip.style.top = ev.clientY + 12 + "px";
  };
  canvas.onmousedown = (ev) => { tl.drag = ev.offsetX; };
  window.addEventListener("mouseup", () => { tl.drag = 0; });
  canvas.onmouseleave = () => { tip.hidden = true; };
  canvas.onclick = (ev) => { const i = hit(tl, ev); if (i >= 0) details(i); };
  canvas.ondblclick = () => { tl.view = tl.full.slice(); tl.draw(); };
  canvas.onwheel = (ev) => {
    ev.preventDefault();
    const at = tl.ms(ev.offsetX), f = ev.deltaY > 0 ? 1.25 : 0.8;
    tl.view = [at - (at - tl.view[0]) * f, at + (tl.view[1] - at) * f];
    tl.draw();
  };
}

header(); utilisation(); failures(); dag(); timeline();
document.body.dataset.renderMs = (performance.now() - t0).toFixed(1);
document.body.dataset.ready = "1";
})();
"""
