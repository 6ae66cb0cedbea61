"""The operator console in a real headless Chromium (Debian's package, driven by Playwright), against a
live agent with two real cameras streaming Magnetic Tile frames, on the session's Ray cluster (with Ray
Jobs): log in, watch the live counters move, accept a false alarm (found in the store as origin
operator), confirm a defect with a drawn box (found labelled, with the box), retrain from the Models
page and watch the Ray job finish, promote the new version and roll it back while the decisions'
model version follows. Screenshots of every page go to ADTR_TESTS_SCREENSHOTS (docs/screenshots with
`make screenshots`) or the test's temp folder."""
from __future__ import annotations

import json
import shutil
import time
import urllib.parse
from pathlib import Path

import cv2
import numpy as np
import pytest

from adtr_edge.agent.publisher import frame_from_file
from adtr_edge.lifecycle.registry import Registry
from adtr_edge.lifecycle.samples import SampleStore

from conftest import MAGNETIC_TILE
from console_live import OPERATOR, VIEWER, add_users, agent_with_console, browser, screenshot_dir  # noqa: F401 - browser is a pytest fixture, used by name
from live import Decisions, Streamer, registry_with_base, versions_in_order, wait_until

pytestmark = [pytest.mark.usefixtures("magnetic_tile"), pytest.mark.usefixtures("ray_session"), pytest.mark.slow]
XSS = '<img src=x onerror="window.__xss=1">'


def _sensitive_copy(model: Path, out: Path, factor: float) -> Path:
    """The same weights with a lower threshold: a model that raises false alarms (what operators fix)."""
    shutil.copytree(model, out, ignore=shutil.ignore_patterns("train_state.pt*"))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["threshold"] *= factor
    manifest["model_version"] = f"{manifest['model_version']}-sensitive"
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def _login(page, url: str, user: tuple[str, str]) -> None:
    page.goto(url + "/live")
    assert "/login" in page.url
    page.fill("#user", user[0])
    page.fill("#password", user[1])
    page.click("#login")
    page.wait_for_url("**/live")


def _live_number(page, camera: str, cell: str) -> float:
    text = page.text_content(f'#camera-rows tr[data-camera="{camera}"] td.{cell}')
    return float(text.split()[0]) if text and text[0].isdigit() else -1.0


