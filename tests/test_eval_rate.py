"""`alpaca-forge eval rate`: the blind rating page in a real browser against a real server on loopback.

Debian's headless chromium, driven by its own chromedriver (as in test_serve_page.py: nothing is
downloaded). Two raters rate six items of two tiny predictions files, one with the keyboard, one
with the buttons; the test decides each verdict in the systems' terms, works out which slot that
is from the texts the page shows, and then holds the server's record, the written reports and the
agreement (against statsmodels' Cohen's kappa) to what was clicked. Then: a reload and a restart
lose nothing, an undo takes one rating back, bad requests get JSON 4xx errors, and bad command
lines exit 2 with a message and a fix.

Screenshot for the closing note: .test-artifacts/eval-rate-page.png.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from browser import open_chromium, wait_for

from conftest import CLI, assert_user_error, run_cli, sigint_default

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / ".test-artifacts"

# The systems' names and their files' names: none of them may ever reach the browser.
A_NAME, B_NAME = "sysalpha", "sysomega"
A_FILE, B_FILE = "zebra-preds.jsonl", "quokka-preds.jsonl"
SECRETS = (A_NAME, B_NAME, "zebra", "quokka")
ITEMS = [
    {"id": f"t{k}", "instruction": text, "input": given, "category": "writing" if k < 3 else "facts"}
    for k, (text, given) in enumerate(
        [
            ("Write a haiku about rain.", ""),
            ("Summarise the text.", "Cats sleep most of the day.\nThey wake at night."),
            ("Give a title to this story.", "A fox finds a key."),
            ("What is the capital of France?", ""),
            ("Translate to French.", "Good morning"),
            ("Name three primary colours.", ""),
        ]
    )
]
# The verdicts the test gives, in the systems' terms (a: A_NAME better, b: B_NAME better).
PLAN = {
    "alice": {"t0": "a", "t1": "b", "t2": "tie", "t3": "a", "t4": "a", "t5": "b"},
    "bob": {"t0": "a", "t1": "b", "t2": "a", "t3": "tie", "t4": "a", "t5": "a"},
}
# The LLM judge's report, with A and B the other way round, t4 unjudged and t5 missing.
JUDGE_OUTCOMES = {"t0": "loss", "t1": "win", "t2": "tie", "t3": "loss", "t4": "unjudged"}
KEYS = {"A": ("1", "a"), "tie": ("2", "t"), "B": ("3", "b")}
BUTTONS = {"A": "choose-a", "tie": "choose-tie", "B": "choose-b"}


def answer(system: str, item: str) -> str:
    k = int(item[1:])
    if system == A_NAME:
        return f"Answer {k}: short and plain."
    return f"Reply {k}, longer:\nwith a second line and   spaces kept."


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@dataclasses.dataclass(frozen=True)
class Files:
    set: Path
    a: Path
    b: Path
    judge_report: Path

    def config(self, output: Path, **overrides: Any) -> Any:
        from alpaca_forge.eval.rate import RateConfig

        settings = {
            "set": str(self.set),
            "a": f"{A_NAME}={self.a}",
            "b": f"{B_NAME}={self.b}",
            "output": str(output),
            "port": 0,
            "bootstrap_samples": 200,
            **overrides,
        }
        return RateConfig(**settings)


def _files(folder: Path) -> Files:
    folder.mkdir(parents=True, exist_ok=True)
    _write_jsonl(folder / "set.jsonl", ITEMS)
    a = _write_jsonl(folder / A_FILE, [{"id": it["id"], "output": answer(A_NAME, it["id"])} for it in ITEMS])
    b = _write_jsonl(folder / B_FILE, [{"id": it["id"], "output": answer(B_NAME, it["id"])} for it in ITEMS])
    judge = folder / "judge" / "report.json"
    judge.parent.mkdir()
    judge.write_text(
        json.dumps(
            {
                "a": B_NAME,  # the other way round: outcomes are from sysomega's side
                "b": A_NAME,
                "judge": "tiny-judge",
                "per_item": [
                    {"id": i, "category": None, "outcome": o, "winners": []}
                    for i, o in JUDGE_OUTCOMES.items()
                ],
            }
        ),
        encoding="utf-8",
    )
    return Files(folder / "set.jsonl", a, b, judge)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Files:
    return _files(tmp_path_factory.mktemp("rate-files"))


# ---------------------------------------------------------------------------------------------
# The browser


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    driver = open_chromium()
    yield driver
    driver.quit()


class RatePage:
    """The page as a rater works it: by its labelled controls (data-testid) and its keys."""

    def __init__(self, driver: Any, url: str):
        self.driver, self.url = driver, url

    def open(self, *, forget: bool = False) -> RatePage:
        self.driver.get(self.url + "/")
        if forget:
            self.driver.execute_script("localStorage.clear()")
            self.driver.get(self.url + "/")
        return self

    def find(self, testid: str) -> Any:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, f'[data-testid="{testid}"]')

    def visible(self, testid: str) -> bool:
        return self.find(testid).is_displayed()

    def text(self, testid: str) -> str:
        # textContent, not .text: the page's texts as given, line breaks and runs of spaces too
        return self.find(testid).get_attribute("textContent")

    def sign_in(self, name: str) -> None:
        from selenium.webdriver.common.keys import Keys

        wait_for(lambda: self.visible("name-form"), 10, "the name form")
        field = self.find("rater-name")
        field.clear()
        field.send_keys(name, Keys.ENTER)
        wait_for(lambda: self.visible("rating") or self.visible("done"), 10, "the first item")

    def progress(self) -> str:
        return self.text("progress")

    def ready(self) -> bool:
        return self.visible("rating") and self.find("choose-a").is_enabled()

    def shown(self) -> dict[str, Any]:
        wait_for(self.ready, 10, "an item to rate")
        return {
            "item": self.find("rating").get_attribute("data-item"),
            "instruction": self.text("instruction"),
            "input": self.text("input") if self.visible("input-block") else None,
            "A": self.text("response-a"),
            "B": self.text("response-b"),
            "progress": self.progress(),
        }

    def wait_past(self, progress: str) -> None:
        wait_for(lambda: self.progress() != progress, 10, f"the page to move on from {progress!r}")

    def press(self, key: str) -> None:
        from selenium.webdriver.common.action_chains import ActionChains

        ActionChains(self.driver).send_keys(key).perform()

    def click(self, testid: str) -> None:
        element = self.find(testid)
        self.driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
        element.click()


def slot_for(label: str, shown: dict[str, Any]) -> str:
    """The slot verdict that says `label` (in the systems' terms) about the pair as shown."""
    if label == "tie":
        return "tie"
    wanted = answer(A_NAME if label == "a" else B_NAME, shown["item"])
    return "A" if shown["A"] == wanted else "B"


def rate_all(page: RatePage, rater: str, *, keys: bool) -> list[dict[str, Any]]:
    """Rates every item the page hands out as PLAN says, by keys or by buttons; what was seen."""
    seen = []
    for k in range(len(ITEMS)):
        shown = page.shown()
        item = next(it for it in ITEMS if it["id"] == shown["item"])
        assert shown["progress"] == f"Item {k + 1} of {len(ITEMS)}"
        assert shown["instruction"] == item["instruction"]
        assert shown["input"] == (item["input"] or None)  # the input block only where there is one
        assert {shown["A"], shown["B"]} == {answer(A_NAME, item["id"]), answer(B_NAME, item["id"])}
        html = page.driver.page_source
        assert not [s for s in SECRETS if s in html], "a system's name reached the page"
        verdict = slot_for(PLAN[rater][item["id"]], shown)
        if keys:
            page.press(KEYS[verdict][k % 2])  # both keys of each verdict get used
        else:
            page.click(BUTTONS[verdict])
        seen.append({**shown, "verdict": verdict, "a_first": shown["A"] == answer(A_NAME, item["id"])})
        page.wait_past(shown["progress"])
    return seen


def ratings_rows(output: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (output / "ratings.jsonl").read_text(encoding="utf-8").splitlines()]


# ---------------------------------------------------------------------------------------------
# Two raters, blind


@pytest.fixture(scope="module")
def rated(files, browser, tmp_path_factory) -> dict[str, Any]:
    """Alice rates all six items with the keyboard, Bob with the buttons, on one page; what each saw."""
    from alpaca_forge.eval.rate import start

    output = tmp_path_factory.mktemp("rate-out")
    config = files.config(output)
    seen: dict[str, list[dict[str, Any]]] = {}
    with start(config) as server:
        page = RatePage(browser, server.url).open(forget=True)
        assert page.visible("name-form") and not page.visible("rating")
        page.sign_in("alice")
        assert page.text("rater-shown") == "alice"
        seen["alice"] = rate_all(page, "alice", keys=True)
        wait_for(lambda: page.visible("done"), 10, "the done screen")
        assert page.progress() == "6 of 6 rated" and "all 6 items" in page.text("done-text")
        page.click("switch-rater")
        page.sign_in("bob")
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "eval-rate-page.png"))
        seen["bob"] = rate_all(page, "bob", keys=False)
        wait_for(lambda: page.visible("done"), 10, "the done screen")
        # what the browser received: the page, its script and style, and the API's JSON
        resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert resources and all(r.startswith(server.url + "/") for r in resources), resources
        problems = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert not problems, problems
        raw = [
            _get(server.url + p)[1]
            for p in ("/", "/static/rate.js", "/static/rate.css", "/api/next?rater=carol")
        ]
        assert not [s for s in SECRETS for body in raw if s in json.dumps(body)], "a system's name was served"
    return {"config": config, "output": output, "seen": seen}


