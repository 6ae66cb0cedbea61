// Live: per-camera counters from /api/live, once a second, without reloading the page.
"use strict";
(() => {
  const { api, el, fmt } = Console;
  const rows = document.getElementById("camera-rows");

  function reasons(map) {
    const entries = Object.entries(map || {});
    if (!entries.length) return "0";
    const total = entries.reduce((s, [, n]) => s + n, 0);
    return [String(total), el("div", { class: "reasons-list" }, entries.map(([r, n]) => r + " " + n).join(", "))];
  }

  function row(c) {
    const drift = !c.drift ? el("span", { class: "hint", text: "—" })
      : c.drift.psi === null ? el("span", { class: "hint", text: "collecting (" + c.drift.n + " frames)" })
      : el("span", { class: c.drift.alarm ? "drift-alarm" : "drift-ok",
                     text: (c.drift.alarm ? "DRIFT " : "ok ") + "PSI " + fmt.num(c.drift.psi, 2) +
                       (c.drift.threshold == null ? "" : " (threshold " + fmt.num(c.drift.threshold, 2) + ")") });
    const cells = [
      el("td", { class: "mono cam", text: c.camera }),
      el("td", { class: "num fps", text: fmt.num(c.fps, 1) }),
      el("td", { class: "num processed", text: c.processed }),
      el("td", { class: "num anomalies", text: c.anomalies }),
      el("td", { class: "num rate", text: fmt.pct(c.anomaly_rate) }),
      el("td", { class: "num p50", text: fmt.ms(c.p50_ms) }),
      el("td", { class: "num p99", text: fmt.ms(c.p99_ms) }),
      el("td", { class: "num", text: c.in_flight }),
      el("td", { class: "dropped" }, ...[].concat(reasons(c.dropped))),
      el("td", { class: "invalid" }, ...[].concat(reasons(c.invalid))),
      el("td", { class: "drift" }, drift),
    ];
    return el("tr", { "data-camera": c.camera }, ...cells);
  }

  async function tick() {
    try {
      const v = await api("GET", "/api/live");
      document.getElementById("serving").textContent = v.serving || "—";
      document.getElementById("shadow").textContent = v.shadow || "—";
      document.getElementById("decisions").textContent = v.decisions ?? "—";
      const actors = Object.entries(v.actors || {});
      const down = actors.filter(([, up]) => !up).map(([name]) => name);
      document.getElementById("actors").textContent = actors.length ? (down.length ? "down: " + down.join(", ") : actors.length + " up") : "—";
      const store = v.store || {};
      document.getElementById("store").textContent = store.files !== undefined ?
        store.files + " files, " + (store.bytes / 1048576).toFixed(1) + " MiB" : "—";
      document.getElementById("age").textContent = v.age_s === null ? "—" : v.age_s.toFixed(1) + " s";
      document.getElementById("window").textContent = v.window_s;
      const banner = document.getElementById("drift-banner");
      banner.hidden = !v.drift_alarms.length;
      banner.textContent = v.drift_alarms.length ? "Score drift on " + v.drift_alarms.join(", ") +
        ": the line's normals changed. Review their recent frames, accept false alarms as normal, then retrain." : "";
      rows.replaceChildren(...(v.cameras.length ? v.cameras.map(row)
        : [el("tr", { class: "empty" }, el("td", { colspan: 11, text: "No camera has sent a frame yet." }))]));
      document.body.dataset.updated = String(v.taken_at);
    } catch (e) {
      Console.toast("live stats: " + e.message, true);
    }
  }
  tick();
  setInterval(tick, 1000);
})();
