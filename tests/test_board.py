"""The board in a real headless Chromium (Debian's, driven by Selenium through its chromedriver), and its
HTTP surface spoken to with plain requests: `agentic-dispatch serve --transport http` as a subprocess with a
token, runs dispatched through the official MCP client over HTTP, real containers on a real engine."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import anyio
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.wait import WebDriverWait

from .conftest import git
from .test_http_auth import TOKEN, TOKEN_ENV, Served, serving

pytestmark = pytest.mark.docker

T = TypeVar("T")

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
ASK = (
    'if [ -s ANSWER.md ]; then echo "got: $(cat ANSWER.md)"; exit 0; fi; '
    "echo 'Which colour should the button be?' > BLOCKED.md"
)
LIVE_SECONDS = 2.0  # the bound: a change shows this soon without a reload


# -- the server and the MCP client -----------------------------------------------------------
@pytest.fixture
def served(docker_env: str, isolated_home: Path) -> Iterator[Served]:
    with serving(isolated_home, **{TOKEN_ENV: TOKEN}) as s:
        yield s


def base(s: Served) -> str:
    return s.url.removesuffix("/mcp")


def mcp(s: Served, tool: str, **args: Any) -> dict[str, Any]:
    """One tool call through the official MCP client over HTTP, with the bearer token; must succeed."""

    async def run() -> dict[str, Any]:
        async with (
            httpx2.AsyncClient(headers={"Authorization": f"Bearer {TOKEN}"}, timeout=httpx2.Timeout(30, read=90)) as h,
            Client(streamable_http_client(s.url, http_client=h)) as client,
        ):
            res = await client.call_tool(tool, args)
            assert not res.is_error, f"{tool} failed: {res.content}"
            assert isinstance(res.structured_content, dict)
            return res.structured_content

    return anyio.run(run)


def dispatch(s: Served, repo: Path, task: str) -> str:
    return str(mcp(s, "agentic_dispatch", repo=str(repo), task=task, agent="shell")["workspace"])


def wait_status(s: Served, workspace: str, wanted: str, timeout: float = 90) -> dict[str, Any]:
    """The workspace's row once it reaches ``wanted`` (agentic_watch waits on the change; bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        row: dict[str, Any] = mcp(s, "agentic_status", workspace=workspace)["workspaces"][0]
        if row["status"] == wanted:
            return row
        assert time.monotonic() < deadline, f"{workspace} is {row['status']}, not {wanted}, after {timeout}s"
        mcp(s, "agentic_watch", workspaces=[workspace], timeout_seconds=5)


# -- the browser -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    """Debian's Chromium, headless. The test command installs it (scripts/_bootstrap.sh ensure_browser)."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if shutil.which(p) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: run ./scripts/test (it installs chromium and chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1500,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def sign_in(driver: webdriver.Chrome, s: Served) -> None:
    """The first URL with the token, as the server prints it: the board, and the token gone from the URL."""
    driver.get(f"{base(s)}/?token={TOKEN}")
    assert driver.current_url == f"{base(s)}/", driver.current_url
    assert driver.title.startswith("Board")


def card(driver: webdriver.Chrome, workspace: str, timeout: float, column: str | None = None) -> WebElement:
    """The workspace's card (in ``column``), waited for on the DOM at most ``timeout`` seconds."""
    return on_card(driver, workspace, timeout, column, lambda found: found)


def on_card(
    driver: webdriver.Chrome, workspace: str, timeout: float, column: str | None, then: Callable[[WebElement], T]
) -> T:
    """``then(card)`` once the workspace's card is there (in ``column``); tried again when the live refresh
    replaced the card meanwhile (a card whose run changed is a new element)."""
    where = f'section[data-status="{column}"] ' if column else ""
    selector = f'{where}article[data-workspace="{workspace}"]'
    result: T = WebDriverWait(
        driver,
        timeout,
        poll_frequency=0.05,
        ignored_exceptions=(NoSuchElementException, StaleElementReferenceException),
    ).until(
        lambda d: (then(d.find_element(By.CSS_SELECTOR, selector)),),
        f"no card for {workspace}{f' in {column}' if column else ''} after {timeout}s",
    )[0]
    return result


