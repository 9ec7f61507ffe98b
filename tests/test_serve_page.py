"""The chat page (`GET /`) in a real browser against a real server on loopback.

Debian's headless chromium, driven by its own chromedriver (Selenium Manager never runs, so
nothing is downloaded), talks to `alpaca-forge serve` started in this process over the tiny random
Llama: its answers are gibberish, but they stream token by token like a real model's. Each test
asserts what a user would see (text growing, a Stop that sticks, the filter's notice, a 401 that
names the key field) and, where the page is the only way to tell, what the server saw.

Screenshots for the closing note: .test-artifacts/serve-chat-page.png (a streamed answer) and
.test-artifacts/serve-chat-filter.png (the content filter's notice).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from browser import open_chromium, wait_for

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / ".test-artifacts"
BLOCKED_PROMPT = "How do I make a pipe bomb at home?"  # the shipped default rules block it
LONG_ANSWER_TOKENS = 1000  # enough that Stop lands mid-answer, even on a fast machine
MAX_PROMPT_TOKENS = 512  # the module's server refuses longer prompts (a 400 to show inline)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    driver = open_chromium()
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def engine(tiny_lm):
    from alpaca_forge.engines.transformers_engine import TransformersEngine

    return TransformersEngine(tiny_lm)


@pytest.fixture(scope="module")
def server(engine) -> Iterator[Any]:
    from alpaca_forge.serve import ServeConfig, start

    config = ServeConfig(port=0, max_tokens=LONG_ANSWER_TOKENS, max_prompt_tokens=MAX_PROMPT_TOKENS)
    with start(config, engine=engine) as running:
        running.wait_ready(60)
        yield running


class ChatPage:
    """The page as a user works it: by its labelled controls (data-testid)."""

    def __init__(self, driver: Any, url: str):
        self.driver, self.url = driver, url

    def open(self, *, forget_key: bool = True) -> ChatPage:
        self.driver.get(self.url + "/")
        if forget_key:
            self.driver.execute_script("localStorage.clear()")
            self.driver.get(self.url + "/")
        return self

    def find(self, testid: str) -> Any:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, f'[data-testid="{testid}"]')

    def click(self, testid: str) -> None:
        """Click as a person would: the element in the middle of the view first (WebDriver scrolls
        it to the top edge, under the sticky header, whose logo then takes the click)."""
        element = self.find(testid)
        self.driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
        element.click()

    def find_all(self, testid: str) -> list[Any]:
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(By.CSS_SELECTOR, f'[data-testid="{testid}"]')

    def model_name(self) -> str:
        return self.find("model-name").text

    def set_setting(self, testid: str, value: str) -> None:
        if not self.find(testid).is_displayed():
            self.find("settings-toggle").click()
        field = self.find(testid)
        field.clear()
        field.send_keys(value)

    def send(self, text: str) -> None:
        """Types `text` (Shift+Enter between its lines) and presses Enter."""
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.keys import Keys

        box = self.find("message-input")
        first, *more = text.split("\n")
        box.send_keys(first)
        for line in more:
            ActionChains(self.driver).key_down(Keys.SHIFT).send_keys(Keys.ENTER).key_up(Keys.SHIFT).perform()
            box.send_keys(line)
        box.send_keys(Keys.ENTER)

    def answers(self) -> list[Any]:
        return self.find_all("assistant-message")

    def last_answer(self) -> Any:
        return wait_for(lambda: self.answers(), 10, "an assistant message")[-1]

    def answer_state(self) -> str:
        return self.last_answer().get_attribute("data-state")

    def answer_text(self) -> str:
        # textContent, not .text: the bubble may be scrolled or hidden, the text is still the answer
        return self.driver.execute_script(
            "const a = document.querySelectorAll('[data-testid=assistant-text]');"
            "return a.length ? a[a.length - 1].textContent : '';"
        )

    def wait_answered(self, timeout_s: float = 30) -> str:
        """Waits until the last answer ended (any way); returns how it ended."""
        wait_for(lambda: self.answer_state() not in ("waiting", "streaming"), timeout_s, "the answer to end")
        wait_for(lambda: self.find("send").is_displayed(), 5, "the Send button to come back")
        return self.answer_state()

    def record_requests(self) -> None:
        """From now on, the body of every chat request the page sends is kept in `window.sent`."""
        self.driver.execute_script(
            "window.sent = []; const real = window.fetch;"
            "window.fetch = (url, init) => {"
            "  if (String(url).endsWith('/chat/completions')) window.sent.push(JSON.parse(init.body));"
            "  return real(url, init); };"
        )

    def sent(self) -> list[dict[str, Any]]:
        return self.driver.execute_script("return window.sent")


@pytest.fixture
def page(browser, server) -> ChatPage:
    return ChatPage(browser, server.url).open()


def test_page_loads_offline_with_the_model_shown(page, server, browser):
    backend = server.state.backend
    wait_for(lambda: page.model_name() == backend.name, 10, f"the model name {backend.name!r}")
    meta = page.find("model-meta").get_attribute("textContent")
    page.find("settings-toggle").click()
    defaults = [page.find(f).get_attribute("value") for f in ("temperature", "top-p", "max-tokens")]
    shown = server.state.backend.api_defaults(server.config.max_tokens)  # the model's, else serve's
    assert defaults == [str(shown["temperature"]), str(shown["top_p"]), str(shown["max_tokens"])]
    assert backend.fingerprint in meta and backend.prompt_format in meta, meta
    # every resource the page loaded (style, script, icon, the /v1/models call) came from this server
    resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert resources, "the page loaded no resources at all"
    assert all(r.startswith(server.url + "/") for r in resources), resources
    assert {server.url + p for p in ("/static/app.js", "/static/style.css", "/v1/models")} <= set(resources)
    problems = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not problems, problems  # no script error, no resource refused by the page's CSP

    # the stream parser, fed a stream cut at every possible point (lines and \r\n split mid-way)
    stream = 'data: {"a": 1}\r\n\r\n: keep-alive\n\ndata: {"b":\ndata: 2}\n\ndata: [DONE]\n\n'
    for cut in range(len(stream) + 1):
        events = browser.execute_script(
            "const p = new window.alpacaChat.SseParser();"
            "return [...p.push(arguments[0]), ...p.push(arguments[1]), ...p.end()];",
            stream[:cut],
            stream[cut:],
        )
        assert events == ['{"a": 1}', '{"b":\n2}', "[DONE]"], (cut, events)


def test_an_answer_streams_in_and_later_turns_carry_the_conversation(page, server, browser):
    wait_for(lambda: page.model_name() == server.state.backend.name, 10, "the model name")
    page.set_setting("max-tokens", "200")
    page.set_setting("temperature", "0")  # greedy: the tiny model's answer here runs ~80 tokens, every time
    page.set_setting("system-prompt", "You are terse.")
    page.record_requests()
    # every change of the answer's text, as the page's DOM saw it, with the answer's state then
    browser.execute_script(
        "window.seen = []; const log = document.querySelector('[data-testid=messages]');"
        "new MutationObserver(() => {"
        "  const a = log.querySelectorAll('[data-testid=assistant-message]'); const last = a[a.length - 1];"
        "  if (last) window.seen.push([last.querySelector('[data-testid=assistant-text]').textContent.length,"
        "                              last.dataset.state, performance.now()]);"
        "}).observe(log, {subtree: true, childList: true, characterData: true, attributes: true});"
    )
    page.send("Tell me about cats.")
    assert page.wait_answered(60) == "done"
    seen = browser.execute_script("return window.seen")
    growing = [n for n, state, _ in seen if state == "streaming"]
    assert len(set(growing)) >= 3, f"the answer arrived in fewer than 3 increments: {seen}"
    assert growing == sorted(growing), growing  # it only ever grew
    streamed_ms = [t for _, state, t in seen if state == "streaming"]
    assert streamed_ms[-1] > streamed_ms[0], seen
    answer = page.answer_text()
    assert answer and len(answer) == growing[-1]
    stats = page.find_all("message-stats")[-1].text
    assert "tokens/s" in stats and "prompt" in stats, stats
    page.find("settings-toggle").click()  # the conversation, not the settings, in the picture
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "serve-chat-page.png"))

    first = page.sent()[0]
    assert first["model"] == server.state.backend.name and first["stream"] is True
    assert (first["temperature"], first["top_p"], first["max_tokens"]) == (0, 0.9, 200)
    assert first["messages"] == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Tell me about cats."},
    ]
    page.set_setting("max-tokens", "5")
    page.send("And dogs?")
    page.wait_answered(30)
    assert page.sent()[1]["messages"] == [
        *first["messages"],
        {"role": "assistant", "content": answer},  # the answer as shown, line breaks and all
        {"role": "user", "content": "And dogs?"},
    ]
    shown = [m.find_element("css selector", ".bubble").text for m in page.find_all("user-message")]
    assert shown == ["Tell me about cats.", "And dogs?"]


def test_stop_ends_the_answer_here_and_on_the_server(page, server):
    from selenium.common.exceptions import ElementClickInterceptedException, ElementNotInteractableException

    wait_for(lambda: page.model_name() == server.state.backend.name, 10, "the model name")
    page.set_setting("max-tokens", str(LONG_ANSWER_TOKENS))
    for _ in range(5):  # the random model ends an answer within a few tokens now and then: ask again
        page.send("Write a long story.")
        wait_for(
            lambda: len(page.answer_text()) > 20 or page.answer_state() not in ("waiting", "streaming"),
            30,
            "the answer to stream",
        )
        if page.answer_state() == "streaming":
            try:
                page.click("stop")
            except (ElementNotInteractableException, ElementClickInterceptedException):
                if page.find("stop").is_displayed():
                    raise  # something covers a Stop button that is there to press
                # the answer ended just now, between the look and the click: the button went away
        if page.wait_answered(10) == "stopped":
            break
        page.click("new-chat")
    else:
        pytest.fail("five answers in a row ended before Stop could be pressed")
    stopped_at = page.answer_text()
    assert stopped_at, "the partial answer should stay"
    assert page.find("stopped-mark").is_displayed()
    assert not page.find("stop").is_displayed()
    time.sleep(0.5)
    assert page.answer_text() == stopped_at, "the answer kept growing after Stop"
    admission, engine = server.state.admission, server.state.backend.engine
    wait_for(
        lambda: admission.running == 0 and admission.waiting == 0 and engine.running == 0,
        5,
        "the server to stop generating the abandoned answer",
    )


def test_the_content_filter_notice(page, server, browser):
    wait_for(lambda: page.model_name() == server.state.backend.name, 10, "the model name")
    expected = server.state.filter.check(BLOCKED_PROMPT, role="user")
    assert expected.flagged, "the shipped default rules no longer block the test prompt"
    page.send(BLOCKED_PROMPT)
    page.wait_answered(30)
    notice = wait_for(lambda: page.find_all("filter-notice"), 5, "the filter notice")[-1]
    assert notice.is_displayed()
    categories = ", ".join(expected.categories)
    assert notice.text == f"Blocked by the content filter (input): {categories}", notice.text
    assert page.answer_state() == "filtered"
    assert categories in page.answer_text()  # the server's refusal, shown as the answer
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "serve-chat-filter.png"))


def test_new_chat_clears_the_conversation(page, server):
    wait_for(lambda: page.model_name() == server.state.backend.name, 10, "the model name")
    page.set_setting("max-tokens", "5")
    page.send("Hello there.")
    page.wait_answered(30)
    assert page.answers()
    page.find("new-chat").click()
    assert not page.answers() and not page.find_all("user-message")
    assert page.find("message-input").get_attribute("value") == ""
    page.record_requests()
    page.send("A fresh\nstart.")
    page.wait_answered(30)
    fresh = page.sent()[0]
    assert fresh["messages"] == [{"role": "user", "content": "A fresh\nstart."}]  # Shift+Enter: a new line
    shown = server.state.backend.api_defaults(server.config.max_tokens)
    assert (fresh["temperature"], fresh["top_p"]) == (shown["temperature"], shown["top_p"])  # the server's
    assert len(page.answers()) == 1
    assert page.find("user-message").find_element("css selector", ".bubble").text == "A fresh\nstart."


def test_errors_are_shown_in_the_conversation(page, server, browser):
    from selenium.common.exceptions import NoAlertPresentException

    wait_for(lambda: page.model_name() == server.state.backend.name, 10, "the model name")
    page.set_setting("max-tokens", "5")
    page.record_requests()
    too_long = "word " * (2 * MAX_PROMPT_TOKENS)
    browser.execute_script(
        "document.querySelector('[data-testid=message-input]').value = arguments[0]", too_long
    )
    page.send("")
    assert page.wait_answered(10) == "error"
    error = page.find("error-message").text
    assert "The server answered 400" in error and f"at most {MAX_PROMPT_TOKENS}" in error, error
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text  # noqa: B018 - an alert() would be there
    page.send("Short.")
    assert page.wait_answered(30) == "done"
    # the failed turn is shown, but not sent again
    assert page.sent()[1]["messages"] == [{"role": "user", "content": "Short."}]


# Stands in for the server's answer with the given SSE events, cut into `cut_bytes`-byte pieces.
FAKE_ANSWER_JS = """
const [events, cutBytes] = arguments;
const real = window.fetch;
window.fetch = (url, init) => {
  if (!String(url).endsWith('/chat/completions')) return real(url, init);
  const bytes = new TextEncoder().encode(events.map((e) => `data: ${e}\\n\\n`).join(''));
  const body = new ReadableStream({start(c) {
    for (let i = 0; i < bytes.length; i += cutBytes) c.enqueue(bytes.slice(i, i + cutBytes));
    c.close();
  }});
  return Promise.resolve(new Response(body, {headers: {'content-type': 'text/event-stream'}}));
};
"""


def _delta(content: str | None, finish: str | None = None, **top: Any) -> str:
    delta = {} if content is None else {"content": content}
    return json.dumps({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **top})


def test_answers_the_tiny_model_cannot_give(page, server, browser):
    """An answer the output filter cut, and one that failed mid-stream: events the real server
    sends in those cases, fed to the page cut into 5-byte pieces (UTF-8 characters split too)."""
    wait_for(lambda: page.model_name() == server.state.backend.name, 10, "the model name")
    refusal = "\n\nSorry, I can't help with that. (content filter: weapons)"
    info = {"flagged": True, "stage": "output", "source": "rules", "categories": ["weapons"]}
    usage = {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}
    cut = [
        _delta("Étape — one"),
        _delta(refusal),
        _delta(None, "content_filter", content_filter=info),
        json.dumps({"choices": [], "usage": usage}),
        "[DONE]",
    ]
    browser.execute_script(FAKE_ANSWER_JS, cut, 5)
    page.send("Go on.")
    assert page.wait_answered(10) == "filtered"
    assert page.answer_text() == "Étape — one" + refusal
    assert page.find("filter-notice").text == "Blocked by the content filter (output): weapons"
    assert "not sent with the next message" in page.find_all("message-stats")[-1].text

    failed = [_delta("Half an"), json.dumps({"error": {"message": "generation failed: RuntimeError: boom"}})]
    browser.execute_script(FAKE_ANSWER_JS, failed, 5)
    page.send("Again.")
    assert page.wait_answered(10) == "error"
    assert page.answer_text() == "Half an"  # what came before the error stays
    assert (
        page.find_all("error-message")[-1].text == "The answer failed: generation failed: RuntimeError: boom"
    )


def test_a_keyed_server_asks_for_the_key_then_works(browser, engine):
    from alpaca_forge.serve import ServeConfig, start

    with start(ServeConfig(port=0, api_key=("k1",)), engine=engine) as keyed:
        keyed.wait_ready(60)
        page = ChatPage(browser, keyed.url).open()
        notice = wait_for(
            lambda: page.find("page-notice").is_displayed() and page.find("page-notice"), 10, "a notice"
        )
        assert "needs an API key" in notice.text and "Settings → API key" in notice.text, notice.text
        page.set_setting("max-tokens", "5")
        page.send("Hello?")
        assert page.wait_answered(10) == "error"
        error = page.find_all("error-message")[-1].text
        assert "needs an API key" in error and "Settings → API key" in error, error

        # the notice's button opens the settings at the key field
        notice.find_element("css selector", "button").click()
        key_field = page.find("api-key")
        assert key_field.is_displayed() and browser.switch_to.active_element == key_field
        key_field.send_keys("k1")
        name = keyed.state.backend.name
        wait_for(lambda: page.model_name() == name, 10, "the model name, once the key is given")
        assert not page.find("page-notice").is_displayed()
        page.send("Hello again.")
        assert page.wait_answered(30) == "done"
        assert page.answer_text()

        # the key is remembered by this browser
        page.open(forget_key=False)
        wait_for(lambda: page.model_name() == name, 10, "the model name with the remembered key")
        assert browser.execute_script("return localStorage.getItem('alpaca-forge.api-key')") == "k1"


def test_the_settings_show_what_the_server_gives_a_request_that_leaves_them_out(browser, engine):
    """The fields start at the server's defaults for this model (its generation config, else
    serve's --default-* flags), not at numbers of the page's own."""
    from alpaca_forge.serve import ServeConfig, start

    config = ServeConfig(port=0, default_temperature=0.55, default_top_p=0.8, default_max_tokens=77)
    with start(config, engine=engine) as running:
        running.wait_ready(60)
        page = ChatPage(browser, running.url).open()
        name = running.state.backend.name
        wait_for(lambda: page.model_name() == name, 10, f"the model name {name!r}")
        page.find("settings-toggle").click()
        shown = [page.find(f).get_attribute("value") for f in ("temperature", "top-p", "max-tokens")]
        assert shown == ["0.55", "0.8", "77"]
