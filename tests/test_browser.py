"""A real browser: Debian's headless Chromium, driven by Playwright, against the demo app.

The app is the default one (`python app.py`): the tiny Gemma 4 demo, which reads text, images
and audio. Chromium's fake microphone plays a spoken example question (a WAV file).

Playwright comes from pip without its own browser download (never `playwright install`); the
test uses /usr/bin/chromium (`apt-get install -y chromium`) and skips when it is absent.
Every request that leaves 127.0.0.1 is blocked and recorded: the page must need none.
"""

import os
import re
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    # A fake microphone that needs no permission prompt and plays a spoken question.
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
]
EXAMPLES = Path(__file__).resolve().parent.parent / "assets" / "examples"
SPOKEN = EXAMPLES / "question_capital.wav"
TIMEOUT_MS = 60_000
STOP_TOKENS = 3000

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is not installed"),
]

# Records the text length of the latest answer on every DOM change: proves streaming.
RECORD_LENGTHS = """() => {
  window.__lengths = [];
  new MutationObserver(() => {
    const bots = document.querySelectorAll('[data-testid="bot"]');
    if (bots.length) window.__lengths.push(bots[bots.length - 1].innerText.length);
  }).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


def assert_streamed(recorded: list[int]) -> None:
    """`RECORD_LENGTHS`' lengths show several refreshes of a growing answer.

    The answer is rendered as markdown, so a refresh may shorten the shown text a little where a
    span closes (`**word` becomes a bold word: four characters fewer; seen in CI, a sampled
    answer went from 1028 to 1024 characters). Growth is therefore checked against the longest
    text shown so far, less a tenth: an answer that was replaced or cleared falls far below.
    """
    lengths = [n for n in recorded if n > 0]
    assert len(set(lengths)) >= 2, lengths  # several refreshes ...
    longest = 0
    for n in lengths:  # ... of a growing answer
        assert n >= 0.9 * longest, (n, longest, lengths)
        longest = max(longest, n)
    assert lengths[-1] > lengths[0], lengths


# Clicks stop as soon as the second answer shows text. The click comes from inside the page
# because the demo model writes ~1000 tokens/s: a round trip through Playwright (which also
# waits for a layout-stable target) would often arrive after the answer had finished.
STOP_ON_FIRST_TEXT = """() => {
  const observer = new MutationObserver(() => {
    const bots = document.querySelectorAll('[data-testid="bot"]');
    const stop = document.querySelector('button[aria-label="Stop"]');
    if (bots.length == 2 && bots[1].innerText.length > 0 && stop) {
      observer.disconnect();
      stop.click();
    }
  });
  observer.observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        args = [*ARGS, f"--use-file-for-fake-audio-capture={SPOKEN}"]
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=args)
        yield browser
        browser.close()


def open_page(browser, url: str):
    """A tab on `url` that may use the microphone; requests off 127.0.0.1 are blocked."""
    external = []

    def loopback_only(route):
        if route.request.url.startswith("http://127.0.0.1"):
            route.continue_()
        else:
            external.append(route.request.url)
            route.abort()

    context = browser.new_context(
        viewport={"width": 1280, "height": 900}, permissions=["microphone"]
    )
    context.set_default_timeout(TIMEOUT_MS)
    context.route("**/*", loopback_only)
    page = context.new_page()
    page.goto(url)
    page.external_requests = external
    return page


@pytest.fixture(scope="module")
def page(launch_app, demo_engine, browser):
    """The Gemma 3 demo: its greedy answers never end early, so lengths and the stop are exact.

    A long context, so the stopped answer can be long (3000 tokens, seconds even for the fast
    demo model): the stop must land while it is still being written.
    """
    _, url = launch_app(
        engine=demo_engine, warmup=True, cache_length=4096, max_out_length=STOP_TOKENS
    )
    page = open_page(browser, url)
    yield page
    page.context.close()


@pytest.fixture(scope="module")
def page_gemma4(launch_app, gemma4_demo, browser):
    """The default app (`python app.py`): the tiny Gemma 4 demo, which listens. No warm-up:
    the first recording compiles the audio path (seconds), which the test can wait for."""
    app, url = launch_app(engine=gemma4_demo, warmup=False)
    page = open_page(browser, url)
    page.app = app
    yield page
    page.context.close()


def send(page, text: str) -> None:
    box = page.get_by_placeholder("Message the model")
    box.fill(text)
    box.press("Enter")