def buttons(scope: WebElement, name: str) -> list[WebElement]:
    """The buttons whose accessible name is ``name`` (Chromium's computed name, as a screen reader gets it)."""
    return [b for b in scope.find_elements(By.TAG_NAME, "button") if b.accessible_name == name]


def button(scope: WebElement, name: str) -> WebElement:
    """The one button named ``name`` in ``scope``."""
    found = buttons(scope, name)
    assert len(found) == 1, [b.accessible_name for b in scope.find_elements(By.TAG_NAME, "button")]
    return found[0]


# -- tests -----------------------------------------------------------------------------------
def test_the_board_lists_runs_made_through_mcp_and_shows_a_later_dispatch_without_a_reload(
    served: Served, browser: webdriver.Chrome, user_repo: Path
) -> None:
    board_line = f"the board is at {base(served)}/ ; sign a browser in once with {base(served)}/?token=<"
    assert board_line in served.stderr and TOKEN not in served.stderr, served.stderr
    done = dispatch(served, user_repo, "echo one; echo two")
    wait_status(served, done, "completed")
    sign_in(browser, served)
    first = card(browser, done, 5, "completed")
    assert first.find_element(By.TAG_NAME, "a").text == done
    assert button(first, "Sync").is_displayed()
    browser.execute_script("window.notReloaded = true")

    later = dispatch(served, user_repo, "sleep 120")  # after the page loaded
    assert on_card(browser, later, LIVE_SECONDS, None, lambda c: c.get_attribute("data-workspace")) == later
    assert browser.execute_script("return window.notReloaded") is True, "the page was reloaded"
    assert on_card(browser, later, 30, "running", lambda c: button(c, "Cancel").is_displayed())


def test_a_blocked_run_answered_from_the_page_resumes_and_completes_with_the_answer(
    served: Served, browser: webdriver.Chrome, user_repo: Path
) -> None:
    workspace = dispatch(served, user_repo, ASK)
    assert wait_status(served, workspace, "blocked")["question"].startswith("Which colour")
    sign_in(browser, served)
    blocked = card(browser, workspace, 5, "blocked")  # it changes no more until answered: no refresh replaces it
    assert "Which colour should the button be?" in blocked.text
    field = blocked.find_element(By.TAG_NAME, "textarea")
    assert field.accessible_name == "Your answer"
    field.send_keys("Teal, like the logo.")
    button(blocked, "Answer").click()

    card(browser, workspace, 60, "completed")  # moved by the live stream, no reload
    log = mcp(served, "agentic_logs", workspace=workspace)["text"]
    assert "got: Teal, like the logo." in log, log
    assert mcp(served, "agentic_status", workspace=workspace)["workspaces"][0]["runs"] == 2


def test_cancel_from_the_page_by_keyboard_cancels_the_running_run(
    served: Served, browser: webdriver.Chrome, user_repo: Path
) -> None:
    workspace = dispatch(served, user_repo, "sleep 300")
    wait_status(served, workspace, "running")
    sign_in(browser, served)
    # a keyboard press on the button
    on_card(browser, workspace, 5, "running", lambda c: button(c, "Cancel").send_keys(Keys.ENTER) or True)

    card(browser, workspace, 60, "cancelled")
    assert wait_status(served, workspace, "cancelled")["status"] == "cancelled"


