/* optmon dashboard: JSON GET + Server-Sent Events through the Envoy gateway, charts with uPlot (vendored).
 *
 * Data shapes are the proto3 JSON of optmon.v1 with proto field names (atm_strike, call.oi, ...); int64 fields
 * (OI, volume, ΔOI, sequence, times) arrive as strings and are converted with num(). Strikes and prices are index
 * points, LTP/straddle ₹, IV percent, OI/volume contracts, times UTC (shown in IST).
 *
 * Live: one EventSource on /v1/underlyings/{u}/subscribe (first a snapshot, then deltas, heartbeats); the
 * connection state is shown in #conn (data-state = connecting | live | reconnecting | offline | error) and the
 * stream is reopened with last_sequence after a drop, with backoff. No polling: the chain analytics and the
 * moneyness series are re-read only when a live message brings a new bucket.
 *
 * Readiness for tests and benchmarks: after the first paint with data, performance.mark("optmon-ready"),
 * window.optmonReadyMs and <body data-ready="1">.
 */
(() => {
  "use strict";

  const $ = (id) => document.getElementById(id);
  const num = (x) => (x === undefined || x === null || x === "" ? null : Number(x));
  const STEP_DEFAULT = { NIFTY: 50, BANKNIFTY: 100, FINNIFTY: 50, MIDCPNIFTY: 25 };
  const IST = { timeZone: "Asia/Kolkata", hour: "2-digit", minute: "2-digit", hour12: false };
  const page = new URLSearchParams(location.search);
  // Credentials for a gateway with auth on (EventSource cannot send headers, so they ride as query parameters).
  const auth = {};
  for (const k of ["access_token", "api_key"]) if (page.get(k)) auth[k] = page.get(k);

  const state = {
    underlyings: [], underlying: page.get("underlying") || "", allExpiries: [],
    expiries: page.getAll("expiry"), timeframe: page.get("timeframe") || "TIMEFRAME_1M",
    indicator: page.get("indicator") || "INDICATOR_IV", side: page.get("side") || "OPTION_TYPE_CALL",
    n: Number(page.get("n") || 10), levels: Number(page.get("levels") || 3),
    step: 50, price: null, bucket: null, dist: new Map(), focus: "", chain: null,
    lastSeq: 0, chainBucket: null, ready: false, generation: 0,
  };

  // ---------- formatting ----------
  const fmtInt = (v) => (v === null || Number.isNaN(v) ? "" : Math.round(v).toLocaleString("en-IN"));
  const fmt = (v, d = 2) => (v === null || Number.isNaN(v) ? "" : v.toFixed(d));
  const fmtStrike = (v) => (Number.isInteger(v) ? String(v) : v.toFixed(2));
  const istTime = (iso) => (iso ? new Date(iso).toLocaleTimeString("en-IN", IST) + " IST" : "—");

  // ---------- HTTP ----------
  function query(params) {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries({ ...params, ...auth })) {
      if (v === undefined || v === null || v === "") continue;
      if (Array.isArray(v)) v.forEach((x) => q.append(k, x));
      else q.append(k, v);
    }
    const s = q.toString();
    return s ? "?" + s : "";
  }

  async function api(path, params = {}) {
    const r = await fetch(path + query(params), { headers: { accept: "application/json" } });
    const text = await r.text();
    let body = null;
    try { body = text ? JSON.parse(text) : null; } catch (_) { body = { message: text }; }
    if (!r.ok) {
      const fv = body && body.details && body.details.flatMap((d) => d.field_violations || []);
      const extra = fv && fv.length ? " (" + fv.map((f) => f.field + ": " + f.description).join("; ") + ")" : "";
      const err = new Error(`${r.status}: ${(body && body.message) || r.statusText}${extra}`);
      err.status = r.status;
      throw err;
    }
    return body;
  }

  function showError(msg) {
    const el = $("error");
    if (!msg) { el.hidden = true; el.textContent = ""; return; }
    el.hidden = false;
    el.textContent = msg;
  }

  // ---------- charts ----------
  const charts = {};
  const CE = "#2bb673", PE = "#e0555b", ATMC = "#f2c14e";
  const axis = { stroke: "#8a96a6", grid: { stroke: "#263241", width: 1 }, ticks: { stroke: "#263241" } };

  function atmHook(u) {
    const atm = u._atm;
    if (atm === null || atm === undefined) return;
    const x = Math.round(u.valToPos(atm, "x", true));
    const ctx = u.ctx;
    ctx.save();
    ctx.strokeStyle = ATMC; ctx.setLineDash([5, 4]); ctx.lineWidth = 1.5 * devicePixelRatio;
    ctx.beginPath(); ctx.moveTo(x, u.bbox.top); ctx.lineTo(x, u.bbox.top + u.bbox.height); ctx.stroke();
    ctx.fillStyle = ATMC; ctx.font = `${11 * devicePixelRatio}px system-ui`;
    ctx.fillText("ATM " + fmtStrike(atm), x + 4, u.bbox.top + 12 * devicePixelRatio);
    ctx.restore();
  }

  function strikeChart(el, title, kind) {
    const bars = (align) => uPlot.paths.bars({ size: [0.42, 60], align });
    const mk = (label, color, align) => kind === "bars"
      ? { label, stroke: color, fill: color + "99", width: 1, paths: bars(align), points: { show: false } }
      : { label, stroke: color, width: 2, points: { size: 4 } };
    const opts = {
      title, width: el.clientWidth || 400, height: 230,
      scales: { x: { time: false, range: (u, mn, mx) => [mn - state.step, mx + state.step] } },
      axes: [{ ...axis, values: (u, vs) => vs.map(fmtStrike) },
             { ...axis, size: 60, values: (u, vs) => vs.map((v) => (kind === "bars" ? compact(v) : fmt(v, 1))) }],
      series: [{ label: "Strike", value: (u, v) => (v === null ? "" : fmtStrike(v)) },
               mk("CE", CE, 1), mk("PE", PE, -1)],
      legend: { live: true },
      hooks: { draw: [atmHook] },
    };
    const u = new uPlot(opts, [[], [], []], el);
    u._atm = null;
    return u;
  }

  function compact(v) {
    const a = Math.abs(v);
    if (a >= 1e7) return (v / 1e7).toFixed(1) + "Cr";
    if (a >= 1e5) return (v / 1e5).toFixed(1) + "L";
    if (a >= 1e3) return (v / 1e3).toFixed(0) + "k";
    return String(Math.round(v));
  }

  function ensureCharts() {
    if (charts.oi) return;
    charts.oi = strikeChart($("chart-oi"), "Open interest (contracts)", "bars");
    charts.doi = strikeChart($("chart-doi"), "ΔOI over the bar (contracts)", "bars");
    charts.iv = strikeChart($("chart-iv"), "IV (%)", "lines");
    addEventListener("resize", () => {
      for (const k of ["oi", "doi", "iv"]) charts[k].setSize({ width: charts[k].root.parentNode.clientWidth, height: 230 });
      if (charts.m) charts.m.setSize({ width: $("chart-moneyness").clientWidth, height: 280 });
    });
  }

  // ---------- strike distribution (snapshot + deltas) ----------
  function setDistribution(d) {
    state.dist = new Map();
    if (num(d.underlying_price)) state.price = num(d.underlying_price);
    if (d.bucket_time) state.bucket = d.bucket_time;
    for (const e of d.expiries || []) {
      const bars = new Map();
      for (const b of e.bars || []) bars.set(num(b.strike), { strike: num(b.strike), call: b.call || null, put: b.put || null });
      state.dist.set(e.expiry, { atm: num(e.atm_strike), bars });
    }
    if (!state.focus || !state.dist.has(state.focus)) state.focus = (d.expiries && d.expiries[0] && d.expiries[0].expiry) || "";
  }

  // FixedPointChanges (docs/stream.md, "Applying a Delta"): OptionLeg fields by number − 1, and their scales
  // (grid units per unit: ₹0.05 ticks, 0.01 % IV, 1e-4 delta/theta/vega, 1e-6 gamma, contracts; 0 = never sent so).
  const LEG_FIELDS = ["ltp", "open", "high", "low", "iv", "delta", "gamma", "theta", "vega", "oi", "oi_change",
                      "oi_change_percent", "volume"];
  const LEG_SCALES = [20, 20, 20, 20, 100, 1e4, 1e6, 1e4, 1e4, 1, 1, 0, 1];
  const PUT_BIT = 1 + LEG_FIELDS.length;

  /** Apply an ExpiryDelta's fixed-point changes to held strikes; returns the bars changed, or null when a change
   *  names a strike or value that is not held (the state is then unknown: the caller resubscribes). */
  function applyChanges(ex, e, step) {
    const c = e.changes;
    const out = [];
    if (!c) return out;
    const atm = num(e.atm_strike) || 0;
    const offsets = c.offsets || [], fields = c.fields || [], values = c.values || [];
    let j = 0;
    for (let k = 0; k < offsets.length; k++) {
      const cur = ex.bars.get(atm + offsets[k] * step);
      if (!cur) return null;
      const mask = fields[k] || 0;
      for (let b = 1; b < PUT_BIT + LEG_FIELDS.length; b++) {
        if (!(mask & (1 << b))) continue;
        const i = b < PUT_BIT ? b - 1 : b - PUT_BIT;
        const leg = b < PUT_BIT ? cur.call : cur.put;
        const s = LEG_SCALES[i], f = LEG_FIELDS[i], held = leg ? num(leg[f]) : null;
        if (held === null || !s || j >= values.length) return null;
        // exact: held × s is an integer up to rounding error, and IEEE division is correctly rounded
        leg[f] = s === 1 ? held + values[j] : (Math.round(held * s) + values[j]) / s;
        j++;
      }
      out.push(cur);
    }
    return out;
  }

  function applyDelta(d) {
    if (num(d.underlying_price)) state.price = num(d.underlying_price);
    const newBucket = d.bucket_time && d.bucket_time !== state.bucket;
    if (d.bucket_time) state.bucket = d.bucket_time;
    const changed = [];
    let consistent = true;
    for (const e of d.expiries || []) {
      let ex = state.dist.get(e.expiry);
      if (!ex) { ex = { atm: null, bars: new Map() }; state.dist.set(e.expiry, ex); }
      if (num(e.atm_strike)) ex.atm = num(e.atm_strike);
      for (const s of e.removed_strikes || []) ex.bars.delete(num(s));
      const fixed = applyChanges(ex, e, num(d.strike_step) || 0);
      if (fixed === null) consistent = false;
      else if (e.expiry === state.focus) changed.push(...fixed);
      for (const b of e.bars || []) {
        const k = num(b.strike);
        const cur = ex.bars.get(k) || { strike: k, call: null, put: null };
        // A delta leg carries only the fields that changed (absent = unchanged).
        if (b.call) cur.call = Object.assign(cur.call || {}, b.call);
        if (b.put) cur.put = Object.assign(cur.put || {}, b.put);
        ex.bars.set(k, cur);
        if (e.expiry === state.focus) changed.push(cur);
      }
    }
    return { changed, newBucket, consistent };
  }

  function renderHeader() {
    $("spot").textContent = state.price === null ? "—" : `${state.underlying} ${state.price.toLocaleString("en-IN", { maximumFractionDigits: 2 })}`;
    $("bucket").textContent = istTime(state.bucket);
  }

  function renderStrikes() {
    ensureCharts();
    const ex = state.dist.get(state.focus);
    $("strike-expiry").textContent = state.focus ? `${state.focus} · ATM ± ${state.n}` : "";
    if (!ex) return;
    const rows = [...ex.bars.values()].sort((a, b) => a.strike - b.strike);
    const xs = rows.map((r) => r.strike);
    const leg = (r, side, f) => (r[side] ? num(r[side][f]) : null);
    const sets = {
      oi: [xs, rows.map((r) => leg(r, "call", "oi")), rows.map((r) => leg(r, "put", "oi"))],
      doi: [xs, rows.map((r) => leg(r, "call", "oi_change")), rows.map((r) => leg(r, "put", "oi_change"))],
      iv: [xs, rows.map((r) => leg(r, "call", "iv")), rows.map((r) => leg(r, "put", "iv"))],
    };
    for (const k of Object.keys(sets)) { charts[k]._atm = ex.atm; charts[k].setData(sets[k]); }
  }

  // ---------- option chain ----------
  const cells = new Map();

  function renderChain(c) {
    state.chain = c;
    $("chain-expiry").textContent = `${c.expiry} · ${istTime(c.bucket_time)}`;
    $("pcr-oi").textContent = fmt(num(c.pcr_oi));
    $("pcr-vol").textContent = fmt(num(c.pcr_volume));
    $("max-pain").textContent = fmtStrike(num(c.max_pain_strike));
    $("straddle").textContent = fmt(num(c.atm_straddle_price));
    $("atm-iv").textContent = fmt(num(c.atm_iv));
    $("iv-rank").textContent = fmt(num(c.iv_rank), 1);
    $("iv-pctl").textContent = fmt(num(c.iv_percentile), 1);
    $("total-oi").textContent = `${fmtInt(num(c.total_call_oi))} / ${fmtInt(num(c.total_put_oi))}`;
    const atm = num(c.atm_strike);
    const td = (side, f, v, text) =>
      `<td class="${side}-cell" data-k="${side}-${f}-${v.strike}" data-value="${v.val ?? ""}">${text}</td>`;
    const html = [];
    for (const r of c.rows || []) {
      const k = num(r.strike);
      const ce = r.call || {}, pe = r.put || {};
      const cls = [k === atm ? "atm" : "", k < atm ? "itm-ce" : "", k > atm ? "itm-pe" : ""].join(" ").trim();
      const cell = (side, leg, f, d) => {
        const val = num(leg[f]);
        const text = d === "int" ? fmtInt(val) : fmt(val, d);
        return td(side, f, { strike: k, val }, text);
      };
      html.push(`<tr class="${cls}" data-strike="${k}">` +
        cell("ce", ce, "oi", "int") + cell("ce", ce, "oi_change", "int") + cell("ce", ce, "volume", "int") +
        cell("ce", ce, "iv", 2) + cell("ce", ce, "ltp", 2) +
        `<td class="strike">${fmtStrike(k)}</td>` +
        cell("pe", pe, "ltp", 2) + cell("pe", pe, "iv", 2) + cell("pe", pe, "volume", "int") +
        cell("pe", pe, "oi_change", "int") + cell("pe", pe, "oi", "int") + "</tr>");
    }
    const tbody = $("chain").tBodies[0];
    tbody.innerHTML = html.join("");
    cells.clear();
    for (const el of tbody.querySelectorAll("td[data-k]")) cells.set(el.dataset.k, el);
    for (const el of tbody.querySelectorAll("td[data-k^='ce-oi_change'], td[data-k^='pe-oi_change']")) {
      const v = num(el.dataset.value);
      if (v) el.classList.add(v > 0 ? "up" : "down");
    }
    const atmRow = tbody.querySelector("tr.atm");
    if (atmRow && !state.scrolled) { atmRow.scrollIntoView({ block: "center" }); state.scrolled = true; scrollTo(0, 0); }
  }

  /** Live values of changed strikes into the chain table (OI, IV, LTP at the bar close). */
  function patchChain(changed) {
    for (const b of changed) {
      for (const [side, leg] of [["ce", b.call], ["pe", b.put]]) {
        if (!leg) continue;
        for (const [f, d] of [["oi", "int"], ["iv", 2], ["ltp", 2]]) {
          if (leg[f] === undefined) continue;
          const el = cells.get(`${side}-${f}-${b.strike}`);
          if (!el) continue;
          const v = num(leg[f]);
          if (String(v) === el.dataset.value) continue;
          el.dataset.value = String(v);
          el.textContent = d === "int" ? fmtInt(v) : fmt(v, d);
          el.classList.remove("flash"); void el.offsetWidth; el.classList.add("flash");
        }
      }
    }
  }

  // ---------- moneyness ----------
  const PALETTE = ["#f2c14e", "#4ea1f2", "#b48ef2", "#2bb673", "#e0555b", "#f28e4e", "#4ef2d6", "#f24ea7",
                   "#9ad14e", "#8a96a6", "#ffffff"];

  function renderMoneyness(m) {
    const focus = state.focus || (m.series[0] && m.series[0].expiry);
    const series = (m.series || []).filter((s) => s.expiry === focus);
    const ind = $("indicator").selectedOptions[0].textContent;
    const side = state.side === "OPTION_TYPE_PUT" ? "PE" : "CE";
    $("moneyness-title").textContent = `${ind} · ${side} · ${focus || ""} · ${m.timeframe.replace("TIMEFRAME_", "")}`;
    const times = [...new Set(series.flatMap((s) => s.times.map(Number)))].sort((a, b) => a - b);
    const idx = new Map(times.map((t, i) => [t, i]));
    const data = [times];
    for (const s of series) {
      const col = new Array(times.length).fill(null);
      s.times.forEach((t, i) => { col[idx.get(Number(t))] = num(s.values[i]); });
      data.push(col);
    }
    series.sort((a, b) => a.level - b.level);
    const el = $("chart-moneyness");
    if (charts.m) { charts.m.destroy(); charts.m = null; }
    el.textContent = "";
    if (!series.length) { el.textContent = "no data"; return; }
    const opts = {
      width: el.clientWidth || 800, height: 280,
      tzDate: (ts) => uPlot.tzDate(new Date(ts * 1e3), "Asia/Kolkata"),
      axes: [{ ...axis }, { ...axis, size: 60 }],
      series: [{}, ...series.map((s, i) => ({
        label: s.label, stroke: s.level === 0 ? ATMC : PALETTE[(i % (PALETTE.length - 1)) + 1],
        width: s.level === 0 ? 2.5 : 1.2, points: { show: false },
      }))],
    };
    charts.m = new uPlot(opts, data, el);
  }

  // ---------- loading ----------
  const distParams = () => ({ expiries: state.expiries, strikes_around_atm: state.n, timeframe: state.timeframe });

  async function loadChain() {
    const c = await api(`/v1/underlyings/${state.underlying}/option-chain`, { expiry: state.focus });
    state.chainBucket = c.bucket_time;
    renderChain(c);
  }

  async function loadMoneyness() {
    const m = await api(`/v1/underlyings/${state.underlying}/moneyness-series`, {
      timeframe: state.timeframe, indicator: state.indicator, side: state.side, levels: state.levels,
      expiries: state.focus ? [state.focus] : [],
    });
    renderMoneyness(m);
  }

  function markReady() {
    if (state.ready) return;
    state.ready = true;
    performance.mark("optmon-ready");
    window.optmonReadyMs = performance.now();
    document.body.dataset.ready = "1";
  }

  let refreshTimer = null, lastRefresh = 0;
  /** Re-read chain analytics and the moneyness series after a new bucket (at most every 5 s). */
  function scheduleRefresh() {
    if (refreshTimer) return;
    const wait = Math.max(0, 5000 - (performance.now() - lastRefresh));
    refreshTimer = setTimeout(async () => {
      refreshTimer = null; lastRefresh = performance.now();
      const gen = state.generation;
      try {
        await Promise.all([loadChain(), loadMoneyness()]);
      } catch (e) { if (gen === state.generation) showError(e.message); }
    }, wait);
  }

  // ---------- live (SSE) ----------
  let es = null, retry = 0, retryTimer = null, watchdog = null;

  function setConn(s, title) {
    const el = $("conn");
    el.dataset.state = s;
    el.className = "conn conn-" + s;
    el.textContent = s;
    if (title) el.title = title;
  }

  function kickWatchdog() {
    clearTimeout(watchdog);
    watchdog = setTimeout(() => { if (es) { es.close(); es = null; } reconnect("no message for 20 s"); }, 20000);
  }

  function disconnect() {
    clearTimeout(retryTimer); clearTimeout(watchdog);
    if (es) { es.close(); es = null; }
  }

  function connect() {
    disconnect();
    const gen = state.generation;
    const url = `/v1/underlyings/${state.underlying}/subscribe` + query({
      ...distParams(), max_updates_per_second: 4, last_sequence: state.lastSeq || null,
    });
    setConn(retry ? "reconnecting" : "connecting");
    es = new EventSource(url);
    es.onmessage = (ev) => {
      if (gen !== state.generation) return;
      kickWatchdog();
      let m;
      try { m = JSON.parse(ev.data); } catch (_) { return; }
      onMessage(m);
    };
    es.onerror = () => {
      if (gen !== state.generation) return;
      if (es) { es.close(); es = null; }
      reconnect("connection lost");
    };
  }

  function reconnect(why) {
    clearTimeout(retryTimer);
    setConn(navigator.onLine === false ? "offline" : "reconnecting", why);
    const delay = Math.min(15000, 500 * 2 ** retry) * (0.8 + Math.random() * 0.4);
    retry += 1;
    retryTimer = setTimeout(connect, delay);
  }

  function onMessage(m) {
    if (m.error) {
      const fatal = ["INVALID_ARGUMENT", "NOT_FOUND", "PERMISSION_DENIED", "UNAUTHENTICATED"].includes(m.error.code);
      showError(`live: ${m.error.code}: ${m.error.message}${(m.error.field_violations || []).map((f) => " · " + f).join("")}`);
      if (es) { es.close(); es = null; }
      if (fatal) { clearTimeout(watchdog); setConn("error", m.error.message); } else reconnect(m.error.message);
      return;
    }
    if (m.end) { if (es) { es.close(); es = null; } retry = 0; reconnect(m.end.reason || "stream ended"); return; }
    retry = 0;
    setConn("live");
    const seq = num(m.sequence);
    if (m.snapshot) {
      state.lastSeq = seq;
      setDistribution(m.snapshot.distribution || {});
      renderHeader(); renderStrikes(); markReady();
      if (state.chainBucket && state.bucket !== state.chainBucket) scheduleRefresh();
    } else if (m.delta) {
      state.lastSeq = seq;
      const { changed, newBucket, consistent } = applyDelta(m.delta);
      if (!consistent) { if (es) { es.close(); es = null; } reconnect("delta does not match the held state"); return; }
      renderHeader(); renderStrikes(); patchChain(changed);
      if (newBucket) scheduleRefresh();
    }
  }

  // ---------- selectors ----------
  function fillSelect(el, values, selected, label = (v) => v) {
    el.innerHTML = values.map((v) => `<option value="${v}"${selected.includes(v) ? " selected" : ""}>${label(v)}</option>`).join("");
  }

  function syncUrl() {
    const q = new URLSearchParams();
    q.set("underlying", state.underlying);
    state.expiries.forEach((e) => q.append("expiry", e));
    q.set("timeframe", state.timeframe); q.set("indicator", state.indicator); q.set("side", state.side);
    q.set("n", state.n); q.set("levels", state.levels);
    for (const [k, v] of Object.entries(auth)) q.set(k, v);
    history.replaceState(null, "", "?" + q.toString());
  }

  async function reload() {
    state.generation += 1;
    disconnect();
    showError("");
    state.lastSeq = 0; state.focus = state.expiries[0] || ""; state.scrolled = false;
    const info = state.underlyings.find((u) => u.underlying === state.underlying);
    state.step = (info && num(info.strike_step)) || STEP_DEFAULT[state.underlying] || 50;
    const gen = state.generation;
    const exps = api(`/v1/underlyings/${state.underlying}/expiries`).then((r) => {
      if (gen === state.generation) state.allExpiries = r.expiries || [];
    });
    try {
      const d = await api(`/v1/underlyings/${state.underlying}/strike-distribution`, distParams());
      if (gen !== state.generation) return;
      setDistribution(d);
      renderHeader(); renderStrikes();
      await loadChain();
      markReady();
      connect();
      await Promise.all([exps, loadMoneyness()]);
      if (gen !== state.generation) return;
      fillSelect($("expiries"), state.allExpiries, state.expiries.length ? state.expiries : [...state.dist.keys()]);
    } catch (e) {
      if (gen === state.generation) { showError(e.message); if (!es) connect(); }
    }
    syncUrl();
  }

  function bindControls() {
    $("underlying").addEventListener("change", (e) => { state.underlying = e.target.value; state.expiries = []; reload(); });
    $("expiries").addEventListener("change", (e) => {
      state.expiries = [...e.target.selectedOptions].map((o) => o.value).slice(0, 6); reload();
    });
    $("timeframe").addEventListener("change", (e) => { state.timeframe = e.target.value; reload(); });
    $("indicator").addEventListener("change", (e) => { state.indicator = e.target.value; syncUrl(); loadMoneyness().catch((x) => showError(x.message)); });
    $("side").addEventListener("change", (e) => { state.side = e.target.value; syncUrl(); loadMoneyness().catch((x) => showError(x.message)); });
    $("atmn").addEventListener("change", (e) => { state.n = Math.max(1, Math.min(50, Number(e.target.value) || 10)); reload(); });
    $("levels").addEventListener("change", (e) => { state.levels = Math.max(0, Math.min(10, Number(e.target.value) || 0)); syncUrl(); loadMoneyness().catch((x) => showError(x.message)); });
    addEventListener("online", () => { if (!es) { retry = 0; connect(); } });
    addEventListener("offline", () => setConn("offline"));
  }

  async function main() {
    $("timeframe").value = state.timeframe; $("indicator").value = state.indicator; $("side").value = state.side;
    $("atmn").value = state.n; $("levels").value = state.levels;
    bindControls();
    try {
      const r = await api("/v1/underlyings");
      state.underlyings = r.underlyings || [];
    } catch (e) { showError(e.message); setConn("error"); return; }
    const names = state.underlyings.map((u) => u.underlying);
    if (!names.length) { showError("no data yet: start a replay (optmon replay …)"); setConn("error"); return; }
    if (!names.includes(state.underlying)) state.underlying = names.includes("NIFTY") ? "NIFTY" : names[0];
    fillSelect($("underlying"), names, [state.underlying]);
    await reload();
  }

  window.optmon = { state };  // for debugging from the console
  main();
})();