@pytest.mark.integration
def test_each_rater_gets_their_own_random_balanced_sides(rated):
    seen = rated["seen"]
    for rater in ("alice", "bob"):
        firsts = [s["a_first"] for s in seen[rater]]
        assert firsts.count(True) == firsts.count(False) == 3, (rater, firsts)  # half each way
    assert [s["a_first"] for s in seen["alice"]] != [s["a_first"] for s in seen["bob"]]
    # the set's order, for both raters (raters who stop early overlap as much as they can)
    assert (
        [s["item"] for s in seen["alice"]] == [s["item"] for s in seen["bob"]] == [it["id"] for it in ITEMS]
    )


@pytest.mark.integration
def test_the_server_recorded_what_was_clicked_on_the_sides_shown(rated):
    rows = ratings_rows(rated["output"])
    assert len(rows) == 12
    for row in rows:
        s = next(s for s in rated["seen"][row["rater"]] if s["item"] == row["item"])
        assert (row["first"], row["second"]) == ((A_NAME, B_NAME) if s["a_first"] else (B_NAME, A_NAME))
        assert row["verdict"] == s["verdict"]
        winner = {"A": row["first"], "B": row["second"], "tie": "tie"}[row["verdict"]]
        assert winner == {"a": A_NAME, "b": B_NAME, "tie": "tie"}[PLAN[row["rater"]][row["item"]]]