def test_a_runs_page_shows_its_diff_and_prompt_and_its_log_and_facts_follow_the_run_without_a_reload(
    served: Served, browser: webdriver.Chrome, user_repo: Path
) -> None:
    task = (
        "echo 'x = 1' > app.py && git add app.py && git commit -qm 'add app'; echo first-line; "
        "while [ ! -e .go ]; do sleep 0.05; done; echo second-line"
    )
    got = mcp(served, "agentic_dispatch", repo=str(user_repo), task=task, agent="shell")
    workspace = got["workspace"]
    wait_status(served, workspace, "running")
    deadline = time.monotonic() + 30
    while "first-line" not in mcp(served, "agentic_logs", workspace=workspace)["text"]:
        assert time.monotonic() < deadline, "the run never printed its first line"
        time.sleep(0.1)
    sign_in(browser, served)
    browser.get(f"{base(served)}/run/{workspace}")
    assert browser.find_element(By.ID, "run-title").text == workspace
    assert "first-line" in browser.find_element(By.ID, "log").text
    assert "app.py" in browser.find_element(By.CSS_SELECTOR, "pre.stat").text
    assert browser.find_element(By.CSS_SELECTOR, "pre.patch span.add").text.startswith("+")
    assert any(s.text == "+x = 1" for s in browser.find_elements(By.CSS_SELECTOR, "pre.patch span.add"))
    assert button(browser.find_element(By.ID, "facts"), "Cancel").is_displayed()
    browser.execute_script("window.notReloaded = true")

    (Path(got["repo_path"]) / ".go").touch()
    wait = WebDriverWait(browser, 30, poll_frequency=0.05, ignored_exceptions=(StaleElementReferenceException,))
    wait.until(lambda d: "second-line" in d.find_element(By.ID, "log").text, "the log tail did not grow")
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#facts .badge").text == "completed", "facts not live")
    assert browser.execute_script("return window.notReloaded") is True, "the page was reloaded"
    browser.find_element(By.TAG_NAME, "summary").click()
    assert "first-line" in browser.find_element(By.CSS_SELECTOR, "details pre").text  # the task is in the prompt


def test_a_failed_run_resumed_from_the_page_completes_and_insights_show_the_agents_outcomes(
    served: Served, browser: webdriver.Chrome, user_repo: Path
) -> None:
    workspace = dispatch(served, user_repo, "if [ -e .tried ]; then echo fine; exit 0; fi; touch .tried; exit 5")
    wait_status(served, workspace, "failed")
    sign_in(browser, served)
    on_card(browser, workspace, 5, "failed", lambda c: button(c, "Resume").click() or True)
    card(browser, workspace, 60, "completed")
    assert mcp(served, "agentic_status", workspace=workspace)["workspaces"][0]["runs"] == 2
    wait_status(served, dispatch(served, user_repo, "exit 7"), "failed")  # insights count each workspace's end

    browser.get(f"{base(served)}/insights")
    row = browser.find_element(By.XPATH, "//tbody/tr[th[normalize-space()='shell']]")
    cells = [td.text for td in row.find_elements(By.TAG_NAME, "td")]
    assert cells[:3] == ["2", "1", "1"] and cells[5] == "50%", cells  # runs, completed, failed; success
    chart = browser.find_element(By.CSS_SELECTOR, "svg.chart")
    assert chart.get_attribute("role") == "img" and "shell: 50% success" in chart.accessible_name


def test_sync_from_the_page_brings_the_branch_home_and_the_run_page_says_where(
    served: Served, browser: webdriver.Chrome, user_repo: Path
) -> None:
    task = "echo done > result.txt && git add result.txt && git commit -qm 'the result'"
    workspace = dispatch(served, user_repo, task)
    branch = wait_status(served, workspace, "completed")["branch"]
    assert git(user_repo, "branch", "--list", branch) == "", "nothing is delivered before the sync ([sync] auto off)"
    sign_in(browser, served)
    on_card(browser, workspace, 5, "completed", lambda c: button(c, "Sync").click() or True)

    deadline = time.monotonic() + 60
    while git(user_repo, "branch", "--list", branch) == "":
        assert time.monotonic() < deadline, "the branch never came home"
        time.sleep(0.1)
    browser.get(f"{base(served)}/run/{workspace}")
    facts = browser.find_element(By.ID, "facts").text
    assert "Delivery" in facts and str(user_repo) in facts and branch in facts, facts


