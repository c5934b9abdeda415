"""The station page, for real: ``protoad-run CAMERA --station 127.0.0.1:0`` judging a live MJPEG camera the test
steers, and a headless Chromium (Debian's) driven by Selenium. The page loads, its live view changes, a defect put
in front of the camera appears in the gallery within 2 s of its judgement, and a click stores a label in the
database. Access rules (the loopback, the token, JSON-only actions) are checked over plain HTTP."""

from __future__ import annotations

import json
import shutil
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest
from selenium.webdriver.common.by import By
from station_helpers import Camera, RunProcess, browser, rows, wait_until  # noqa: F401
from test_station_db import part, write_video

from protoad_edge import versions
from protoad_edge.bundle import Bundle
from protoad_edge.metadata import ModelInfo
from protoad_edge.preprocess import to_batch
from protoad_edge.runtime.backends.ort import OrtBackend

pytestmark = pytest.mark.slow


def jpeg_roundtrip(rgb: np.ndarray) -> np.ndarray:
    """What the camera's MJPEG stream delivers of ``rgb``."""
    data = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])[1]
    return cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def shown(index: int, defect: bool) -> np.ndarray:
    """A good part, or one with a black-and-white checked patch on it (a defect the tiny model tells apart)."""
    frame = part(index)
    if defect:
        yy, xx = np.mgrid[0:36, 0:36]
        frame[42:78, 62:98] = np.where(((yy // 6 + xx // 6) % 2)[..., None] == 0, 255, 0)
    return frame


@pytest.fixture(scope="module")
def scores(tiny_model: Path) -> dict[str, float]:
    """The highest score of a good part and the lowest of a defective one, as the camera delivers them (the same
    five parts over and over, so these are exact), and a threshold halfway."""
    backend = OrtBackend(tiny_model, providers=["CPUExecutionProvider"])
    pre = backend.info.preprocess
    found = {}
    for defect in (False, True):
        crops = [pre(jpeg_roundtrip(shown(i, defect))) for i in range(10)]
        found[defect] = backend.infer(to_batch(crops))[1]
    assert found[False].max() < found[True].min(), found
    good, bad = float(found[False].max()), float(found[True].min())
    return {"good": good, "defect": bad, "threshold": (good + bad) / 2}


class Line:
    """A camera showing good parts, and a defective one while ``defect_until`` lies ahead."""

    def __init__(self) -> None:
        self.defect_until = 0.0
        self.camera = Camera(lambda i: shown(i, time.time() < self.defect_until), fps=8)

    def show_defect(self, seconds: float) -> None:
        self.defect_until = time.time() + seconds


@pytest.fixture(scope="module")
def station(tiny_model: Path, scores: dict[str, float], tmp_path_factory: pytest.TempPathFactory):
    """The run judging the camera, with its own copy of the tiny bundle (the page changes it), whose threshold
    is set between good and defective parts."""
    folder = tmp_path_factory.mktemp("station")
    (folder / "models").mkdir()
    for suffix in (".onnx", ".json", ".prototypes.npy"):
        shutil.copy(tiny_model.with_name(tiny_model.stem + suffix), folder / "models")
    model = folder / "models" / tiny_model.name
    info = ModelInfo.load_json(model.with_suffix(".json"))
    info.image_threshold, info.threshold_rule = scores["threshold"], "manual"
    info.save_json(model.with_suffix(".json"))
    line = Line()
    process = RunProcess(
        [line.camera.url, "--model", str(model), "--db", "line.db", "--station", "127.0.0.1:0"]
        + ["--db-normal-every", "4", "--status-every", "0", "--reload-every", "0.2"],
        folder,
    )
    try:
        url = process.url()
        yield {"url": url, "db": folder / "line.db", "line": line, "process": process, "model": model}
    finally:
        process.process.terminate()
        code = process.wait(60)
        line.camera.close()
        assert code == 143, process.log  # SIGTERM: today's exit status of a terminated run


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes, dict[str, str]]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, error.read(), dict(error.headers)


def post(url: str, body: dict, content_type: str = "application/json") -> tuple[int, dict | bytes]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": content_type}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_the_page_loads_and_its_live_view_changes(station: dict, browser) -> None:  # noqa: F811
    browser.get(station["url"])
    live = wait_until(lambda: browser.find_elements(By.ID, "live-0"), 20, "the source's live view")[0]
    first = wait_until(lambda: live.get_attribute("data-seq"), 20, "a first live picture")
    assert browser.execute_script("return arguments[0].naturalWidth", live) == 160  # the frame's own width
    wait_until(lambda: live.get_attribute("data-seq") != first, 10, "the live view to change")
    assert "camera" not in browser.find_element(By.CSS_SELECTOR, "#source-0 .source-name").text
    judged = browser.find_element(By.CSS_SELECTOR, "#source-0 .count-frames")
    count = wait_until(lambda: judged.text.isdigit() and int(judged.text), 10, "the judged counter")
    wait_until(lambda: int(judged.text) > count, 10, "the judged counter to grow")
    shown = browser.execute_script(
        "return ['frames', 'ok', 'anomalies'].map(c => document.querySelector('#source-0 .count-' + c).textContent)"
    )
    assert int(shown[1]) + int(shown[2].split()[0]) == int(shown[0])  # passed + rejected = judged
    assert "model" in browser.find_element(By.ID, "model").text and "tiny" in browser.find_element(By.ID, "model").text
    health = browser.find_element(By.CSS_SELECTOR, "#source-0 .health").text
    assert "health: ok" in health and "not checked" in health  # the tiny bundle records nothing of its images


def test_a_defect_appears_in_the_gallery_and_a_click_stores_its_label(station: dict, browser) -> None:  # noqa: F811
    browser.get(station["url"])
    wait_until(lambda: browser.find_elements(By.ID, "live-0"), 20, "the page")
    before = max((r["id"] for r in rows(station["db"])), default=0)
    station["line"].show_defect(0.4)
    anomaly = wait_until(
        lambda: next((r for r in rows(station["db"]) if r["id"] > before and r["verdict"] == "anomaly"), None),
        20,
        "the defect's judgement",
    )
    judged_at = anomaly["timestamp"] + anomaly["latency_ms"] / 1000
    card = wait_until(
        lambda: browser.find_elements(By.CSS_SELECTOR, f"#gallery .card[data-id='{anomaly['id']}']"),
        10,
        "the defect in the gallery",
        every=0.02,
    )[0]
    shown_after = time.time() - judged_at
    assert shown_after <= 2.0, f"the gallery showed the defect {shown_after:.2f} s after its judgement"
    assert browser.find_element(By.CSS_SELECTOR, "#gallery .card").get_attribute("data-id") >= str(anomaly["id"])
    image = card.find_element(By.CSS_SELECTOR, "img.overlay")
    wait_until(lambda: browser.execute_script("return arguments[0].naturalWidth", image) == 160, 10, "its overlay")
    # no name, no label: every action is logged with who did it
    card.find_element(By.CSS_SELECTOR, "button[data-label='false-alarm']").click()
    notice = wait_until(lambda: browser.find_element(By.ID, "notice").text, 10, "the notice")
    assert "enter your name" in notice and rows(station["db"], "SELECT * FROM labels") == []
    browser.find_element(By.ID, "operator").send_keys("Ana Line3")
    card.find_element(By.CSS_SELECTOR, "button[data-label='false-alarm']").click()
    wait_until(lambda: card.get_attribute("data-label") == "false-alarm", 10, "the card to show the label")
    labels = rows(station["db"], "SELECT * FROM labels")
    assert [(r["frame"], r["label"], r["operator"]) for r in labels] == [(anomaly["id"], "false-alarm", "Ana Line3")]
    actions = rows(station["db"], "SELECT * FROM actions")
    assert actions[-1]["operator"] == "Ana Line3" and json.loads(actions[-1]["detail"]) == {
        "frame": anomaly["id"],
        "label": "false-alarm",
    }
    assert "Ana Line3 (127.0.0.1) marked frame" in station["process"].log
    wait_until(lambda: "Ana Line3" in browser.find_element(By.ID, "actions").text, 10, "who did what, on the page")


def test_passed_frames_can_be_marked_missed(station: dict, browser) -> None:  # noqa: F811
    browser.get(station["url"])
    browser.find_element(By.ID, "operator").send_keys("Ben")
    card = wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, "#passed .card"), 20, "a sampled passed part")[0]
    frame_id = int(card.get_attribute("data-id"))
    card.find_element(By.CSS_SELECTOR, "button[data-label='missed-defect']").click()
    wait_until(lambda: card.get_attribute("data-label") == "missed-defect", 10, "the label on the card")
    assert rows(station["db"], "SELECT label, operator FROM labels WHERE frame = ?", (frame_id,)) == [
        {"label": "missed-defect", "operator": "Ben"}
    ]


