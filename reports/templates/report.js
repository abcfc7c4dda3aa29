// safequant report: sortable tables and the flips browser. No network, no eval, no innerHTML:
// every value from the run is set with textContent, so model output stays text.
(function () {
  "use strict";
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  // Sortable tables: a click on a header with data-col sorts the body rows by that cell's data-v
  // (numbers numerically, empty last), a second click reverses.
  document.querySelectorAll("table.sortable").forEach(function (table) {
    var body = table.tBodies[0];
    table.querySelectorAll("th[data-col]").forEach(function (th) {
      th.tabIndex = 0;
      th.setAttribute("role", "button");
      var sort = function () {
        var col = +th.getAttribute("data-col");
        var asc = th.getAttribute("aria-sort") !== "ascending";
        table.querySelectorAll("th[aria-sort]").forEach(function (h) { h.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", asc ? "ascending" : "descending");
        var rows = Array.prototype.slice.call(body.rows);
        var key = function (r) {
          var c = r.cells[col];
          var v = c ? (c.getAttribute("data-v") !== null ? c.getAttribute("data-v") : c.textContent.trim()) : "";
          var n = parseFloat(v);
          return { empty: v === "", num: !isNaN(n) && isFinite(+v), n: n, s: v.toLowerCase() };
        };
        rows.sort(function (a, b) {
          var x = key(a), y = key(b);
          if (x.empty !== y.empty) return x.empty ? 1 : -1;
          var d = (x.num && y.num) ? x.n - y.n : (x.s < y.s ? -1 : x.s > y.s ? 1 : 0);
          return asc ? d : -d;
        });
        rows.forEach(function (r) { body.appendChild(r); });
      };
      th.addEventListener("click", sort);
      th.addEventListener("keydown", function (ev) { if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); sort(); } });
    });
  });

  // Flips browser: data from <script type="application/json" id="flips-data">, one page at a time.
  var src = document.getElementById("flips-data");
  var root = document.getElementById("flips-browser");
  if (!src || !root) return;
  var data = JSON.parse(src.textContent);
  if (!data.flips) return;
  var form = root.querySelector("form");
  var list = root.querySelector(".flip-list");
  var status = root.querySelector(".flip-status");
  var prev = root.querySelector("button.prev"), next = root.querySelector("button.next");
  var page = 0;

  function fill(select, values, labels) {
    values.forEach(function (v, i) {
      var o = document.createElement("option");
      o.value = String(v);
      o.textContent = labels ? labels[i] : String(v);
      select.appendChild(o);
    });
  }
  function uniq(idx) {
    var seen = {};
    Object.keys(data.prompts).forEach(function (k) { seen[data.prompts[k][idx]] = 1; });
    return Object.keys(seen).sort();
  }
  fill(form.elements.variant, data.variants);
  fill(form.elements.benchmark, uniq(3));
  fill(form.elements.category, uniq(4));
  fill(form.elements.direction, [0, 1], data.directions);

  function matches(f) {
    var p = data.prompts[f[0]];
    var e = form.elements;
    if (e.variant.value && f[1] !== e.variant.value) return false;
    if (e.benchmark.value && p[3] !== e.benchmark.value) return false;
    if (e.category.value && p[4] !== e.category.value) return false;
    if (e.direction.value !== "" && String(f[2]) !== e.direction.value) return false;
    var q = e.search.value.trim().toLowerCase();
    if (q && (p[0] + "\n" + p[1] + "\n" + f[3]).toLowerCase().indexOf(q) < 0) return false;
    return true;
  }
  function labels(values) {
    var box = el("div", "judges");
    data.judges.forEach(function (j, i) {
      var t = el("span", "judge-label " + (values[i] === "refusal" ? "refusal" : "other"));
      t.textContent = j + ": " + (values[i] || "–");
      box.appendChild(t);
    });
    return box;
  }
  function response(title, text, judgeLabels) {
    var col = el("div", "flip-col");
    col.appendChild(el("div", "flip-col-title", title));
    col.appendChild(el("pre", "response" + (text ? "" : " empty-response"), text || "(empty response)"));
    col.appendChild(labels(judgeLabels));
    return col;
  }
  function render() {
    var shown = data.flips.filter(matches);
    var size = data.page || 100;
    var pages = Math.max(1, Math.ceil(shown.length / size));
    if (page >= pages) page = pages - 1;
    list.textContent = "";
    var frag = document.createDocumentFragment();
    shown.slice(page * size, (page + 1) * size).forEach(function (f) {
      var p = data.prompts[f[0]];
      var item = el("article", "flip " + (f[2] === 0 ? "lost" : "gained"));
      var head = el("div", "head");
      head.appendChild(el("span", "dir", data.directions[f[2]]));
      head.appendChild(el("strong", null, f[1]));
      head.appendChild(el("span", "mono", f[0]));
      if (p[3]) head.appendChild(el("span", "tag", p[3]));
      if (p[4]) head.appendChild(el("span", "tag", p[4]));
      if (p[5]) head.appendChild(el("span", "tag", p[5]));
      item.appendChild(head);
      item.appendChild(el("p", "prompt", p[0]));
      var cols = el("div", "flip-cols");
      cols.appendChild(response(data.reference + " (reference)", p[1], p[2]));
      cols.appendChild(response(f[1], f[3], f[4]));
      item.appendChild(cols);
      frag.appendChild(item);
    });
    list.appendChild(frag);
    status.textContent = shown.length + " of " + data.flips.length + " flips" +
      (shown.length ? " · page " + (page + 1) + " of " + pages : "");
    prev.disabled = page === 0;
    next.disabled = page >= pages - 1;
  }
  form.addEventListener("input", function () { page = 0; render(); });
  form.addEventListener("submit", function (ev) { ev.preventDefault(); });
  prev.addEventListener("click", function () { page -= 1; render(); root.scrollIntoView(); });
  next.addEventListener("click", function () { page += 1; render(); root.scrollIntoView(); });
  render();
})();