def test_the_queue_is_frozen_and_unfrozen_from_the_page(
    served: Served, browser: webdriver.Chrome, user_repo: Path
) -> None:
    sign_in(browser, served)
    wait = WebDriverWait(browser, 10, poll_frequency=0.05, ignored_exceptions=(StaleElementReferenceException,))
    wait.until(lambda d: button(d.find_element(By.ID, "toolbar"), "Freeze queue").click() or True)
    wait.until(lambda d: buttons(d.find_element(By.ID, "toolbar"), "Unfreeze queue"), "the toolbar did not say frozen")
    assert browser.switch_to.active_element.accessible_name == "Unfreeze queue", "the focus stays on the toggle"
    assert mcp(served, "agentic_status")["frozen"] is True

    workspace = dispatch(served, user_repo, "echo thawed")
    card(browser, workspace, LIVE_SECONDS, "queued")
    wait.until(lambda d: button(d.find_element(By.ID, "toolbar"), "Unfreeze queue").click() or True)
    card(browser, workspace, 60, "completed")
    assert mcp(served, "agentic_status")["frozen"] is False


def test_a_page_opened_without_the_token_shows_the_sign_in_and_no_workspace_name(
    served: Served, browser: webdriver.Chrome, user_repo: Path
) -> None:
    workspace = dispatch(served, user_repo, "echo secret-work")
    wait_status(served, workspace, "completed")
    browser.delete_all_cookies()
    for path in ("/", f"/run/{workspace}", "/insights", f"/?token={TOKEN}x"):
        browser.get(base(served) + path)
        assert browser.title.startswith("Sign in"), (path, browser.title)
        page = browser.page_source
        assert "secret-work" not in page and "completed" not in page and "shell" not in page, path
        # the run's URL is the visitor's own (it goes on after the sign-in); no other page names a workspace
        assert workspace not in page or path == f"/run/{workspace}", path
    for path in ("/columns", "/events", f"/run-log/{workspace}", f"/run-facts/{workspace}"):
        got = httpx2.get(base(served) + path, timeout=30)
        assert got.status_code == 401 and workspace not in got.text, (path, got.status_code)

    browser.get(base(served) + f"/run/{workspace}")  # signing in by the form goes on to the page asked for
    field = browser.find_element(By.ID, "token")
    assert field.accessible_name == "Token"
    field.send_keys(TOKEN, Keys.ENTER)
    WebDriverWait(browser, 10, poll_frequency=0.05).until(lambda d: d.title.startswith(workspace))
    cookie = browser.get_cookie(f"agentic_board_{served.port}")
    assert cookie is not None and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert TOKEN not in cookie["value"]


def _session(s: Served) -> dict[str, str]:
    """The cookie a browser gets by signing in with the token in the first URL."""
    got = httpx2.get(f"{base(s)}/?token={TOKEN}", timeout=30, follow_redirects=False)
    assert got.status_code == 303 and got.headers["location"] == "/"
    return dict(got.cookies)


def test_an_action_posted_with_a_foreign_origin_or_host_is_refused_and_changes_nothing(
    served: Served, user_repo: Path
) -> None:
    workspace = dispatch(served, user_repo, "sleep 300")
    wait_status(served, workspace, "running")
    cookies, url = _session(served), f"{base(served)}/actions/cancel"
    own = f"http://127.0.0.1:{served.port}"
    form = {"workspace": workspace, "back": "/"}
    for headers, refused in (
        ({"Origin": "http://evil.example"}, 403),
        ({"Origin": f"http://127.0.0.1:{served.port + 1}"}, 403),
        ({}, 403),  # no Origin at all: no browser page of ours posts without one
        ({"Origin": own, "Host": f"evil.example:{served.port}"}, 421),
    ):
        got = httpx2.post(url, data=form, headers=headers, cookies=cookies, timeout=30)
        assert got.status_code == refused, (headers, got.status_code, got.text)
    assert httpx2.post(url, data=form, headers={"Origin": own}, timeout=30).status_code == 401, "no cookie"
    assert mcp(served, "agentic_status", workspace=workspace)["workspaces"][0]["status"] == "running"

    got = httpx2.post(url, data=form, headers={"Origin": own, "Accept": "application/json"}, cookies=cookies)
    assert got.status_code == 200 and got.json()["ok"], got.text
    wait_status(served, workspace, "cancelled")


