// abproxy's live admin page. Polls the admin port once a second and turns the cumulative
// counters of /ui/snapshot into rates, error ratios and p99 over a sliding window, so the
// proxy keeps no history for the page and its request path does no work for it.
// Plain browser JavaScript, served from the binary: no framework, no build step.
"use strict";

(() => {
  const POLL_MS = 1000;
  /** Rates, error ratios and p99 are over this window: one-second differences are too noisy to read. */
  const WINDOW_MS = 10_000;
  /** How far back the charts reach; the page keeps this much history in memory and no more. */
  const SPAN_MS = 5 * 60_000;
  /** Charts never span less than this, so the first minute does not stretch a few points across the card. */
  const MIN_SPAN_MS = 60_000;
  /** Analyses listed on the page; /canary keeps a few more. */
  const SHOWN_ANALYSES = 6;
  /** Okabe–Ito colours: told apart with the common colour-vision deficiencies. */
  const PALETTE = ["#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#7f7f7f", "#000000"];
  const SVG = "http://www.w3.org/2000/svg";
  const EMPTY = { requests: 0, failures: 0, latency: { bounds: [], cumulative: [] } };

  /** Snapshots, oldest first, covering SPAN_MS + WINDOW_MS. */
  const history = [];
  /** A variant keeps its colour across reloads that reorder, add or remove variants. */
  const colors = new Map();
  /** Canary analyses the reader opened stay open while new ones arrive. */
  const opened = new Set();
  let polls = 0;
  /** The JSON last drawn per panel: panels a reader may be selecting text in are redrawn only on change. */
  const rendered = { canary: "", config: "" };

  // ---- DOM helpers: elements built from data, never from HTML strings, so a variant name
  // or an error message is always shown as text.

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    setAttributes(el, attrs);
    return fill(el, children, true);
  }

  /** Gives `el` these children (nested lists flattened, null and false left out). */
  function fill(el, children, append) {
    const nodes = children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false)
      .map((c) => (c instanceof Node ? c : document.createTextNode(String(c))));
    if (append) el.append(...nodes); else el.replaceChildren(...nodes);
    return el;
  }

  function svg(tag, attrs) {
    const el = document.createElementNS(SVG, tag);
    setAttributes(el, attrs);
    return el;
  }

  function setAttributes(el, attrs) {
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value !== null && value !== undefined && value !== false) {
        el.setAttribute(name, String(value));
      }
    }
  }

  function swatch(name) {
    const el = h("span", { class: "swatch", "aria-hidden": "true" });
    el.style.background = color(name);
    return el;
  }

  function pill(text, kind) {
    return h("span", { class: `pill ${kind || ""}`, "data-field": "state" }, text);
  }

  function color(name) {
    if (!colors.has(name)) colors.set(name, PALETTE[colors.size % PALETTE.length]);
    return colors.get(name);
  }

  // ---- Formatting.

  const dash = "–";

  function fmtRate(perSecond) {
    if (perSecond === null || perSecond === undefined) return dash;
    return perSecond < 10 ? perSecond.toFixed(1) : Math.round(perSecond).toLocaleString("en-US");
  }

  function fmtRatio(ratio) {
    if (ratio === null || ratio === undefined) return dash;
    const percent = ratio * 100;
    return `${percent === 0 || percent >= 10 ? percent.toFixed(1) : percent.toFixed(2)} %`;
  }

  function fmtSeconds(seconds, atLeast) {
    if (seconds === null || seconds === undefined) return dash;
    const prefix = atLeast ? "> " : "";
    if (seconds >= 1) return `${prefix}${seconds.toFixed(2)} s`;
    const ms = seconds * 1000;
    return `${prefix}${ms < 10 ? ms.toFixed(2) : Math.round(ms)} ms`;
  }

  function fmtCount(n) {
    return (n || 0).toLocaleString("en-US");
  }

  function fmtTime(ms) {
    return new Date(ms).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false });
  }

  function fmtSpan(ms) {
    return ms < 120_000 ? `−${Math.round(ms / 1000)} s` : `−${+(ms / 60_000).toFixed(1)} min`;
  }

  /** A round axis maximum at or above `value`. */
  function niceMax(value, floor) {
    const v = Math.max(value, floor);
    const magnitude = 10 ** Math.floor(Math.log10(v));
    for (const step of [1, 2, 2.5, 5, 10]) {
      if (step * magnitude >= v) return step * magnitude;
    }
    return 10 * magnitude;
  }

  // ---- Arithmetic on snapshots.

  function record(snapshot) {
    const last = history[history.length - 1];
    // A restarted proxy starts its counters at zero: differences across it mean nothing.
    if (last && (snapshot.at_ms <= last.at_ms || restarted(last, snapshot))) history.length = 0;
    history.push(snapshot);
    const oldest = snapshot.at_ms - SPAN_MS - WINDOW_MS;
    while (history.length > 2 && history[0].at_ms < oldest) history.shift();
  }

  function restarted(before, after) {
    return Object.entries(before.variants).some(
      ([name, counters]) => (after.variants[name] || EMPTY).requests < counters.requests,
    );
  }

  /** The quantile `q` of the requests between two cumulative histograms, interpolated
   *  within its bucket as Prometheus's histogram_quantile does. */
  function quantile(q, now, then) {
    const bounds = now.bounds;
    const same = then.cumulative.length === now.cumulative.length;
    const counts = now.cumulative.map((count, i) => count - (same ? then.cumulative[i] : 0));
    const total = counts[counts.length - 1];
    if (!(total > 0)) return { value: null, atLeast: false };
    const rank = q * total;
    const i = counts.findIndex((count) => count >= rank);
    if (i < 0 || i >= bounds.length) return { value: bounds[bounds.length - 1] ?? null, atLeast: true };
    const lower = i === 0 ? 0 : bounds[i - 1];
    const below = i === 0 ? 0 : counts[i - 1];
    const inBucket = counts[i] - below;
    const value = inBucket > 0 ? lower + ((bounds[i] - lower) * (rank - below)) / inBucket : bounds[i];
    return { value, atLeast: false };
  }

  /** What one variant did between two snapshots. */
  function variantDelta(now, then, name) {
    const a = now.variants[name] || EMPTY;
    const b = then.variants[name] || EMPTY;
    const seconds = (now.at_ms - then.at_ms) / 1000;
    const requests = a.requests - b.requests;
    const p99 = quantile(0.99, a.latency, b.latency);
    return {
      rate: seconds > 0 ? requests / seconds : null,
      errors: requests > 0 ? (a.failures - b.failures) / requests : null,
      p99: p99.value,
      p99AtLeast: p99.atLeast,
    };
  }

  /** For each snapshot after the first, the snapshot WINDOW_MS before it (or the oldest). */
  function windows() {
    const pairs = [];
    let j = 0;
    for (let i = 1; i < history.length; i++) {
      while (j + 1 < i && history[j + 1].at_ms <= history[i].at_ms - WINDOW_MS) j++;
      pairs.push([history[i], history[j]]);
    }
    return pairs;
  }

  // ---- Rendering.

  function render(status, canary) {
    const names = status.variants.map((variant) => variant.name);
    names.forEach(color);
    const pairs = windows();
    const latest = pairs.length ? pairs[pairs.length - 1] : null;
    const current = new Map(names.map((name) => [name, latest ? variantDelta(latest[0], latest[1], name) : null]));
    const snapshot = history[history.length - 1];

    document.body.dataset.polls = String(polls);
    document.body.dataset.generation = String(status.generation);
    renderHeader(status, snapshot);
    renderVariants(status, snapshot, current);
    const series = (pick) => names.map((name) => ({
      name,
      points: pairs.map(([now, then]) => [now.at_ms, pick(variantDelta(now, then, name))]),
    }));
    renderChart("rate", series((d) => d.rate), fmtRate, 1, current, (d) => d.rate);
    renderChart("errors", series((d) => d.errors), fmtRatio, 0.01, current, (d) => d.errors);
    renderChart("p99", series((d) => d.p99), (s) => fmtSeconds(s), 0.001, current, (d) => d.p99);
    renderOnChange("canary", canary, () => renderCanary(canary));
    renderShadows(status, pairs);
    renderOnChange("config", [status, snapshot.reloads], () => renderConfig(status, snapshot));
  }

  function renderOnChange(key, data, draw) {
    const text = JSON.stringify(data);
    if (rendered[key] !== text) {
      rendered[key] = text;
      draw();
    }
  }

  function renderHeader(status, snapshot) {
    const state = document.getElementById("state");
    state.textContent = status.state;
    state.className = `pill ${status.state === "ready" ? "ok" : "warn"}`;
    document.getElementById("live").textContent =
      `${status.listen} · generation ${status.generation} · ${fmtCount(snapshot.in_flight)} in flight · updated ${fmtTime(snapshot.at_ms)}`;
    document.getElementById("window-note").textContent =
      `rates, errors and p99 over the last ${WINDOW_MS / 1000} s`;
  }

  function renderVariants(status, snapshot, current) {
    const buckets = status.assignment.buckets;
    const split = document.getElementById("split");
    fill(split, status.variants.filter((v) => v.buckets.count > 0).map((variant) => {
      const part = h("span", { title: `${variant.name}: buckets ${variant.buckets.first}–${variant.buckets.last}` },
        `${variant.name} ${variant.weight} %`);
      part.style.width = `${(100 * variant.buckets.count) / buckets}%`;
      part.style.background = color(variant.name);
      return part;
    }));
    const rows = status.variants.map((variant) => {
      const delta = current.get(variant.name);
      const counters = snapshot.variants[variant.name] || EMPTY;
      const range = variant.buckets.count > 0
        ? `${variant.buckets.first}–${variant.buckets.last} (${variant.buckets.count} of ${buckets})`
        : "none";
      // `data-label` names the cell where a phone shows rows as blocks without the header.
      const cell = (field, label, value, text) =>
        h("td", { class: "num", "data-field": field, "data-label": label, "data-value": value ?? "" }, text);
      return h("tr", { "data-variant": variant.name },
        h("td", { class: "name", title: variant.upstream }, swatch(variant.name), variant.name),
        cell("weight", "weight", variant.weight, `${variant.weight} %`),
        h("td", { "data-field": "buckets", "data-label": "buckets" }, range),
        cell("rate", "req/s", delta && delta.rate, fmtRate(delta && delta.rate)),
        cell("errors", "errors", delta && delta.errors, fmtRatio(delta && delta.errors)),
        cell("p99", "p99", delta && delta.p99, fmtSeconds(delta && delta.p99, delta && delta.p99AtLeast)),
        cell("requests", "requests", counters.requests, fmtCount(counters.requests)));
    });
    const refused = (snapshot.variants.none || EMPTY).requests;
    if (refused > 0) {
      rows.push(h("tr", { class: "muted", "data-variant": "none" },
        h("td", { class: "name", colspan: 6 }, "refused before assignment (variant=\"none\")"),
        h("td", { class: "num", "data-field": "requests", "data-label": "requests", "data-value": refused }, fmtCount(refused))));
    }
    fill(document.querySelector("#variants tbody"), rows);
  }

  function renderChart(key, series, format, floor, current, pick) {
    const plot = document.querySelector(`[data-chart="${key}"] .plot`);
    const newest = history[history.length - 1].at_ms;
    const span = Math.min(SPAN_MS, Math.max(MIN_SPAN_MS, newest - history[0].at_ms));
    const start = newest - span;
    let max = 0;
    for (const { points } of series) {
      for (const [t, v] of points) if (t >= start && v !== null && Number.isFinite(v)) max = Math.max(max, v);
    }
    max = niceMax(max, floor);
    const [width, height] = [300, 100];
    const chart = svg("svg", {
      viewBox: `0 0 ${width} ${height}`, preserveAspectRatio: "none", role: "img",
      "aria-label": `${key} per variant over the last ${Math.round(span / 1000)} s`,
    });
    for (const y of [25, 50, 75]) {
      chart.append(svg("line", { x1: 0, x2: width, y1: y, y2: y, class: "grid", "vector-effect": "non-scaling-stroke" }));
    }
    for (const { name, points } of series) {
      // A gap (no requests, so no ratio or p99) breaks the line rather than bridging it.
      let segment = [];
      const flush = () => {
        if (segment.length > 1) {
          chart.append(svg("polyline", {
            points: segment.join(" "), stroke: color(name), "vector-effect": "non-scaling-stroke",
          }));
        }
        segment = [];
      };
      for (const [t, v] of points) {
        if (t < start || v === null || !Number.isFinite(v)) {
          flush();
          continue;
        }
        const x = ((t - start) / span) * width;
        const y = height - (Math.min(v, max) / max) * height;
        segment.push(`${x.toFixed(1)},${y.toFixed(1)}`);
      }
      flush();
    }
    const legend = h("div", { class: "legend" }, series.map(({ name }) => {
      const delta = current.get(name);
      return h("span", {}, swatch(name), `${name} `, h("b", {}, delta ? format(pick(delta)) : dash));
    }));
    fill(plot, [
      chart,
      h("span", { class: "ymax" }, format(max)),
      h("div", { class: "axis" }, h("span", {}, fmtSpan(span)), h("span", {}, "now")),
      legend,
    ]);
  }

  const STATE_KIND = { running: "", paused: "warn", promoted: "ok", rolled_back: "bad" };
  const VERDICT_KIND = { pass: "ok", fail: "bad", inconclusive: "warn" };
  const OUTCOME_KIND = { pass: "ok", fail: "bad", inconclusive: "warn", skipped: "" };

  function renderCanary(canary) {
    const box = document.getElementById("canary");
    if (!canary.enabled) {
      fill(box, [h("p", { class: "muted" }, "No [canary] section in the config.")]);
      return;
    }
    const step = canary.step
      ? `${canary.step.index} of ${canary.step.of} (${canary.step.weight} %), ${canary.step.passed} of ${canary.step.needed} analyses passed`
      : "no ramp: the file's weight";
    const totals = canary.totals || {};
    const facts = h("dl", {},
      h("dt", {}, "weight"), h("dd", { "data-field": "weight" }, `${canary.weight} % (file: ${canary.file_weight} %)`),
      h("dt", {}, "step"), h("dd", {}, step),
      h("dt", {}, "failures"), h("dd", {}, `${canary.consecutive_failures} in a row of ${canary.failures_to_rollback} to roll back`),
      h("dt", {}, "interval"), h("dd", {}, canary.interval),
      h("dt", {}, "this run"), h("dd", {},
        `${canary.variant} ${fmtCount(totals.canary_failures)} failed of ${fmtCount(totals.canary_requests)}, ` +
        `${canary.baseline} ${fmtCount(totals.baseline_failures)} of ${fmtCount(totals.baseline_requests)}`),
      canary.reason ? [h("dt", {}, "reason"), h("dd", {}, canary.reason)] : []);
    const analyses = canary.last_checks || [];
    const checks = analyses.slice(0, SHOWN_ANALYSES).map((analysis) => {
      const details = h("details", { "data-at": analysis.at },
        h("summary", {},
          pill(analysis.verdict, VERDICT_KIND[analysis.verdict]), " ",
          h("span", { class: "muted" }, fmtTime(Date.parse(analysis.at))), " ",
          (analysis.checks || []).map((check) => [h("span", { class: `chip ${OUTCOME_KIND[check.outcome]}`, title: check.detail }, check.check), " "]),
          // What failed or was missing is worth reading without a tap.
          analysis.verdict === "pass" ? null : h("div", { class: "muted" }, analysis.summary)),
        h("ul", { class: "checks" }, (analysis.checks || []).map((check) =>
          h("li", {}, pill(check.outcome, OUTCOME_KIND[check.outcome]), ` ${check.check}: ${check.detail}`))));
      details.open = opened.has(analysis.at);
      details.addEventListener("toggle", () => {
        if (details.open) opened.add(analysis.at); else opened.delete(analysis.at);
      });
      return details;
    });
    const earlier = analyses.length - checks.length;
    fill(box, [
      h("p", {}, pill(canary.state.replace("_", " "), STATE_KIND[canary.state]), " ",
        h("b", {}, canary.variant), " against ", h("b", {}, canary.baseline)),
      facts,
      h("h3", { class: "muted" }, checks.length ? "Last checks, newest first" : "No analysis yet"),
      checks,
      earlier > 0 ? h("p", { class: "muted" }, `${earlier} earlier in `, h("a", { href: "/canary" }, "/canary")) : null,
    ]);
  }

  function renderShadows(status, pairs) {
    const box = document.getElementById("shadows");
    if (!status.shadows.length) {
      fill(box, [h("p", { class: "muted" }, "No [[shadow]] in the config.")]);
      return;
    }
    const latest = pairs.length ? pairs[pairs.length - 1] : null;
    const newest = history[history.length - 1];
    fill(box, status.shadows.map((shadow) => {
      const counters = newest.shadows[shadow.name] || { results: {}, comparisons: {} };
      const c = counters.comparisons;
      const compared = (c.match || 0) + (c.mismatch || 0);
      const agreement = compared > 0 ? c.match / compared : null;
      let recent = null;
      if (latest) {
        const before = (latest[1].shadows[shadow.name] || { comparisons: {} }).comparisons;
        const matched = (c.match || 0) - (before.match || 0);
        const total = compared - ((before.match || 0) + (before.mismatch || 0));
        recent = total > 0 ? matched / total : null;
      }
      const r = counters.results;
      const bar = h("div", { class: "bar", title: "share of compared answers that matched" }, h("span", {}));
      bar.firstChild.style.width = `${(agreement ?? 0) * 100}%`;
      return h("div", { "data-shadow": shadow.name },
        h("p", {}, h("b", {}, shadow.name), h("span", { class: "muted" }, ` ${shadow.percent} % of users → ${shadow.upstream}`)),
        shadow.compare
          ? [
            h("dl", {},
              h("dt", {}, "agreement"),
              h("dd", { "data-field": "agreement", "data-value": agreement ?? "" },
                `${fmtRatio(agreement)} (${fmtCount(c.match)} of ${fmtCount(compared)} on ${shadow.compare})`),
              h("dt", {}, `last ${WINDOW_MS / 1000} s`), h("dd", {}, fmtRatio(recent)),
              h("dt", {}, "unparsable"), h("dd", {}, fmtCount(c.unparsable))),
            bar,
          ]
          : h("p", { class: "muted" }, "No compare pointer: answers are logged, not compared."),
        h("dl", {},
          h("dt", {}, "mirrored"),
          h("dd", {}, `${fmtCount(r.ok)} ok, ${fmtCount(r.error)} error, ${fmtCount(r.timeout)} timeout, ${fmtCount(r.dropped)} dropped`)));
    }));
  }

  function renderConfig(status, snapshot) {
    const box = document.getElementById("config");
    const reloads = snapshot.reloads || {};
    const failure = status.last_reload_error;
    const assignment = status.assignment;
    fill(box, [
      h("dl", {},
        h("dt", {}, "generation"), h("dd", { "data-field": "generation" }, String(status.generation)),
        h("dt", {}, "file"), h("dd", {}, h("code", {}, status.config.path)),
        h("dt", {}, "sha256"), h("dd", { title: status.config.sha256 }, h("code", { "data-field": "sha256" }, status.config.sha256.slice(0, 16)), "…"),
        h("dt", {}, "reloads"), h("dd", {}, `${fmtCount(reloads.ok)} applied, ${fmtCount(reloads.error)} rejected`),
        h("dt", {}, "assignment"), h("dd", {},
          `${assignment.sources.join(", ")}; ${assignment.buckets} buckets; on missing: ${assignment.on_missing}`),
        h("dt", {}, "listen"), h("dd", {}, `${status.listen}${status.listen_plain ? ` and ${status.listen_plain}` : ""}; admin ${status.admin}`)),
      failure
        ? h("div", { class: "error", "data-field": "reload-error" },
          h("b", {}, "Last reload rejected "), fmtTime(Date.parse(failure.at)),
          failure.sha256 ? ` (sha256 ${failure.sha256.slice(0, 16)}…)` : "",
          h("br"), failure.error, h("br"), "The previous config keeps serving.")
        : h("p", { class: "muted", "data-field": "reload-error" }, "No rejected reload."),
      status.restart_required.length
        ? h("div", { class: "error" }, `Restart required for: ${status.restart_required.join(", ")}`)
        : [],
    ]);
  }

  // ---- Polling.

  async function readJson(path) {
    const response = await fetch(path, { cache: "no-store", headers: { accept: "application/json" } });
    if (!response.ok) throw new Error(`${path} answered ${response.status}`);
    return response.json();
  }

  async function poll() {
    let readings = null;
    try {
      readings = await Promise.all(["/ui/snapshot", "/status", "/canary"].map(readJson));
    } catch (err) {
      const state = document.getElementById("state");
      state.textContent = "unreachable";
      state.className = "pill bad";
      document.getElementById("live").textContent = `cannot read the admin port (${err.message}); retrying`;
    } finally {
      setTimeout(poll, POLL_MS);
    }
    if (readings) {
      const [snapshot, status, canary] = readings;
      record(snapshot);
      polls += 1;
      // A bug here surfaces as an error in the console (and fails the browser test) while
      // polling goes on.
      render(status, canary);
    }
  }

  poll();
})();
