// Models of one inspection point: retrain now (and follow the job), promote, shadow, roll back, each after a
// confirmation.
"use strict";
(() => {
  const { api, toast, confirmAction } = Console;
  const point = document.getElementById("point").dataset.point;  // the inspection point this page shows

  async function run(button, method, url, body, done) {
    if (!(await confirmAction(button.dataset.confirm))) return;
    button.disabled = true;
    try {
      const result = await api(method, url, { ...body, point });
      toast(done(result));
      return result;
    } catch (e) {
      toast(e.message, true);
    } finally {
      button.disabled = false;
    }
  }
  const reloadSoon = () => setTimeout(() => window.location.reload(), 800);

  document.querySelectorAll("button.promote").forEach((b) => b.addEventListener("click", async () => {
    if (await run(b, "POST", "/api/models/promote", { version: b.dataset.version }, (r) => "serving " + r.promoted)) reloadSoon();
  }));
  document.querySelectorAll("button.shadow").forEach((b) => b.addEventListener("click", async () => {
    if (await run(b, "POST", "/api/models/shadow", { version: b.dataset.version }, (r) => "shadowing " + r.shadow)) reloadSoon();
  }));
  const rollback = document.getElementById("rollback");
  rollback?.addEventListener("click", async () => {
    if (await run(rollback, "POST", "/api/models/rollback", {}, (r) => "rolled back: serving " + r.serving)) reloadSoon();
  });
  const shadowOff = document.getElementById("shadow-off");
  shadowOff?.addEventListener("click", async () => {
    if (await run(shadowOff, "POST", "/api/models/shadow", { version: null }, () => "shadow stopped")) reloadSoon();
  });

  // ------------------------------------------------------------------ the retrain job
  const panel = document.getElementById("job-panel");
  let timer = null;
  async function follow(id) {
    if (!id) return;
    panel.dataset.job = id;
    document.getElementById("job-id").textContent = id;
    try {
      const info = await api("GET", "/api/retrain/" + encodeURIComponent(id) + "?point=" + encodeURIComponent(point));
      document.getElementById("job-status").textContent = info.status || "—";
      document.getElementById("job-message").textContent = info.message || "";
      const logNode = document.getElementById("job-log");
      logNode.hidden = !(info.log_tail || []).length;
      logNode.textContent = (info.log_tail || []).join("\n");
      logNode.scrollTop = logNode.scrollHeight;
      panel.dataset.status = info.status || "";
      if (["SUCCEEDED", "FAILED", "STOPPED"].includes(info.status)) { clearInterval(timer); timer = null; }
    } catch (e) {
      document.getElementById("job-status").textContent = "unknown (" + e.message + ")";
    }
  }
  function startFollowing(id) {
    clearInterval(timer);
    follow(id);
    timer = setInterval(() => follow(id), 2000);
  }
  const retrain = document.getElementById("retrain");
  retrain?.addEventListener("click", async () => {
    const job = await run(retrain, "POST", "/api/retrain", {}, (r) => "retrain submitted: " + r.submission_id);
    if (job && job.submission_id) startFollowing(job.submission_id);
  });
  if (panel && panel.dataset.job) startFollowing(panel.dataset.job);
})();
