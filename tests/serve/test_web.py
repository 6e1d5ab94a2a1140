"""The web page of `swarm serve --local 2` in headless chromium: a question typed into the
chat gets transformers' greedy answer (as the API does), the swarm view shows the peers and
the plan, the key is asked for and required, both views fit 1280 and 375 pixel wide
screens, and a killed peer's recovery appears without a reload."""

from __future__ import annotations

import re

import httpx
import openai
import psutil
import pytest

from swarm.model.stopping import stop_token_ids
from swarm.model import hf
from tests.helpers.reference import reference_generate
from tests.serve import browser
from tests.serve.conftest import MAX_LEN, serving

pytestmark = [pytest.mark.slow,
              pytest.mark.needs(None if browser.available() else "Debian's chromium and chromium-driver are not "
                                                                 "installed (bootstrap/setup.sh test installs them)")]

KEY = "sk-web"
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def served(tiny_chat_model_dir):
    # --mem: this device holds too little for the whole model, so the plan spans a local peer.
    with serving(tiny_chat_model_dir, "--local", "2", "--mem", "8M", "--local-peer-arg=--heartbeat",
                 "--local-peer-arg=0.3", key=KEY) as s:
        yield s


@pytest.fixture(scope="module")
def driver():
    with browser.chromium() as d:
        yield d


@pytest.fixture
def page(driver, served):
    browser.set_viewport(driver, browser.WIDE)
    browser.open_page(driver, served.url, KEY)
    return driver


def by_id(driver, name: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, name)


def visible(text: str) -> str:
    return " ".join(text.split())


def api_answer(served, messages: list[dict]) -> str:
    with openai.OpenAI(base_url=served.url + "/v1", api_key=KEY, max_retries=0, timeout=60) as c:
        reply = c.chat.completions.create(model=served.model, messages=messages)  # the server's defaults: greedy
    return reply.choices[0].message.content


def test_the_page_asks_for_the_key_and_the_apis_refuse_requests_without_it(driver, served):
    browser.set_viewport(driver, browser.WIDE)
    driver.get(served.url + "/")
    driver.execute_script("localStorage.clear()")
    driver.get(served.url + "/")
    browser.wait(driver, lambda d: by_id(d, "key-dialog").get_attribute("open") is not None)
    assert "missing API key" in by_id(driver, "key-reason").text
    by_id(driver, "key-input").send_keys("sk-wrong\n")
    browser.wait(driver, lambda d: "incorrect API key" in by_id(d, "key-reason").text)
    by_id(driver, "key-input").clear()
    by_id(driver, "key-input").send_keys(KEY + "\n")
    browser.wait(driver, lambda d: by_id(d, "model-name").text == served.model)
    assert driver.execute_script("return localStorage.getItem('swarm.apiKey')") == KEY
    for path in ("/v1/models", "/api/tags", "/api/swarm/events", "/api/swarm/join", "/v1/swarm"):
        assert httpx.get(served.url + path).status_code == 401, path
    assert httpx.get(served.url + "/api/swarm/events?key=sk-wrong").status_code == 401
    assert httpx.get(served.url + f"/v1/models?key={KEY}").status_code == 401  # ?key= is for the events only


def transformers_greedy_answer(model_dir, question: str) -> str:
    """transformers' greedy answer through the chat template, with the server's budget and stop ids."""
    tokenizer = hf.load_tokenizer(model_dir)
    stop_ids = stop_token_ids(tokenizer)
    prompt = hf.chat_token_ids(tokenizer, [{"role": "user", "content": question}])
    tokens = reference_generate(model_dir, [prompt], MAX_LEN - len(prompt), sorted(stop_ids))[0]
    return tokenizer.decode([t for t in tokens if t not in stop_ids], skip_special_tokens=True)


def test_a_question_typed_into_the_page_gets_transformers_greedy_answer(page, served, tiny_chat_model_dir):
    want = transformers_greedy_answer(tiny_chat_model_dir, QUESTION)
    assert api_answer(served, [{"role": "user", "content": QUESTION}]) == want
    assert browser.ask(page, QUESTION) == want
    from selenium.webdriver.common.by import By

    answer = page.find_elements(By.CSS_SELECTOR, ".message.assistant")[-1]
    if not re.search(r"[`*]|^\s*(\d+[.)]|[-*])\s", want, re.M):  # no markdown in it: shown as it came
        assert visible(answer.find_element(By.CSS_SELECTOR, ".body").text) == visible(want)
    stats = answer.find_element(By.CSS_SELECTOR, ".stats").text
    assert re.fullmatch(r"first token \d+\.\d\d s · \d+\.\d tokens/s · \d+ tokens", stats), stats

    # Regenerate gives the same greedy answer.
    by_id(page, "regenerate").click()
    browser.wait(page, lambda d: d.find_elements(By.CSS_SELECTOR, ".message.assistant .stats"))
    assert len(page.find_elements(By.CSS_SELECTOR, ".message.assistant")) == 1
    assert page.execute_script(
        "return JSON.parse(localStorage.getItem('swarm.conversations'))[0].messages[1].content") == want

    # The tiny model's answer fills the context: a follow-up is refused, in the API's words.
    with pytest.raises(openai.BadRequestError) as info:
        api_answer(served, [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": want},
                            {"role": "user", "content": "And of Italy?"}])
    browser.ask(page, "And of Italy?")
    error = page.find_elements(By.CSS_SELECTOR, ".message.assistant")[-1].find_element(By.CSS_SELECTOR, ".error")
    assert error.text == info.value.body["message"] and "maximum context length" in error.text

    # New chat, and the old one is still listed (localStorage) after a reload.
    by_id(page, "new-chat").click()
    assert page.find_elements(By.CSS_SELECTOR, "#messages li") == []
    page.refresh()
    browser.wait(page, lambda d: d.find_elements(By.CSS_SELECTOR, "button.conversation"))
    page.find_elements(By.CSS_SELECTOR, "button.conversation")[0].click()
    assert len(page.find_elements(By.CSS_SELECTOR, ".message")) == 4