def set_max_new_tokens(page, value: int) -> None:
    box = page.get_by_label("number input for Max new tokens")
    box.fill(str(value))
    box.press("Enter")


def stats_text(page) -> str:
    return page.locator("#answer-stats").inner_text()


def test_chat_stream_stop_and_refused_upload_in_chromium(page, tmp_path):
    from playwright.sync_api import expect

    expect(page.locator("#banner")).to_contain_text("Demo model: random weights")
    # Greedy: the demo's greedy answers never end early, so lengths are predictable.
    page.get_by_label("Greedy (always the most likely token)").check()
    set_max_new_tokens(page, 300)
    page.evaluate(RECORD_LENGTHS)

    # A message streams into a growing answer, then the statistics line fills in.
    # Text that spells a control token is shown as typed (not swallowed as an HTML tag).
    send(page, "Tell me about <start_of_turn> the sea.")
    user_bubble = page.locator('[data-testid="user"]').first
    expect(user_bubble).to_contain_text("the sea.")
    assert (
        user_bubble.inner_text().replace("\u200b", "") == "Tell me about <start_of_turn> the sea."
    )
    expect(page.get_by_text("looks like a Gemma control token").first).to_contain_text(
        "<\u200bstart_of_turn>"
    )
    expect(page.locator("#answer-stats")).to_contain_text("context", timeout=TIMEOUT_MS)
    assert_streamed(page.evaluate("window.__lengths"))
    assert "300 tokens" in stats_text(page)

    # The stop button ends a long answer.
    set_max_new_tokens(page, STOP_TOKENS)
    page.evaluate(STOP_ON_FIRST_TEXT)
    send(page, "Count to one thousand.")
    expect(page.locator("#answer-stats")).to_contain_text("stopped")
    assert int(re.search(r"(\d+) tokens", stats_text(page)).group(1)) < STOP_TOKENS
    expect(page.get_by_role("button", name="Submit")).to_be_visible()
    expect(page.locator('[data-testid="bot"]')).to_have_count(2)
    assert page.locator('[data-testid="bot"]').nth(1).inner_text()  # the partial answer stays

    # An image goes through the upload path to the demo's toy vision encoder and is answered.
    set_max_new_tokens(page, 40)
    page.locator('input[type="file"]').first.set_input_files(str(EXAMPLES / "shapes.png"))
    expect(page.locator("img[src*='shapes']").first).to_be_visible()
    send(page, "What is in this picture?")
    expect(page.locator('[data-testid="bot"]')).to_have_count(3, timeout=60_000)
    expect(page.locator("#answer-stats")).to_contain_text("40 tokens", timeout=60_000)
    assert page.locator('[data-testid="bot"]').nth(2).inner_text()

    screenshot = tmp_path / "chat.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000
    print(f"screenshot: {screenshot}")
    assert page.external_requests == []


def test_a_microphone_recording_is_answered_by_the_gemma4_demo(page_gemma4):
    from playwright.sync_api import expect

    page = page_gemma4
    expect(page.locator("#banner")).to_contain_text("Gemma 4-architecture")
    # Default sampling (not greedy): the demo's sampled answers run for hundreds of tokens,
    # so the answer visibly streams.
    set_max_new_tokens(page, 400)
    page.evaluate(RECORD_LENGTHS)
    page.get_by_role("button", name="Record audio").click()
    page.get_by_role("button", name="Start recording").click()
    page.wait_for_timeout(2000)  # Chromium's fake microphone plays the spoken question
    page.get_by_role("button", name="Stop recording").click()
    page.get_by_role("button", name="Attach audio").click()
    send(page, "What did I say?")
    # The recording was uploaded, decoded (44.1 kHz WAV -> 16 kHz mono), encoded by the toy
    # conformer and answered: the message keeps its audio and the answer streams in.
    expect(page.locator("#answer-stats")).to_contain_text("context", timeout=TIMEOUT_MS)
    assert page.get_by_text("not supported by this model").count() == 0
    expect(page.locator('[data-testid="bot"]')).to_have_count(1)
    assert page.locator('[data-testid="bot"]').first.inner_text()
    # The server's side of it: one chat, whose first turn holds one audio clip.
    (session,) = map(page.app.registry.peek, page.app.registry.keys())  # not a dict
    (turn,) = session.sampler.turns
    assert len(turn.audio) == 1 and turn.user == "What did I say?" and turn.answer
    assert_streamed(page.evaluate("window.__lengths"))
    assert page.external_requests == []
