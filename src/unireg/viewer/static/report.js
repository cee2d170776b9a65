// unireg's registration report: three linked NiiVue views (fixed, moving before, warped over
// fixed) with overlays, and the metrics, label and settings tables. Everything the page needs
// is inlined; it makes no network request.
(function () {
  "use strict";
  const state = (window.unireg = { ready: false, errors: [], firstDrawMs: null, views: {} });
  const report = (msg) => {
    state.errors.push(String(msg));
    const box = document.getElementById("errors");
    if (box) { box.textContent = state.errors.join("\n"); box.hidden = false; }
  };
  window.addEventListener("error", (e) => report(e.message || e));
  window.addEventListener("unhandledrejection", (e) => report(e.reason));

  const data = JSON.parse(document.getElementById("unireg-data").textContent);
  const NV = window.niivue;
  const el = (tag, attrs = {}, ...kids) => {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (k === "text") e.textContent = v; else if (k === "html") e.innerHTML = v; else e.setAttribute(k, v);
    }
    for (const k of kids) if (k) e.append(k);
    return e;
  };
  const fmt = (v) => {
    if (v === null || v === undefined) return "–";
    if (typeof v === "number") return Number.isInteger(v) ? String(v) : (Math.abs(v) >= 1000 || Math.abs(v) < 0.001 && v !== 0 ? v.toExponential(3) : v.toFixed(4));
    if (typeof v === "object") return JSON.stringify(v);
    return String(v);
  };
  // a colour per label value: golden-ratio hues, fixed by the value alone
  const labelColour = (k) => {
    const h = (k * 0.6180339887) % 1, s = 0.75, l = 0.55;
    const f = (n) => { const a = s * Math.min(l, 1 - l); const t = (n + h * 12) % 12;
      return Math.round(255 * (l - a * Math.max(-1, Math.min(t - 3, 9 - t, 1)))); };
    return [f(0), f(8), f(4)];
  };

  // ---- layout -------------------------------------------------------------------------
  const app = document.getElementById("app");
  const m = data.metrics || {};
  const headline = [];
  if (m.dice_mean !== undefined) headline.push(`mean Dice ${fmt(m.dice_mean)}`);
  if (m.folding_percent !== undefined) headline.push(`folding ${fmt(m.folding_percent)} %`);
  if (m.time_s !== undefined) headline.push(`${fmt(m.time_s)} s`);
  app.append(el("header", {}, el("h1", { text: data.title }),
    el("span", { class: "sub", text: [(data.settings || {}).spec, ...headline].filter(Boolean).join(" · ") }),
    el("span", { class: "sub", text: `NiiVue ${data.niivue} · world RAS mm` })));
  const errors = el("pre", { id: "errors", hidden: "" });
  errors.style.color = "#f66";
  app.append(errors);

  const controls = el("div", { class: "controls" });
  const plane = el("select", { id: "plane" });
  for (const [v, t] of [["multi", "multiplanar"], ["axial", "axial"], ["coronal", "coronal"], ["sagittal", "sagittal"], ["render", "3D"]]) plane.append(el("option", { value: v, text: t }));
  if (data.ndim === 2) plane.value = "axial";
  const fade = el("input", { id: "fade", type: "range", min: "0", max: "100", value: "50" });
  const check = (id, text, on) => { const c = el("input", { id, type: "checkbox" }); c.checked = !!on; return [c, el("label", {}, c, text)]; };
  const [checker, checkerL] = check("checker", "checkerboard", false);
  const [outline, outlineL] = check("outline", "fixed label outlines", true);
  const [jac, jacL] = check("jacobian", "Jacobian (log2 det)", false);
  const [folds, foldsL] = check("folds", `folded voxels (${data.folded_voxels})`, true);
  const [gridC, gridL] = check("grid", `deformation grid (${data.grid_mm} mm)`, false);
  const [kpC, kpL] = check("keypoints", "keypoints", true);
  controls.append(el("label", {}, "view ", plane), el("label", {}, "fade: fixed ", fade, " warped"), checkerL);
  if (data.volumes.outline) controls.append(outlineL);
  controls.append(jacL, foldsL, gridL);
  if (data.keypoints) controls.append(kpL);
  controls.append(el("span", { class: "legend", text: "click a view to move the crosshair in all three; Jacobian: blue-green shrinks, red-yellow grows (by over 11 %), red voxels fold; grid: white" }));
  app.append(controls);

  const views = el("div", { class: "views" });
  const panel = (id, title) => {
    const c = el("canvas", { id });
    views.append(el("div", { class: "view" }, el("h2", { text: title }), el("div", { class: "canvas" }, c)));
    return c;
  };
  const cF = panel("view-fixed", "fixed");
  const cM = panel("view-moving", "moving (before registration)");
  const cW = panel("view-warped", "warped over fixed (fade, checkerboard, overlays)");
  app.append(views);
  const location = el("div", { id: "location" });
  app.append(location);

  // ---- tables -------------------------------------------------------------------------
  const tables = el("div", { class: "tables" });
  const kv = (obj) => {
    const t = el("table");
    for (const [k, v] of Object.entries(obj)) {
      let text = fmt(v);
      if (k === "inputs" && v && typeof v === "object") {  // one line per input file
        text = Object.entries(v).map(([name, r]) => `${name}: ${r && r.path ? r.path : fmt(r)}`).join("\n");
      } else if (k === "command" && Array.isArray(v)) {
        text = v.join(" ");
      }
      t.append(el("tr", {}, el("td", { text: k }), el("td", { class: typeof v === "number" ? "num" : "pre", text })));
    }
    return t;
  };
  tables.append(el("div", {}, el("h3", { text: "metrics" }), el("div", { class: "scroll" }, kv(data.metrics || {}))));
  const labelBox = el("div", {});
  if (data.labels && data.labels.length) {
    const t = el("table", { id: "labels" });
    const named = data.labels.some((r) => r.name);
    t.append(el("tr", {}, el("th", { text: "label" }), named ? el("th", { text: "name" }) : null, el("th", { class: "num", text: "Dice" }), el("th", { class: "num", text: "HD95 mm" })));
    for (const r of data.labels) {
      const [R, G, B] = labelColour(r.label);
      const sw = el("span", { class: "swatch" }); sw.style.background = `rgb(${R},${G},${B})`;
      const bar = el("span", { class: "bar" }); bar.style.width = `${Math.round(60 * (r.dice || 0))}px`;
      const row = el("tr", { "data-label": String(r.label) }, el("td", {}, sw, String(r.label)),
        named ? el("td", { class: "name", text: r.name || "" }) : null,
        el("td", { class: "num" }, bar, " ", fmt(r.dice)), el("td", { class: "num", text: fmt(r.hd95) }));
      row.addEventListener("click", () => selectLabel(r, row));
      t.append(row);
    }
    labelBox.append(el("h3", { text: "labels, worst Dice first (click: go to it and show its outline alone; again: all)" }), el("div", { class: "scroll" }, t));
  }
  if (data.keypoints) {
    const t = el("table", { id: "keypoints" });
    t.append(el("tr", {}, el("th", { text: "keypoint" }), el("th", { class: "num", text: "residual mm" })));
    data.keypoints.residual_mm.forEach((r, i) => {
      const row = el("tr", {}, el("td", { text: String(i) }), el("td", { class: "num", text: fmt(r) }));
      row.addEventListener("click", () => moveTo(data.keypoints.fixed[i]));
      t.append(row);
    });
    labelBox.append(el("h3", { text: "keypoints, click to go to one (yellow: detected; on the moving image, cyan: where the transform sends the fixed keypoint, joined to its pair by a white line)" }), el("div", { class: "scroll" }, t));
  }
  tables.append(labelBox);
  tables.append(el("div", {}, el("h3", { text: "method and settings" }), el("div", { class: "scroll" }, kv(data.settings || {}))));
  app.append(tables);

  // ---- views --------------------------------------------------------------------------
  const options = {
    backColor: [0, 0, 0, 1], crosshairColor: [1, 0.1, 0.1, 1], show3Dcrosshair: true, isColorbar: false,
    multiplanarShowRender: NV.SHOW_RENDER.NEVER, multiplanarLayout: NV.MULTIPLANAR_TYPE.GRID,
    isRadiologicalConvention: false, loadingText: "", logLevel: "warn",
  };
  // NiiVue rounds any value above the table's start up to its second entry (2/256 of the
  // table), which would paint 0 in a label's colour in tables of over 128 labels: transparent
  // entries below 0 keep 0 on a transparent entry
  const lut = (entries) => {
    const top = Math.max(...entries.map((e) => e[0]));
    const pad = [];
    for (let k = Math.ceil((top + 1) / 100) + 1; k > 0; k--) pad.push([-k, [0, 0, 0], 0]);
    const all = [...pad, ...entries];
    return { R: all.map((e) => e[1][0]), G: all.map((e) => e[1][1]), B: all.map((e) => e[1][2]), A: all.map((e) => e[2]), I: all.map((e) => e[0]),
      labels: all.map((e) => e[3] || "") };
  };
  const gridLut = (hidden) => lut([[0, [0, 0, 0], 0], ...[1, 2, 3].map((v) => [v, [235, 235, 235], hidden === v ? 0 : 255, `grid ${"RAS"[v - 1]}`])]);
  // keypoint markers: 1 detected (yellow), 2 a fixed keypoint mapped by the transform (cyan),
  // 3 the line between a pair (white); a colour map of steps, not a label table (NiiVue shows
  // one label-table overlay over another badly)
  NV.cmapper.addColormap("unireg-markers", { R: [0, 255, 255, 0, 0, 230, 230], G: [0, 220, 220, 230, 230, 230, 230],
    B: [0, 0, 0, 255, 255, 230, 230], A: [0, 255, 255, 255, 255, 255, 255], I: [0, 1, 84, 86, 169, 171, 255] });
  const markers = { colormap: "unireg-markers", cal_min: 0.5, cal_max: 3.5 };
  let selected = null;
  const maxLabel = Math.max(1, ...(data.labels || []).map((r) => r.label));
  // every label's outline, or the selected label's alone (NiiVue draws overlays opaque)
  const outlineLut = () => lut([[0, [0, 0, 0], 0], ...(data.labels || []).map((r) => [r.label, labelColour(r.label), selected === null || selected === r.label ? 255 : 0])]);
  // the undrawn label map, read by the line under the views
  const namesLut = lut([[0, [0, 0, 0], 0], ...(data.labels || []).map((r) => [r.label, [0, 0, 0], 0])]);

  const decode = (name, extra = {}) => NV.NVImage.loadFromBase64({ base64: data.volumes[name], name: `${name}.nii.gz`, ...extra });
  async function make(canvas) {
    const nv = new NV.Niivue(options);
    await nv.attachToCanvas(canvas);
    return nv;
  }
  // add volumes to a view with one GPU upload at the end (NiiVue uploads after every add)
  function addAll(nv, images) {
    nv.updateGLVolume = () => {};
    try { for (const img of images) if (img) nv.addVolume(img); } finally { delete nv.updateGLVolume; }
    nv.updateGLVolume();
  }
  const gray = { colormap: "gray", cal_min: 0, cal_max: 255 };
  // NiiVue's table from ours; its location read-out names value v by labels[v], not by
  // labels[v - min], so the names are shifted to start at value 0
  const labelTable = (cm) => {
    const t = NV.cmapper.makeLabelLut(cm);
    if (t.labels && t.min < 0) t.labels = t.labels.slice(-t.min);
    return t;
  };
  const labelOpts = (max, cm, opacity = 1) => ({ cal_min: 0, cal_max: max, opacity, colormapLabel: labelTable(cm) });
  const vol = {};
  const outlines = {};
  async function setup() {
    const [nvF, nvM, nvW] = await Promise.all([make(cF), make(cM), make(cW)]);
    state.views = { fixed: nvF, moving: nvM, warped: nvW };
    const has = (name) => Boolean(data.volumes[name]);
    const [fixedF, outlineF, kpF, moving, kpM, fixedW, warped, checkerV, outlineW, logjac, foldsV, grid, kpW, namesF, namesW] = await Promise.all([
      decode("fixed", gray),
      has("outline") ? decode("outline", labelOpts(maxLabel, outlineLut())) : null,
      has("kp_fixed") ? decode("kp_fixed", markers) : null,
      decode("moving", gray),
      has("kp_moving") ? decode("kp_moving", markers) : null,
      decode("fixed", gray),
      decode("warped", { ...gray, opacity: 0.5 }),
      decode("fixed", { ...gray, opacity: 0 }),
      has("outline") ? decode("outline", labelOpts(maxLabel, outlineLut())) : null,
      decode("logjac", { colormap: "warm", colormapNegative: "winter", cal_min: data.logjac_min, cal_max: data.logjac_limit, opacity: 0 }),
      decode("folds", { colormap: "red", cal_min: 0.5, cal_max: 1, opacity: 1 }),
      decode("grid", labelOpts(3, gridLut(0), 0)),
      has("kp_fixed") ? decode("kp_fixed", markers) : null,
      has("labels") ? decode("labels", labelOpts(maxLabel, namesLut, 0)) : null,
      has("labels") ? decode("labels", labelOpts(maxLabel, namesLut, 0)) : null,
    ]);
    state.volumes = vol;
    // the outline arrays of each view plane, swapped into the outline volumes by applyPlane
    if (outlineF) {
      const planes = await Promise.all(["axial", "coronal", "sagittal"].map((p) => decode(`outline_${p}`)));
      outlines.multi = outlineF.img;
      outlines.render = outlineF.img;
      ["axial", "coronal", "sagittal"].forEach((p, i) => { outlines[p] = planes[i].img; });
    }
    fillChecker(checkerV, fixedW, warped);
    Object.assign(vol, { outlineF, kpF, kpM, warped, checker: checkerV, outlineW, logjac, folds: foldsV, grid, kpW, namesW });
    configurePlane();
    configureOverlays();
    addAll(nvF, [fixedF, namesF, outlineF, kpF]);
    addAll(nvM, [moving, kpM]);
    addAll(nvW, [fixedW, warped, checkerV, namesW, outlineW, logjac, foldsV, grid, kpW]);
    nvF.broadcastTo([nvM, nvW], { "2d": true, "3d": true });
    nvM.broadcastTo([nvF, nvW], { "2d": true, "3d": true });
    nvW.broadcastTo([nvF, nvM], { "2d": true, "3d": true });
    for (const nv of Object.values(state.views)) nv.onLocationChange = () => readout();
    hover(nvF, cF);
    hover(nvW, cW);
    readout();
    for (const nv of [nvF, nvM, nvW]) nv.setSliceType(sliceType());
  }

  // the line under the views: the crosshair in world mm, the fixed label there with its
  // Dice, the Jacobian determinant and whether the map folds there
  const labelText = {};
  for (const r of data.labels || []) labelText[r.label] = `label ${r.label}` + (r.name ? ` ${r.name}` : "") + (r.dice === null ? "" : `, Dice ${r.dice.toFixed(3)}`);
  function readout(at_mm = null, prefix = "") {
    const nv = state.views.warped;
    const mm = at_mm || nv.frac2mm(nv.scene.crosshairPos);
    const at = (img) => { const v = img.mm2vox([mm[0], mm[1], mm[2]]); return img.getValue(v[0], v[1], v[2]); };
    const parts = [`R ${mm[0].toFixed(1)}  A ${mm[1].toFixed(1)}  S ${mm[2].toFixed(1)} mm`];
    if (vol.namesW) { const k = Math.round(at(vol.namesW)); parts.push(k ? (labelText[k] || `label ${k}`) : "no label"); }
    const lj = at(vol.logjac);
    parts.push(`Jacobian det ${Math.pow(2, lj).toFixed(2)}` + (Math.abs(lj) >= data.logjac_limit ? " (or beyond)" : ""));
    if (at(vol.folds) > 0.5) parts.push("folded here");
    location.textContent = prefix + parts.join("  ·  ");
  }
  // the same read-out under the pointer, over the fixed and the warped views
  function hover(nv, canvas) {
    canvas.addEventListener("mousemove", (e) => {
      const dpr = nv.uiData && nv.uiData.dpr ? nv.uiData.dpr : window.devicePixelRatio || 1;
      const frac = nv.canvasPos2frac([e.offsetX * dpr, e.offsetY * dpr]);
      if (!frac || frac[0] < 0) { readout(); return; }
      readout(nv.frac2mm(frac), "pointer: ");
    });
    canvas.addEventListener("mouseleave", () => readout());
  }

  // fixed and warped in alternating blocks of data.checker_block voxels (NIfTI order: x fastest)
  function fillChecker(out, a, b) {
    const [nx, ny, nz] = [a.hdr.dims[1], a.hdr.dims[2], Math.max(1, a.hdr.dims[3])];
    const [bx, by, bz] = data.checker_block;
    for (let z = 0, i = 0; z < nz; z++) for (let y = 0; y < ny; y++) for (let x = 0; x < nx; x++, i++) {
      out.img[i] = (Math.floor(x / bx) + Math.floor(y / by) + Math.floor(z / bz)) % 2 ? b.img[i] : a.img[i];
    }
  }

  const sliceType = () => ({ render: NV.SLICE_TYPE.RENDER, multi: NV.SLICE_TYPE.MULTIPLANAR, axial: NV.SLICE_TYPE.AXIAL, coronal: NV.SLICE_TYPE.CORONAL, sagittal: NV.SLICE_TYPE.SAGITTAL }[plane.value]);
  // the volumes' settings for the chosen plane, without a GPU upload: grid sheets lying in
  // the viewed plane are hidden (axial: S, coronal: A, sagittal: R); the outlines of that plane
  function configurePlane() {
    const hidden = { render: 0, multi: 0, axial: 3, coronal: 2, sagittal: 1 }[plane.value];
    vol.grid.colormapLabel = labelTable(gridLut(hidden));
    for (const v of [vol.outlineF, vol.outlineW]) if (v) v.img = outlines[plane.value];
  }
  // the overlays' visibility from the controls, without a GPU upload
  function configureOverlays() {
    const f = Number(fade.value) / 100;
    const set = (v, o) => { if (v) v.opacity = o; };
    set(vol.warped, checker.checked ? 0 : f);
    set(vol.checker, checker.checked ? 1 : 0);
    set(vol.logjac, jac.checked ? 0.6 : 0);
    set(vol.folds, folds.checked ? 1 : 0);
    set(vol.grid, gridC.checked ? 0.9 : 0);
    for (const v of [vol.kpF, vol.kpM, vol.kpW]) set(v, kpC.checked ? 1 : 0);
    const cm = outlineLut();
    for (const v of [vol.outlineF, vol.outlineW]) if (v) { v.colormapLabel = labelTable(cm); v.opacity = outline.checked ? 1 : 0; }
  }
  function applyPlane() {
    configurePlane();
    configureOverlays();
    for (const nv of Object.values(state.views)) { nv.setSliceType(sliceType()); nv.updateGLVolume(); }
  }
  // one GPU upload per view whose overlays changed
  function applyOverlays() {
    configureOverlays();
    const changed = [state.views.warped, ...(vol.outlineF || vol.kpF ? [state.views.fixed] : []), ...(vol.kpM ? [state.views.moving] : [])];
    for (const nv of changed) nv.updateGLVolume();
  }
  // the fade slider and the checkerboard change the warped view alone
  function applyOverlaysWarped() {
    configureOverlays();
    state.views.warped.updateGLVolume();
  }

  function moveTo(mm) {
    if (!mm) return;
    for (const nv of Object.values(state.views)) {
      nv.scene.crosshairPos = nv.mm2frac([mm[0], mm[1], mm[2] || 0]);
      nv.drawScene();
    }
    readout();
  }
  state.moveTo = moveTo;  // world RAS mm, for scripts driving the page
  function selectLabel(r, row) {
    document.querySelectorAll("#labels tr.selected").forEach((x) => x.classList.remove("selected"));
    if (selected === r.label) { selected = null; } else { selected = r.label; row.classList.add("selected"); outline.checked = true; moveTo(r.centre); }
    applyOverlays();
  }
  for (const c of [fade, checker]) c.addEventListener("input", applyOverlaysWarped);
  for (const c of [outline, jac, folds, gridC, kpC]) c.addEventListener("input", () => applyOverlays());
  plane.addEventListener("change", applyPlane);
  gridC.addEventListener("change", () => { if (gridC.checked && plane.value === "multi") { plane.value = "axial"; applyPlane(); } });

  setup().then(() => new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)))).then(() => {
    state.firstDrawMs = performance.now();
    state.ready = true;
  }).catch(report);
})();
