"""Operator console benchmark (`make bench`): does the page stay responsive with 10,000 stored anomalies?

Real parts: the agent (its actors on an embedded Ray) serving the model, its console on loopback, and
Debian's headless Chromium loading the pages (Playwright). The output folder is filled beforehand with
10,000 anomalies across 4 cameras, each the files the scoring actor writes (payload, overlay,
thumbnail, heatmap, sidecar), made from real Magnetic Tile frames with the scoring actor's own
functions. Identical bytes are hard links (disk stays small; the listing, names and URLs are those
of 10,000 distinct anomalies).

Measured: the index's first listing of the folder; server time (HTTP round trip, median of 20) for
the review page (first page, a deep page, filtered by camera, normals only), a detail view and the
live JSON; in the browser, navigation → `load` (every thumbnail and heatmap layer loaded), first visit
and warm median of 5, for Review page 1, a deep page, a detail view and Live.
"""
from __future__ import annotations

import argparse
import http.cookiejar
import json
import os
import platform
import re
import shutil
import statistics
import sys
import time
import urllib.parse
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np
import ray
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from adtr_edge.actors.scoring import frame_stem, heat_png, thumbnail_jpg
from adtr_edge.agent.console import start_console
from adtr_edge.agent.console.auth import add_user
from adtr_edge.agent.console.frames import FrameIndex
from adtr_edge.agent.runner import Agent
from adtr_edge.agent.settings import AgentSettings, load_settings
from adtr_edge.model.checkpoint import read_manifest
from adtr_edge.model.visualize import heatmap_overlay

from console_live import CHROMIUM_ARGS, chromium_path
from results_table import update_section

CAMERAS = ("line-1", "line-2", "line-3", "line-4")
USER = ("bench", "bench password 2026")


