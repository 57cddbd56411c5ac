// grmpiqa web page: pick or drop images, POST them to /v1/score, show sorted results.
// Plain JavaScript, no build step, no third-party code; everything is served by the app.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const state = { items: [], models: null, scale: null, seq: 0 };

  function fmt(v, digits) {
    return v === null || v === undefined ? "" : Number(v).toFixed(digits);
  }

  function currentModel() {
    if (!state.models) return null;
    const name = $("checkpoint").value || state.models.default;
    return state.models.models.find((m) => m.name === name) || state.models.models[0];
  }

  function describeModel() {
    const m = currentModel();
    if (!m) return;
    const ck = m.checkpoint ? `, checkpoint ${m.checkpoint.file}` : "";
    $("model").textContent = `Model: ${m.description}${ck} (grmpiqa ${m.version})`;
    const warn = $("random-warning");
    if (m.random_weights) {
      warn.textContent = "Warning: this model has RANDOM backbone weights; its scores carry " +
        "no learned quality knowledge (tests and demos only).";
      warn.hidden = false;
    } else if (m.warning || m.note) {
      warn.textContent = (m.warning ? "Warning: " + m.warning : "Note: " + m.note);
      warn.hidden = false;
    } else {
      warn.hidden = true;
    }
    state.scale = m.scale;
    $("scale-note").textContent = m.scale
      ? `; MOS is on the scale of ${m.scale.source || "the training data"}: ` +
        `${m.scale.name} ${m.scale.lo}-${m.scale.hi}, ` +
        (m.scale.higher_is_better ? "higher is better" : "lower is better")
      : "";
  }

  async function loadModels() {
    try {
      const r = await fetch("/v1/models");
      state.models = await r.json();
    } catch (e) {
      $("model").textContent = "Could not reach the service: " + e;
      return;
    }
    const sel = $("checkpoint");
    for (const m of state.models.models) {
      const o = document.createElement("option");
      o.value = m.name;
      o.textContent = m.name + (m.random_weights ? " (random weights)" : "");
      sel.appendChild(o);
    }
    sel.value = state.models.default;
    $("checkpoint-row").hidden = state.models.models.length < 2;
    describeModel();
  }

  // cividis (matplotlib): dark blue (low) -> grey -> yellow (high), relative to the map's
  // own min..max; safe for colour-vision deficiencies, lightness rises monotonically.
  const CIVIDIS = [[0, 34, 78], [26, 56, 111], [67, 78, 108], [97, 101, 111], [125, 124, 120],
    [155, 148, 118], [188, 174, 108], [222, 201, 88], [254, 232, 56]];
  function colour(t) {
    t = Math.min(1, Math.max(0, t)) * (CIVIDIS.length - 1);
    const k = Math.min(CIVIDIS.length - 2, Math.floor(t));
    const u = t - k;
    return CIVIDIS[k].map((c, i) => Math.round(c + (CIVIDIS[k + 1][i] - c) * u));
  }

  function drawMap(canvas, map) {
    canvas.width = map.cols;
    canvas.height = map.rows;
    const ctx = canvas.getContext("2d");
    const img = ctx.createImageData(map.cols, map.rows);
    const span = map.max > map.min ? map.max - map.min : 1;
    for (let r = 0; r < map.rows; r++) {
      for (let c = 0; c < map.cols; c++) {
        const [R, G, B] = colour((map.grid[r][c] - map.min) / span);
        const o = 4 * (r * map.cols + c);
        img.data[o] = R; img.data[o + 1] = G; img.data[o + 2] = B; img.data[o + 3] = 255;
      }
    }
    ctx.putImageData(img, 0, 0);
    const [x0, y0, x1, y1] = map.box;
    canvas.style.left = `${x0 * 100}%`;
    canvas.style.top = `${y0 * 100}%`;
    canvas.style.width = `${(x1 - x0) * 100}%`;
    canvas.style.height = `${(y1 - y0) * 100}%`;
  }

  function render() {
    const list = $("results");
    list.textContent = "";
    const sorted = state.items.slice().sort((a, b) => {
      if (a.score === null && b.score === null) return a.seq - b.seq;
      if (a.score === null) return 1;
      if (b.score === null) return -1;
      return b.score - a.score || a.seq - b.seq;
    });
    let rank = 0;
    for (const it of sorted) {
      const li = document.createElement("li");
      li.className = "result" + (it.error ? " failed" : "");
      li.dataset.name = it.name;
      if (it.score !== null) li.dataset.score = String(it.score);
      const fig = document.createElement("figure");
      const thumb = document.createElement("div");
      thumb.className = "thumb";
      if (it.url) {
        const img = document.createElement("img");
        img.src = it.url;
        img.alt = it.name;
        thumb.appendChild(img);
      }
      if (it.map) {
        const cv = document.createElement("canvas");
        cv.className = "map";
        cv.setAttribute("aria-hidden", "true");
        drawMap(cv, it.map);
        thumb.appendChild(cv);
      }
      fig.appendChild(thumb);
      const cap = document.createElement("figcaption");
      const name = document.createElement("p");
      name.className = "name";
      name.textContent = it.name;
      cap.appendChild(name);
      if (it.error) {
        const e = document.createElement("p");
        e.className = "error";
        e.textContent = "Not scored: " + it.error;
        cap.appendChild(e);
      } else {
        rank += 1;
        const s = document.createElement("p");
        s.className = "score";
        s.innerHTML = "";
        s.append(`score ${fmt(it.score, 4)} `);
        const rk = document.createElement("span");
        rk.className = "rank";
        rk.textContent = `#${rank}`;
        s.appendChild(rk);
        cap.appendChild(s);
        if (it.mos !== null && it.mos !== undefined) {
          const m = document.createElement("p");
          m.className = "mos";
          m.textContent = `${(it.scaleName || "MOS")} ${fmt(it.mos, 1)}`;
          cap.appendChild(m);
        }
        if (it.map) {
          const mi = document.createElement("p");
          mi.className = "mapinfo";
          mi.textContent = `map mean ${fmt(it.map.mean, 3)} (${fmt(it.map.min, 3)}-${fmt(it.map.max, 3)})`;
          cap.appendChild(mi);
        }
      }
      fig.appendChild(cap);
      li.appendChild(fig);
      list.appendChild(li);
    }
    const any = state.items.length > 0;
    $("csv").disabled = !any;
    $("clear").disabled = !any;
    $("legend").hidden = !($("show-maps").checked && any);
  }

  async function upload(files) {
    files = Array.from(files || []);
    if (!files.length) return;
    const m = currentModel();
    const params = new URLSearchParams({ map: "true" });
    if (m) params.set("checkpoint", m.name);
    if (state.scale) params.set("scale", "mos");
    const form = new FormData();
    for (const f of files) form.append("image", f, f.name);
    $("status").textContent = `Scoring ${files.length} image${files.length > 1 ? "s" : ""}…`;
    let doc;
    try {
      const r = await fetch("/v1/score?" + params.toString(), { method: "POST", body: form });
      doc = await r.json();
      if (!doc.results) {
        $("status").textContent = `The service refused the request (${r.status}): ${doc.error}`;
        return;
      }
    } catch (e) {
      $("status").textContent = "Request failed: " + e;
      return;
    }
    const scaleName = doc.model && doc.model.scale ? doc.model.scale.name : null;
    doc.results.forEach((res, i) => {
      state.items.push({
        seq: state.seq++,
        name: res.name,
        score: res.score,
        mos: res.mos === undefined ? null : res.mos,
        scaleName: scaleName,
        error: res.error,
        map: res.map || null,
        url: res.error ? null : URL.createObjectURL(files[i]),
        model: doc.model ? doc.model.name : "",
      });
    });
    const bad = doc.results.filter((x) => x.error).length;
    const ok = doc.results.length - bad;
    $("status").textContent = `Scored ${ok} image${ok === 1 ? "" : "s"}` +
      (bad ? `; ${bad} could not be read.` : ".") + ` ${state.items.length} in the list.`;
    render();
  }

  function csvCell(v) {
    const s = v === null || v === undefined ? "" : String(v);
    return /[",\n\r]/.test(s) ? '"' + s.replace(/"/g, '""') + '"' : s;
  }

  function downloadCsv() {
    const rows = [["name", "score", "mos", "map_mean", "model", "error"]];
    const sorted = state.items.slice().sort((a, b) => (b.score ?? -1) - (a.score ?? -1));
    for (const it of sorted) {
      rows.push([it.name, it.score === null ? "" : fmt(it.score, 6),
                 it.mos === null ? "" : fmt(it.mos, 4), it.map ? fmt(it.map.mean, 6) : "",
                 it.model, it.error || ""]);
    }
    const text = rows.map((r) => r.map(csvCell).join(",")).join("\n") + "\n";
    const a = document.createElement("a");
    a.href = URL.createObjectURL(new Blob([text], { type: "text/csv" }));
    a.download = "grmpiqa-scores.csv";
    document.body.appendChild(a);
    a.click();
    a.remove();
  }

  function init() {
    const drop = $("drop");
    const input = $("file");
    input.addEventListener("change", () => { upload(input.files); input.value = ""; });
    drop.addEventListener("keydown", (e) => {
      if ((e.key === "Enter" || e.key === " ") && e.target === drop) { e.preventDefault(); input.click(); }
    });
    drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
    drop.addEventListener("dragleave", () => drop.classList.remove("over"));
    drop.addEventListener("drop", (e) => {
      e.preventDefault();
      drop.classList.remove("over");
      upload(e.dataTransfer.files);
    });
    $("show-maps").addEventListener("change", (e) => {
      $("results").classList.toggle("maps-on", e.target.checked);
      $("legend").hidden = !(e.target.checked && state.items.length > 0);
    });
    $("csv").addEventListener("click", downloadCsv);
    $("clear").addEventListener("click", () => {
      for (const it of state.items) if (it.url) URL.revokeObjectURL(it.url);
      state.items = [];
      $("status").textContent = "Cleared.";
      render();
    });
    $("checkpoint").addEventListener("change", describeModel);
    loadModels();
  }

  document.addEventListener("DOMContentLoaded", init);
})();
