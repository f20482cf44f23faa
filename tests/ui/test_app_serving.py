"""The dashboard while a server runs in it: requests in the console, the batch in the header,
outcomes in the events log.

The continuous batch's events are handed to the App exactly as the engine worker hands them:
through `app._emit`, called on a thread that is not the App's.
"""

from __future__ import annotations

import threading
import time

import pytest

from vramancer.app import VramancerApp
from vramancer.config.options import LoadOptions
from vramancer.engine import events as ev
from vramancer.widgets.events_log import EventsLog
from vramancer.widgets.requests import KEPT

SIZE = (120, 40)
TIMEOUT = 30.0

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("one_torch_thread")]




async def wait_for(pilot, condition, what: str, timeout: float = TIMEOUT):
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await pilot.pause(0.02)
    return result


def emit_from_worker_thread(app: VramancerApp, events: list[ev.Event]) -> None:
    """What the worker does: `emit` each event, in order, from its own thread."""
    thread = threading.Thread(target=lambda: [app._emit(e) for e in events])
    thread.start()
    thread.join()


async def engine_started(pilot) -> None:
    await wait_for(pilot, lambda: pilot.app.worker is not None and pilot.app._handlers, "the engine to start")


def screen_text(app) -> str:
    """Every line the screen shows now, as a person reads it."""
    return "\n".join(strip.text for strip in app.screen._compositor.render_strips())


def requests_text(app) -> str:
    return app.console_panel.requests.render().plain


def log_text(app) -> str:
    """The events log's lines as written (on screen they wrap to the panel's width)."""
    return "\n".join(text for text, _ in app.query_one(EventsLog).entries)


def queued(n: int, client: str = "127.0.0.1:5100", prompt: str = "Tell me about lighthouses") -> ev.RequestQueued:
    return ev.RequestQueued(f"req-{n}", f"{client[:-1]}{n}", prompt, 12, 64)


def done(n: int, tokens: int, reason: str = "stop") -> ev.GenerationDone:
    return ev.GenerationDone(f"req-{n}", "x" * tokens, tuple(range(tokens)), 12, tokens, 0.05, 18.5,
                             reason == "cancelled", finish_reason=reason, total_s=1.25)


async def test_each_request_shows_its_progress_and_outcome(tiny_model_dir):
    app = VramancerApp(telemetry=False)
    async with app.run_test(size=SIZE) as pilot:
        await engine_started(pilot)
        assert not app.header.batch.display and not app.console_panel.requests.display, \
            "without a server the header and console show nothing of one"
        console_height = app.console_panel.region.height

        emit_from_worker_thread(app, [queued(1), queued(2, prompt="Write a haiku\nabout the sea"),
                                      ev.RequestStarted("req-1"), ev.BatchStatus(1, 1, 0.0, 20, 2048)])
        await wait_for(pilot, lambda: "req-2" in requests_text(app), "the two requests")
        shown = requests_text(app)
        assert "127.0.0.1:5101" in shown and '"Tell me about lighthouses"' in shown
        assert '"Write a haiku about the sea"' in shown, "a prompt's line breaks do not break the list"
        lines = {line.split()[0]: line for line in shown.splitlines()[1:]}
        assert "0/64 tok" in lines["req-1"] and lines["req-1"].endswith("streaming")
        assert lines["req-2"].endswith("queued")
        assert app.console_panel.region.height > console_height, "the console makes room for the requests"
        await wait_for(pilot, lambda: app.header.batch.display, "the batch in the header")
        assert str(app.header.batch.render()) == "1 running · 1 waiting · 0.0 tok/s"

        emit_from_worker_thread(app, [ev.Token("a", "req-1"), ev.Token("b", "req-1"), ev.Token("c", "req-1"),
                                      ev.RequestStarted("req-2"), ev.Token("z", "req-2"),
                                      ev.BatchStatus(2, 0, 41.5, 40, 2048)])
        await wait_for(pilot, lambda: "3/64 tok" in requests_text(app), "the tokens so far")
        assert "1/64 tok" in requests_text(app)
        await wait_for(pilot, lambda: "41.5 tok/s" in str(app.header.batch.render()), "the batch's speed")
        assert "2 running · 0 waiting" in str(app.header.batch.render())
        await pilot.pause()
        width = app.header.batch.region.width

        emit_from_worker_thread(app, [done(1, 3), done(2, 1, "cancelled"),
                                      ev.RequestRefused("req-3", "queue_full", "The queue is full (8 waiting)."),
                                      ev.BatchStatus(0, 0, 17.1, 0, 2048)])
        await wait_for(pilot, lambda: "refused" in requests_text(app), "the refusal")
        lines = {line.split()[0]: line for line in requests_text(app).splitlines()[1:]}
        assert lines["req-1"].endswith("finished (stop)") and "18.5 tok/s" in lines["req-1"]
        assert lines["req-2"].endswith("cancelled")
        assert "refused (queue_full): The queue is full" in lines["req-3"]
        log = log_text(app)
        assert "request req-1 from 127.0.0.1:5101 · 3 tokens in 1.25 s · stop" in log
        assert "request req-2 from 127.0.0.1:5102 · 1 tokens in 1.25 s · cancelled" in log
        assert "request req-3 refused (queue_full): The queue is full (8 waiting)." in log
        assert "answered" not in log, "a server request is not logged as the console's answer"
        await pilot.pause()
        # Nothing running: the last second's rate is not shown as if it were now.
        assert "0 running · 0 waiting" in screen_text(app) and "17.1" not in screen_text(app), "the header on screen"
        # Shorter figures are padded: the header stays still, and new figures need no layout.
        assert app.header.batch.region.width == width
        assert "req-1" in screen_text(app) and "finished (stop)" in screen_text(app), "the console on screen"