def _counts(labels: list[str]) -> tuple[int, int, int]:
    return labels.count("a"), labels.count("tie"), labels.count("b")


@pytest.mark.integration
def test_the_reports_count_what_was_clicked(rated, files):
    output = rated["output"]
    result = run_cli(
        "eval",
        "rate",
        *_flags(rated["config"]),
        "--report-only",
        "--judge-report",
        str(files.judge_report.parent),
    )
    assert result.returncode == 0, result.stderr
    assert "rated by 2 people" in result.stderr and "kappa alice / bob" in result.stderr
    for rater, plan in PLAN.items():
        report = json.loads((output / "raters" / rater / "report.json").read_text())
        assert (report["a"], report["b"], report["judge"]) == (A_NAME, B_NAME, f"human:{rater}")
        assert (report["wins"], report["ties"], report["losses"]) == _counts(list(plan.values()))
        assert {i["id"]: i["outcome"] for i in report["per_item"]} == {
            item: {"a": "win", "b": "loss", "tie": "tie"}[label] for item, label in plan.items()
        }
        assert (output / "raters" / rater / "report.md").is_file()
    pooled = json.loads((output / "report.json").read_text())
    # an item the two raters decided differently is a tie
    agreed = [PLAN["alice"][i] if PLAN["alice"][i] == PLAN["bob"][i] else "tie" for i in PLAN["alice"]]
    assert (pooled["wins"], pooled["ties"], pooled["losses"]) == _counts(agreed)
    assert pooled["judge"] == "humans (2 raters)" and pooled["judgements"] == 12
    assert "blind" in (output / "report.md").read_text()


def _sm_kappa(x: list[str], y: list[str]) -> float:
    import numpy as np
    from statsmodels.stats.inter_rater import cohens_kappa

    labels = ["a", "b", "tie"]
    table = np.zeros((3, 3))
    for u, v in zip(x, y, strict=True):
        table[labels.index(u), labels.index(v)] += 1
    return float(cohens_kappa(table).kappa)


@pytest.mark.integration
def test_kappa_between_raters_and_with_the_judge(rated, files):
    from alpaca_forge.eval.rate import write_rate_report

    config = dataclasses.replace(rated["config"], judge_report=str(files.judge_report))
    report = write_rate_report(config)
    data = json.loads((rated["output"] / "agreement.json").read_text())
    items = list(PLAN["alice"])
    alice, bob = ([PLAN[r][i] for i in items] for r in ("alice", "bob"))
    (pair,) = data["between_raters"]
    assert pair["between"] == ["alice", "bob"] and pair["items"] == 6
    assert pair["kappa"] == pytest.approx(_sm_kappa(alice, bob))
    assert pair["agreement"] == pytest.approx(sum(u == v for u, v in zip(alice, bob, strict=True)) / 6)
    assert report.between_raters[0].kappa == pytest.approx(pair["kappa"])

    # the judge's outcomes are from sysomega's side: a win of its A is a win of our B
    judge = {"t0": "a", "t1": "b", "t2": "tie", "t3": "a"}
    rows = {k["between"][0]: k for k in data["judge"]["with_raters"]}
    assert set(rows) == {"alice", "bob", "humans (pooled)"}
    assert data["judge"]["name"] == "tiny-judge" and data["judge"]["unjudged_items"] == 1
    for rater in ("alice", "bob"):
        k = rows[rater]
        assert k["items"] == 4 and k["left_out"] == {"unjudged_by_judge": 1, "not_in_judge_report": 1}
        assert k["kappa"] == pytest.approx(_sm_kappa([PLAN[rater][i] for i in judge], list(judge.values())))
    pooled = {i: PLAN["alice"][i] if PLAN["alice"][i] == PLAN["bob"][i] else "tie" for i in judge}
    assert rows["humans (pooled)"]["kappa"] == pytest.approx(
        _sm_kappa(list(pooled.values()), list(judge.values()))
    )
    md = (rated["output"] / "agreement.md").read_text()
    assert "| alice / bob | 6 |" in md and "tiny-judge" in md