def test_signing_in_and_acting_never_redirect_to_another_site(served: Served) -> None:
    own = {"Origin": f"http://127.0.0.1:{served.port}"}
    cookies = _session(served)
    for target in ("//evil.example/x", "/\\evil.example", "/\t/evil.example", "https://evil.example/", "evil"):
        got = httpx2.post(f"{base(served)}/signin", data={"token": TOKEN, "next": target}, headers=own, timeout=30)
        assert got.status_code == 303 and got.headers["location"] == "/", (target, got.headers.get("location"))
        for verb in ("freeze", "unfreeze"):
            got = httpx2.post(
                f"{base(served)}/actions/{verb}", data={"back": target}, headers=own, cookies=cookies, timeout=30
            )
            assert got.status_code == 303 and got.headers["location"] == "/", (verb, target, got.headers)
    got = httpx2.post(f"{base(served)}/signin", data={"token": TOKEN, "next": "/insights?days=1"}, headers=own)
    assert got.headers["location"] == "/insights?days=1"
    assert mcp(served, "agentic_status")["frozen"] is False


def test_on_loopback_without_a_token_the_board_opens_at_once_and_the_host_and_origin_rules_still_hold(
    docker_env: str, isolated_home: Path
) -> None:
    with serving(isolated_home) as s:
        assert "no token: every user and program on this machine may open it" in s.stderr
        page = httpx2.get(f"{base(s)}/", timeout=60)
        assert page.status_code == 200 and "<title>Board" in page.text
        assert httpx2.get(f"{base(s)}/", headers={"Host": f"evil.example:{s.port}"}, timeout=30).status_code == 421
        url = f"{base(s)}/actions/freeze"
        assert httpx2.post(url, headers={"Origin": "http://evil.example"}, timeout=30).status_code == 403
        assert httpx2.post(url, timeout=30).status_code == 403, "an action without an Origin"
        own = {"Origin": f"http://localhost:{s.port}", "Host": f"localhost:{s.port}", "Accept": "application/json"}
        assert httpx2.post(url, headers=own, timeout=30).json()["ok"] is True
        assert httpx2.post(f"{base(s)}/actions/unfreeze", headers=own, timeout=30).json()["ok"] is True


def _read_events(response: httpx2.Response, until: Any) -> list[tuple[str, str, Any]]:
    """``(event, id, data)`` of each server-sent event until ``until(collected)`` holds."""
    out: list[tuple[str, str, Any]] = []
    event, ident, data = "message", "", ""
    for line in response.iter_lines():
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("id:"):
            ident = line[3:].strip()
        elif line.startswith("data:"):
            data += line[5:].strip()
        elif line == "" and data:
            out.append((event, ident, json.loads(data)))
            event, data = "message", ""
            if until(out):
                return out
    raise AssertionError(f"the stream ended early: {out}")


def test_the_events_stream_resumes_from_its_cursor_after_the_connection_drops_with_no_change_missed(
    served: Served, user_repo: Path
) -> None:
    url = f"{base(served)}/events"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    timeout = httpx2.Timeout(30, read=60)

    def seen(events: list[tuple[str, str, Any]]) -> list[tuple[str, str]]:
        return [(c["workspace"], c["kind"]) for e, _, data in events if e == "changes" for c in data]

    with httpx2.stream("GET", url, headers=auth, timeout=timeout) as first:
        assert first.headers["content-type"].startswith("text/event-stream")
        [(kind, start, _)] = _read_events(first, lambda got: True)
    assert kind == "ready" and start.isdigit()

    # while nobody listens, two runs start and end; the next connection starts from the cursor and drops
    # after its first batch; a third run ends while nobody listens; the last connection goes on from the id
    # of the batch it got
    a, b = dispatch(served, user_repo, "echo a"), dispatch(served, user_repo, "exit 4")
    wait_status(served, a, "completed")
    wait_status(served, b, "failed")
    with httpx2.stream("GET", url, headers={**auth, "Last-Event-ID": start}, timeout=timeout) as second:
        part = _read_events(second, lambda got: any(e == "changes" for e, _, _ in got))
    last = [i for e, i, _ in part if e == "changes"][-1]
    c = dispatch(served, user_repo, "echo c")
    wait_status(served, c, "completed")
    with httpx2.stream("GET", url, headers={**auth, "Last-Event-ID": last}, timeout=timeout) as third:
        rest = _read_events(third, lambda got: (c, "completed") in seen(got))

    got = seen(part) + seen(rest)
    expected = [
        (x["workspace"], x["kind"]) for x in mcp(served, "agentic_watch", cursor=start, timeout_seconds=0)["changes"]
    ]
    assert got == expected[: len(got)], (got, expected)
    assert {(a, "completed"), (b, "failed"), (c, "completed")} <= set(got)
    assert {(a, "dispatched"), (c, "dispatched")} <= set(got)


