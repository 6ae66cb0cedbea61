// Shared by every page: CSRF-protected JSON calls, a toast, a confirmation dialog, DOM building with
// textContent only (data from the agent never becomes markup).
"use strict";
const Console = (() => {
  const token = document.querySelector('meta[name="csrf-token"]').content;

  async function api(method, url, body) {
    const options = { method, credentials: "same-origin", headers: { "Accept": "application/json" } };
    if (method !== "GET") {
      options.headers["Content-Type"] = "application/json";
      options.headers["X-CSRFToken"] = token;
      options.body = JSON.stringify(body || {});
    }
    const response = await fetch(url, options);
    let data = {};
    try { data = await response.json(); } catch (e) { data = {}; }
    if (response.status === 401) { window.location.assign("/login?next=" + encodeURIComponent(location.pathname + location.search)); }
    if (!response.ok) { const err = new Error(data.error || ("HTTP " + response.status)); err.status = response.status; throw err; }
    return data;
  }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = String(value);
      else node.setAttribute(key, String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  let toastTimer = null;
  function toast(message, bad) {
    const node = document.getElementById("toast");
    node.textContent = message;
    node.className = bad ? "bad" : "";
    node.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => { node.hidden = true; }, bad ? 8000 : 3000);
  }

  function confirmAction(text) {
    const dialog = document.getElementById("confirm-dialog");
    if (!dialog) return Promise.resolve(window.confirm(text));
    document.getElementById("confirm-text").textContent = text;
    return new Promise((resolve) => {
      dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
      dialog.returnValue = "";
      dialog.showModal();
    });
  }

  const fmt = {
    num: (v, d = 2) => (v === null || v === undefined || Number.isNaN(v)) ? "—" : Number(v).toFixed(d),
    pct: (v) => (v === null || v === undefined) ? "—" : (100 * v).toFixed(1) + " %",
    ms: (v) => (v === null || v === undefined) ? "—" : (v >= 1000 ? (v / 1000).toFixed(2) + " s" : v.toFixed(0) + " ms"),
  };

  // The heatmap layer: on by default, remembered per browser.
  function applyHeat() { document.body.classList.toggle("no-heat", localStorage.getItem("adtr-heat") === "off"); }
  function toggleHeat() { localStorage.setItem("adtr-heat", localStorage.getItem("adtr-heat") === "off" ? "on" : "off"); applyHeat(); }
  applyHeat();

  return { api, el, toast, confirmAction, fmt, toggleHeat };
})();
