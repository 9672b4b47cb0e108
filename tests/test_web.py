"""The chat page in headless Debian Chromium (Playwright's bundled driver, no downloaded browser)."""

import os
import shutil

import pytest

CHROMIUM = os.environ.get("METARLHF_CHROMIUM", "/usr/bin/chromium")
if not (os.path.exists(CHROMIUM) or shutil.which("chromium")):
    pytest.skip(f"Debian chromium not installed at {CHROMIUM} (apt-get install -y chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is in the test extra")

from server.app import create_app  # noqa: E402
from server.settings import Settings  # noqa: E402
from server.testing import LiveServer, TinyPersonalizer, tiny_engine  # noqa: E402

KEY = "sk-web-page-test"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Settings(api_keys={KEY: "acme"}, adapter_root=str(tmp_path_factory.mktemp("adapters")), adapt_threshold=2,
                 default_max_tokens=6)
    app = create_app(s, engine=tiny_engine(max_context=512), personalizer=TinyPersonalizer())
    with LiveServer(app) as url:
        yield url


@pytest.fixture(scope="module")
def page(server):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium"),
                                    args=ARGS)
        pg = browser.new_page()
        pg.set_default_timeout(20_000)
        yield pg
        browser.close()


def send(page, text):
    n = page.locator(".msg.assistant").count()
    page.fill("#prompt", text)
    page.click("#send")
    try:
        page.wait_for_function(f"document.querySelectorAll('.msg.assistant').length > {n}")
    except sync_api.TimeoutError as e:
        raise AssertionError(f"no answer; page error: {page.locator('#error').inner_text()!r}") from e
    return page.locator(".msg.assistant").nth(n)


def test_chat_rate_and_see_the_adapter_version_change(server, page):
    page.goto(server + "/")
    page.fill("#apikey", KEY)
    page.dispatch_event("#apikey", "change")
    page.fill("#userid", "web-user")
    page.dispatch_event("#userid", "change")
    first = send(page, "Hello there")
    assert "base model" in first.locator(".meta").inner_text()
    first.locator("button[data-rating=up]").click()
    page.wait_for_function("document.getElementById('feedback-counts').textContent.startsWith('1 👍')")
    second = send(page, "And again")
    second.locator("button[data-rating=down]").click()
    # two ratings reach the threshold: the background job adapts and the page shows v1
    page.wait_for_function("document.getElementById('adapter-version').textContent === 'own v1'", timeout=60_000)
    assert page.locator("#changed-at").inner_text() not in ("–", "never")
    assert "succeeded" in page.locator("#job-state").inner_text()
    third = send(page, "Personalised now?")
    assert "own v1" in third.locator(".meta").inner_text()
    # the key is kept in localStorage for the next visit
    assert page.evaluate("localStorage.getItem('metarlhf.key')") == KEY


def test_bad_key_shows_an_error(server, page):
    page.goto(server + "/")
    page.fill("#apikey", "sk-wrong-key-123")
    page.dispatch_event("#apikey", "change")
    page.fill("#userid", "someone")
    page.fill("#prompt", "hi")
    page.click("#send")
    page.wait_for_function("document.getElementById('error').textContent.includes('invalid API key')")
