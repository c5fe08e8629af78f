// The dashboard page: fetches /api/v1/overview every 5 s and fills the four views. Plain DOM,
// no framework and no build step; text goes in through textContent, never as HTML.
"use strict";

const REFRESH_MS = 5000;

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function bar(percent) {
  const fill = el("span");
  fill.style.width = Math.min(100, Math.max(0, percent)) + "%";
  return el("span", {}, el("span", { class: "bar" }, fill), percent + "%");
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + units[i];
}

function cores(millis) {
  return (millis / 1000).toFixed(millis % 1000 ? 1 : 0);
}

// Earnings per hour as a small inline SVG line over the last 24 hours.
function sparkline(points) {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("class", "spark");
  svg.setAttribute("width", "120");
  svg.setAttribute("height", "24");
  if (!points.length) return el("span", { class: "empty" }, "none");
  const now = Date.now(), hour = 3600000, start = now - 24 * hour;
  const max = Math.max(...points.map((p) => parseFloat(p.credits))) || 1;
  const xy = points.map((p) => [((p.hourMs - start) / (24 * hour)) * 116 + 2, 22 - (parseFloat(p.credits) / max) * 20]);
  const line = document.createElementNS(ns, "polyline");
  line.setAttribute("points", (xy.length === 1 ? [[2, xy[0][1]], ...xy] : xy).map((p) => p.join(",")).join(" "));
  line.setAttribute("fill", "none");
  line.setAttribute("stroke", "#4aa3ff");
  line.setAttribute("stroke-width", "2");
  svg.append(line);
  const title = document.createElementNS(ns, "title");
  title.textContent = points.map((p) => new Date(p.hourMs).toISOString().slice(11, 16) + " " + p.credits).join("\n");
  svg.append(title);
  return svg;
}

function fill(id, rows, columns, emptyText) {
  const body = document.getElementById(id);
  body.replaceChildren();
  if (!rows.length) {
    body.append(el("tr", {}, el("td", { colspan: columns, class: "empty" }, emptyText)));
    return;
  }
  for (const r of rows) body.append(r);
}

function render(o) {
  const hidden = "you may not list ProviderNodes";
  fill("regions", o.regions.map((r) => el("tr", { "data-region": r.region },
    el("td", {}, r.region), el("td", { class: "num" }, r.nodes), el("td", { class: "num" }, r.ready), el("td", { class: "num" }, r.running),
    el("td", {}, bar(r.cpuPercent), ` of ${cores(r.cpuMillis)} cores`), el("td", {}, bar(r.memoryPercent), ` of ${bytes(r.memoryBytes)}`))),
    6, o.providersVisible ? "no providers have joined" : hidden);
  fill("job-rows", o.jobs.map((j) => el("tr", { "data-job": j.namespace + "/" + j.name },
    el("td", {}, j.namespace), el("td", {}, j.name), el("td", { class: "phase-" + j.phase }, j.phase), el("td", {}, j.runtime),
    el("td", {}, bar(j.percent), ` ${j.succeeded}/${j.total}`), el("td", { class: "num" }, j.running), el("td", { class: "num" }, j.failed),
    el("td", { class: "num" }, j.cost ? j.cost + (j.budget ? " / " + j.budget : "") : "–"), el("td", { class: "why" }, j.blocked || ""))),
    9, "no jobs you may see");
  fill("provider-rows", o.providers.map((p) => el("tr", { "data-provider": p.name },
    el("td", {}, p.name), el("td", {}, p.region), el("td", { class: "state-" + p.state }, p.state), el("td", { class: "num" }, p.running),
    el("td", {}, bar(p.cpuPercent)), el("td", { class: "num" }, p.reputation), el("td", { class: "num" }, p.succeeded), el("td", { class: "num" }, p.failed),
    el("td", { class: "num" }, p.earned), el("td", {}, sparkline(p.earnings)))),
    10, o.providersVisible ? "no providers have joined" : hidden);
  fill("failure-rows", o.failures.map((f) => el("tr", {},
    el("td", {}, f.namespace), el("td", {}, f.job), el("td", { class: "num" }, f.index), el("td", { class: "num" }, f.attempt), el("td", {}, f.node),
    el("td", { class: "num" }, f.exitCode), el("td", { class: "why" }, f.message))),
    7, "no recent failures");
}

function showView() {
  const view = (location.hash || "#pool").slice(1);
  for (const s of document.querySelectorAll("section.view")) s.hidden = location.hash !== "#all" && s.id !== view;
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.view === view);
}

async function refresh() {
  const error = document.getElementById("error");
  try {
    const resp = await fetch("api/v1/overview", { credentials: "same-origin" });
    const body = await resp.json();
    if (!resp.ok) throw new Error(body.error || resp.status + " " + resp.statusText);
    render(body);
    error.hidden = true;
    document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
    document.body.dataset.loaded = "true";
  } catch (e) {
    error.textContent = String(e.message || e);
    error.hidden = false;
    document.body.dataset.loaded = "error";
  }
}

window.addEventListener("hashchange", showView);
showView();
refresh();
setInterval(refresh, REFRESH_MS);