async def test_a_thousand_requests_do_not_grow_the_screen(tiny_model_dir):
    app = VramancerApp(telemetry=False)
    async with app.run_test(size=SIZE) as pilot:
        await engine_started(pilot)
        emit_from_worker_thread(app, [queued(0), done(0, 2)])
        await wait_for(pilot, lambda: "req-0" in log_text(app), "the first request")
        await pilot.pause()
        console = app.console_panel.region
        batch = []
        for n in range(1, 1000):
            batch += [queued(n), ev.RequestStarted(f"req-{n}"), ev.Token("t", f"req-{n}"), done(n, 1)]
        emit_from_worker_thread(app, batch)
        await wait_for(pilot, lambda: "req-999" in log_text(app), "the last request's outcome", timeout=120)
        await pilot.pause()
        requests = app.console_panel.requests
        assert len(requests.requests) == KEPT and requests.total == 1000
        assert app.console_panel.region == console, "the console keeps its size"
        shown = requests_text(app).splitlines()
        assert len(shown) == requests.content_region.height and shown[-1].startswith("req-999")
        assert f"{1000 - (len(shown) - 1)} earlier not shown" in shown[0]


async def test_the_console_answers_beside_the_server_requests(tiny_model_dir):
    app = VramancerApp(LoadOptions(tiny_model_dir, "sim:2x64MiB", "proportional", 256, "auto"), telemetry=False,
                       sampling={"max_new_tokens": 30})
    answers: list[ev.GenerationDone] = []
    async with app.run_test(size=SIZE, message_hook=lambda m: answers.append(m.event)
                            if getattr(m, "event", None).__class__ is ev.GenerationDone else None) as pilot:
        await wait_for(pilot, lambda: app.plan is not None and app.console_panel.ready, "the model to load")
        emit_from_worker_thread(app, [queued(1), ev.RequestStarted("req-1"), ev.Token("x", "req-1")])
        await wait_for(pilot, lambda: "req-1" in requests_text(app), "the server request")
        app.console_panel.prompt.focus()
        await pilot.press(*"Hello", "enter")
        answer = (await wait_for(pilot, lambda: [a for a in answers if a.request_id == 1], "the console's answer"))[0]
        await pilot.pause()
        assert str(app.query(".answer").last().render()) == answer.text and answer.new_tokens > 0
        assert "req-1" in requests_text(app) and "streaming" in requests_text(app), "the request line stays"
        assert f"answered {answer.new_tokens} tokens" in log_text(app)


async def test_the_dashboards_server_takes_the_serve_flags(tmp_path):
    """`vramancer --serve` with the flags `vramancer serve` takes: the key, the batch size, the
    connection deadlines reach the server and the worker the dashboard starts."""
    import httpx

    from vramancer.cli.main import _check_values, _limits, build_parser

    key_file = tmp_path / "key"
    key_file.write_text("sk-dashboard\n")
    args = build_parser().parse_args(["--serve", "0", "--api-key-file", str(key_file), "--max-batch", "3",
                                      "--keep-alive-seconds", "2.5", "--body-seconds", "7"])
    _check_values(args)
    settings = {"api_key": args.api_key, "max_batch": args.max_batch, "limits": _limits(args)}
    app = VramancerApp(telemetry=False, serve_port=0, serve_settings=settings)
    async with app.run_test(size=SIZE) as pilot:
        await engine_started(pilot)
        await wait_for(pilot, lambda: app.server is not None and app.server.port, "the server")
        assert app.worker.max_batch == 3
        assert (app.server.limits.keep_alive_s, app.server.limits.body_s, app.server.limits.header_s) == (2.5, 7.0, 10.0)
        url = f"http://127.0.0.1:{app.server.port}/v1/models"
        async with httpx.AsyncClient() as client:
            assert (await client.get(url)).status_code == 401
            answered = await client.get(url, headers={"Authorization": "Bearer sk-dashboard"})
        assert answered.status_code != 401
