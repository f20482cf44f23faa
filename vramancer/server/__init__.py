"""The OpenAI-compatible HTTP server and /metrics: another client of the engine, like app/.

Starlette rather than FastAPI: every route here checks its body by hand to answer with OpenAI's
error objects (FastAPI's pydantic validation answers 422 in its own shape, which would have to be
undone), and the five routes need no schema generation; FastAPI would add pydantic models and an
import's worth of start-up time for nothing we use. uvicorn serves it; streaming is a Starlette
StreamingResponse writing server-sent events (`data: {...}`, then `data: [DONE]`), which also
cancels the stream when the client hangs up; prometheus_client formats /metrics.

Modules: protocol (OpenAI shapes, checks), tools (tool calls in and out), bridge (worker events
-> per-request asyncio queues), metrics (the Prometheus registry), guard (request counting,
trailing slashes, Origin/Host/Content-Type), connections (deadlines and the connection cap on
uvicorn's h11 protocol), routes (the Starlette app), service (InferenceServer: uvicorn on a
thread; `vramancer serve`). Neither this package nor the dashboard imports the other; the
engine imports neither.
"""