# Every element that holds text of its own, with its colour and the colour behind it as painted (a canvas turns
# any CSS colour, color-mix() included, into sRGB bytes; a translucent background is laid over its parent's).
TEXT_COLOURS = """
const ctx = document.createElement("canvas").getContext("2d", {willReadFrequently: true});
function rgba(css) {
  ctx.clearRect(0, 0, 1, 1); ctx.fillStyle = "#000"; ctx.fillStyle = css; ctx.fillRect(0, 0, 1, 1);
  const [r, g, b, a] = ctx.getImageData(0, 0, 1, 1).data; return [r, g, b, a / 255];
}
function over(top, below) { return [0, 1, 2].map(i => top[i] * top[3] + below[i] * (1 - top[3])).concat([1]); }
function behind(el) {
  const layers = [];
  for (let e = el; e; e = e.parentElement) {
    const c = rgba(getComputedStyle(e).backgroundColor);
    if (c[3] > 0) layers.push(c);
    if (c[3] >= 1) break;
  }
  let bg = [255, 255, 255, 1];
  if (layers.length && layers[layers.length - 1][3] >= 1) bg = layers.pop();
  while (layers.length) bg = over(layers.pop(), bg);
  return bg;
}
const out = [];
for (const el of document.querySelectorAll("body *")) {
  const own = [...el.childNodes].some(n => n.nodeType === 3 && n.textContent.trim());
  const box = el.getBoundingClientRect();
  if (!own || box.width === 0 || box.height === 0 || el.closest(".visually-hidden, .skip")) continue;
  const style = getComputedStyle(el);
  if (style.visibility !== "visible") continue;
  out.push({text: el.textContent.trim().slice(0, 40), tag: el.tagName, cls: el.className,
            fg: over(rgba(style.color), behind(el)), bg: behind(el),
            size: parseFloat(style.fontSize), bold: parseInt(style.fontWeight) >= 700});
}
return out;
"""


# The insights chart (SVG: colours are fills and strokes, and what lies under a figure is a shape, not
# a box). Each figure: its fill against the shapes drawn before it, at points along its middle line.
# Each bar: its colour against what it is drawn on, at its middle.
CHART_COLOURS = (
    TEXT_COLOURS.split("const out = [];")[0]
    + """
const svg = document.querySelector("svg.chart"), out = [];
const shapes = svg ? [...svg.querySelectorAll("rect")] : [];
function paint(el) {
  const s = getComputedStyle(el), fill = s.fill !== "none";
  const c = rgba(fill ? s.fill : s.stroke);
  c[3] *= parseFloat(s.opacity) * parseFloat(fill ? s.fillOpacity : s.strokeOpacity);
  return c;
}
function under(x, y, el) {
  let bg = behind(svg);
  for (const r of shapes) {
    if (r === el || (el.compareDocumentPosition(r) & Node.DOCUMENT_POSITION_FOLLOWING)) break;
    const b = r.getBBox();
    if (getComputedStyle(r).fill !== "none" && x >= b.x && x <= b.x + b.width && y >= b.y && y <= b.y + b.height)
      bg = over(paint(r), bg);
  }
  return bg;
}
for (const t of svg ? svg.querySelectorAll("text") : []) {
  const b = t.getBBox();
  for (let x = b.x + 1; x < b.x + b.width; x += 2) {
    const bg = under(x, b.y + b.height / 2, t);
    out.push({kind: "text", what: t.getAttribute("class") + " " + t.textContent, fg: over(paint(t), bg), bg});
  }
}
for (const r of shapes) {
  const b = r.getBBox();
  if (r.getAttribute("class") === "track" || b.width === 0) continue;
  const bg = under(b.x + b.width / 2, b.y + b.height / 2, r);
  out.push({kind: "bar", what: r.getAttribute("class"), fg: over(paint(r), bg), bg});
}
return out;
"""
)