@pytest.mark.integration
def test_eval_reports_are_read_back_through_one_typed_reader(rated, tmp_path):
    from alpaca_forge.core.errors import UserError
    from alpaca_forge.eval.rate import write_rate_report
    from alpaca_forge.eval.report import read_pairwise_report

    write_rate_report(rated["config"])  # writes raters/NAME/report.json as `eval pairwise` does
    report = read_pairwise_report(rated["output"] / "raters" / "alice", flag="--judge-report", fix="f")
    assert report.path == rated["output"] / "raters" / "alice" / "report.json"
    assert (report.a, report.b, report.judge) == (A_NAME, B_NAME, "human:alice")
    assert {r.id: r.outcome for r in report.per_item} == {
        item: {"a": "win", "b": "loss", "tie": "tie"}[label] for item, label in PLAN["alice"].items()
    }
    bad = [
        ("{not json", "report.json:1: not JSON"),
        ('{"a": "x", "b": "y"}', "not a pairwise report (no per-item outcomes)"),
        ('{"a": "x", "per_item": [{"id": 3, "outcome": "won"}]}', "item '3' has the outcome 'won'"),
    ]
    for text, message in bad:
        (tmp_path / "report.json").write_text(text)
        with pytest.raises(
            UserError, match="--judge-report .*" + message.replace("(", r"\(").replace(")", r"\)")
        ):
            read_pairwise_report(tmp_path, flag="--judge-report", fix="f")
    with pytest.raises(UserError, match="cannot be read"):
        read_pairwise_report(tmp_path / "missing.json", flag="--judge-report", fix="f")


# ---------------------------------------------------------------------------------------------
# Resuming, undoing


@pytest.mark.integration
def test_a_rater_resumes_after_a_reload_and_a_restart_losing_nothing(files, browser, tmp_path):
    from alpaca_forge.eval.rate import start

    config = files.config(tmp_path / "out")
    with start(config) as server:
        page = RatePage(browser, server.url).open(forget=True)
        page.sign_in("carol")
        for key in ("1", "3"):
            before = page.shown()
            page.press(key)
            page.wait_past(before["progress"])
        third = page.shown()
        # side by side on a wide window, A above B on a narrow one
        a, b = (page.find(f"response-{x}").rect for x in "ab")
        assert a["y"] == b["y"] and a["x"] + a["width"] <= b["x"], (a, b)
        browser.set_window_size(480, 900)
        try:
            a, b = (page.find(f"response-{x}").rect for x in "ab")
            assert a["y"] + a["height"] <= b["y"] and a["x"] == b["x"], (a, b)
        finally:
            browser.set_window_size(1280, 900)
        page.open()  # a reload: the name is remembered, the next unrated item comes back
        assert page.shown() == third and third["progress"] == "Item 3 of 6"
        port = server.port
    kept = ratings_rows(tmp_path / "out")
    assert [r["item"] for r in kept] == ["t0", "t1"]
    with (tmp_path / "out" / "ratings.jsonl").open("a") as f:
        f.write('{"rater": "carol", "item": "t2", "fir')  # killed mid-write (kill -9)

    # the same port, so the tab left open talks to the new server; its token is stale now
    with start(dataclasses.replace(config, port=port)) as server:
        page.press("2")
        wait_for(
            lambda: page.visible("notice") and "nothing was recorded" in page.text("notice"), 10, "the notice"
        )
        assert page.shown() == third  # the same item, on the same sides
        page.press("2")
        wait_for(lambda: page.progress() == "Item 4 of 6", 10, "the fourth item")
        page.press("u")  # undo: the third item again
        wait_for(lambda: page.progress() == "Item 3 of 6", 10, "the third item back")
        assert page.shown() == third and "taken back" in page.text("notice")
        for _ in range(4):
            before = page.shown()
            page.press("t")
            page.wait_past(before["progress"])
        wait_for(lambda: page.visible("done"), 10, "the done screen")
        assert not page.find("undo").get_attribute("disabled")
    rows = ratings_rows(tmp_path / "out")
    assert rows[:2] == kept  # nothing rewritten, the cut-off line gone
    assert [(r["item"], r.get("undo", False)) for r in rows[2:5]] == [
        ("t2", False),
        ("t2", True),
        ("t2", False),
    ]
    from alpaca_forge.eval.rate import RatingStore

    with RatingStore(tmp_path / "out" / "ratings.jsonl") as store:
        assert [r.item for r in store.ratings("carol")] == [it["id"] for it in ITEMS]


