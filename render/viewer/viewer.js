// LatentMAS capture viewer: one hand-off's [num_layers, T] matrix on a canvas, with zoom, pan,
// hover and a small read-only API (window.latentmasViewer). Text from the capture is only ever
// set as textContent or drawn with fillText, never parsed as HTML.
(function () {
  'use strict';

  const META = JSON.parse(document.getElementById('lm-meta').textContent);
  const TILE = 4096;               // columns per offscreen tile (canvas sides stay well under limits)
  const M = { left: 46, right: 78, top: 34, bottom: 40 };   // plot margins in CSS pixels
  const BAND = 12;                 // segment band height, above the map
  const NEIGHBOURS = 3;            // tokens shown either side of the hovered one
  const CACHE = 4;                 // decoded hand-offs kept

  const $ = (id) => document.getElementById(id);
  const canvas = $('lm-canvas');
  const ctx = canvas.getContext('2d');
  const tooltip = $('lm-tooltip');

  // -- float16 decoding ---------------------------------------------------------------------
  const HALF = new Float32Array(65536);
  for (let h = 0; h < 65536; h++) {
    const sign = h & 0x8000 ? -1 : 1, exp = (h >> 10) & 0x1f, frac = h & 0x3ff;
    HALF[h] = exp === 0 ? sign * frac * 2 ** -24
      : exp === 31 ? (frac ? NaN : sign * Infinity)
        : sign * (1 + frac / 1024) * 2 ** (exp - 15);
  }

  function decodeValues(base64) {
    const bin = atob(base64);
    const bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    const halves = new Uint16Array(bytes.buffer, 0, bytes.length >> 1);
    const out = new Float32Array(halves.length);
    for (let i = 0; i < halves.length; i++) out[i] = HALF[halves[i]];
    return out;
  }

  // -- palettes -------------------------------------------------------------------------------
  const PALETTES = {};
  for (const [name, p] of Object.entries(META.palettes)) {
    const lut = new Uint8Array(256 * 3);
    for (let i = 0; i < lut.length; i++) lut[i] = parseInt(p.colors.substr(2 * i, 2), 16);
    const nan = [1, 3, 5].map((i) => parseInt(p.nan.substr(i, 2), 16));
    PALETTES[name] = { lut, nan };
  }
  const rgb = (lut, i) => `rgb(${lut[3 * i]},${lut[3 * i + 1]},${lut[3 * i + 2]})`;

  // -- state ----------------------------------------------------------------------------------
  const state = {
    problem: 0, handoff: 0, cur: null, cmap: PALETTES[META.cmap] ? META.cmap : Object.keys(PALETTES)[0],
    scale: 'fixed', view: null, selCol: null, selLayer: null, hover: null,
    stats: { firstDrawMs: null, lastDrawMs: null, draws: 0 },
  };
  const decoded = new Map();   // blob index -> hand-off, most recent last

  function loadHandoff(blob) {
    if (decoded.has(blob)) {
      const h = decoded.get(blob); decoded.delete(blob); decoded.set(blob, h); return h;
    }
    const raw = JSON.parse($('lm-h' + blob).textContent);
    const L = META.numLayers, T = raw.positions.length;
    const values = decodeValues(raw.values);
    const layerMin = new Float32Array(L).fill(NaN), layerMax = new Float32Array(L).fill(NaN);
    for (let l = 0; l < L; l++) {
      let lo = Infinity, hi = -Infinity;
      for (let c = l * T, e = c + T; c < e; c++) {
        const v = values[c];
        if (v < lo) lo = v;
        if (v > hi) hi = v;
      }
      if (lo <= hi) { layerMin[l] = lo; layerMax[l] = hi; }
    }
    const segmentOf = new Int32Array(T).fill(-1);
    raw.segments.forEach((s, i) => { for (let c = Math.max(0, s[2]); c < Math.min(T, s[3]); c++) segmentOf[c] = i; });
    const gapBefore = new Map(raw.gaps.map(([c, n]) => [c, n]));
    const h = { blob, L, T, values, layerMin, layerMax, segmentOf, gapBefore, raw, tiles: null, tilesKey: null };
    decoded.set(blob, h);
    while (decoded.size > CACHE) decoded.delete(decoded.keys().next().value);
    return h;
  }

  // -- colouring into offscreen tiles ---------------------------------------------------------
  function scaleOf(h) {
    if (state.scale === 'handoff') {
      return h.raw.min === null ? [0, 1] : [h.raw.min, h.raw.max > h.raw.min ? h.raw.max : h.raw.min + 1];
    }
    return [h.raw.vmin, h.raw.vmax];
  }

  function colourTiles(h) {
    const key = state.cmap + '|' + state.scale;
    if (h.tilesKey === key) return;
    const { lut, nan } = PALETTES[state.cmap];
    const L = h.L, T = h.T, tiles = [];
    for (let t0 = 0; t0 < T; t0 += TILE) {
      const w = Math.min(TILE, T - t0);
      const tile = document.createElement('canvas');
      tile.width = w; tile.height = Math.max(L, 1);
      const tctx = tile.getContext('2d');
      const img = tctx.createImageData(w, Math.max(L, 1));
      const px = img.data;
      for (let l = 0; l < L; l++) {
        let lo, hi;
        if (state.scale === 'layer') { lo = h.layerMin[l]; hi = h.layerMax[l]; if (!(hi > lo)) hi = lo + 1; }
        else [lo, hi] = scaleOf(h);
        const k = 255 / (hi - lo), row = (L - 1 - l) * w * 4, base = l * T + t0;
        for (let c = 0; c < w; c++) {
          const v = h.values[base + c], o = row + 4 * c;
          if (v !== v) { px[o] = nan[0]; px[o + 1] = nan[1]; px[o + 2] = nan[2]; }
          else {
            let i = ((v - lo) * k + 0.5) | 0;
            i = i < 0 ? 0 : i > 255 ? 255 : i;
            px[o] = lut[3 * i]; px[o + 1] = lut[3 * i + 1]; px[o + 2] = lut[3 * i + 2];
          }
          px[o + 3] = 255;
        }
      }
      tctx.putImageData(img, 0, 0);
      tiles.push({ canvas: tile, start: t0, width: w });
    }
    h.tiles = tiles; h.tilesKey = key;
  }

  // -- geometry -----------------------------------------------------------------------------------
  let cssW = 0, cssH = 0;
  function resize() {
    const r = canvas.getBoundingClientRect(), dpr = window.devicePixelRatio || 1;
    cssW = Math.max(200, r.width); cssH = Math.max(160, r.height);
    canvas.width = Math.round(cssW * dpr); canvas.height = Math.round(cssH * dpr);
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    for (const c of [$('lm-profile'), $('lm-strip')]) {
      const b = c.getBoundingClientRect();
      c.width = Math.round(Math.max(100, b.width) * dpr); c.height = Math.round(Math.max(60, b.height) * dpr);
      c.getContext('2d').setTransform(dpr, 0, 0, dpr, 0, 0);
    }
  }
  const plot = () => ({ x: M.left, y: M.top, w: cssW - M.left - M.right, h: cssH - M.top - M.bottom });

  function fullView(h) { return { c0: 0, c1: Math.max(h.T, 1), l0: 0, l1: Math.max(h.L, 1) }; }

  function clampView(v, h) {
    const T = Math.max(h.T, 1), L = Math.max(h.L, 1);
    let cw = Math.min(Math.max(v.c1 - v.c0, 1), T), lh = Math.min(Math.max(v.l1 - v.l0, 1), L);
    let c0 = Math.min(Math.max(v.c0, 0), T - cw), l0 = Math.min(Math.max(v.l0, 0), L - lh);
    return { c0, c1: c0 + cw, l0, l1: l0 + lh };
  }

  function cellUnder(x, y) {   // CSS pixels on the canvas -> {layer, column} or null
    const p = plot(), v = state.view, h = state.cur;
    if (!h || x < p.x || x >= p.x + p.w || y < p.y || y >= p.y + p.h) return null;
    const column = Math.floor(v.c0 + (x - p.x) / p.w * (v.c1 - v.c0));
    const layer = Math.floor(v.l1 - (y - p.y) / p.h * (v.l1 - v.l0));
    if (column < 0 || column >= h.T || layer < 0 || layer >= h.L) return null;
    return { layer, column };
  }

  const xOf = (c) => { const p = plot(), v = state.view; return p.x + (c - v.c0) / (v.c1 - v.c0) * p.w; };
  const yOf = (l) => { const p = plot(), v = state.view; return p.y + (v.l1 - l) / (v.l1 - v.l0) * p.h; };

  // -- drawing --------------------------------------------------------------------------------------
  let pending = 0;
  function requestDraw() { if (!pending) pending = requestAnimationFrame(() => { pending = 0; draw(); }); }

  function niceStep(span, target) {
    const raw = span / Math.max(target, 1), mag = 10 ** Math.floor(Math.log10(raw));
    return [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
  }

  function draw() {
    const t0 = performance.now(), h = state.cur;
    ctx.clearRect(0, 0, cssW, cssH);
    ctx.font = '11px system-ui, sans-serif';
    ctx.fillStyle = '#222';
    if (!h || h.T === 0 || h.L === 0) {
      ctx.textAlign = 'center'; ctx.fillText('empty cache (T = 0)', cssW / 2, cssH / 2);
      return finishDraw(t0);
    }
    colourTiles(h);
    const p = plot(), v = state.view, perCol = p.w / (v.c1 - v.c0);
    ctx.imageSmoothingEnabled = perCol < 1;
    ctx.imageSmoothingQuality = 'low';
    const sy = h.L - v.l1, sh = v.l1 - v.l0;
    for (const t of h.tiles) {
      const a = Math.max(v.c0, t.start), b = Math.min(v.c1, t.start + t.width);
      if (b <= a) continue;
      ctx.drawImage(t.canvas, a - t.start, sy, b - a, sh, xOf(a), p.y, (b - a) * perCol, p.h);
    }
    ctx.strokeStyle = '#444'; ctx.lineWidth = 1; ctx.strokeRect(p.x - 0.5, p.y - 0.5, p.w + 1, p.h + 1);
    drawSegments(h, p, v);
    drawGaps(h, p, v, perCol);
    drawAxes(h, p, v, perCol);
    drawColourbar(h, p);
    drawSelection(h, p, v, perCol);
    return finishDraw(t0);
  }

  function finishDraw(t0) {
    const s = state.stats;
    s.draws++; s.lastDrawMs = performance.now() - t0;
    if (s.firstDrawMs === null) s.firstDrawMs = performance.now();
    return s.lastDrawMs;
  }

  function drawSegments(h, p, v) {
    const y = p.y - BAND - 2;
    ctx.save();
    ctx.beginPath(); ctx.rect(p.x, 0, p.w, cssH); ctx.clip();
    ctx.fillStyle = '#eee'; ctx.fillRect(p.x, y, p.w, BAND);
    ctx.textAlign = 'center'; ctx.textBaseline = 'bottom';
    for (const [agent, kind, start, stop, colour] of h.raw.segments) {
      if (stop <= v.c0 || start >= v.c1) continue;
      const x0 = xOf(Math.max(start, v.c0)), x1 = xOf(Math.min(stop, v.c1));
      ctx.fillStyle = colour; ctx.fillRect(x0, y, Math.max(x1 - x0, 1), BAND);
      const label = agent + ' ' + kind;
      if (ctx.measureText(label).width + 6 < x1 - x0) {
        ctx.fillStyle = '#222'; ctx.fillText(label, (x0 + x1) / 2, y - 1);
      }
      if (start > v.c0) {   // boundary line through the map
        ctx.strokeStyle = 'rgba(255,255,255,0.8)'; ctx.beginPath();
        ctx.moveTo(Math.round(x0) + 0.5, y); ctx.lineTo(Math.round(x0) + 0.5, p.y + p.h); ctx.stroke();
      }
    }
    ctx.restore();
  }

  function drawGaps(h, p, v, perCol) {
    const gaps = h.raw.gaps;
    if (!gaps.length) return;
    const y = p.y + p.h + 2;
    ctx.save();
    ctx.beginPath(); ctx.rect(p.x - 4, 0, p.w + 8, cssH); ctx.clip();
    ctx.fillStyle = '#000';
    let lastX = -Infinity, shown = 0;
    const lines = [];
    for (const [c] of gaps) {
      if (c < v.c0 || c > v.c1) continue;
      const x = xOf(c);
      if (x - lastX < 2) continue;
      lastX = x; shown++;
      ctx.beginPath(); ctx.moveTo(x, y); ctx.lineTo(x - 3.5, y + 6); ctx.lineTo(x + 3.5, y + 6); ctx.closePath(); ctx.fill();
      lines.push(x);
    }
    if (perCol >= 3 || shown * 8 < p.w) {   // dashed lines through the map where they stay readable
      ctx.strokeStyle = 'rgba(0,0,0,0.55)'; ctx.setLineDash([3, 3]); ctx.beginPath();
      for (const x of lines) { ctx.moveTo(Math.round(x) + 0.5, p.y); ctx.lineTo(Math.round(x) + 0.5, p.y + p.h); }
      ctx.stroke();
    }
    ctx.restore();
  }

  function drawAxes(h, p, v, perCol) {
    ctx.fillStyle = '#222'; ctx.strokeStyle = '#444';
    // layers: layer 0 at the bottom
    ctx.textAlign = 'right'; ctx.textBaseline = 'middle';
    const lstep = Math.max(1, niceStep(v.l1 - v.l0, p.h / 16));
    for (let l = Math.ceil(v.l0 / lstep) * lstep; l < v.l1; l += lstep) {
      const y = (yOf(l) + yOf(l + 1)) / 2;
      if (y < p.y || y > p.y + p.h) continue;
      ctx.fillText(String(l), p.x - 4, y);
    }
    ctx.save(); ctx.translate(12, p.y + p.h / 2); ctx.rotate(-Math.PI / 2); ctx.textAlign = 'center';
    ctx.fillText('layer', 0, 0); ctx.restore();
    // columns, or their tokens when there is room
    ctx.textBaseline = 'top';
    const yt = p.y + p.h + 10;
    if (perCol >= 14) {
      ctx.save(); ctx.beginPath(); ctx.rect(p.x, 0, p.w, cssH); ctx.clip();
      ctx.textAlign = 'center';
      for (let c = Math.floor(v.c0); c < Math.ceil(v.c1); c++) {
        const x = xOf(c + 0.5);
        let text = displayToken(h.raw.tokens[c]);
        const room = perCol - 2;
        while (text.length > 1 && ctx.measureText(text).width > room) text = text.slice(0, -2) + '…';
        ctx.fillText(text, x, yt);
        ctx.fillStyle = '#777'; ctx.fillText(String(c), x, yt + 13); ctx.fillStyle = '#222';
      }
      ctx.restore();
    } else {
      ctx.textAlign = 'center';
      const step = Math.max(1, niceStep(v.c1 - v.c0, p.w / 70));
      for (let c = Math.ceil(v.c0 / step) * step; c < v.c1; c += step) {
        const x = xOf(c + 0.5);
        ctx.beginPath(); ctx.moveTo(x, p.y + p.h); ctx.lineTo(x, p.y + p.h + 3); ctx.stroke();
        ctx.fillText(String(c), x, yt);
      }
      ctx.fillStyle = '#666'; ctx.fillText('KV cache column', p.x + p.w / 2, yt + 14);
    }
  }

  function drawColourbar(h, p) {
    const { lut } = PALETTES[state.cmap];
    const x = p.x + p.w + 14, w = 12;
    for (let i = 0; i < 256; i++) {
      ctx.fillStyle = rgb(lut, i);
      ctx.fillRect(x, p.y + p.h * (1 - (i + 1) / 256), w, p.h / 256 + 0.6);
    }
    ctx.strokeStyle = '#444'; ctx.strokeRect(x - 0.5, p.y - 0.5, w + 1, p.h + 1);
    ctx.fillStyle = '#222'; ctx.textAlign = 'left'; ctx.textBaseline = 'middle';
    const [lo, hi] = state.scale === 'layer' ? ['layer min', 'layer max'] : scaleOf(h).map(formatValue);
    ctx.fillText(String(hi), x + w + 3, p.y + 4);
    ctx.fillText(String(lo), x + w + 3, p.y + p.h - 4);
  }

  function drawSelection(h, p, v, perCol) {
    ctx.save(); ctx.beginPath(); ctx.rect(p.x, p.y, p.w, p.h); ctx.clip();
    ctx.strokeStyle = '#000'; ctx.lineWidth = 1.5;
    if (state.selCol !== null) ctx.strokeRect(xOf(state.selCol), p.y, Math.max(perCol, 1.5), p.h);
    if (state.selLayer !== null) ctx.strokeRect(p.x, yOf(state.selLayer + 1), p.w, yOf(state.selLayer) - yOf(state.selLayer + 1));
    ctx.restore();
  }

  // -- profile (a column over layers) and strip (a layer over columns) ---------------------------------
  function lineChart(el, xs, ys, lo, hi, opts) {
    const c = el.getContext('2d'), dpr = window.devicePixelRatio || 1;
    const W = el.width / dpr, H = el.height / dpr, L = 40, R = 8, Tp = 6, B = 18;
    c.clearRect(0, 0, W, H);
    c.font = '10px system-ui, sans-serif'; c.fillStyle = '#222'; c.strokeStyle = '#999';
    c.strokeRect(L - 0.5, Tp - 0.5, W - L - R + 1, H - Tp - B + 1);
    c.textAlign = 'right'; c.textBaseline = 'middle';
    c.fillText(formatValue(hi), L - 3, Tp + 4); c.fillText(formatValue(lo), L - 3, H - B - 4);
    c.textAlign = 'center'; c.textBaseline = 'top';
    c.fillText(opts.xlabel, L + (W - L - R) / 2, H - B + 4);
    const X = (x) => L + x * (W - L - R), Y = (y) => Tp + (1 - (y - lo) / (hi - lo)) * (H - Tp - B);
    if (opts.window) {
      c.fillStyle = 'rgba(80,120,255,0.12)';
      c.fillRect(X(opts.window[0]), Tp, Math.max(X(opts.window[1]) - X(opts.window[0]), 1), H - Tp - B);
    }
    c.strokeStyle = '#1f5fbf'; c.lineWidth = 1.2; c.beginPath();
    let pen = false;
    for (let i = 0; i < xs.length; i++) {
      const y = ys[i];
      if (y !== y) { pen = false; continue; }
      if (pen) c.lineTo(X(xs[i]), Y(y)); else c.moveTo(X(xs[i]), Y(y));
      pen = true;
    }
    c.stroke();
  }

  function drawPanels() {
    const h = state.cur;
    if (!h || !h.T) return;
    const [lo, hi] = scaleOf(h);
    if (state.selCol !== null) {
      const c = state.selCol, xs = [], ys = [];
      for (let l = 0; l < h.L; l++) { xs.push(h.L > 1 ? l / (h.L - 1) : 0.5); ys.push(h.values[l * h.T + c]); }
      $('lm-profile-title').textContent = `column ${c} (position ${h.raw.positions[c]}, token ${JSON.stringify(h.raw.tokens[c])}) over layers 0…${h.L - 1}`;
      lineChart($('lm-profile'), xs, ys, Math.min(lo, h.raw.min ?? lo), Math.max(hi, h.raw.max ?? hi), { xlabel: 'layer' });
    }
    if (state.selLayer !== null) {
      const l = state.selLayer, W = 1000, xs = [], ys = [];   // one point per bucket of columns (its mean)
      const per = Math.max(1, Math.ceil(h.T / W));
      for (let c0 = 0; c0 < h.T; c0 += per) {
        let s = 0, n = 0;
        for (let c = c0; c < Math.min(h.T, c0 + per); c++) { const x = h.values[l * h.T + c]; if (x === x) { s += x; n++; } }
        xs.push(h.T > 1 ? (c0 + per / 2) / h.T : 0.5); ys.push(n ? s / n : NaN);
      }
      $('lm-strip-title').textContent = `layer ${l} over columns 0…${h.T - 1}` + (per > 1 ? ` (mean of ${per} columns per point)` : '') +
        `; range ${formatValue(h.layerMin[l])} … ${formatValue(h.layerMax[l])}`;
      lineChart($('lm-strip'), xs, ys, Math.min(lo, h.layerMin[l]), Math.max(hi, h.layerMax[l]),
        { xlabel: 'column', window: [state.view.c0 / h.T, state.view.c1 / h.T] });
    }
  }

  // -- text ------------------------------------------------------------------------------------------
  function formatValue(v) {
    if (v === null || v === undefined || v !== v) return 'NaN';
    return Math.abs(v) >= 1e-3 || v === 0 ? v.toFixed(4) : v.toExponential(3);
  }
  const displayToken = (t) => String(t).replace(/\n/g, '\\n').replace(/\t/g, '\\t').replace(/\r/g, '\\r');

  function segmentAt(h, column) {
    const i = h.segmentOf[column];
    if (i < 0) return null;
    const [agent, kind, start, stop] = h.raw.segments[i];
    return { agent, kind, start, stop };
  }

  function cell(h, layer, column) {
    return {
      layer, column, value: h.values[layer * h.T + column], token: h.raw.tokens[column],
      position: h.raw.positions[column], segment: segmentAt(h, column),
      gapBefore: h.gapBefore.get(column) || 0,
    };
  }

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function showTooltip(clientX, clientY, hit) {
    const h = state.cur, c = cell(h, hit.layer, hit.column);
    const lines = [
      el('div', 'where', `layer ${c.layer} · column ${c.column} · position ${c.position}`),
      el('div', 'value', `value ${formatValue(c.value)}`),
      el('div', 'segment', c.segment ? `segment ${c.segment.agent} ${c.segment.kind} (columns ${c.segment.start}…${c.segment.stop - 1})` : 'segment none'),
    ];
    const toks = el('div', 'tokens');
    for (let j = Math.max(0, c.column - NEIGHBOURS); j <= Math.min(h.T - 1, c.column + NEIGHBOURS); j++) {
      toks.appendChild(el('span', j === c.column ? 'tok here' : 'tok', displayToken(h.raw.tokens[j])));
      if (j < c.column + NEIGHBOURS) toks.appendChild(document.createTextNode(' '));
    }
    lines.push(toks);
    const readout = h.raw.readout && h.raw.readout[c.column];
    if (readout) {
      const tops = readout.tokens.map((t, i) => `${displayToken(t)} ${readout.probs[i].toFixed(3)}`).join(' · ');
      const entropy = readout.entropy === null ? '' : ` (entropy ${readout.entropy.toFixed(2)} nats)`;
      lines.push(el('div', 'readout', `readout: ${tops}${entropy}`));
    }
    if (c.gapBefore) lines.push(el('div', 'gap', `kNN gap: ${c.gapBefore} position${c.gapBefore === 1 ? '' : 's'} removed before this column`));
    tooltip.replaceChildren(...lines);
    tooltip.hidden = false;
    const r = tooltip.getBoundingClientRect();
    let x = clientX + 14, y = clientY + 14;
    if (x + r.width > window.innerWidth) x = Math.max(0, clientX - r.width - 14);
    if (y + r.height > window.innerHeight) y = Math.max(0, clientY - r.height - 14);
    tooltip.style.left = x + 'px'; tooltip.style.top = y + 'px';
    tooltip.dataset.layer = c.layer; tooltip.dataset.column = c.column;
  }

  // -- selection -------------------------------------------------------------------------------------------
  function fillSelect(sel, items) {
    sel.replaceChildren(...items.map(([value, text]) => { const o = el('option', '', text); o.value = value; return o; }));
  }

  function showProblem() {
    const pr = META.problems[state.problem];
    $('lm-gold').textContent = pr.gold;
    $('lm-prediction').textContent = pr.prediction || '(none)';
    $('lm-correct').textContent = pr.correct === null ? 'unknown' : pr.correct ? 'yes ✓' : 'no ✗';
    $('lm-question').textContent = pr.question;
    fillSelect($('lm-handoff'), pr.handoffs.map((hd, i) => [i, `${hd.title}${hd.occurrence > 1 ? ' #' + hd.occurrence : ''} (T = ${hd.columns})`]));
    $('lm-problem').value = state.problem;
  }

  function selectIndices(pi, hi) {
    const changedProblem = pi !== state.problem || !state.cur;
    state.problem = pi; state.handoff = hi;
    if (changedProblem) showProblem();
    $('lm-handoff').value = hi;
    const hd = META.problems[pi].handoffs[hi];
    state.cur = loadHandoff(hd.blob);
    state.view = fullView(state.cur);
    state.selCol = state.cur.T ? 0 : null; state.selLayer = state.cur.L ? Math.floor(state.cur.L / 2) : null;
    tooltip.hidden = true;
    const h = state.cur;
    $('lm-caption').textContent = `${hd.title} · problem ${META.problems[pi].number} · ${h.L} layers × ${h.T} columns · ` +
      `similarity ${META.mode}` + (h.raw.gaps.length ? ` · kNN removed ${h.raw.gaps.reduce((s, g) => s + g[1], 0)} positions in ${h.raw.gaps.length} runs (▲ under the map)` : '');
    draw(); drawPanels();
  }

  function findProblem(problem) {
    const pi = META.problems.findIndex((p) => p.number === Number(problem));
    if (pi < 0) throw new Error(`no problem ${problem} in this page (it has ${META.problems.map((p) => p.number).join(', ')})`);
    return pi;
  }

  function findHandoff(pi, handoff) {
    const list = META.problems[pi].handoffs;
    const hi = typeof handoff === 'number' ? handoff : list.findIndex((h) => h.name === handoff);
    if (!(hi >= 0 && hi < list.length)) throw new Error(`problem ${META.problems[pi].number} has no hand-off ${handoff} (it has ${list.map((h) => h.name).join(', ')})`);
    return hi;
  }

  const nextFrame = () => new Promise((resolve) => requestAnimationFrame(() => resolve()));

  function selection() {
    const pr = META.problems[state.problem], hd = pr.handoffs[state.handoff];
    return {
      problem: pr.number, handoff: state.handoff, name: hd.name, occurrence: hd.occurrence,
      numLayers: state.cur.L, numColumns: state.cur.T, cmap: state.cmap, scale: state.scale,
    };
  }

  // -- interaction ------------------------------------------------------------------------------------------
  function setView(v) { state.view = clampView(v, state.cur); requestDraw(); }

  function zoomAt(factor, anchor, axis) {
    const v = state.view;
    if (axis === 'layers') {
      const a = anchor ?? (v.l0 + v.l1) / 2;
      setView({ ...v, l0: a - (a - v.l0) * factor, l1: a + (v.l1 - a) * factor });
    } else {
      const a = anchor ?? (v.c0 + v.c1) / 2;
      setView({ ...v, c0: a - (a - v.c0) * factor, c1: a + (v.c1 - a) * factor });
    }
  }

  function localXY(e) { const r = canvas.getBoundingClientRect(); return [e.clientX - r.left, e.clientY - r.top]; }

  canvas.addEventListener('wheel', (e) => {
    if (!state.cur || !state.cur.T) return;
    e.preventDefault();
    const [x, y] = localXY(e), p = plot(), v = state.view;
    const factor = Math.exp(Math.max(-3, Math.min(3, e.deltaY / 300)));
    if (e.shiftKey) zoomAt(factor, v.l1 - (y - p.y) / p.h * (v.l1 - v.l0), 'layers');
    else zoomAt(factor, v.c0 + (x - p.x) / p.w * (v.c1 - v.c0), 'columns');
  }, { passive: false });

  let drag = null;
  canvas.addEventListener('pointerdown', (e) => {
    const [x, y] = localXY(e);
    drag = { x, y, view: { ...state.view }, moved: false };
    canvas.setPointerCapture(e.pointerId);
  });
  canvas.addEventListener('pointermove', (e) => {
    const [x, y] = localXY(e);
    if (drag) {
      const dx = x - drag.x, dy = y - drag.y;
      if (Math.abs(dx) + Math.abs(dy) > 3) drag.moved = true;
      if (drag.moved) {
        canvas.classList.add('dragging'); tooltip.hidden = true;
        const p = plot(), v = drag.view, dc = dx / p.w * (v.c1 - v.c0), dl = dy / p.h * (v.l1 - v.l0);
        setView({ c0: v.c0 - dc, c1: v.c1 - dc, l0: v.l0 + dl, l1: v.l1 + dl });
        return;
      }
    }
    const hit = cellUnder(x, y);
    if (hit) showTooltip(e.clientX, e.clientY, hit); else tooltip.hidden = true;
  });
  canvas.addEventListener('pointerup', (e) => {
    const [x, y] = localXY(e);
    if (drag && !drag.moved) {
      const hit = cellUnder(x, y);
      if (hit) { state.selCol = hit.column; state.selLayer = hit.layer; requestDraw(); drawPanels(); }
    }
    drag = null; canvas.classList.remove('dragging');
  });
  canvas.addEventListener('pointerleave', () => { if (!drag) tooltip.hidden = true; });
  canvas.addEventListener('dblclick', () => { if (state.cur) setView(fullView(state.cur)); });

  $('lm-problem').addEventListener('change', (e) => selectIndices(Number(e.target.value), 0));
  $('lm-handoff').addEventListener('change', (e) => selectIndices(state.problem, Number(e.target.value)));
  $('lm-cmap').addEventListener('change', (e) => { state.cmap = e.target.value; draw(); });
  $('lm-scale').addEventListener('change', (e) => { state.scale = e.target.value; draw(); drawPanels(); });
  $('lm-zoom-in').addEventListener('click', () => zoomAt(0.5));
  $('lm-zoom-out').addEventListener('click', () => zoomAt(2));
  $('lm-reset').addEventListener('click', () => setView(fullView(state.cur)));
  window.addEventListener('resize', () => { resize(); draw(); drawPanels(); });

  // -- start -------------------------------------------------------------------------------------------------
  fillSelect($('lm-problem'), META.problems.map((p, i) => [i, `${p.number}${p.correct === true ? ' ✓' : p.correct === false ? ' ✗' : ''}`]));
  fillSelect($('lm-cmap'), Object.keys(PALETTES).map((n) => [n, n]));
  $('lm-cmap').value = state.cmap;
  $('lm-run').textContent = [META.source, META.model, META.method, `similarity ${META.mode}`].filter(Boolean).join(' · ');
  resize();
  selectIndices(0, 0);
  const ready = nextFrame().then(() => selection());

  const api = {
    version: 1,
    ready,
    get selection() { return selection(); },
    get problems() {
      return META.problems.map((p) => ({
        number: p.number, question: p.question, gold: p.gold, prediction: p.prediction, correct: p.correct,
        handoffs: p.handoffs.map((h) => ({ name: h.name, index: h.index, occurrence: h.occurrence, numColumns: h.columns })),
      }));
    },
    get view() { return { ...state.view }; },
    get stats() { return { ...state.stats }; },
    /** Show problem `problem` (its number) and its hand-off `handoff` (place in the list, or name); resolves once drawn. */
    select(problem, handoff = 0) {
      const pi = findProblem(problem);
      selectIndices(pi, findHandoff(pi, handoff));
      return nextFrame().then(() => selection());
    },
    /** {value, token, position, segment, gapBefore} of the current hand-off's cell. */
    cellAt(layer, column) {
      const h = state.cur;
      if (!(Number.isInteger(layer) && Number.isInteger(column) && layer >= 0 && layer < h.L && column >= 0 && column < h.T)) {
        throw new Error(`no cell (${layer}, ${column}): the hand-off has ${h.L} layers and ${h.T} columns`);
      }
      return cell(h, layer, column);
    },
    /** [{column, removed}] where kNN filtering removed cache positions (before that column). */
    gaps() { return state.cur.raw.gaps.map(([column, removed]) => ({ column, removed })); },
    /** Show columns [c0, c1) and layers [l0, l1) (defaults: all); resolves once drawn. */
    zoom(c0, c1, l0 = 0, l1 = state.cur.L) { state.view = clampView({ c0, c1, l0, l1 }, state.cur); draw(); return nextFrame().then(() => ({ ...state.view })); },
    /** The centre of a cell in client (viewport) coordinates, or null when it is not in view. */
    cellCenter(layer, column) {
      const r = canvas.getBoundingClientRect(), v = state.view;
      if (column < v.c0 || column + 1 > v.c1 + 1e-9 || layer < v.l0 || layer + 1 > v.l1 + 1e-9) return null;
      return { x: r.left + xOf(column + 0.5), y: r.top + (yOf(layer) + yOf(layer + 1)) / 2 };
    },
    setColormap(name) { if (!PALETTES[name]) throw new Error(`no colormap ${name} (have ${Object.keys(PALETTES).join(', ')})`); state.cmap = name; $('lm-cmap').value = name; draw(); },
    setScale(mode) { if (!['fixed', 'layer', 'handoff'].includes(mode)) throw new Error(`no scale ${mode} (fixed, layer, handoff)`); state.scale = mode; $('lm-scale').value = mode; draw(); drawPanels(); },
    /** Draw the current view once, synchronously; returns its time in ms (for benchmarks). */
    redraw() { return draw(); },
  };
  Object.defineProperty(window, 'latentmasViewer', { value: Object.freeze(api), writable: false, configurable: false });
})();
