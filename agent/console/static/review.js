// Review: the thumbnail grid (selection, keyboard triage) and the detail view (box / brush mask).
"use strict";
(() => {
  const { api, toast, toggleHeat } = Console;
  const action = (camera, stem, act, body) =>
    api("POST", "/api/review/" + encodeURIComponent(camera) + "/" + encodeURIComponent(stem) + "/" + act, body);
  const labels = { accept: "accepted as normal", confirm: "confirmed defect", skip: "skipped" };
  const typing = (e) => ["INPUT", "TEXTAREA", "SELECT"].includes(e.target.tagName);

  document.getElementById("toggle-heat")?.addEventListener("click", toggleHeat);

  // ------------------------------------------------------------------ the grid
  const cards = Array.from(document.querySelectorAll("#cards .card"));
  if (cards.length) {
    let selected = 0;
    const select = (i) => {
      selected = Math.max(0, Math.min(cards.length - 1, i));
      cards.forEach((c, j) => c.classList.toggle("selected", j === selected));
      cards[selected].focus({ preventScroll: true });
      cards[selected].scrollIntoView({ block: "nearest" });
    };
    const firstOpen = cards.findIndex((c) => !c.classList.contains("done"));
    select(firstOpen < 0 ? 0 : firstOpen);

    async function act(card, what) {
      if (!card.querySelector(".actions")) return;
      const buttons = card.querySelectorAll("button");
      buttons.forEach((b) => { b.disabled = true; });
      try {
        await action(card.dataset.camera, card.dataset.stem, what, {});
        card.classList.add("done");
        card.querySelector(".state").textContent = labels[what] + " · " + document.getElementById("whoami").textContent;
        toast(card.dataset.camera + " #" + card.dataset.stem.split("_").pop().replace(/^0+(?=\d)/, "") + ": " + labels[what]);
        const next = cards.findIndex((c, j) => j > cards.indexOf(card) && !c.classList.contains("done"));
        if (next >= 0) select(next);
      } catch (e) {
        toast(e.message, true);
      } finally {
        buttons.forEach((b) => { b.disabled = false; });
      }
    }

    cards.forEach((card, i) => {
      card.addEventListener("click", (e) => {
        const button = e.target.closest("button[data-act]");
        if (button) { e.preventDefault(); select(i); act(card, button.dataset.act); }
        else if (!e.target.closest("a")) select(i);
      });
    });

    document.addEventListener("keydown", (e) => {
      if (typing(e) || e.ctrlKey || e.metaKey || e.altKey) return;
      const card = cards[selected];
      const key = e.key.toLowerCase();
      if (key === "arrowright" || key === "j") select(selected + 1);
      else if (key === "arrowleft" || key === "k") select(selected - 1);
      else if (key === "enter") window.location.assign(card.dataset.detail);
      else if (key === "a") act(card, "accept");
      else if (key === "d") window.location.assign(card.dataset.detail);  // a defect: mark it in the detail view
      else if (key === "s") act(card, "skip");
      else if (key === "o") toggleHeat();
      else if (key === "n") document.getElementById("next-page")?.click();
      else if (key === "p") document.getElementById("prev-page")?.click();
      else return;
      e.preventDefault();
    });
  } else if (!document.getElementById("detail")) {
    document.addEventListener("keydown", (e) => {
      if (!typing(e) && e.key.toLowerCase() === "o") toggleHeat();
    });
  }

  // ------------------------------------------------------------------ the detail view
  const detail = document.getElementById("detail");
  if (!detail) return;
  const canvas = document.getElementById("draw");
  const base = document.querySelector("#stage img.base");
  const state = { tool: "box", box: null, painted: false, drawing: false, start: null };
  const ctx = canvas ? canvas.getContext("2d") : null;

  function sizeCanvas() {
    // The frame's own pixels: from the decision, else from the image once it has loaded.
    const w = Number(detail.dataset.width) || base.naturalWidth, h = Number(detail.dataset.height) || base.naturalHeight;
    if (canvas && w && h && (canvas.width !== w || canvas.height !== h)) { canvas.width = w; canvas.height = h; }
  }
  function fit() {
    // Small frames are shown larger, large ones smaller: as big as the viewer allows, aspect kept.
    if (!base.naturalWidth) return;
    const viewer = detail.querySelector(".viewer");
    const room = Math.min(viewer.clientWidth / base.naturalWidth,
                          (window.innerHeight - viewer.getBoundingClientRect().top - 16) / base.naturalHeight);
    base.style.width = Math.max(1, Math.floor(base.naturalWidth * room)) + "px";
  }
  const ready = () => { sizeCanvas(); fit(); };
  if (base.complete) ready(); else base.addEventListener("load", ready);
  window.addEventListener("resize", fit);

  const point = (e) => {
    const r = canvas.getBoundingClientRect();
    return [Math.round((e.clientX - r.left) * canvas.width / r.width), Math.round((e.clientY - r.top) * canvas.height / r.height)];
  };
  const info = (text) => { const node = document.getElementById("mark-info"); if (node) node.textContent = text; };

  function clear() {
    if (!ctx) return;
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    state.box = null; state.painted = false;
    info(state.tool === "box" ? "Drag on the image to draw a box (optional)." : "Paint over the defect (optional).");
  }
  function drawBox() {
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    const [x, y, w, h] = state.box;
    ctx.lineWidth = Math.max(2, canvas.width / 300);
    ctx.strokeStyle = "rgba(239, 68, 68, 1)";
    ctx.fillStyle = "rgba(239, 68, 68, 0.18)";
    ctx.fillRect(x, y, w, h);
    ctx.strokeRect(x, y, w, h);
  }
  function paint(p) {
    const radius = Number(document.getElementById("brush-size").value) * canvas.width / canvas.getBoundingClientRect().width / 2;
    ctx.fillStyle = "rgba(239, 68, 68, 0.55)";
    ctx.beginPath();
    ctx.arc(p[0], p[1], Math.max(1, radius), 0, 2 * Math.PI);
    ctx.fill();
    state.painted = true;
  }
  function setTool(tool) {
    if (tool !== state.tool) clear();
    state.tool = tool;
    document.getElementById("tool-box")?.classList.toggle("on", tool === "box");
    document.getElementById("tool-brush")?.classList.toggle("on", tool === "brush");
    info(tool === "box" ? "Drag on the image to draw a box (optional)." : "Paint over the defect (optional).");
  }

  if (canvas && document.getElementById("tool-box")) {
    canvas.addEventListener("pointerdown", (e) => {
      sizeCanvas();
      canvas.setPointerCapture(e.pointerId);
      state.drawing = true;
      state.start = point(e);
      if (state.tool === "brush") paint(state.start);
    });
    canvas.addEventListener("pointermove", (e) => {
      if (!state.drawing) return;
      const p = point(e);
      if (state.tool === "brush") { paint(p); return; }
      const [x0, y0] = state.start;
      const x = Math.max(0, Math.min(x0, p[0])), y = Math.max(0, Math.min(y0, p[1]));
      const w = Math.min(canvas.width, Math.max(x0, p[0])) - x, h = Math.min(canvas.height, Math.max(y0, p[1])) - y;
      state.box = [x, y, Math.max(1, w), Math.max(1, h)];
      drawBox();
    });
    canvas.addEventListener("pointerup", () => {
      state.drawing = false;
      if (state.tool === "box" && state.box) info("Box [" + state.box.join(", ") + "] in frame pixels.");
      if (state.tool === "brush" && state.painted) info("Mask painted.");
    });
    document.getElementById("tool-box").addEventListener("click", () => setTool("box"));
    document.getElementById("tool-brush").addEventListener("click", () => setTool("brush"));
    document.getElementById("tool-clear").addEventListener("click", clear);
  }

  async function decide(what) {
    const body = { note: document.getElementById("note")?.value || undefined };
    if (what === "confirm") {
      if (state.tool === "box" && state.box && state.box[2] > 1 && state.box[3] > 1) body.box = state.box;
      if (state.tool === "brush" && state.painted) body.mask = canvas.toDataURL("image/png");
    }
    const buttons = document.querySelectorAll(".actions button");
    buttons.forEach((b) => { b.disabled = true; });
    try {
      const result = await action(detail.dataset.camera, detail.dataset.stem, what, body);
      const extra = what === "confirm" ? (result.box ? " with box" : result.mask ? " with mask" : " (image label)") : "";
      document.getElementById("review-state").textContent = labels[what] + extra + " by " + document.getElementById("whoami").textContent;
      toast(labels[what] + extra);
      document.body.dataset.done = what;
      if (detail.dataset.next) setTimeout(() => window.location.assign(detail.dataset.next), 600);
    } catch (e) {
      toast(e.message, true);
    } finally {
      buttons.forEach((b) => { b.disabled = false; });
    }
  }
  document.getElementById("act-accept")?.addEventListener("click", () => decide("accept"));
  document.getElementById("act-confirm")?.addEventListener("click", () => decide("confirm"));
  document.getElementById("act-skip")?.addEventListener("click", () => decide("skip"));

  document.addEventListener("keydown", (e) => {
    if (typing(e) || e.ctrlKey || e.metaKey || e.altKey) return;
    const key = e.key.toLowerCase();
    const can = !!document.getElementById("act-accept");
    if (key === "o") toggleHeat();
    else if (key === "escape") window.location.assign(detail.dataset.back);
    else if (key === "j" && detail.dataset.next) window.location.assign(detail.dataset.next);
    else if (key === "k" && detail.dataset.prev) window.location.assign(detail.dataset.prev);
    else if (can && key === "a") decide("accept");
    else if (can && key === "d") decide("confirm");
    else if (can && key === "s") decide("skip");
    else if (can && key === "b") setTool("box");
    else if (can && key === "r") setTool("brush");
    else if (can && key === "c") clear();
    else return;
    e.preventDefault();
  });
})();