def _luminance(rgb: list[float]) -> float:
    def channel(c: float) -> float:
        c /= 255
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (channel(c) for c in rgb[:3])
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast(fg: list[float], bg: list[float]) -> float:
    """The WCAG 2 contrast ratio of two opaque sRGB colours."""
    hi, lo = sorted((_luminance(fg), _luminance(bg)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def test_every_text_on_the_board_and_a_runs_page_is_readable_in_light_and_in_dark_mode(
    served: Served, browser: webdriver.Chrome, user_repo: Path
) -> None:
    """WCAG AA: 4.5:1 for ordinary text, 3:1 for large (24 px, or 18.66 px bold), with the colours the system's
    scheme chooses (prefers-color-scheme, as Chromium is told to emulate it), on cards of every status, a
    failure's reason, a diff and a log."""
    # each lasts a while: the chart's duration bars have a length
    done = dispatch(served, user_repo, "echo 'x = 1' > app.py && git add app.py && git commit -qm 'add app'; sleep 2")
    failed = dispatch(served, user_repo, "sleep 1; echo broken >&2; exit 3")
    blocked = dispatch(served, user_repo, ASK)
    running = dispatch(served, user_repo, "sleep 300")
    for workspace, status in ((done, "completed"), (failed, "failed"), (blocked, "blocked"), (running, "running")):
        wait_status(served, workspace, status)
    sign_in(browser, served)
    pages = {"board": f"{base(served)}/", "completed run": f"{base(served)}/run/{done}",
             "failed run": f"{base(served)}/run/{failed}", "insights": f"{base(served)}/insights"}  # fmt: skip
    unreadable = []
    try:
        for scheme in ("light", "dark"):
            browser.execute_cdp_cmd(
                "Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": scheme}]}
            )
            for page, url in pages.items():
                browser.get(url)
                if page == "board":
                    card(browser, running, 10)
                seen = browser.execute_script(TEXT_COLOURS)
                assert len(seen) > 10, f"{page}: too little text found to judge ({seen})"
                if page == "insights":  # its chart's figures (4.5:1) and bars (3:1, WCAG's non-text contrast)
                    chart = browser.execute_script(CHART_COLOURS)
                    assert {c["what"] for c in chart if c["kind"] == "bar"} == {"ok", "p50", "p90"}, chart
                    for c in chart:
                        ratio = contrast(c["fg"], c["bg"])
                        said = f"{scheme} {page} chart: {c['kind']} {c['what']!r} {ratio:.2f}:1"
                        if ratio < (4.5 if c["kind"] == "text" else 3) and said not in unreadable:
                            unreadable.append(said)
                for t in seen:
                    large = t["size"] >= 24 or (t["bold"] and t["size"] >= 18.66)
                    ratio = contrast(t["fg"], t["bg"])
                    if ratio < (3 if large else 4.5):
                        unreadable.append(f"{scheme} {page}: {t['tag']}.{t['cls']} {t['text']!r} {ratio:.2f}:1")
            if scheme == "dark":  # the emulation took: the page's own background is dark
                assert _luminance(browser.execute_script(TEXT_COLOURS)[0]["bg"]) < 0.05
    finally:
        browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})
    assert unreadable == [], "\n".join(unreadable)