def test_stop_ends_an_answer_and_keyboard_alone_works(page, served):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    prompt = by_id(page, "prompt")
    prompt.send_keys("Tell me a long story.", Keys.ENTER)
    browser.wait(page, lambda d: by_id(d, "stop").is_displayed())
    prompt.send_keys(Keys.ESCAPE)  # Escape (or the Stop button) stops
    browser.wait(page, lambda d: d.find_elements(By.CSS_SELECTOR, ".message.assistant .stats"))
    assert page.find_element(By.CSS_SELECTOR, ".message.assistant .stats").text == "stopped"
    # Tabs by keyboard: arrow keys move between the views.
    by_id(page, "tab-chat").send_keys(Keys.ARROW_RIGHT)
    assert by_id(page, "view-swarm").is_displayed() and not by_id(page, "view-chat").is_displayed()
    assert page.switch_to.active_element == by_id(page, "tab-swarm")


def test_markdown_is_rendered_and_html_is_escaped(page):
    html = page.execute_script("""
        const box = document.createElement('div');
        box.append(swarm.renderMarkdown(arguments[0]));
        return box.innerHTML;""",
        "<img src=x onerror=alert(1)> **bold** `x<y`\n\n- one\n- two\n\n1. a\n\n2. b\n\n```\n<b>code</b>\n```")
    assert "<img" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "<strong>bold</strong>" in html and "<code>x&lt;y</code>" in html
    assert "<ul><li>one</li><li>two</li></ul>" in html and "<ol><li>a</li><li>b</li></ol>" in html and "<pre><code>&lt;b&gt;code&lt;/b&gt;</code></pre>" in html


def test_the_swarm_view_lists_the_peers_and_the_plan(page, served):
    from selenium.webdriver.common.by import By

    by_id(page, "tab-swarm").click()
    plan = httpx.get(served.url + "/v1/swarm", headers={"Authorization": f"Bearer {KEY}"}).json()["plan"]
    names = {p["name"] for p in httpx.get(served.url + "/v1/swarm",
                                         headers={"Authorization": f"Bearer {KEY}"}).json()["peers"]}
    assert {"local-1", "local-2"} <= names and len(plan["stages"]) >= 2
    browser.wait(page, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#peers tbody tr")) == len(names))
    shown = {row.find_elements(By.TAG_NAME, "td")[0].text for row in page.find_elements(By.CSS_SELECTOR,
                                                                                      "#peers tbody tr")}
    assert shown == names
    bar = [part.text for part in page.find_elements(By.CSS_SELECTOR, "#layer-bar .layers")]
    assert bar == [f"{s['peer']} {s['start']}–{s['end']}" for s in plan["stages"]]
    assert len(page.find_elements(By.CSS_SELECTOR, "#stages tbody tr")) == len(plan["stages"])
    assert "predicted" in by_id(page, "rate").text and page.find_elements(By.CSS_SELECTOR, "#links tbody tr")
    assert by_id(page, "plan-summary").text.startswith(f"· {len(plan['stages'])} stages: ")

    by_id(page, "show-join").click()
    browser.wait(page, lambda d: by_id(d, "join-command").text)
    assert re.fullmatch(r"swarm join --join-code [0-9a-z-]+", by_id(page, "join-command").text)
    browser.wait(page, lambda d: d.execute_script("return document.getElementById('join-qr').naturalWidth") > 0)


def test_both_views_fit_wide_and_narrow_screens(page, tmp_path):
    shots = browser.screenshots(page, tmp_path, QUESTION)
    assert [p.name for p in shots] == ["chat-wide.png", "swarm-wide.png", "chat-narrow.png", "swarm-narrow.png"]
    for size in (browser.WIDE, browser.NARROW):
        browser.set_viewport(page, size)
        for view in ("chat", "swarm"):
            by_id(page, f"tab-{view}").click()
            width = page.execute_script("return document.documentElement.scrollWidth")
            assert width <= size[0], (view, size, width)


def test_a_killed_peer_shows_its_recovery_without_a_reload(page, served):
    """Last in the module: the swarm goes on without the killed peer."""
    from selenium.webdriver.common.by import By

    by_id(page, "tab-swarm").click()
    headers = {"Authorization": f"Bearer {KEY}"}
    plan = httpx.get(served.url + "/v1/swarm", headers=headers).json()["plan"]
    victim_name = next(s["peer"] for s in plan["stages"] if s["peer"].startswith("local-"))
    victim = next(p for p in psutil.Process(served.process.pid).children(recursive=True)
                  if victim_name in " ".join(p.cmdline()))
    browser.wait(page, lambda d: "none: no peer was lost" in browser.text_of(d, "recoveries"))
    victim.kill()
    # The source re-plans once the directory drops the peer (missed heartbeats); the page hears it.
    browser.wait(page, lambda d: f"peer {victim_name} lost" in browser.text_of(d, "recoveries"), timeout_s=60)
    assert re.search(rf"peer {victim_name} lost; re-planned over \d+ peers? in", browser.text_of(page, "recoveries"))
    by_id(page, "tab-chat").click()
    assert browser.ask(page, QUESTION)  # and the page still gets answers
