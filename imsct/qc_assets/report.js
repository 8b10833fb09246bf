/* IMSCT QC report: pass / fail / artifact verdicts and comments per subject, kept in localStorage
   under the report's id, exported and imported as JSON. After a verdict the page stays on the
   subject unless "advance after marking" is ticked (remembered by this browser, off by default).
   Plain script, no network, works from file://. */
(function () {
  "use strict";

  var meta = JSON.parse(document.getElementById("imsct-qc-data").textContent);
  var KEY = "imsct-qc:" + meta.report_id;
  var MARKS = { pass: true, fail: true, artifact: true };
  var ADVANCE_KEY = "imsct-qc-advance";
  var entries = Array.prototype.slice.call(document.querySelectorAll("section.subject"));
  var bySubject = {};
  entries.forEach(function (el) { bySubject[el.getAttribute("data-subject")] = el; });
  var current = -1;

  var storage = (function () {
    try {
      var s = window.localStorage;
      s.setItem("imsct-qc-probe", "1");
      s.removeItem("imsct-qc-probe");
      return s;
    } catch (e) {
      return null;
    }
  })();

  function readState() {
    if (!storage) return {};
    try {
      var v = JSON.parse(storage.getItem(KEY) || "{}");
      return v && typeof v === "object" && !Array.isArray(v) ? v : {};
    } catch (e) {
      console.warn("imsct qc: stored marks unreadable, starting empty", e);
      return {};
    }
  }

  var state = readState();

  function persist() {
    if (!storage) return;
    try {
      storage.setItem(KEY, JSON.stringify(state));
    } catch (e) {
      document.getElementById("storage-warning").hidden = false;
    }
  }

  function record(subject) {
    var r = state[subject];
    if (!r || typeof r !== "object") r = state[subject] = { qc: null, comment: "" };
    return r;
  }

  function isStale(el, r) {
    var fp = el.getAttribute("data-fp");
    return !!(r && r.qc && r.fp && fp && r.fp !== fp);
  }

  function render(el) {
    var r = state[el.getAttribute("data-subject")] || {};
    var mark = MARKS[r.qc] ? r.qc : "";
    el.classList.toggle("qc-pass", mark === "pass");
    el.classList.toggle("qc-fail", mark === "fail");
    el.classList.toggle("qc-artifact", mark === "artifact");
    el.classList.toggle("qc-unset", !mark);
    el.setAttribute("data-qc", mark || "unset");
    Array.prototype.forEach.call(el.querySelectorAll("button[data-mark]"), function (b) {
      b.setAttribute("aria-pressed", String(b.getAttribute("data-mark") === mark));
    });
    var ta = el.querySelector("textarea.comment");
    if (document.activeElement !== ta) ta.value = typeof r.comment === "string" ? r.comment : "";
    el.querySelector(".badge").textContent = mark ? mark.toUpperCase() : "";
    el.querySelector(".stale").hidden = !isStale(el, r);
  }

  function summary() {
    var n = { pass: 0, fail: 0, artifact: 0, unset: 0 };
    entries.forEach(function (el) {
      var r = state[el.getAttribute("data-subject")];
      n[r && MARKS[r.qc] ? r.qc : "unset"] += 1;
    });
    var box = document.getElementById("summary");
    box.textContent = entries.length + " subjects: " + n.pass + " pass, " + n.fail + " fail, " + n.artifact + " artifact, " + n.unset + " unset";
    Object.keys(n).forEach(function (k) { box.setAttribute("data-" + k, n[k]); });
    return n;
  }

  function applyFilter() {
    var f = document.getElementById("filter").value;
    entries.forEach(function (el) {
      el.hidden = f !== "all" && el.getAttribute("data-qc") !== f;
    });
  }

  function setMark(subject, mark) {
    var el = bySubject[subject];
    if (!el) throw new Error("no subject " + subject);
    var r = record(subject);
    r.qc = MARKS[mark] ? mark : null;
    r.fp = el.getAttribute("data-fp");
    r.time = new Date().toISOString();
    persist();
    render(el);
    summary();
    applyFilter();
  }

  function setComment(subject, text) {
    var r = record(subject);
    r.comment = String(text);
    persist();
  }

  function exportData() {
    var out = {};
    entries.forEach(function (el) {
      var s = el.getAttribute("data-subject");
      var r = state[s] || {};
      out[s] = { qc: MARKS[r.qc] ? r.qc : null, comment: typeof r.comment === "string" ? r.comment : "" };
      if (isStale(el, r)) out[s].stale = true;
    });
    return out;
  }

  function download() {
    var blob = new Blob([JSON.stringify(exportData(), null, 1) + "\n"], { type: "application/json" });
    var a = document.createElement("a");
    var stamp = new Date().toISOString().slice(0, 19).replace(/[:T]/g, "-");
    a.href = URL.createObjectURL(blob);
    a.download = "qc-" + (meta.title || "imsct").replace(/[^A-Za-z0-9._-]+/g, "_") + "-" + stamp + ".json";
    document.body.appendChild(a);
    a.click();
    setTimeout(function () { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
  }

  function importData(obj) {
    if (!obj || typeof obj !== "object" || Array.isArray(obj)) throw new Error("not a QC export (expected an object of subjects)");
    var n = 0;
    Object.keys(obj).forEach(function (s) {
      var v = obj[s];
      if (!bySubject[s] || !v || typeof v !== "object") return;
      var r = record(s);
      r.qc = MARKS[v.qc] ? v.qc : null;
      r.comment = typeof v.comment === "string" ? v.comment : "";
      r.fp = v.stale ? "" : bySubject[s].getAttribute("data-fp");
      n += 1;
    });
    persist();
    entries.forEach(render);
    summary();
    applyFilter();
    return n;
  }

  var advanceBox = document.getElementById("advance");

  function advanceOn() { return advanceBox.checked; }

  function showAdvance() {
    document.getElementById("advance-state").textContent = advanceOn()
      ? "After a verdict the page moves to the next subject (advance is on)."
      : "After a verdict the page stays on the subject (advance is off).";
  }

  function status(text) { document.getElementById("status").textContent = text; }

  /* a verdict given from the keyboard or a button: set it, then stay or advance as the page says */
  function verdict(el, mark) {
    var subject = el.getAttribute("data-subject");
    setMark(subject, mark);
    var visible = entries.filter(function (x) { return !x.hidden; });
    var said = subject + ": " + (mark || "unset");
    if (el.hidden) {  // filtered out by its new mark: the next one moved up into its place
      focusEntry(current);
      var now = currentEntry();
      status(said + "; hidden by the filter" + (now ? ", now on " + now.getAttribute("data-subject") : ""));
    } else if (mark && advanceOn()) {
      var at = visible.indexOf(el);
      if (at + 1 < visible.length) {
        focusEntry(at + 1);
        status(said + "; advanced to " + currentEntry().getAttribute("data-subject"));
      } else {
        status(said + "; last subject, staying");
      }
    } else {
      status(said + (mark ? "; staying on it (advance is off)" : ""));
    }
  }

  function focusEntry(i) {
    var visible = entries.filter(function (el) { return !el.hidden; });
    if (!visible.length) return;
    i = Math.max(0, Math.min(visible.length - 1, i));
    entries.forEach(function (el) { el.classList.remove("current"); });
    var el = visible[i];
    el.classList.add("current");
    el.focus({ preventScroll: true });
    el.scrollIntoView({ block: "start" });
    current = i;
  }

  function currentEntry() {
    var visible = entries.filter(function (el) { return !el.hidden; });
    return visible[current] || null;
  }

  entries.forEach(function (el, i) {
    var subject = el.getAttribute("data-subject");
    el.addEventListener("click", function (ev) {
      var visible = entries.filter(function (x) { return !x.hidden; });
      entries.forEach(function (x) { x.classList.remove("current"); });
      el.classList.add("current");
      current = visible.indexOf(el);
      var b = ev.target.closest("button[data-mark]");
      if (b) verdict(el, b.getAttribute("data-mark"));
    });
    el.querySelector("textarea.comment").addEventListener("input", function (ev) {
      setComment(subject, ev.target.value);
    });
    render(el);
  });

  try { advanceBox.checked = !!storage && storage.getItem(ADVANCE_KEY) === "1"; } catch (e) { advanceBox.checked = false; }
  advanceBox.addEventListener("change", function () {
    try { if (storage) storage.setItem(ADVANCE_KEY, advanceBox.checked ? "1" : "0"); } catch (e) { /* not stored */ }
    showAdvance();
  });
  showAdvance();

  /* the sticky header's height, so that a subject scrolled to sits just below it */
  function headerHeight() {
    document.documentElement.style.setProperty("--head", document.getElementById("top").offsetHeight + "px");
  }
  headerHeight();
  window.addEventListener("resize", headerHeight);

  document.getElementById("overlay").addEventListener("change", function (ev) {
    document.body.classList.toggle("no-overlay", !ev.target.checked);
  });
  document.getElementById("filter").addEventListener("change", function () { applyFilter(); current = -1; });
  document.getElementById("export").addEventListener("click", download);
  var fileInput = document.getElementById("import-file");
  document.getElementById("import").addEventListener("click", function () { fileInput.click(); });
  fileInput.addEventListener("change", function () {
    var f = fileInput.files && fileInput.files[0];
    if (!f) return;
    var reader = new FileReader();
    reader.onload = function () {
      try {
        var n = importData(JSON.parse(reader.result));
        alert("Imported marks for " + n + " subject(s) of this report.");
      } catch (e) {
        alert("Could not import " + f.name + ": " + e.message);
      }
      fileInput.value = "";
    };
    reader.readAsText(f);
  });

  document.addEventListener("keydown", function (ev) {
    var tag = ev.target && ev.target.tagName;
    if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
    if (tag === "TEXTAREA" || tag === "INPUT" || tag === "SELECT") {
      if (ev.key === "Escape") ev.target.blur();
      return;
    }
    var el = currentEntry();
    switch (ev.key) {
      case "j": case "ArrowDown": focusEntry(current + 1); break;
      case "k": case "ArrowUp": focusEntry(current - 1); break;
      case "p": case "f": case "a": case "u":
        if (!el) { focusEntry(0); el = currentEntry(); }
        if (el) verdict(el, { p: "pass", f: "fail", a: "artifact", u: "" }[ev.key]);
        break;
      case "n":
        advanceBox.checked = !advanceBox.checked;
        advanceBox.dispatchEvent(new Event("change"));
        break;
      case "c":
        if (el) el.querySelector("textarea.comment").focus();
        break;
      case "o": {
        var box = document.getElementById("overlay");
        box.checked = !box.checked;
        box.dispatchEvent(new Event("change"));
        break;
      }
      default: return;
    }
    ev.preventDefault();
  });

  window.addEventListener("storage", function (ev) {
    if (ev.key !== KEY) return;
    state = readState();
    entries.forEach(render);
    summary();
    applyFilter();
  });

  if (!storage) document.getElementById("storage-warning").hidden = false;
  summary();
  applyFilter();
  window.imsctQC = { exportData: exportData, importData: importData, setMark: setMark, summary: summary, reportId: meta.report_id,
                     storageKey: KEY, current: function () { var el = currentEntry(); return el ? el.getAttribute("data-subject") : null; } };
})();