def test_the_api_refuses_what_it_must(station: dict) -> None:
    url = station["url"]
    status, body, headers = get(url + "api/live/0.jpg?width=64")
    assert status == 200 and headers["Content-Type"] == "image/jpeg" and int(headers["X-Frame-Seq"]) > 0
    assert cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR).shape[1] == 64
    assert get(url + "api/live/3.jpg")[0] == 400
    assert get(url + "api/gallery?limit=abc")[0] == 400
    assert get(url + "api/nothing")[0] == 404
    # a DNS-rebinding page names another host: refused on the loopback
    assert get(url + "api/status", {"Host": "evil.example:80"})[0] == 403
    # a form from another site cannot send JSON without asking first: only JSON changes anything
    status, _ = post(url + "api/label", {"frame": 1, "label": "false-alarm", "operator": "x"}, "text/plain")
    assert status == 415
    status, answer = post(url + "api/label", {"frame": 10**9, "label": "false-alarm", "operator": "x"})
    assert status == 400 and b"no judged frame" in answer  # type: ignore[operator]


def test_a_station_beyond_the_loopback_needs_a_token(tiny_model: Path, tmp_path: Path) -> None:
    source = write_video(tmp_path / "v.avi", 400, set())
    refused = RunProcess(
        [str(source), "--model", str(tiny_model), "--db", "x.db", "--station", "0.0.0.0:0"],
        tmp_path,
        env={"PROTOAD_STATION_TOKEN": ""},
    )
    assert refused.wait(60) == 2
    assert refused.lines[-1] == (
        "error: --station 0.0.0.0:0 is reachable from other machines: give it a token "
        "(--station-token-file FILE, or the PROTOAD_STATION_TOKEN environment variable)"
    )
    token = tmp_path / "token"
    token.write_text("s3cret-t0ken\n")
    process = RunProcess(
        [
            str(source),
            "--model",
            str(tiny_model),
            "--db",
            "y.db",
            "--station",
            "0.0.0.0:0",
            "--station-token-file",
            str(token),
        ],
        tmp_path,
    )
    try:
        url = process.url().replace("0.0.0.0", "127.0.0.1")
        assert "s3cret" not in process.log
        assert get(url + "api/status")[0] == 401
        assert get(url + "api/status", {"X-Station-Token": "wrong"})[0] == 401
        assert get(url + "api/status", {"X-Station-Token": "s3cret-t0ken"})[0] == 200
        status, _, headers = get(url + "?token=s3cret-t0ken")
        assert status == 200 and "SameSite=Strict" in headers["Set-Cookie"] and "HttpOnly" in headers["Set-Cookie"]
        assert get(url + "api/status", {"Cookie": "protoad_station_token=s3cret-t0ken"})[0] == 200
    finally:
        process.kill()


