"""The web console in a real browser (Debian's chromium, driven by Selenium), against real servers
and a real worker: log in, create a job through the form (a bad cron first), see it fire, follow a
live log, kill, retry, pause and resume, a viewer's read-only view, an ownership change, a map's
sub-tasks, and a workflow's graph with a step marked succeeded by hand."""
from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

import pytest
from harness import FAST_CLUSTER_ARGS, wait_until

from fastjob import Worker
from fastjob.client import Client

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
if CHROMIUM is None or CHROMEDRIVER is None:
    if os.environ.get("FASTJOB_REQUIRE_SERVICES"):  # .ci/run installs both: there, a skip would hide a failure
        raise RuntimeError("the console tests need Debian's chromium and chromium-driver (apt-get install)")
    pytest.skip("needs Debian's chromium and chromium-driver", allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.wait import WebDriverWait  # noqa: E402


class Browser:
    """A headless chromium; each call runs on a thread, so the test's worker keeps running."""

    def __init__(self, base: str) -> None:
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM or ""
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--window-size=1280,800"):
            options.add_argument(flag)
        self.driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        self.base = base

    async def run(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.to_thread(fn)

    async def open(self, hash_path: str) -> None:
        await self.run(lambda: self.driver.get(f"{self.base}/{hash_path}"))

    async def text(self) -> str:
        return str(await self.run(lambda: self.driver.find_element(By.TAG_NAME, "main").text))

    async def until_text(self, needle: str, timeout: float = 15.0) -> str:
        last = [""]

        async def seen() -> str | None:
            last[0] = await self.text()
            return last[0] if needle in last[0] else None
        try:
            return str(await wait_until(seen, timeout, f"{needle!r} on the page", poll=0.2))
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the page says: {last[0][:500]!r}") from None

    async def on(self, css: str, action: Callable[[Any], Any], timeout: float = 10.0) -> None:
        """``action`` on the element once the page drew it: a page is drawn after its requests
        answer, and drawn again (its elements replaced) when an instance ends, so a bounded wait."""
        def attempt(driver: Any) -> bool:
            action(driver.find_element(By.CSS_SELECTOR, css))
            return True
        await self.run(lambda: WebDriverWait(self.driver, timeout, poll_frequency=0.05, ignored_exceptions=(
            NoSuchElementException, StaleElementReferenceException)).until(attempt, f"{css} on the page"))

    async def click(self, css: str) -> None:
        await self.on(css, lambda element: element.click())

    async def count(self, css: str) -> int:
        return len(await self.run(lambda: self.driver.find_elements(By.CSS_SELECTOR, css)))

    async def type(self, css: str, text: str, clear: bool = True) -> None:
        def do(element: Any) -> None:
            if clear:
                element.clear()
            element.send_keys(text)
        await self.on(css, do)

    async def login(self, token: str) -> None:
        await self.run(lambda: self.driver.get(f"{self.base}/"))
        await self.type("input[name=token]", token)
        await self.click("#login button")
        await wait_until(lambda: self.run(lambda: self.driver.find_element(By.ID, "logout").is_displayed()), 10,
                         "logged in")

    def close(self) -> None:
        self.driver.quit()


@pytest.fixture
async def browsers() -> Any:
    opened: list[Browser] = []

    def make(base: str) -> Browser:
        browser = Browser(base)
        opened.append(browser)
        return browser

    yield make
    for browser in opened:
        browser.close()


async def test_console_end_to_end(servers, sqlite_url, browsers):
    server = await servers.start(sqlite_url, *FAST_CLUSTER_ARGS, "--second-level-threshold", "0")
    worker = Worker(app="billing", servers=[server.address], reconnect_max=0.5)
    go = asyncio.Event()

    @worker.handler("tick")
    async def tick(ctx: Any) -> None:
        pass

    @worker.handler("chatty")
    async def chatty(ctx: Any) -> None:
        for n in range(3):
            await asyncio.wait_for(go.wait(), 20)
            go.clear()
            ctx.log.info("step %d", n)

    @worker.handler("long")
    async def long(ctx: Any) -> None:
        await asyncio.sleep(3600)

    @worker.handler("flaky")
    async def flaky(ctx: Any) -> str:
        if ctx.attempt == 1:
            raise RuntimeError("first attempt fails")
        return "fine"

    for name in ("chatty", "long", "flaky"):
        worker.schedule(name)
    async with worker:
        browser = browsers(f"http://{server.http_address}")
        await browser.login(server.admin_token or "")
        await browser.until_text("Fires per minute")

        # a job through the form: a bad cron is refused as you type, then its next fires show
        await browser.open("#/job?app=billing")
        await browser.type("input[name=name]", "every-second")
        await browser.type("input[name=handler]", "tick")
        await browser.type("input[name=expr]", "61 * * * * *")
        await browser.until_text("bad cron")
        await browser.type("input[name=expr]", "* * * * * *")
        await wait_until(lambda: browser.count("#next li"), 10, "the next fire times")
        assert await browser.count("#next li") == 10
        await browser.click("#save")
        await browser.until_text("every-second")

        # it fires, and the jobs page says how it went
        await browser.open("#/instances?app=billing&job=every-second")
        async def fired() -> Any:
            await browser.open("#/instances?app=billing&job=every-second&status=succeeded&n=" + str(time.time()))
            return "succeeded" in await browser.until_text("Instances")
        await wait_until(fired, 15, "a fire of the new job in the list")
        await browser.open("#/jobs?app=billing&name=every-second")
        await browser.until_text("100% ok")

        # a phone-width screen: nothing wider than the screen but the tables' own scrolling
        await browser.run(lambda: browser.driver.set_window_size(390, 844))
        await browser.open("#/instances?app=billing&job=every-second&w=390")
        await browser.until_text("Instances")
        overflow = await browser.run(lambda: browser.driver.execute_script(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth"))
        assert overflow <= 1
        await browser.run(lambda: browser.driver.set_window_size(1280, 800))

        # pause and resume
        await browser.open("#/jobs?app=billing&name=every-second")
        await browser.until_text("every-second")
        await browser.click("button[data-act=pause]")
        await wait_until(lambda: browser.count("button[data-act=resume]"), 10, "paused")
        await browser.click("button[data-act=resume]")
        await wait_until(lambda: browser.count("button[data-act=pause]"), 10, "resumed")

        # a live log: each line is written only after the page showed the one before
        chatty_id = await worker.trigger("chatty")
        await browser.open(f"#/instance?id={chatty_id}")
        await browser.until_text("Log")
        for n in range(3):
            go.set()
            await browser.until_text(f"step {n}")
        await browser.until_text("succeeded")

        # run a long job now from the jobs page, and kill it from its page
        await browser.open("#/jobs?app=billing&name=long")
        await wait_until(lambda: browser.count("button[data-act=run][data-job=long]"), 10, "a run button")
        await browser.click("button[data-act=run][data-job=long]")
        await browser.run(lambda: browser.driver.switch_to.alert.accept())  # no params
        await browser.until_text("Attempts")
        long_id = int((await browser.run(lambda: browser.driver.current_url)).rsplit("id=", 1)[1])
        await wait_until(lambda: _running(worker, long_id), 10, "the long run started")
        await browser.open(f"#/instance?id={long_id}&at={time.time()}")
        await wait_until(lambda: browser.count("#kill"), 10, "a kill button")
        await browser.click("#kill")
        await browser.until_text("killed")

        # retry a failed instance
        flaky_id = await worker.trigger("flaky")
        await wait_until(lambda: _status(worker, flaky_id, "failed"), 10, "the first attempt failed")
        await browser.open(f"#/instance?id={flaky_id}")
        await wait_until(lambda: browser.count("#retry"), 10, "a retry button")
        await browser.click("#retry")
        await browser.until_text("succeeded")

        # a viewer sees no mutating buttons, and a POST forged with its token is refused
        viewer = await _token(worker, server, "viewer")
        reader = browsers(f"http://{server.http_address}")
        await reader.login(viewer)
        await reader.open("#/jobs?app=billing")
        await reader.until_text("every-second")
        for css in ("button[data-act]", "a[href^='#/job?']"):
            assert await reader.count(css) == 0, css
        await reader.open(f"#/instance?id={flaky_id}")
        await reader.until_text("Attempts")
        assert await reader.count("#retry") == 0
        forged = await reader.run(lambda: reader.driver.execute_async_script(
            "const done = arguments[0]; fetch('/api/v1/apps/billing/jobs/long/trigger', {method: 'POST',"
            " headers: {Authorization: 'Bearer ' + sessionStorage.getItem('fastjob.token')}})"
            ".then(r => done(r.status));"))
        assert forged == 403


async def _running(worker: Worker, instance_id: int) -> bool:
    return await _status(worker, instance_id, "running")


async def _status(worker: Worker, instance_id: int, status: str) -> bool:
    return (await worker.get_instance(instance_id))["status"] == status


async def _token(worker: Worker, server: Any, role: str) -> str:
    import aiohttp

    async with aiohttp.ClientSession() as session, session.post(
            f"http://{server.http_address}/api/v1/tokens", json={"name": role, "role": role},
            headers={"Authorization": f"Bearer {server.admin_token}"}) as answer:
        return str((await answer.json())["token"])


async def _step_boxes(browser: Browser) -> dict[str, str]:
    """The workflow graph's boxes, step name to status, read in one go (a re-render may be under way)."""
    return dict(await browser.run(lambda: browser.driver.execute_script(
        "return [...document.querySelectorAll('svg.dag g.step')].map(g => [g.dataset.step, g.dataset.status]);")))


async def test_console_shows_a_maps_progress_and_its_sub_tasks(servers, sqlite_url, browsers):
    server = await servers.start(sqlite_url, *FAST_CLUSTER_ARGS)
    worker = Worker(app="maps", servers=[server.address], reconnect_max=0.5)

    @worker.handler("double")
    async def double(ctx: Any) -> int:
        if ctx.params == 7:
            raise ValueError("seven <b>is</b> refused")
        return int(ctx.params) * 2

    @worker.handler("fan")
    async def fan(ctx: Any) -> int:
        results = await ctx.map(range(10), "double", batch_size=4, return_exceptions=True)
        return len(results)

    @worker.handler("wide")
    async def wide(ctx: Any) -> int:
        return len(await ctx.map(range(101), "double", batch_size=1, return_exceptions=True))

    @worker.handler("plain")
    async def plain(ctx: Any) -> None:
        pass

    for name in ("fan", "wide", "plain"):
        worker.schedule(name)
    async with worker:
        fan_id, wide_id, plain_id = [await worker.trigger(name) for name in ("fan", "wide", "plain")]
        for instance_id in (fan_id, wide_id, plain_id):
            await wait_until(lambda i=instance_id: _status(worker, i, "succeeded"), 20, f"instance {instance_id} ended")
        browser = browsers(f"http://{server.http_address}")
        await browser.login(server.admin_token or "")
        await browser.open(f"#/instance?id={fan_id}")
        text = await browser.until_text("10 of 10 done, 1 failed")
        assert await browser.count("#subtasks tbody tr") == 3  # items 0..4, 4..8, 8..10
        assert "4..8" in text and "#7: ValueError: seven <b>is</b> refused" in text  # escaped: shown as text
        assert await browser.count("#subtasks b") == 0
        assert "Workflow" not in text and await browser.count("svg.dag") == 0

        # 101 batches: the first page of them, and a link to the rest
        await browser.open(f"#/instance?id={wide_id}")
        await browser.until_text("101 of 101 done, 1 failed")
        assert await browser.count("#subtasks tbody tr") == 100
        await browser.click("#subtasks-more")
        await browser.until_text("First page")
        await wait_until(lambda: browser.count("#subtasks tbody tr"), 10, "the second page of batches")
        assert await browser.count("#subtasks tbody tr") == 1 and await browser.count("#subtasks-more") == 0

        # an instance without sub-tasks shows neither
        await browser.open(f"#/instance?id={plain_id}")
        text = await browser.until_text("Attempts")
        assert "Sub-tasks" not in text and "Workflow" not in text


async def test_console_draws_a_workflow_and_marks_a_step_succeeded(servers, sqlite_url, browsers):
    server = await servers.start(sqlite_url, *FAST_CLUSTER_ARGS)
    worker = Worker(app="flows", servers=[server.address], reconnect_max=0.5)

    @worker.handler("ok")
    async def ok(ctx: Any) -> str:
        return "fine"

    hold, booms = asyncio.Event(), [0]

    @worker.handler("boom")
    async def boom(ctx: Any) -> None:
        booms[0] += 1
        if booms[0] > 1:  # a rerun's: it fails too, once the test let it
            await asyncio.wait_for(hold.wait(), 30)
        raise RuntimeError("the source is gone")

    worker.workflow("etl", {"a": {"handler": "ok"}, "b": {"after": ["a"], "handler": "boom"},
                            "c": {"after": ["b"], "handler": "ok"}})
    async with worker:
        instance_id = await worker.trigger("etl")
        await wait_until(lambda: _status(worker, instance_id, "failed"), 20, "the workflow failed at step b")
        browser = browsers(f"http://{server.http_address}")
        await browser.login(server.admin_token or "")
        await browser.open(f"#/instance?id={instance_id}")
        await wait_until(lambda: browser.count("svg.dag g.step"), 15, "the workflow's graph")
        assert await _step_boxes(browser) == {"a": "succeeded", "b": "failed", "c": "not_started"}
        edges = await browser.run(lambda: [(e.get_attribute("data-from"), e.get_attribute("data-to"))
                                           for e in browser.driver.find_elements(By.CSS_SELECTOR, "svg.dag path.edge")])
        assert sorted(edges) == [("a", "b"), ("b", "c")]
        columns = await browser.run(lambda: browser.driver.execute_script(
            "return [...document.querySelectorAll('svg.dag g.step')].map(g => g.transform.baseVal[0].matrix.e);"))
        assert columns[0] < columns[1] < columns[2]  # a column per depth
        tooltip = await browser.run(lambda: browser.driver.find_element(
            By.CSS_SELECTOR, "svg.dag g.step[data-step=b] title").get_attribute("textContent"))
        assert "the source is gone" in tooltip
        text = await browser.until_text("Workflow")
        assert "1 failed" in text and "Sub-tasks" in text

        # the instance ended: every step not succeeded can be marked so...
        marks = await browser.run(lambda: sorted(b.get_attribute("data-succeed") for b in
                                                 browser.driver.find_elements(By.CSS_SELECTOR, "button[data-succeed]")))
        assert marks == ["b", "c"]

        # ...but not while a rerun of the fire runs: the page says why
        async with Client(server.http_address, server.admin_token) as api:
            rerun_id = (await api.retry(instance_id))["instance_id"]
        await wait_until(lambda: booms[0] == 2, 20, "the rerun's step b running")
        await browser.click("button[data-succeed=b]")
        await browser.until_text("conflict: attempt 2 of this fire has not ended")
        hold.set()
        await wait_until(lambda: _status(worker, rerun_id, "failed"), 20, "the rerun failed at step b")

        # once it ended, b is marked succeeded and shows so
        await browser.open(f"#/instance?id={instance_id}&at={time.time()}")
        await wait_until(lambda: browser.count("button[data-succeed=b]"), 15, "the page drawn again")
        assert await _step_boxes(browser) == {"a": "succeeded", "b": "failed", "c": "not_started"}
        await browser.click("button[data-succeed=b]")

        async def marked() -> bool:
            return await _step_boxes(browser) == {"a": "succeeded", "b": "succeeded", "c": "not_started"}
        await wait_until(marked, 15, "step b shown succeeded")
        assert await browser.count("button[data-succeed=b]") == 0 and await browser.count("button[data-succeed=c]") == 1

        # a viewer sees the graph but no button
        reader = browsers(f"http://{server.http_address}")
        await reader.login(await _token(worker, server, "viewer"))
        await reader.open(f"#/instance?id={instance_id}")
        await wait_until(lambda: reader.count("svg.dag g.step"), 15, "the graph for a viewer")
        assert await reader.count("button[data-succeed]") == 0


async def test_cluster_page_shows_an_ownership_change(servers, mysql_dsn, browsers):
    import aiohttp

    first = await servers.start(mysql_dsn, *FAST_CLUSTER_ARGS)
    second = await servers.start(mysql_dsn, *FAST_CLUSTER_ARGS)
    token = first.admin_token or ""
    worker = Worker(app="billing", servers=[first.address, second.address], reconnect_max=0.5)

    @worker.handler("noop")
    async def noop(ctx: Any) -> None:
        pass

    async with worker, aiohttp.ClientSession() as session:
        async with session.get(f"http://{first.http_address}/api/v1/cluster",
                               headers={"Authorization": f"Bearer {token}"}) as answer:
            owner = {app["name"]: app["owner"] for app in (await answer.json())["apps"]}["billing"]
        stopped, survivor = (first, second) if owner == first.address else (second, first)
        browser = browsers(f"http://{survivor.http_address}")
        await browser.login(token)
        await browser.open("#/cluster")
        await browser.until_text("Ownership changes")
        before = await browser.count("#history tbody tr")
        assert before >= 1  # billing got its owner
        await stopped.terminate()  # SIGTERM: it hands its apps over

        async def moved() -> bool:
            await browser.open(f"#/cluster?at={time.time()}")  # a new hash: the page is drawn again
            await browser.until_text("Ownership changes")
            text = await browser.text()
            return await browser.count("#history tbody tr") > before and (
                "handed over" in text or "takeover" in text or "released" in text)

        await wait_until(moved, 30, "the ownership change on the cluster page")