# ---------------------------------------------------------------------------------------------
# Bad requests


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    return _call(urllib.request.Request(url, headers=headers or {}))


def _post(url: str, body: Any, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return _call(
        urllib.request.Request(
            url, data=data, headers={"content-type": "application/json", **(headers or {})}
        )
    )


def _call(request: urllib.request.Request) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            raw, status, kind = r.read(), r.status, r.headers.get("content-type", "")
    except urllib.error.HTTPError as e:
        raw, status, kind = e.read(), e.code, e.headers.get("content-type", "")
    return status, json.loads(raw) if "json" in kind else raw.decode()


@pytest.mark.integration
def test_bad_requests_get_a_json_4xx_and_the_server_keeps_serving(files, tmp_path):
    from alpaca_forge.eval.rate import start

    with start(files.config(tmp_path / "out")) as server:
        api = server.url + "/api"
        status, first = _get(api + "/next?rater=dave")
        assert status == 200 and first["item"]["id"] == "t0"
        good = {"rater": "dave", "item": "t0", "verdict": "A", "token": first["item"]["token"]}
        bad = [
            (b"{not json", 400, "bad_json"),
            ([1, 2], 400, "bad_json"),
            ({**good, "rater": "no spaces please"}, 400, "bad_rater"),
            ({k: v for k, v in good.items() if k != "rater"}, 400, "bad_rater"),
            ({**good, "verdict": "C"}, 400, "bad_verdict"),
            ({**good, "verdict": None}, 400, "bad_verdict"),
            ({**good, "item": "t99"}, 404, "unknown_item"),
            ({**good, "item": 3}, 404, "unknown_item"),
            ({**good, "token": None}, 400, "bad_token"),
            ({**good, "token": "0" * 32}, 409, "stale_token"),
            ({**good, "item": "t1"}, 409, "stale_token"),  # t0's token does not rate t1
            ({**good, "rater": "erin"}, 409, "stale_token"),  # nor does dave's rate erin's
            (b"{" + b" " * 20_000 + b"}", 413, "too_large"),
        ]
        for body, want_status, code in bad:
            status, reply = _post(api + "/rate", body)
            assert (status, reply["error"]["code"]) == (want_status, code), (body, reply)
            assert reply["error"]["message"]
        assert _post(api + "/rate", good)[0] == 200
        status, reply = _post(api + "/rate", good)  # the same again: a second tab
        assert (status, reply["error"]["code"]) == (409, "already_rated")
        for path, want_status in (("/next", 400), ("/next?rater=../x", 400), ("/nothing", 404)):
            status, reply = _get(api + path)
            assert status == want_status and reply["error"]["message"], (path, reply)
        assert _get(server.url + "/static/../config.py")[0] == 404
        # not through another site's page, nor a name that is not loopback (DNS rebinding)
        status, reply = _post(api + "/rate", good, {"origin": "http://evil.example"})
        assert (status, reply["error"]["code"]) == (403, "origin_not_allowed")
        status, reply = _get(api + "/next?rater=dave", {"host": "evil.example:8400"})
        assert (status, reply["error"]["code"]) == (403, "host_not_allowed")
        status, reply = _post(api + "/undo", {"rater": "dave"})
        assert status == 200 and reply["undone"] == "t0"
        assert _post(api + "/undo", {"rater": "dave"})[1]["undone"] is None
        status, after = _get(api + "/next?rater=dave")
        assert status == 200 and after["item"]["id"] == "t0" and after["rated"] == 0
    rows = ratings_rows(tmp_path / "out")
    assert [(r["item"], r.get("undo", False)) for r in rows] == [("t0", False), ("t0", True)]


# ---------------------------------------------------------------------------------------------
# Attacks: another site's page, DNS rebinding, odd tokens, a flood of names


def _route_calls(server: Any) -> list[tuple[str, str]]:
    """(method, path) for every route of the running app, and a path no route has."""
    from starlette.routing import Route

    calls = [("GET", "/nothing")]
    for route in server.app.routes:
        assert isinstance(route, Route), route
        path = route.path.replace("{name}", "rate.js")
        if path == "/api/next":
            path += "?rater=dave"
        calls += [(method, path) for method in sorted(route.methods - {"HEAD"})]
    return calls


def _send(url: str, method: str, headers: dict[str, str], body: Any = None) -> tuple[int, Any]:
    if method == "GET":
        return _get(url, headers)
    return _post(url, body if body is not None else {"rater": "dave"}, headers)


@pytest.mark.integration
def test_every_route_refuses_a_foreign_host_and_another_sites_origin_null_included(files, tmp_path):
    from alpaca_forge.eval.rate import start

    with start(files.config(tmp_path / "out")) as server:
        calls = _route_calls(server)
        assert {path for _, path in calls} >= {
            "/",
            "/static/rate.js",
            "/api/next?rater=dave",
            "/api/rate",
            "/api/undo",
        }
        status, first = _get(server.url + "/api/next?rater=dave")
        good = {"rater": "dave", "item": "t0", "verdict": "A", "token": first["item"]["token"]}
        own = server.url  # "http://127.0.0.1:PORT", what the page's own calls send as Origin
        assert _post(server.url + "/api/rate", good, {"origin": own})[0] == 200
        attacks = [
            ({"host": "evil.example:8400"}, "host_not_allowed"),  # DNS rebinding
            ({"host": "["}, "host_not_allowed"),  # no name at all (it was a 500)
            ({"origin": "http://["}, "origin_not_allowed"),
            (
                {"host": f"evil.example:{server.port}", "origin": f"http://evil.example:{server.port}"},
                "host_not_allowed",
            ),
            ({"origin": "null"}, "origin_not_allowed"),  # a sandboxed iframe, a file: page
            ({"origin": "http://evil.example"}, "origin_not_allowed"),
            ({"origin": "http://127.0.0.1:1"}, "origin_not_allowed"),  # another page on this machine
            ({"origin": f"file://127.0.0.1:{server.port}"}, "origin_not_allowed"),
        ]
        for headers, code in attacks:
            for method, path in calls:
                body = good if path == "/api/rate" else None
                status, reply = _send(server.url + path, method, headers, body)
                assert isinstance(reply, dict), (headers, method, path, reply)
                assert (status, reply["error"]["code"]) == (403, code), (headers, method, path, reply)
        # nothing the attacks sent was recorded or undone
        assert [(r["item"], r.get("undo", False)) for r in ratings_rows(tmp_path / "out")] == [("t0", False)]
        for method, path in calls:  # the page's own calls still pass the gate
            status, reply = _send(server.url + path, method, {"origin": own} if method == "POST" else {})
            assert status != 403, (method, path, reply)
        assert _get(server.url + "/static/rate.js", {"origin": own})[0] == 200


@pytest.mark.integration
def test_odd_tokens_names_and_items_are_json_4xx_not_500(files, tmp_path):
    from alpaca_forge.eval.rate import start

    with start(files.config(tmp_path / "out")) as server:
        api = server.url + "/api"
        first = _get(api + "/next?rater=dave")[1]
        good = {"rater": "dave", "item": "t0", "verdict": "A", "token": first["item"]["token"]}
        for token in ("é" * 32, "\ud800", "\u0000" * 32, "令牌"):
            status, reply = _post(api + "/rate", {**good, "token": token})
            assert (status, reply["error"]["code"]) == (409, "stale_token"), (token, reply)
        raw = json.dumps({k: v for k, v in good.items() if k != "token"})[:-1] + ', "token": "\u00e9\u00e9"}'
        status, reply = _post(api + "/rate", raw.encode("utf-8"))
        assert (status, reply["error"]["code"]) == (409, "stale_token"), reply
        status, reply = _post(api + "/rate", {**good, "token": good["token"][:-1] + "é"})
        assert (status, reply["error"]["code"]) == (409, "stale_token"), reply
        for body, code in (
            ({**good, "rater": "é"}, "bad_rater"),
            ({**good, "item": "\ud800"}, "unknown_item"),
        ):
            status, reply = _post(api + "/rate", body)
            assert status in (400, 404) and reply["error"]["code"] == code, reply
        for query in ("rater=%C3%A9", "rater=%FF", "rater=%ED%A0%80"):
            status, reply = _get(api + "/next?" + query)
            assert (status, reply["error"]["code"]) == (400, "bad_rater"), (query, reply)
        assert _post(api + "/rate", good)[0] == 200  # and the server still records
    assert [r["item"] for r in ratings_rows(tmp_path / "out")] == ["t0"]


@pytest.mark.integration
def test_a_flood_of_rater_names_holds_a_bounded_state_and_loses_no_rating(files, tmp_path, monkeypatch):
    from alpaca_forge.eval.rate import RatingStore, start

    kept = 16
    monkeypatch.setattr("alpaca_forge.eval.rate.app.SIDES_KEPT", kept * len(ITEMS))
    with start(files.config(tmp_path / "out")) as server:
        assert server.session.raters_kept_at_most == kept
        api = server.url + "/api"
        alice = _get(api + "/next?rater=alice")[1]["item"]
        shown_first = {}
        for k in range(10 * kept):  # the attack: a new name per request
            status, reply = _get(api + f"/next?rater=flood{k}")
            assert status == 200, reply
            shown_first[k] = reply["item"]["response_a"]
            assert server.session.raters_kept <= kept
            if k % kept == 0:  # some of them rate: what is on disk must stay
                token = reply["item"]["token"]
                body = {"rater": f"flood{k}", "item": "t0", "verdict": "tie", "token": token}
                assert _post(api + "/rate", body)[0] == 200
        assert server.session.raters_kept == kept
        # alice's sides were dropped long ago, and worked out again the same: her token still rates
        body = {"rater": "alice", "item": "t0", "verdict": "B", "token": alice["token"]}
        assert _post(api + "/rate", body)[0] == 200
        again = _get(api + "/next?rater=flood0")[1]
        assert again["rated"] == 1 and again["item"]["id"] == "t1"
        assert _get(api + "/next?rater=flood1")[1]["item"]["response_a"] == shown_first[1]
        assert _post(api + "/undo", {"rater": "alice"})[1]["undone"] == "t0"
        assert _post(api + "/rate", body)[0] == 200  # and rated again, the same pair
        assert server.session.raters_kept <= kept
    with RatingStore(tmp_path / "out" / "ratings.jsonl") as store:
        assert store.raters() == sorted(["alice", *(f"flood{k}" for k in range(0, 10 * kept, kept))])
        assert [r.verdict for r in store.ratings("alice")] == ["B"]


def _drip_body(port: int, gap_s: float, give_up_s: float) -> dict[str, Any]:
    """A POST whose headers arrive at once (`Content-Length: 100`) and whose body then comes one
    byte every `gap_s`, answered or not, until the server closes the connection or `give_up_s`
    has passed. What came back, the seconds until it came and until the close (None: not by
    then), and the body bytes sent before the answer."""
    body = json.dumps({"rater": "mallory"}).ljust(100).encode()
    head = (
        f"POST /api/undo HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    out: dict[str, Any] = {"reply": b"", "answered_s": None, "closed_s": None, "sent": 0}
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(head)
        t0 = time.perf_counter()
        s.settimeout(gap_s)
        sent = 0
        while time.perf_counter() - t0 < give_up_s:
            try:
                chunk = s.recv(65536)
            except TimeoutError:  # nothing from the server for a while: one more byte
                if sent < len(body):
                    with contextlib.suppress(OSError):
                        s.send(body[sent : sent + 1])
                    sent += 1
                continue
            except OSError:
                chunk = b""
            if not chunk:
                out["closed_s"] = time.perf_counter() - t0
                break
            if not out["reply"]:
                out["answered_s"], out["sent"] = time.perf_counter() - t0, sent
            out["reply"] += chunk
    return out


@pytest.mark.integration
def test_a_body_dripped_a_byte_at_a_time_gets_a_408_and_its_connection_closed(files, tmp_path, monkeypatch):
    """Headers sent at once and the body dripped: without a deadline each such client held its
    connection for good (the connection cap never closes one in the middle of a request), so
    enough of them locked honest raters out. With one, each gets a 408 within the deadline; its
    connection, idle again, is closed (keep-alive, the header deadline, or the cap), dripping or
    not; and honest raters are answered all the while."""
    from alpaca_forge.eval.rate import start

    deadline_s = 1.0
    monkeypatch.setattr("alpaca_forge.eval.rate.app.BODY_TIMEOUT_S", deadline_s)
    # the rating server's keep-alive and header deadline are 5 s each: closed within 5 s of the 408
    give_up_s = deadline_s + 5 + 3
    with start(files.config(tmp_path / "out")) as server:
        drips: list[dict[str, Any]] = []
        drippers = [
            threading.Thread(target=lambda: drips.append(_drip_body(server.port, 0.1, give_up_s)))
            for _ in range(20)
        ]
        for t in drippers:
            t.start()
        time.sleep(0.3)  # every dripper has sent its headers and some of its body
        api = server.url + "/api"
        status, first = _get(api + "/next?rater=dave")
        assert status == 200 and first["item"]["id"] == "t0"
        good = {"rater": "dave", "item": "t0", "verdict": "A", "token": first["item"]["token"]}
        assert _post(api + "/rate", good)[0] == 200
        assert all(t.is_alive() for t in drippers), "the honest rater was not answered during the attack"
        for t in drippers:
            t.join(give_up_s + 5)
        assert len(drips) == 20
        for drip in drips:
            head, _, reply = drip["reply"].partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 408 "), drip
            assert json.loads(reply)["error"]["code"] == "body_timeout", drip
            assert drip["sent"] < 100 and drip["answered_s"] < deadline_s + 1, drip
            assert drip["closed_s"] is not None, f"the connection outlived its 408: {drip}"
        assert _post(api + "/undo", {"rater": "dave"})[1]["undone"] == "t0"  # and it keeps serving
    rows = ratings_rows(tmp_path / "out")
    assert [(r["rater"], r["item"], r.get("undo", False)) for r in rows] == [
        ("dave", "t0", False),
        ("dave", "t0", True),
    ]


# ---------------------------------------------------------------------------------------------
# The command line


def _flags(config: Any) -> list[str]:
    return [
        "--set",
        config.set,
        "--a",
        config.a,
        "--b",
        config.b,
        "--output",
        config.output,
        "--bootstrap-samples",
        "200",
    ]


@pytest.mark.integration
def test_bad_command_lines_exit_2_with_a_fix(files, tmp_path):
    out = str(tmp_path / "out")
    base = ["eval", "rate", "--a", f"{A_NAME}={files.a}", "--b", f"{B_NAME}={files.b}", "--output", out]
    assert_user_error(run_cli(*base, "--set", str(tmp_path / "nope.jsonl")), "nope.jsonl")
    short = _write_jsonl(tmp_path / "short.jsonl", [{"id": "t0", "output": "only one"}])
    result = run_cli(
        *base[:2], "--set", str(files.set), "--a", str(short), "--b", str(files.b), "--output", out
    )
    assert_user_error(result, "short", "has no answer for 5 of the set's 6")
    result = run_cli(
        *base[:2],
        "--set",
        str(files.set),
        "--a",
        "model:smollm2-135m-instruct",
        "--b",
        str(files.b),
        "--output",
        out,
    )
    assert_user_error(result, "alpaca-forge infer", "then rate its file")
    result = run_cli(
        *base[:2], "--set", str(files.set), "--a", str(files.a), "--b", str(files.a), "--output", out
    )
    assert_user_error(result, "both called")
    assert_user_error(run_cli(*base, "--set", str(files.set), "--report-only"), "nobody has rated")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"a": "x", "b": "y", "per_item": []}))
    result = run_cli(*base, "--set", str(files.set), "--judge-report", str(other), "--port", "0")
    assert_user_error(result, "compares 'x' with 'y'")
    assert_user_error(run_cli(*base, "--set", str(files.set), "--port", "70000"), "--port")
    assert not (tmp_path / "out" / "ratings.jsonl").exists()