@pytest.mark.timeout(1800)  # waits on real Ray jobs that train
def test_an_operator_triages_labels_retrains_promotes_and_rolls_back_in_the_browser(
        browser, trained_model, tmp_path, small_dataset):  # noqa: F811 - the browser fixture imported above
    shots = screenshot_dir(tmp_path)
    model = _sensitive_copy(trained_model, tmp_path / "model", 0.8)
    registry = registry_with_base(model, tmp_path / "registry", MAGNETIC_TILE)
    add_users(registry.root)
    v1 = registry.current()
    store = SampleStore(registry.store_dir)
    normals = [frame_from_file(s.path) for s in small_dataset.test if s.label == 0][:20]
    defects = [frame_from_file(s.path) for s in small_dataset.test if s.label == 1][:20]
    learning = {"guard": {"enabled": False},
                "retrain": {"epochs": 2, "policy": "register", "min_train_samples": 5, "start_timeout_s": 120,
                            "adtr_plus": {"epochs": 1},
                            "gate": {"max_far_increase": 1.0, "max_auroc_drop": 1.0, "max_recall_drop": 1.0}}}
    with agent_with_console(registry.root, tmp_path, learning=learning, output={"normals": {"every_s": 2.0}}) \
            as (agent, console):
        url = console.url
        decisions = Decisions(agent.bound_results)
        line1 = Streamer(agent.bound_ingest[0], "line-1", normals, fps=3)  # good parts only: anomalies are false alarms
        line2 = Streamer(agent.bound_ingest[0], "line-2", defects, fps=2)
        context = browser.new_context(viewport={"width": 1440, "height": 960})
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        try:
            # ---------------------------------------------------------- log in; live counters move
            _login(page, url, OPERATOR)
            page.wait_for_selector('#camera-rows tr[data-camera="line-1"]', timeout=60_000)
            first = _live_number(page, "line-1", "processed")
            assert wait_until(lambda: _live_number(page, "line-1", "processed") >= first + 5, 60), \
                "the Live page's counter did not move while the camera streamed"
            assert wait_until(lambda: _live_number(page, "line-1", "fps") > 0, 30)
            assert page.text_content("#serving") == v1
            assert wait_until(lambda: (page.text_content('tr[data-camera="line-2"] td.p50') or "—") != "—", 30)
            page.screenshot(path=str(shots / "live.png"))

            # ---------------------------------------------------------- accept a false alarm (keyboard)
            anomalies = Path(agent.cfg.output.dir)
            assert wait_until(lambda: any((anomalies / "line-1").glob("2*.json")), 120), "no false alarm on line-1"
            assert wait_until(lambda: any((anomalies / "line-2").glob("2*.json")), 120), "no anomaly on line-2"
            page.goto(url + "/review")
            page.wait_for_selector("#cards .card")
            page.screenshot(path=str(shots / "review.png"))
            page.select_option("#f-camera", "line-1")
            page.select_option("#f-decision", "anomaly")
            page.click("#apply")
            page.wait_for_url("**camera=line-1**")
            card = page.locator("#cards .card.selected")
            stem = card.get_attribute("data-stem")
            page.keyboard.press("a")
            page.wait_for_selector(f'#cards .card.done[data-stem="{stem}"]')
            seq = int(stem.split("_")[-1])
            rows = [s for s in store.snapshot().samples if s.camera_id == "line-1" and s.seq == seq]
            assert len(rows) == 1 and rows[0].origin == "operator" and rows[0].label == 0, rows
            assert store.find(rows[0].sha256)["added_by"] == "console:ana"

            # ---------------------------------------------------------- confirm a defect with a box
            page.goto(url + "/review?camera=line-2&decision=anomaly")
            page.click("#cards .card.selected a.thumb")
            page.wait_for_selector("#detail")
            # (no wait_for_function: the console's CSP forbids eval, which Playwright's string predicates use)
            assert wait_until(lambda: page.evaluate("document.querySelector('#stage img.base').complete"), 30)
            detail = page.locator("#detail")
            stem2 = detail.get_attribute("data-stem")
            width, height = int(detail.get_attribute("data-width")), int(detail.get_attribute("data-height"))
            area = page.locator("#draw").bounding_box()
            page.mouse.move(area["x"] + area["width"] * 0.2, area["y"] + area["height"] * 0.3)
            page.mouse.down()
            page.mouse.move(area["x"] + area["width"] * 0.6, area["y"] + area["height"] * 0.7, steps=8)
            page.mouse.up()
            assert "Box [" in page.text_content("#mark-info")
            page.screenshot(path=str(shots / "detail.png"))
            page.click("#act-confirm")
            page.wait_for_selector("body[data-done='confirm']")
            page.wait_for_timeout(1000)  # the page moves on to the next frame by itself after 0.6 s
            seq2 = int(stem2.split("_")[-1])
            rows = [s for s in store.snapshot().samples if s.camera_id == "line-2" and s.seq == seq2]
            assert len(rows) == 1 and rows[0].origin == "confirmed_defect" and rows[0].label == 1, rows
            x, y, w, h = rows[0].box
            assert abs(x - 0.2 * width) <= 0.03 * width and abs(y - 0.3 * height) <= 0.03 * height
            assert abs(w - 0.4 * width) <= 0.03 * width and abs(h - 0.4 * height) <= 0.03 * height

            # ---------------------------------------------------------- crafted input stays text
            folder = anomalies / "line-9"
            folder.mkdir()
            crafted = "20261129T101010_0000004242"
            cv2.imwrite(str(folder / f"{crafted}.jpg"), np.full((40, 60, 3), 90, np.uint8))
            (folder / f"{crafted}.json").write_text(json.dumps({
                "camera_id": XSS, "model_version": XSS, "score": 2.0, "normalized_score": 2.0, "threshold": 1.0,
                "width": 60, "height": 40, "regions": []}))
            page.goto(url + f"/review/line-9/{crafted}")
            assert XSS in page.text_content("#detail")
            page.goto(url + "/review?camera=" + urllib.parse.quote(XSS))
            assert page.locator("#f-camera option:checked").text_content().startswith(XSS)
            assert page.evaluate("window.__xss") is None

            # ---------------------------------------------------------- retrain from the Models page
            page.goto(url + "/models")
            page.click("#retrain")
            page.click("#confirm-ok")
            page.wait_for_selector("#job-panel[data-job^='retrain-']")
            page.wait_for_selector(", ".join(f"#job-panel[data-status='{s}']"
                                             for s in ("SUCCEEDED", "FAILED", "STOPPED")),
                                   state="attached", timeout=900_000)
            assert page.text_content("#job-status") == "SUCCEEDED", page.text_content("#job-log")
            assert "retrain done" in page.text_content("#job-log")
            page.reload()
            page.wait_for_selector("#job-panel[data-status='SUCCEEDED']", state="attached",
                                   timeout=120_000)  # the log tail is in
            v2 = Registry(registry.root).pointers()["candidate"]
            assert v2 and v2 != v1
            row = page.locator(f'#versions tr[data-version="{v2}"]')
            assert "passed" in row.text_content() and "candidate" in row.text_content()
            page.screenshot(path=str(shots / "models.png"), full_page=True)

            # ---------------------------------------------------------- promote, then roll back
            row.locator("button.promote").click()
            assert v2 in page.text_content("#confirm-text")
            page.click("#confirm-ok")
            assert wait_until(lambda: Registry(registry.root).current() == v2, 120)
            page.goto(url + "/live")
            assert wait_until(lambda: page.text_content("#serving") == v2, 60)

            def seen(version: str, after: float) -> bool:
                return any(d["model_version"] == version for k, d in list(decisions.by_key.items())
                           if decisions.received_at.get(k, 0) > after)

            assert wait_until(lambda: seen(v2, 0), 60)
            page.goto(url + "/models")
            page.click("#rollback")
            page.click("#confirm-ok")
            assert wait_until(lambda: Registry(registry.root).current() == v1, 120)
            mark = time.time()
            page.goto(url + "/live")
            assert wait_until(lambda: page.text_content("#serving") == v1, 60)
            assert wait_until(lambda: seen(v1, mark), 60)
            page.goto(url + "/activity")
            page.screenshot(path=str(shots / "activity.png"), full_page=True)
            activity = page.text_content("#audit")
            for action in ("login", "accept normal", "confirm defect", "retrain", "promote", "rollback"):
                assert action in activity, action

            # ---------------------------------------------------------- a viewer: same pages, no buttons
            viewer = browser.new_context().new_page()
            _login(viewer, url, VIEWER)
            viewer.goto(url + "/review?camera=line-1")
            assert viewer.locator("#cards .card").count() > 0 and viewer.locator("button[data-act]").count() == 0
            viewer.keyboard.press("a")  # nothing to do, nothing sent
            viewer.goto(url + "/models")
            assert viewer.locator("#retrain").count() == 0 and viewer.locator("button.promote").count() == 0
            viewer.context.close()
        finally:
            line1.stop()
            line2.stop()
            decisions.close()
            context.close()
    assert not errors, errors
    assert versions_in_order(decisions, "line-1") == [v1, v2, v1]
    outcome = json.loads(next((registry.root / "runs").glob("*/outcome.json")).read_text())
    print(f"retrain from the console: {outcome['timings']}, adtr_plus {outcome['adtr_plus']}, "
          f"samples {outcome['samples']['by_origin']}")