def test_a_finite_source_still_ends_the_run(tiny_model: Path, tmp_path: Path) -> None:
    """The page lives as long as the run: a video that ends ends the run, with exit status 0, and the port
    closes."""
    source = write_video(tmp_path / "short.avi", 12, {5})
    process = RunProcess(
        [str(source), "--model", str(tiny_model), "--db", "s.db", "--station", "127.0.0.1:0", "--status-every", "0"],
        tmp_path,
    )
    url = process.url()
    assert process.wait(60) == 0, process.log
    assert "frames      12" in process.stdout and "database    s.db: 12 judgements recorded" in process.stdout
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=5)


def test_many_pages_at_once_share_one_picture_per_frame(station: dict) -> None:
    """Ten pages asking for the live view at once get the same frame's picture; none fails."""
    answers: list[tuple[int, str]] = []

    def ask() -> None:
        status, _, headers = get(station["url"] + "api/live/0.jpg?width=160")
        answers.append((status, headers.get("X-Frame-Seq", "")))

    threads = [threading.Thread(target=ask) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [status for status, _ in answers] == [200] * 10


def test_applying_a_threshold_changes_the_verdicts_of_the_following_frames(station: dict, browser) -> None:  # noqa: F811
    """Passed parts marked 'missed defect' make the page suggest a lower threshold; Apply writes it as a new
    version of the bundle, and the running line judges the next frames with it: parts that passed now fail."""
    before = ModelInfo.load_json(station["model"].with_suffix(".json"))
    query = "SELECT id FROM frames WHERE verdict = 'ok' AND images IS NOT NULL LIMIT 12"
    passed = wait_until(lambda: len(rows(station["db"], query)) >= 5 and rows(station["db"], query), 60, "5 passed")
    for row in passed:
        status, _ = post(station["url"] + "api/label", {"frame": row["id"], "label": "missed-defect", "operator": "Cy"})
        assert status == 200
    browser.get(station["url"])
    browser.find_element(By.ID, "operator").send_keys("Cy")
    row = wait_until(
        lambda: [r for r in browser.find_elements(By.CSS_SELECTOR, "#trade tbody tr") if "suggested" in r.text],
        20,
        "the suggested threshold",
    )[0]
    suggested = float(row.find_element(By.CSS_SELECTOR, "button").get_attribute("data-threshold"))
    assert suggested < before.image_threshold
    last = max(r["id"] for r in rows(station["db"]))
    row.find_element(By.CSS_SELECTOR, "button").click()
    message = wait_until(
        lambda: "puts the threshold" in (t := browser.find_element(By.ID, "review-result").text) and t,
        60,
        "the new version",
    )
    after = ModelInfo.load_json(station["model"].with_suffix(".json"))
    assert after.version == before.version + 1 and after.image_threshold == suggested
    assert f"version {after.version} of tiny puts the threshold" in message
    judged = wait_until(
        lambda: [r for r in rows(station["db"]) if r["id"] > last and r["model_version"] == after.version],
        30,
        "frames judged with the new version",
    )
    assert all(r["threshold"] == suggested for r in judged)
    assert all((r["verdict"] == "anomaly") == (r["score"] > suggested) for r in judged)
    earlier = rows(station["db"], "SELECT * FROM frames WHERE id <= ? AND model_version = ?", (last, before.version))
    assert any(r["verdict"] == "ok" for r in earlier) and all(r["verdict"] == "anomaly" for r in judged)
    wait_until(
        lambda: browser.find_element(By.ID, "model").get_attribute("data-version") == str(after.version),
        10,
        "the page to name the new version",
    )
    applied = rows(station["db"], "SELECT * FROM actions WHERE action = 'apply'")
    assert [(a["operator"], json.loads(a["detail"])["version"]) for a in applied] == [("Cy", after.version)]
    assert after.changes[-1]["what"] == "set-threshold" and "chosen by Cy" in after.changes[-1]["split"]


def test_teaching_the_false_alarms_makes_them_pass(station: dict, scores: dict[str, float], browser) -> None:  # noqa: F811
    """With every part flagged (the threshold applied above), the operator marks good parts 'false alarm' and parts
    with the defect 'real defect' (also the frames marked before, for what they show), and teaches from
    the page: a new version with more prototypes, which passes the check on the marked frames (the defects stay
    caught), and the good parts score lower from the next frames on."""
    before = ModelInfo.load_json(station["model"].with_suffix(".json"))
    last = max(r["id"] for r in rows(station["db"]))
    station["line"].show_defect(1.0)
    bad = wait_until(
        lambda: (
            (
                found := rows(
                    station["db"],
                    "SELECT id, score FROM frames WHERE id > ? AND score >= ? AND images IS NOT NULL",
                    (last, scores["defect"] - 1e-6),
                )
            )
            and len(found) >= 2
            and found
        ),
        30,
        "2 frames of the defect",
    )
    good = rows(
        station["db"],
        "SELECT id, score FROM frames WHERE model_version = ? AND images IS NOT NULL AND "
        "score <= ? ORDER BY id DESC LIMIT 8",
        (before.version, scores["good"] + 1e-6),
    )
    # the frames marked by the tests before, marked again for what they show (a defect scores at least scores["defect"])
    again = rows(station["db"], "SELECT id, score FROM frames WHERE id IN (SELECT frame FROM labels)")
    assert len(good) >= 3
    for row in bad + good + again:
        label = "real-defect" if row["score"] >= scores["defect"] - 1e-6 else "false-alarm"
        assert post(station["url"] + "api/label", {"frame": row["id"], "label": label, "operator": "Dee"})[0] == 200
    browser.get(station["url"])
    browser.find_element(By.ID, "operator").send_keys("Dee")
    browser.find_element(By.ID, "teach").click()
    message = wait_until(
        lambda: (t := browser.find_element(By.ID, "review-result").text) and "working" not in t and t,
        180,
        "the teach to finish",
    )
    after = ModelInfo.load_json(station["model"].with_suffix(".json"))
    assert after.version == before.version + 1 and after.num_prototypes > before.num_prototypes, message
    newest = "SELECT frame, label FROM labels WHERE id IN (SELECT max(id) FROM labels GROUP BY frame)"
    marked = rows(
        station["db"],
        f"SELECT f.id FROM frames f JOIN ({newest}) l ON l.frame = f.id "
        "WHERE l.label = 'false-alarm' AND f.images IS NOT NULL",
    )
    assert f"version {after.version} of tiny knows the {len(marked)} false alarms as normal" in message
    assert "check on the" in message and ": passed;" in message
    judged = wait_until(
        lambda: rows(station["db"], "SELECT score FROM frames WHERE model_version = ?", (after.version,)),
        30,
        "frames judged with the taught version",
    )
    assert max(r["score"] for r in judged) < min(r["score"] for r in good)  # the same good parts, known now
    assert [a["operator"] for a in rows(station["db"], "SELECT * FROM actions WHERE action = 'teach'")] == ["Dee"]


def test_rolling_back_from_the_page_puts_the_version_before_back(station: dict, browser) -> None:  # noqa: F811
    """After the teach above, "Roll back the last change" puts the version it was made from back in force, bit for
    bit; the running line judges the next frames with it, and who did it is logged."""
    model = station["model"]
    taught = ModelInfo.load_json(model.with_suffix(".json"))
    if not taught.changes:  # run alone, without the tests above: a change to undo first
        status, _ = post(station["url"] + "api/apply", {"threshold": 2 * taught.image_threshold, "operator": "Flo"})
        assert status == 200
        taught = ModelInfo.load_json(model.with_suffix(".json"))
    earlier = int(taught.changes[-1]["from"])
    last = max(r["id"] for r in rows(station["db"]))
    browser.get(station["url"])
    browser.find_element(By.ID, "operator").send_keys("Flo")
    browser.find_element(By.ID, "rollback").click()
    message = wait_until(
        lambda: "rolled back" in (t := browser.find_element(By.ID, "review-result").text) and t, 60, "the rollback"
    )
    after = ModelInfo.load_json(model.with_suffix(".json"))
    assert after.version == earlier and f"version {taught.version} rolled back to version {earlier}" in message
    kept = versions.kept(Bundle.of(model))
    assert model.read_bytes() == (kept[earlier] / model.name).read_bytes()  # the version before, bit for bit
    assert taught.version in kept  # the version undone stays on disk
    judged = wait_until(
        lambda: rows(station["db"], "SELECT * FROM frames WHERE id > ? AND model_version = ?", (last, earlier)),
        30,
        "frames judged with the version rolled back to",
    )
    assert all(r["threshold"] == after.image_threshold for r in judged)
    logged = rows(station["db"], "SELECT * FROM actions WHERE action = 'rollback'")
    assert [(a["operator"], json.loads(a["detail"])) for a in logged] == [
        ("Flo", {"from": taught.version, "version": earlier})
    ]


def test_apply_is_refused_where_the_bundle_does_not_decide(tiny_model: Path, tmp_path: Path) -> None:
    """A run judging with --threshold ignores the bundle's threshold: applying one would change nothing it flags."""
    source = write_video(tmp_path / "v.avi", 400, set())
    process = RunProcess(
        [str(source), "--model", str(tiny_model), "--threshold", "0.5", "--db", "o.db", "--station", "127.0.0.1:0"],
        tmp_path,
    )
    try:
        url = process.url()
        status, answer = post(url + "api/apply", {"threshold": 0.1, "operator": "Eve"})
        assert status == 400 and b"this run judges with --threshold 0.5, whatever the bundle says" in answer
        status, answer = post(url + "api/apply", {"threshold": "low", "operator": "Eve"})
        assert status == 400 and b"give the threshold as a number" in answer
    finally:
        process.kill()
    assert ModelInfo.load_json(tiny_model.with_suffix(".json")).version == 1  # untouched