@pytest.mark.unit
def test_one_server_per_output_folder(files, tmp_path):
    from alpaca_forge.core.errors import UserError
    from alpaca_forge.eval.rate import start, write_rate_report

    config = files.config(tmp_path / "out")
    with start(config):
        with pytest.raises(UserError, match="another `alpaca-forge eval rate` is using"):
            start(config)
        with pytest.raises(UserError, match="another"):
            write_rate_report(config)  # --report-only while a server writes: refused, not raced


@pytest.mark.unit
def test_a_foreign_line_in_the_ratings_stops_the_start(files, tmp_path):
    from alpaca_forge.core.errors import UserError
    from alpaca_forge.eval.rate import start

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "ratings.jsonl").write_text('{"rater": "x", "item": "t0", "verdict": "maybe"}\n')
    with pytest.raises(UserError, match=r"ratings.jsonl:1: not a rating"):
        start(files.config(tmp_path / "out"))


@pytest.mark.integration
def test_the_command_serves_until_ctrl_c_then_writes_the_report(files, tmp_path):
    out = tmp_path / "out"
    args = [
        "eval",
        "rate",
        "--set",
        str(files.set),
        "--a",
        f"{A_NAME}={files.a}",
        "--b",
        f"{B_NAME}={files.b}",
    ]
    proc = subprocess.Popen(
        [str(CLI), *args, "--output", str(out), "--port", "0", "--bootstrap-samples", "200"],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        preexec_fn=sigint_default,
    )
    try:
        for line in proc.stderr:  # the address comes first, once the page listens
            if "rating page: " in line:
                break
        else:
            pytest.fail(f"the command ended (exit {proc.wait()}) without giving the page's address")
        url = line.split("rating page: ")[1].split()[0].rstrip("/")
        assert url.startswith("http://127.0.0.1:"), line
        item = _get(url + "/api/next?rater=frank")[1]["item"]
        assert (
            _post(
                url + "/api/rate", {"rater": "frank", "item": "t0", "verdict": "tie", "token": item["token"]}
            )[0]
            == 200
        )
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "1 rating recorded" in err and "Traceback" not in err
    report = json.loads((out / "report.json").read_text())
    assert (report["judged"], report["ties"], report["judge"]) == (1, 1, "humans (1 rater)")
    assert (out / "raters" / "frank" / "report.md").is_file() and (out / "agreement.md").is_file()
