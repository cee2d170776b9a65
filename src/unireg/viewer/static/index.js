// unireg's evaluation index: the summary table, the plots and every case with a link to its
// report page. Inlined and offline, like the report pages.
(function () {
  "use strict";
  const state = (window.unireg = { ready: false, errors: [] });
  window.addEventListener("error", (e) => state.errors.push(String(e.message || e)));
  const data = JSON.parse(document.getElementById("unireg-data").textContent);
  const el = (tag, attrs = {}, ...kids) => {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) { if (k === "text") e.textContent = v; else e.setAttribute(k, v); }
    for (const k of kids) if (k) e.append(k);
    return e;
  };
  const fmt = (v) => (v === null || v === undefined ? "–" : typeof v === "number" ? (Number.isInteger(v) ? String(v) : v.toFixed(4)) : String(v));
  // a sortable table of objects: click a header to sort by it (again: the other way)
  function table(rows, columns, cell) {
    const t = el("table");
    const head = el("tr");
    let key = null, dir = 1;
    const body = el("tbody");
    const fill = () => {
      body.replaceChildren();
      const order = rows.map((r, i) => i);
      if (key !== null) order.sort((a, b) => {
        const x = rows[a][key], y = rows[b][key];
        if (x === y) return 0; if (x === null || x === undefined) return 1; if (y === null || y === undefined) return -1;
        return (x < y ? -1 : 1) * dir;
      });
      for (const i of order) body.append(el("tr", {}, ...columns.map((c) => cell(rows[i], c, i))));
    };
    for (const c of columns) {
      const th = el("th", { class: "sortable", text: c });
      th.addEventListener("click", () => { dir = key === c ? -dir : 1; key = c; fill(); });
      head.append(th);
    }
    t.append(el("thead", {}, head), body);
    fill();
    return t;
  }
  const plain = (r, c) => el("td", { class: typeof r[c] === "number" ? "num" : "", text: fmt(r[c]) });
  const app = document.getElementById("app");
  app.append(el("header", {}, el("h1", { text: data.title }), el("span", { class: "sub", text: `${data.rows.length} registrations` })));
  const sumCols = data.summary.length ? Object.keys(data.summary[0]).filter((k) => !k.endsWith("_std")) : [];
  const box = el("div", { class: "index" });
  box.append(el("h3", { text: "summary (mean per method, shift and angle)" }), table(data.summary, sumCols, plain));
  const plots = el("div");
  for (const [name, b64] of Object.entries(data.plots)) plots.append(el("img", { class: "plot", alt: name, src: `data:image/png;base64,${b64}` }));
  box.append(plots);
  const caseCols = data.rows.length ? ["page", ...Object.keys(data.rows[0])] : [];
  const rows = data.rows.map((r, i) => ({ page: data.links[i], ...r }));
  box.append(el("h3", { text: "every registration (click a header to sort; the page shows it in NiiVue)" }),
    el("div", { class: "scroll tall" }, table(rows, caseCols, (r, c) => (c === "page" ? el("td", {}, r.page ? el("a", { href: r.page, text: "view" }) : "–") : plain(r, c)))));
  if (Object.keys(data.settings).length) {
    const t = el("table");
    for (const [k, v] of Object.entries(data.settings)) t.append(el("tr", {}, el("td", { text: k }), el("td", { text: typeof v === "object" ? JSON.stringify(v) : fmt(v) })));
    box.append(el("h3", { text: "run" }), t);
  }
  app.append(box);
  state.ready = true;
})();
