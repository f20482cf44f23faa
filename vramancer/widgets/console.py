"""The #console panel: a conversation with the model, streamed as it is decoded.

Each prompt goes to the engine with the earlier turns, so the model sees the conversation
through its chat template. The console keeps the turns, the prompt history and which request
is streaming; the App carries requests to the engine and answers back.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.geometry import Size
from textual.message import Message
from textual.reactive import Reactive
from textual.widgets import Input, Static

from vramancer.widgets.labels import terminal_safe
from vramancer.widgets.requests import ServerRequests

if TYPE_CHECKING:
    from vramancer.engine.events import GenerationDone



REDRAW_INTERVAL = 0.1  # seconds between redraws of a streaming answer


class PromptInput(Input):
    """The prompt line, with up/down recalling earlier prompts like a shell."""

    # The text's width (Input sets it on every key) scrolls the line inside a box whose size the
    # stylesheet fixes, so a new width needs a repaint, never a layout of the whole screen.
    # Textual's default asks for one: a full layout per key press, which made key -> screen
    # the slowest while an answer streams.
    virtual_size = Reactive(Size(0, 0), layout=False)

    BINDINGS = [
        Binding("up", "history(-1)", "Earlier prompt", show=False),
        Binding("down", "history(1)", "Later prompt", show=False),
    ]

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.history: list[str] = []
        self._position = 0  # == len(history) when showing the line being typed
        self._draft = ""

    def remember(self, prompt: str) -> None:
        if not self.history or self.history[-1] != prompt:
            self.history.append(prompt)
        self._position = len(self.history)
        self._draft = ""

    def action_history(self, step: int) -> None:
        if not self.history:
            return
        if self._position == len(self.history):
            self._draft = self.value
        self._position = max(0, min(self._position + step, len(self.history)))
        self.value = self._draft if self._position == len(self.history) else self.history[self._position]
        self.cursor_position = len(self.value)


class ConsolePanel(Vertical):
    """Transcript, stats line and prompt. Streams one answer at a time. Beside the transcript,
    once a server request arrives, the server's requests (one line each)."""

    class Ask(Message):
        """Send this conversation to the model (the last message is the new prompt)."""

        def __init__(self, messages: tuple[dict, ...], request_id: int) -> None:
            super().__init__()
            self.messages = messages
            self.request_id = request_id

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.border_title = "console"
        self.ready = False  # a model is loaded and answers can be asked for
        self.messages: list[dict] = []  # the conversation so far, as chat messages
        self.request_id = 0
        self.streaming: int | None = None  # the request whose answer is arriving
        self.answer_text = ""
        self.transcript = VerticalScroll(id="transcript")
        self.requests = ServerRequests(id="requests")
        self.requests.display = False  # until a server request arrives: nothing extra without a server
        self.stats = Static("", id="stats")
        self.prompt = PromptInput(id="prompt", placeholder="Ask the model…  (enter send · esc cancel · ↑↓ history)")
        self.prompt.cursor_blink = False  # a steady cursor: blinking redrew the screen twice a second at idle
        self._answer: Static | None = None
        self._redraw_pending = False
        self.streamed_tokens = 0  # tokens of the streaming answer so far, as the engine counts them
        self._first_told: tuple[int, float] | None = None  # (tokens, engine time) of its first text
        self._last_told: tuple[int, float] | None = None  # and of its latest

    def compose(self) -> ComposeResult:
        with Horizontal(id="console-body"):
            yield self.transcript
            yield self.requests
        yield self.stats
        yield self.prompt

    @property
    def generating(self) -> bool:
        return self.streaming is not None

    @on(Input.Submitted, "#prompt")
    def _submitted(self, event: Input.Submitted) -> None:
        event.stop()
        prompt = event.value.strip()
        if not prompt:
            return
        if not self.ready:
            self.app.notify("The model is not ready yet; send the prompt again once it has loaded.",
                            severity="warning")
            return
        if self.generating:
            self.app.notify("An answer is still streaming; press Esc to cancel it first.", severity="warning")
            return
        self.prompt.remember(prompt)
        self.prompt.value = ""
        self.request_id += 1
        self.streaming = self.request_id
        self.messages.append({"role": "user", "content": prompt})
        self.answer_text = ""
        self.streamed_tokens = 0
        self._first_told = self._last_told = None
        self.transcript.mount(Static(f"› {terminal_safe(prompt)}", classes="user-turn", markup=False))
        self._answer = Static("", classes="answer", markup=False)
        self.transcript.mount(self._answer)
        self.stats.update("thinking…")
        self.transcript.scroll_end(animate=False)
        self.post_message(self.Ask(tuple(dict(m) for m in self.messages), self.request_id))

    def add_text(self, request_id: int, text: str, step: int = 0, at: float | None = None) -> None:
        """Append streamed text to the answer of `request_id` (stale requests are ignored).
        `step`: the answer's tokens when the engine sent it (0: count it as one), `at`: when
        (time.monotonic on the engine's thread)."""
        if request_id != self.streaming or self._answer is None or not text:
            return
        at = time.monotonic() if at is None else at
        self.streamed_tokens = step or self.streamed_tokens + 1
        self._last_told = (self.streamed_tokens, at)
        self.answer_text += text
        if self._first_told is None:  # the first text replaces "thinking…" at once, unpaced
            self._first_told = self._last_told
            self._redraw()
        elif not self._redraw_pending:
            self._redraw_pending = True
            self.set_timer(REDRAW_INTERVAL, self._redraw)

    def _redraw(self) -> None:
        """Show the answer so far. At most every REDRAW_INTERVAL: re-wrapping a long answer for
        every token would take the CPU the model needs to decode."""
        self._redraw_pending = False
        if self.streaming is None or self._answer is None:
            return
        # Most redraws add a few words to the answer's last line: the whole screen is laid out
        # again only when it takes another line (a layout for each redraw made the key presses
        # that met one wait for it).
        self._answer.update(terminal_safe(self.answer_text), layout=False)
        if _needs_other_height(self._answer):
            self._answer.refresh(layout=True)
        self.stats.update(self.streaming_stats(), layout=False)  # one line of a fixed size
        self.transcript.scroll_end(animate=False)

    def streaming_stats(self) -> str:
        """Tokens so far and the decode rate between the first text and the latest, both as the
        engine timed them."""
        rate = ""
        if self._first_told is not None and self._last_told is not None:
            (tokens0, t0), (tokens1, t1) = self._first_told, self._last_told
            if tokens1 > tokens0 and t1 > t0:
                rate = f" · {(tokens1 - tokens0) / (t1 - t0):.1f} tok/s"
        return f"streaming · {self.streamed_tokens} tokens{rate} · esc cancels"

    def finish(self, done: GenerationDone) -> None:
        """The answer is complete (or was cancelled): keep it as the model's turn, show stats."""
        if done.request_id != self.streaming:
            return
        self.streaming = None
        self.answer_text = done.text
        if self._answer is not None:
            self._answer.update(terminal_safe(done.text) or "(no text)")
            self._answer.set_class(done.cancelled, "-cancelled")
        self.messages.append({"role": "assistant", "content": done.text})
        ttft = f"{done.ttft_s:.2f} s" if done.ttft_s is not None else "—"
        rate = f"{done.decode_tokens_per_s:.1f} tok/s" if done.decode_tokens_per_s else "— tok/s"
        head = "cancelled · " if done.cancelled else ""
        self.stats.update(f"{head}first token {ttft} · {rate} · {done.prompt_tokens} prompt + "
                          f"{done.new_tokens} new tokens")
        self.transcript.scroll_end(animate=False)

    def fail(self, message: str) -> None:
        """The engine refused the request: say why, and forget the prompt it was refused for."""
        if self.streaming is None:
            return
        self.streaming = None
        if self.messages and self.messages[-1]["role"] == "user":
            self.messages.pop()
        if self._answer is not None:
            self._answer.update(message)
            self._answer.add_class("-error")
        self.stats.update("refused · ctrl+l starts a new conversation")

    def new_conversation(self) -> int | None:
        """Forget every turn. Returns the request still streaming, which the caller cancels."""
        abandoned = self.streaming
        self.streaming = None
        self.messages = []
        self.answer_text = ""
        self._answer = None
        self.transcript.remove_children()
        self.stats.update("new conversation")
        return abandoned

    def serving(self) -> ServerRequests:
        """A server request arrived: show the server's requests beside the transcript (once)."""
        if not self.requests.display:
            self.requests.display = True
            self.add_class("-serving")
        return self.requests

    def stop_streaming(self) -> None:
        """The model went away (a new load): nothing is streaming any more."""
        if self.streaming is not None and self._answer is not None:
            self._answer.add_class("-cancelled")
        self.streaming = None


def _needs_other_height(text: Static) -> bool:
    """Whether `text`, given new content, needs more (or fewer) lines than it has on screen."""
    width, height = text.size
    if not (text.is_mounted and width):
        return True
    return text.get_content_height(text.size, text.size, width) != height