def fill(folder: Path, data: str, threshold: float, count: int) -> dict:
    """`count` anomalies (and count/10 sampled normals), newest last, spread over the last 7 days."""
    every = sorted(Path(data).glob("MT_*/Imgs/*.jpg"))
    sources = every[:: max(1, len(every) // 40)][:40]  # defects and good parts alike
    originals = folder.parent / "originals"
    originals.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    made = []
    for i, source in enumerate(sources):  # the unique files, written once
        payload = source.read_bytes()
        frame = cv2.cvtColor(cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        amap = cv2.GaussianBlur(rng.random((64, 64)).astype(np.float32), (0, 0), 6) * 2.5 * threshold
        big = cv2.resize(amap, (frame.shape[1], frame.shape[0]))
        files = {".jpg": payload, "_thumb.jpg": thumbnail_jpg(frame), "_heat.png": heat_png(amap, threshold),
                 "_overlay.png": cv2.imencode(".png", heatmap_overlay(frame, big, 2 * threshold,
                                                                      big >= threshold))[1].tobytes()}
        for suffix, data_ in files.items():
            (originals / f"{i}{suffix}").write_bytes(data_)
        made.append((frame.shape[1], frame.shape[0]))
    now = time.time()
    for n in range(count + count // 10):
        normal = n >= count
        camera = CAMERAS[n % len(CAMERAS)]
        seq = n // len(CAMERAS)
        ts = now - 7 * 86400 * (1 - n / (count + count // 10))
        i = n % len(sources)
        width, height = made[i]
        stem = frame_stem(ts, seq, normal=normal)  # the scoring actor's own names
        target = folder / camera
        target.mkdir(parents=True, exist_ok=True)
        for suffix in (".jpg", "_thumb.jpg", "_heat.png", *([] if normal else ["_overlay.png"])):
            os.link(originals / f"{i}{suffix}", target / f"{stem}{suffix}")
        score = threshold * (0.6 if normal else 1.0 + rng.random())
        (target / f"{stem}.json").write_text(json.dumps({
            "camera_id": camera, "seq": seq, "ts": ts, "score": score, "normalized_score": score / threshold,
            "threshold": threshold, "is_anomaly": not normal, "width": width, "height": height,
            "regions": [] if normal else [{"box": [width // 4, height // 4, width // 3, height // 3], "area": 100}],
            "model_version": "bench", "source_encoding": "jpeg"}))
    return {"anomalies": count, "normals": count // 10, "files": sum(1 for _ in folder.rglob("*") if _.is_file())}


class Session:
    def __init__(self, base: str):
        self.base = base
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))

    def get(self, path: str) -> bytes:
        with self.opener.open(self.base + path, timeout=60) as response:
            return response.read()

    def login(self) -> None:
        token = re.search(rb'name="csrf_token" value="([^"]+)"', self.get("/login")).group(1).decode()
        self.opener.open(self.base + "/login", urllib.parse.urlencode(
            {"csrf_token": token, "user": USER[0], "password": USER[1], "next": "/live"}).encode(), timeout=60).read()

    def timed(self, path: str, n: int = 20) -> dict:
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            body = self.get(path)
            times.append((time.perf_counter() - t0) * 1000)
        return {"median_ms": statistics.median(times), "max_ms": max(times), "bytes": len(body)}


def browser_times(url: str, paths: dict[str, str], repeats: int = 5) -> dict:
    """Per page: the first visit in a fresh browser context (empty cache), then `repeats` visits coming
    from another page (about:blank), as an operator moves between pages. Navigation Timing, not wall
    clock: navigation start → DOMContentLoaded and → load (the images in view have loaded)."""
    from playwright.sync_api import sync_playwright

    timing = ("(() => { const n = performance.getEntriesByType('navigation')[0];"
              " return [n.domContentLoadedEventEnd, n.loadEventEnd]; })()")
    out = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        for name, path in paths.items():
            context = browser.new_context(viewport={"width": 1440, "height": 960})
            page = context.new_page()
            page.goto(url + "/login")
            page.fill("#user", USER[0])
            page.fill("#password", USER[1])
            page.click("#login")
            page.wait_for_url("**/live")
            page.goto("about:blank")
            loads = []
            for _ in range(1 + repeats):
                page.goto(url + path, wait_until="load")
                loads.append(page.evaluate(timing))
                page.goto("about:blank")
            page.goto(url + path, wait_until="load")
            out[name] = {"first_load_ms": loads[0][1], "first_dom_ready_ms": loads[0][0],
                         "warm_load_ms": statistics.median(x[1] for x in loads[1:]),
                         "warm_dom_ready_ms": statistics.median(x[0] for x in loads[1:]),
                         "images": page.evaluate("document.images.length"),
                         "images_loaded_at_load": page.evaluate(
                             "Array.from(document.images).filter(i => i.complete && i.naturalWidth).length")}
            context.close()
        browser.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "magnetic-tile"))
    p.add_argument("--model", default="runs/bench/adtr-edge")
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--anomalies", type=int, default=10_000)
    p.add_argument("--no-readme", action="store_true")
    args = p.parse_args()
    if chromium_path() is None:
        raise SystemExit("bench_console needs Debian's chromium (tests/install_browser.sh installs it)")
    out = Path(args.out) / "console"
    shutil.rmtree(out, ignore_errors=True)
    (out / "anomalies").mkdir(parents=True)
    threshold = float(read_manifest(Path(args.model))["threshold"])
    t0 = time.monotonic()
    made = fill(out / "anomalies", args.data, threshold, args.anomalies)
    fill_s = time.monotonic() - t0
    t0 = time.perf_counter()
    index = FrameIndex(out / "anomalies")
    index.refresh(force=True)
    cold_index_ms = (time.perf_counter() - t0) * 1000
    t0 = time.perf_counter()
    index.cameras.clear()
    index.refresh(force=True)
    total, _ = index.query(limit=48)
    index_ms = (time.perf_counter() - t0) * 1000
    assert total == args.anomalies + args.anomalies // 10, total

    add_user(out / "users.json", USER[0], USER[1], "operator")
    cfg = load_settings(overrides=[
        "http.enabled=false", f"output.dir={out / 'anomalies'}", f"output.max_bytes={1 << 40}",
        f"state_dir={out / 'state'}", "console.port=0", f"console.users_file={out / 'users.json'}"], kind=AgentSettings)
    ray.init(num_cpus=2, log_to_driver=False, include_dashboard=False)
    agent = Agent(Path(args.model), ["tcp://127.0.0.1:*"], "tcp://127.0.0.1:*", cfg).start()
    console = start_console(agent)
    results = {"date": datetime.now(UTC).isoformat(timespec="seconds"),
               "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform()},
               "model": str(args.model), "stored": made, "fill_s": fill_s, "index_first_listing_ms": cold_index_ms,
               "index_relisting_ms": index_ms, "page_size": cfg.console.page_size}
    try:
        session = Session(console.url)
        session.login()
        first = f"/review/{CAMERAS[0]}/" + index.query(camera=CAMERAS[0], decision="anomaly", limit=1)[1][0].stem
        pages = (args.anomalies + args.anomalies // 10 + cfg.console.page_size - 1) // cfg.console.page_size
        deep = f"/review?page={pages // 2}"
        server = {"review page 1": session.timed("/review"),
                  f"review page {pages // 2} of {pages}": session.timed(deep),
                  "review, one camera, anomalies": session.timed(f"/review?camera={CAMERAS[1]}&decision=anomaly"),
                  "review, normals only": session.timed("/review?decision=normal"),
                  "detail view": session.timed(first), "live JSON": session.timed("/api/live")}
        results["server"] = server
        results["browser"] = browser_times(console.url, {"review page 1": "/review", f"review page {pages // 2}": deep,
                                                         "detail view": first, "live": "/live"})
    finally:
        console.shutdown()
        agent.stop(drain=False)
        ray.shutdown()
    (Path(args.out) / "console.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=1))
    if not args.no_readme:
        update_section(ROOT / "docs" / "results.md", "console-bench", render(results))
    shutil.rmtree(out / "anomalies", ignore_errors=True)


def render(r: dict) -> str:
    s = r["stored"]
    lines = [f"Measured by `tests/benchmarks/bench_console.py` (in `make bench`) on {r['date'][:10]} "
             f"({r['machine']['cpus']} CPU threads, no GPU): "
             f"{s['anomalies']:,} stored anomalies and {s['normals']:,} sampled normals over 4 cameras "
             f"({s['files']:,} files), {r['page_size']} thumbnails per review page, the agent's console on loopback, "
             "Debian's headless Chromium.", "",
             f"Listing the folder: {r['index_first_listing_ms']:.0f} ms the first time after a start, "
             f"{r['index_relisting_ms']:.0f} ms for a full relisting (done only for a camera whose folder "
             "changed).", "",
             "| request | server (median of 20) | in the browser: navigation → load, first / warm |",
             "|---|---|---|"]
    browser = {k.split(" of ")[0]: v for k, v in r["browser"].items()}
    browser["live JSON"] = browser.pop("live", None)  # the Live page (HTML + script), which polls the JSON
    for name, t in r["server"].items():
        b = browser.get(name.split(" of ")[0])
        cell = f"{b['first_load_ms']:.0f} ms / {b['warm_load_ms']:.0f} ms ({b['images']} images)" if b else "—"
        lines.append(f"| {name if name != 'live JSON' else 'Live page / its JSON'} | {t['median_ms']:.1f} ms "
                     f"({max(1, t['bytes'] // 1024)} KiB) | {cell} |")
    lines += ["", f"Model `{Path(r['model']).name}`: it does not matter here (no frame is scored; no camera ran "
              "during the measurement). Server: the HTTP round trip from a client on the box. Browser: Chromium's "
              "Navigation Timing, first visit with an empty cache / later visits; thumbnails below the fold load "
              "lazily as the operator scrolls. The first request after a start also pays the folder's first listing."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
