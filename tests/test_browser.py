"""The app in a real browser: Debian's chromium, headless, driven by Playwright.

Never `playwright install` (it downloads browsers): the system chromium is used. Outside CI the
test is skipped when chromium or playwright is missing; in CI (CI set) it fails instead.
"""

import os
import shutil
from pathlib import Path

import pytest

from test_app import running_app

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]


def _missing(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must run the browser test)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright is not installed: pip install playwright==1.65.2")
    if not shutil.which(CHROMIUM):
        _missing(f"{CHROMIUM} is missing: apt-get install -y chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def test_example_click_shows_sql_and_verdict(browser, tiny_run, tmp_path):
    from playwright.sync_api import expect

    with running_app(tiny_run, tmp_path / "app.log") as url:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(url, wait_until="domcontentloaded")
        chat = page.locator("#chat")
        expect(chat).to_be_visible(timeout=60_000)
        expect(page.get_by_text("4 tables")).to_be_visible()  # the example database, loaded

        # One click: the example fills the question and its database, and runs.
        page.get_by_text("Having: Which departments have more than 2 employees?").click()
        expect(page.get_by_text("2 tables")).to_be_visible(timeout=30_000)  # the company database now
        bot = chat.locator('[data-testid="bot"]')
        expect(chat.locator('[data-testid="user"]').first).to_contain_text("Which departments")
        expect(bot.first).to_contain_text("for this schema", timeout=60_000)  # the verdict
        expect(bot.first.locator("pre code")).to_contain_text("SELECT")  # the SQL, in a code block

        # A follow-up question, typed and sent with Enter, gets its own answer.
        box = page.get_by_placeholder("e.g. Which singers are older than 40?")
        box.fill("Only the ones hired after 2020.")
        box.press("Enter")
        expect(bot).to_have_count(2, timeout=60_000)
        expect(bot.nth(1)).to_contain_text("for this schema", timeout=60_000)

        # Ask with nothing typed: a notice, not an error, and the conversation stays as it was.
        page.get_by_role("button", name="Ask").click()
        expect(page.get_by_text("Please type a question")).to_be_visible(timeout=30_000)
        expect(bot).to_have_count(2)

        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "app.png"), full_page=True)
        assert not errors, errors
