"""One execution environment: the runtime process, the Runtime API state, the invocation in flight.

The HTTP layer (:mod:`lambdalet_agent.server`) calls in from both sides: the caller side with
:meth:`Environment.invoke`, the runtime side with :meth:`Environment.next_event`,
:meth:`Environment.begin_result` / :meth:`Environment.finish` and :meth:`Environment.init_error`.
Everything runs on one event loop; no locks are needed because no method awaits between a state check
and the change it guards.

A streamed result (:meth:`Environment.start_stream`) hands the caller a :class:`ResponseStream` at once;
the invocation still ends in one place, :meth:`Environment._complete` (the runtime's end of the stream,
a timeout, the runtime's exit, shutdown), which closes the stream and leaves the outcome in
``Invocation.final`` for the caller's trailers.

Concurrent mode (``--max-concurrency N``, ``AWS_LAMBDA_MAX_CONCURRENCY``, N > 1) follows AWS's emulator in its
Lambda Managed Instances mode (``internal/lambda-managed-instances``), with the differences named here:

- Up to N invocations are in flight; the runtime is told ``AWS_LAMBDA_MAX_CONCURRENCY=N`` (our Python
  bootstrap and awslambdaric >= 4 then run N worker processes) and may wait at ``/next`` N times. Each
  ``/next`` takes the oldest accepted invocation; results are matched by request id, in any order.
- One more invocation is answered ``429 Environment.Busy`` (the emulator: ``400 Runtime.Unavailable``, and
  already when no worker waits at ``/next``; here an accepted invocation waits for one, under its deadline).
- A timeout answers that caller ``Sandbox.Timedout`` and leaves the runtime and the other invocations
  alone; the worker stays taken until the runtime posts the late result (``410 InvokeTimeout``, as the
  emulator). Only when no worker can serve any more is the runtime reset: every one holds a timed-out
  invocation, or one of those is held and an invocation waited in vain for a worker (a runtime that ignores
  ``AWS_LAMBDA_MAX_CONCURRENCY`` has one); the emulator would stay unavailable.
- The runtime process exiting fails every invocation it was running with ``Runtime.ExitError``, as the
  emulator; then the runtime is reset as in standard mode (the emulator ends). Invocations accepted but not
  yet handed out wait for the new runtime. An init failure answers every waiting invocation.
- Logs: Lambda Managed Instances supports only the JSON log format, and the runtime is given
  ``AWS_LAMBDA_LOG_FORMAT=JSON`` unless the function sets it; the agent's own ``START``/``END``/``REPORT``
  lines stay in the text format, one set per invocation, each naming its request id (the emulator writes
  text lines in this mode too). ``X-Amz-Log-Type: Tail`` returns the invocation's own platform lines and
  the function's lines that contain its request id (JSON log records carry it): lines of overlapping
  invocations cannot be told apart otherwise.
- Max Memory Used is the peak of the whole runtime while the invocation ran (the peak is reset when an
  invocation starts with no other running), so overlapping invocations report the same shared peak.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from lambdalet_agent import report
from lambdalet_agent.external import Endpoint, ExternalRuntime, find_peer_process
from lambdalet_agent.memory import MemoryLimiter
from lambdalet_agent.metrics import Metrics
from lambdalet_agent.process import RuntimeProcess
from lambdalet_agent.runtimes import InvalidEntrypoint, RuntimeNotFound
from lambdalet_agent.settings import Settings
from lambdalet_agent.state import ConcurrentRuntimeState, Phase, RuntimeState

log = logging.getLogger("lambdalet.agent")

Runtime = RuntimeProcess | ExternalRuntime

JSON = "application/json"
RESPONSE_LIMIT = 6 * 1024 * 1024 + 100  # 6,291,556 bytes, the Runtime API's limit
STREAM_BUFFER = 1024 * 1024  # streamed bytes held for a slow caller before the runtime's reads pause
REQUEST_LIMIT = 6 * 1024 * 1024  # 6,291,456 bytes, the Invoke API's limit
# The runtime's end of a pipe the agent closes once the runtime is under its memory limit (our Python
# bootstrap waits for that before it imports the function's code; the variable is removed from its env).
MEMORY_GATE_VAR = "_LAMBDALET_MEMORY_GATE_FD"


class RuntimeGone(Exception):
    """The runtime waiting at ``/next`` was reset or the agent is stopping: it must exit (HTTP 500)."""


class Busy(Exception):
    """The environment runs as many invocations as it may (one in standard mode); the message says so."""


def error_json(error_type: str, message: str) -> bytes:
    return json.dumps({"errorType": error_type, "errorMessage": message}, separators=(",", ":")).encode()


@dataclass(slots=True)
class Event:
    """What the caller sent."""

    request_id: str
    body: bytes
    invoked_arn: str
    content_type: str = JSON
    trace_id: str | None = None
    client_context: str | None = None
    cognito_identity: str | None = None
    want_tail: bool = False


class ResponseStream:
    """A streamed response on its way from the runtime to the caller: chunks in the order the runtime
    wrote them, then the end. Bounded: :meth:`put` waits while more than ``STREAM_BUFFER`` bytes are held
    (the runtime's connection stops being read meanwhile); :meth:`close` never waits and wakes everyone."""

    __slots__ = ("_chunks", "_getter", "_putter", "_size", "closed")

    def __init__(self) -> None:
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._getter: asyncio.Future[None] | None = None
        self._putter: asyncio.Future[None] | None = None
        self.closed = False

    @staticmethod
    def _wake(waiter: asyncio.Future[None] | None) -> None:
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def put(self, chunk: bytes) -> None:
        if self.closed:
            return
        self._chunks.append(chunk)
        self._size += len(chunk)
        self._wake(self._getter)
        while self._size > STREAM_BUFFER and not self.closed:
            self._putter = asyncio.get_running_loop().create_future()
            await self._putter

    def close(self) -> None:
        self.closed = True
        self._wake(self._getter)
        self._wake(self._putter)

    async def get(self) -> bytes | None:
        """The next chunk, or None once the stream is closed and drained."""
        while not self._chunks:
            if self.closed:
                return None
            self._getter = asyncio.get_running_loop().create_future()
            await self._getter
        chunk = self._chunks.popleft()
        self._size -= len(chunk)
        if self._size <= STREAM_BUFFER:
            self._wake(self._putter)
        return chunk


@dataclass(slots=True)
class Outcome:
    """What the caller gets: a buffered body, or a stream of chunks (streaming response mode)."""

    body: bytes
    content_type: str = JSON
    error_type: str | None = None  # set for every failed invocation -> X-Amz-Function-Error: Unhandled
    stream: ResponseStream | None = None


@dataclass(slots=True)
class Invocation:
    event: Event
    result: asyncio.Future[Outcome]
    finished: asyncio.Future[None]
    accepted_at: float
    tail: report.LogTail | None = None
    delivered_at: float | None = None
    deadline_at: float | None = None  # loop time
    deadline_epoch_ms: int = 0
    timer: asyncio.TimerHandle | None = None
    init_duration_ms: float | None = None
    duration_ms: float = 0.0
    max_memory_mb: int = 0
    reset: bool = False
    stream: ResponseStream | None = None
    final: Outcome | None = None  # how it ended (a streamed invocation: its error, if any, for the trailers)


@dataclass(slots=True)
class InitFailure:
    kind: str  # "posted" | "exit" | "timeout" | "entrypoint"
    body: bytes = b""
    content_type: str = JSON
    error_type: str = "Runtime.Unknown"
    returncode: int | None = None
    message: str = ""

    def render(self, request_id: str, init_timeout_s: float) -> Outcome:
        if self.kind == "posted":
            return Outcome(self.body, self.content_type, self.error_type)
        if self.kind == "exit":
            message = report.exit_error(request_id, self.returncode)
            return Outcome(error_json("Runtime.ExitError", message), JSON, "Runtime.ExitError")
        if self.kind == "timeout":
            message = f"RequestId: {request_id} Error: Init timed out after {init_timeout_s:.2f} seconds"
            return Outcome(error_json("Sandbox.Timedout", message), JSON, "Sandbox.Timedout")
        message = f"RequestId: {request_id} Error: {self.message}"
        return Outcome(error_json(self.error_type, message), JSON, self.error_type)


class Environment:
    def __init__(
        self,
        settings: Settings,
        command: Callable[[], list[str]],
        *,
        limiter: MemoryLimiter,
        metrics: Metrics,
        out: BinaryIO,
        base_env: Mapping[str, str],
    ) -> None:
        self.settings = settings
        self._command = command
        self.limiter = limiter
        self.metrics = metrics
        self._out = out
        self._base_env = base_env
        self.runtime_api_address = ""
        self.max_concurrency = settings.max_concurrency
        self.concurrent = self.max_concurrency > 1
        self.state: RuntimeState | ConcurrentRuntimeState = RuntimeState()
        # Concurrent mode: the same state object, typed; invocations by request id; the order of hand-out.
        self.cstate = ConcurrentRuntimeState(self.max_concurrency)
        if self.concurrent:
            self.state = self.cstate
        self.in_flight: dict[str, Invocation] = {}  # accepted, not finished
        self.handed_out: dict[str, Invocation] = {}  # delivered to a worker, no result yet
        self._queue: collections.deque[Invocation] = collections.deque()  # accepted, not delivered
        self._waiters: collections.deque[asyncio.Future[Invocation]] = collections.deque()  # /next calls
        self.process: Runtime | None = None
        self._processes: set[Runtime] = set()  # every process not yet closed (old ones included)
        # External runtime mode (lambdalet_agent.external): the runtime is another container's process.
        self.external = settings.external_runtime
        self._exited_idle = False  # the external runtime died between invocations: tell the next caller
        self._generation = 0
        self._init_started = 0.0
        self._init_timer: asyncio.TimerHandle | None = None
        self.init_failure: InitFailure | None = None
        self.init_duration_ms: float | None = None
        self._report_init = settings.initialization_type != "provisioned-concurrency"
        self._waiter: asyncio.Future[Invocation] | None = None
        self.current: Invocation | None = None  # accepted, not finished (covers init wait and streaming)
        self.running: Invocation | None = None  # delivered to the runtime, no result yet
        self._flush_scheduled = False
        self._closing = False
        self._respawn_task: asyncio.Task[None] | None = None
        # The runtime is put under its memory limit on this thread while its interpreter starts: a cgroup v1
        # attach takes ~15 ms (the kernel waits for an RCU grace period). One thread keeps attaches in order.
        self._attach_thread: ThreadPoolExecutor | None = None
        self._attached: asyncio.Future[None] | None = None  # the current runtime's attach

    # ----------------------------------------------------------------------------------- lifecycle

    def runtime_environment(self) -> dict[str, str]:
        s = self.settings
        env = dict(self._base_env)
        env.update(s.user_env)
        runtime = s.runtime or ""
        env.update(
            {
                "_HANDLER": s.handler,
                "AWS_LAMBDA_RUNTIME_API": self.runtime_api_address,
                "AWS_LAMBDA_FUNCTION_NAME": s.function_name,
                "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(s.memory_mb),
                "AWS_LAMBDA_FUNCTION_VERSION": s.function_version,
                "AWS_LAMBDA_LOG_GROUP_NAME": f"/aws/lambda/{s.function_name}",
                "AWS_LAMBDA_LOG_STREAM_NAME": env.get("AWS_LAMBDA_LOG_STREAM_NAME")
                or time.strftime("%Y/%m/%d/[$LATEST]", time.gmtime()) + os.urandom(16).hex(),
                "LAMBDA_TASK_ROOT": s.code_dir,
                "AWS_REGION": s.region,
                "AWS_DEFAULT_REGION": env.get("AWS_DEFAULT_REGION", s.region),
                "TZ": env.get("TZ", ":UTC"),
                "AWS_LAMBDA_INITIALIZATION_TYPE": s.initialization_type,
                "LANG": env.get("LANG", "en_US.UTF-8"),
            }
        )
        if runtime and not runtime.startswith("provided"):
            env["AWS_EXECUTION_ENV"] = f"AWS_Lambda_{runtime}"
        for name in ("AWS_LAMBDA_MAX_CONCURRENCY", "_X_AMZN_TRACE_ID"):
            env.pop(name, None)
        if self.concurrent:
            env["AWS_LAMBDA_MAX_CONCURRENCY"] = str(self.max_concurrency)
            env.setdefault("AWS_LAMBDA_LOG_FORMAT", "JSON")  # the only format Lambda Managed Instances has
        return env

    async def start(self) -> None:
        if self.external:
            # Nothing to start: init runs from now until the runtime's first /next.
            self._generation += 1
            self.state.restart()
            self._init_started = time.monotonic()
            return
        await self._spawn()

    async def _spawn(self) -> None:
        self._generation += 1
        generation = self._generation
        self.state.restart()
        self.init_failure = None
        self.init_duration_ms = None
        self._init_started = time.monotonic()
        try:
            argv = self._command()
        except (InvalidEntrypoint, RuntimeNotFound) as exc:
            error_type = "Runtime.InvalidEntrypoint"
            self._fail_init(InitFailure("entrypoint", error_type=error_type, message=str(exc)))
            return
        env = self.runtime_environment()
        gate, gate_open = os.pipe()
        env[MEMORY_GATE_VAR] = str(gate)
        try:
            self.process = await RuntimeProcess.spawn(
                argv,
                env=env,
                cwd=self.settings.code_dir,
                sink=self._emit,
                on_exit=lambda code: self._on_exit(generation, code),
                pass_fds=(gate,),
            )
        except OSError as exc:
            os.close(gate_open)
            self.process = None
            self._fail_init(InitFailure("entrypoint", error_type="Runtime.InvalidEntrypoint", message=str(exc)))
            return
        finally:
            os.close(gate)
        self._processes.add(self.process)
        loop = asyncio.get_running_loop()
        if self._attach_thread is None:
            self._attach_thread = ThreadPoolExecutor(1, thread_name_prefix="memory-limit")
        self._attached = loop.run_in_executor(self._attach_thread, self._attach, self.process.pid, gate_open)
        self._init_timer = loop.call_later(self.settings.init_timeout_s, self._on_init_timeout, generation)

    def _attach(self, pid: int, gate_open: int) -> None:
        """(On the attach thread.) Put the runtime under the memory limit, then open its gate."""
        try:
            self.limiter.attach(pid)
        finally:
            os.close(gate_open)

    def _release_waiter(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(RuntimeGone())
        self._waiter = None
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(RuntimeGone())

    async def close(self) -> None:
        self._closing = True
        self._release_waiter()
        while self._respawn_task is not None and not self._respawn_task.done():
            # Not cancelled: a spawn cut in the middle would leak its process. With _closing set it
            # finishes promptly, and the loop below kills whatever it started.
            await self._respawn_task
        for process in list(self._processes):
            process.kill()
            await process.wait(2.0)
            process.close()
        self._processes.clear()
        if self._attached is not None:
            with contextlib.suppress(Exception):
                await self._attached
        if self._attach_thread is not None:
            self._attach_thread.shutdown(wait=False)
        self.limiter.close()
        for inv in self._unfinished():
            failure = error_json("Sandbox.Failure", "The execution environment is shutting down.")
            if inv.final is None:
                inv.final = Outcome(failure, JSON, "Sandbox.Failure")
            if not inv.result.done():
                inv.result.set_result(inv.final)
            if inv.stream is not None:
                inv.stream.close()
            if not inv.finished.done():
                inv.finished.set_result(None)
        self._flush()

    def _unfinished(self) -> list[Invocation]:
        if self.concurrent:
            return list(self.in_flight.values())
        return [self.current] if self.current is not None else []

    @property
    def ready(self) -> bool:
        """Init has finished (successfully or not) for the current runtime process."""
        return self.state.phase not in (Phase.STARTED,) or self.init_failure is not None

    def _reset(self, reason: str) -> None:
        """Kill the runtime and start a new one (in the background; the caller is not kept waiting)."""
        self.metrics.resets.labels(reason).inc()
        self._generation += 1  # events of the old process are ignored from now on
        if self._init_timer is not None:
            self._init_timer.cancel()
        self._release_waiter()
        old = self.process
        self.process = None
        self.state.restart()
        self.init_failure = None
        self.init_duration_ms = None
        if old is not None:
            old.kill()
        self.limiter.kill_all()
        self._report_init = True
        if self.external:
            # The kubelet restarts the killed container; init runs until the new runtime's first /next.
            self._init_started = time.monotonic()
        if not self._closing:
            previous = self._respawn_task
            self._respawn_task = asyncio.get_running_loop().create_task(self._respawn(old, previous))

    async def _respawn(self, old: Runtime | None, previous: asyncio.Task[None] | None) -> None:
        if previous is not None and not previous.done():
            await previous  # resets are serialised: one runtime at a time
        if old is None and self.process is not None:
            return  # the previous reset already started a fresh runtime
        if old is not None:
            await old.wait(2.0)
            old.close()
            self._processes.discard(old)
        if not self._closing:
            if not self.external:
                await self._spawn()
            self._advance()

    # ----------------------------------------------------------------------------------- logs

    def _emit(self, line: bytes) -> None:
        self._out.write(line)
        if self.concurrent:
            for running in self.handed_out.values():
                if running.tail is not None and running.event.request_id.encode() in line:
                    running.tail.add(line)
        elif (inv := self.current) is not None and inv.tail is not None and inv.delivered_at is not None:
            inv.tail.add(line)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _emit_platform(self, text: str, inv: Invocation | None = None) -> None:
        line = text.encode() + b"\n"
        self._out.write(line)
        if inv is not None and inv.tail is not None:
            inv.tail.add(line)

    def _flush(self) -> None:
        self._flush_scheduled = False
        with contextlib.suppress(OSError, ValueError):
            self._out.flush()

    # ----------------------------------------------------------------------------------- caller side

    def invoke(self, event: Event) -> Invocation:
        """Accept an invocation (raises :class:`Busy`); await ``result`` then ``finished`` on it."""
        if self.concurrent:
            return self._invoke_concurrent(event)
        if self.current is not None:
            self.metrics.busy.inc()
            raise Busy("An invocation is already running in this execution environment.")
        loop = asyncio.get_running_loop()
        inv = Invocation(event, loop.create_future(), loop.create_future(), loop.time())
        if event.want_tail:
            inv.tail = report.LogTail()
        self.current = inv
        if self._exited_idle:
            self._answer_idle_exit(inv)
            return inv
        if self.state.phase is not Phase.STARTED or self.external:
            # Init is over: the function timeout runs from now, even if the runtime is slow to call /next.
            # (An external runtime has no init timeout of its own: waiting for it counts against this one.)
            self._arm_timer(inv, loop)
        self._advance()
        return inv

    def _invoke_concurrent(self, event: Event) -> Invocation:
        request_id = event.request_id
        if len(self.in_flight) + len(self.cstate.timed_out) >= self.max_concurrency:
            self.metrics.busy.inc()
            raise Busy(f"{self.max_concurrency} invocations are already running in this execution environment.")
        if request_id in self.in_flight:
            self.metrics.busy.inc()
            raise Busy(f"An invocation with request id {request_id} is already running.")
        loop = asyncio.get_running_loop()
        inv = Invocation(event, loop.create_future(), loop.create_future(), loop.time())
        if event.want_tail:
            inv.tail = report.LogTail()
        self.in_flight[request_id] = inv
        if self.state.phase is not Phase.STARTED:
            self._arm_timer(inv, loop)
        self._queue.append(inv)
        self._advance()
        return inv

    def _arm_timer(self, inv: Invocation, loop: asyncio.AbstractEventLoop) -> None:
        inv.deadline_at = loop.time() + self.settings.timeout_s
        inv.timer = loop.call_at(inv.deadline_at, self._on_timeout, inv)

    def _advance(self) -> None:
        """Hand the accepted invocation to the runtime, or answer it with the stored init failure."""
        if self.concurrent:
            self._advance_concurrent()
            return
        inv = self.current
        if inv is None or inv.delivered_at is not None or inv.result.done():
            return
        if self.init_failure is not None:
            self._answer_init_failure(inv, self.init_failure)
            return
        if self.state.phase is Phase.READY and self._waiter is not None and not self._waiter.done():
            self._deliver(inv)

    def _deliver(self, inv: Invocation) -> None:
        cold = self.state.deliver(inv.event.request_id)
        self.running = inv
        assert self._waiter is not None
        waiter, self._waiter = self._waiter, None
        self._hand_out(inv, waiter, cold=cold, reset_peak=True)

    def _hand_out(self, inv: Invocation, waiter: asyncio.Future[Invocation], *, cold: bool, reset_peak: bool) -> None:
        """Give ``inv`` to the runtime's waiting ``/next``: deadline, START line, peak measurement."""
        loop = asyncio.get_running_loop()
        if cold and self._report_init:
            inv.init_duration_ms = self.init_duration_ms
        self._report_init = True
        now = loop.time()
        inv.delivered_at = now
        if inv.timer is None:
            self._arm_timer(inv, loop)
        assert inv.deadline_at is not None
        # The deadline the runtime sees is the one the agent enforces (its timer runs on loop time).
        inv.deadline_epoch_ms = report.deadline_ms(int(time.time() * 1000), inv.deadline_at - now)
        if reset_peak and self.process is not None:
            self.limiter.reset_peak(self.process.pid)
        self._emit_platform(report.start_line(inv.event.request_id, self.settings.function_version), inv)
        waiter.set_result(inv)

    def _advance_concurrent(self) -> None:
        """Pair accepted invocations with waiting ``/next`` calls, oldest first; or answer them all with the
        stored init failure (then reset once)."""
        if self.init_failure is not None:
            if self._queue:
                failure = self.init_failure
                while self._queue:
                    self._answer_init_failure(self._queue.popleft(), failure, reset=False)
                self._reset("init_error")
            return
        while self._queue and self._waiters:
            waiter = self._waiters.popleft()
            if waiter.done():  # (released by a reset)
                continue
            inv = self._queue.popleft()
            cold = self.cstate.deliver(inv.event.request_id)
            # A shared peak: restarted only when no other invocation is running.
            reset_peak = not self.handed_out
            self.handed_out[inv.event.request_id] = inv
            self._hand_out(inv, waiter, cold=cold, reset_peak=reset_peak)

    def _answer_init_failure(self, inv: Invocation, failure: InitFailure, *, reset: bool = True) -> None:
        loop = asyncio.get_running_loop()
        request_id = inv.event.request_id
        inv.delivered_at = loop.time()
        if inv.timer is not None:
            inv.timer.cancel()
        init_ms = (loop.time() - self._init_started) * 1000 if self.init_duration_ms is None else self.init_duration_ms
        inv.init_duration_ms = init_ms
        outcome = failure.render(request_id, self.settings.init_timeout_s)
        self._emit_platform(
            f"INIT_REPORT Init Duration: {init_ms:.2f} ms\tPhase: init\tStatus: error"
            f"\tError Type: {outcome.error_type}",
        )
        self._emit_platform(report.start_line(request_id, self.settings.function_version), inv)
        inv.reset = True
        self._complete(inv, outcome)
        if reset:
            self._reset("init_error")

    def _answer_idle_exit(self, inv: Invocation) -> None:
        """The external runtime exited while idle: this invocation reports it (no second reset)."""
        self._exited_idle = False
        request_id = inv.event.request_id
        inv.delivered_at = asyncio.get_running_loop().time()
        inv.reset = True
        self._emit_platform(report.start_line(request_id, self.settings.function_version), inv)
        message = report.exit_error(request_id, None)
        self._emit_platform(message, inv)
        self._complete(inv, Outcome(error_json("Runtime.ExitError", message), JSON, "Runtime.ExitError"), peak=0)

    def _complete(self, inv: Invocation, outcome: Outcome, *, peak: int | None = None) -> None:
        """Write END and REPORT, set the caller's result (buffered outcomes) and finish."""
        loop = asyncio.get_running_loop()
        if inv.timer is not None:
            inv.timer.cancel()
        if self.running is inv:
            self.running = None
        if self.concurrent:
            self.handed_out.pop(inv.event.request_id, None)
        start = inv.delivered_at if inv.delivered_at is not None else inv.accepted_at
        inv.duration_ms = (loop.time() - start) * 1000
        if peak is None:
            peak = self.limiter.peak_bytes(self.process.pid) if self.process is not None else 0
        inv.max_memory_mb = min(report.memory_mb(peak), self.settings.memory_mb) if peak else 0
        request_id = inv.event.request_id
        self._emit_platform(report.end_line(request_id), inv)
        self._emit_platform(
            report.report_line(
                request_id,
                duration_ms=inv.duration_ms,
                memory_size_mb=self.settings.memory_mb,
                max_memory_used_mb=inv.max_memory_mb,
                init_duration_ms=inv.init_duration_ms,
            ),
            inv,
        )
        self._flush()
        m = self.metrics
        m.duration.observe(inv.duration_ms / 1000)
        if inv.init_duration_ms is not None:
            m.init_duration.observe(inv.init_duration_ms / 1000)
        if outcome.error_type is None:
            m.successes.inc()
        else:
            m.failures.inc()
            m.errors.labels(outcome.error_type).inc()
        inv.final = outcome
        if inv.stream is not None:
            inv.stream.close()
        if not inv.result.done():
            inv.result.set_result(outcome)
        if not inv.finished.done():
            inv.finished.set_result(None)
        if self.current is inv:
            self.current = None
        if self.concurrent and self.in_flight.get(inv.event.request_id) is inv:
            del self.in_flight[inv.event.request_id]

    def _on_timeout(self, inv: Invocation) -> None:
        if inv.finished.done():
            return
        request_id = inv.event.request_id
        timeout_s = self.settings.timeout_s
        if inv.delivered_at is None:  # the runtime never came back to /next for it
            self._emit_platform(report.start_line(request_id, self.settings.function_version), inv)
        self._emit_platform(report.timeout_log_line(request_id, timeout_s, time.time()), inv)
        inv.reset = True
        if self.concurrent:
            if inv.delivered_at is None:
                self._queue.remove(inv)
                starved = True  # no worker took it in time
            else:
                self.cstate.time_out(request_id)
                self.handed_out.pop(request_id, None)
                starved = len(self.cstate.timed_out) >= self.max_concurrency
            # The others run on. The runtime is reset only when no worker can serve: each one there is
            # holds a timed-out invocation, and either all N do or an invocation waited for one in vain
            # (a runtime with fewer workers than N: one that ignores AWS_LAMBDA_MAX_CONCURRENCY).
            inv.reset = starved and bool(self.cstate.timed_out) and not self.handed_out
        outcome = Outcome(
            error_json("Sandbox.Timedout", report.timeout_error(request_id, timeout_s)), JSON, "Sandbox.Timedout"
        )
        peak = self.limiter.peak_bytes(self.process.pid) if self.process is not None else 0
        self._complete(inv, outcome, peak=peak)
        if inv.reset:
            self._reset("timeout")

    def _on_init_timeout(self, generation: int) -> None:
        if generation != self._generation or self.state.phase is not Phase.STARTED:
            return
        self._init_timer = None
        if self.process is not None:
            self.process.kill()
        self._fail_init(InitFailure("timeout"))

    def _fail_init(self, failure: InitFailure) -> None:
        if self._init_timer is not None:
            self._init_timer.cancel()
            self._init_timer = None
        if self.init_failure is None:
            self.init_failure = failure
        self._advance()

    def _on_exit(self, generation: int, returncode: int | None) -> None:
        if generation != self._generation or self._closing:
            return
        phase = self.state.phase
        if phase is Phase.STARTED:
            self._fail_init(InitFailure("exit", returncode=returncode))
        elif phase is Phase.INIT_ERROR:
            self._advance()
        elif self.concurrent:
            # Every invocation the runtime was running fails with it (as the emulator); queued ones wait.
            for inv in list(self.handed_out.values()):
                self._exit_error(inv, returncode)
            self._reset("exit")
        elif phase is Phase.RUNNING and self.running is not None:
            self._exit_error(self.running, returncode)
            self._reset("exit")
        else:
            # Died while idle (or between /response and /next): start a fresh one.
            self._exited_idle = self.external
            self._reset("exit")

    def _exit_error(self, inv: Invocation, returncode: int | None) -> None:
        """``inv`` ends with ``Runtime.ExitError``: the runtime exited while running it."""
        request_id = inv.event.request_id
        inv.reset = True
        message = report.exit_error(request_id, returncode)
        self._emit_platform(message, inv)
        self._complete(inv, Outcome(error_json("Runtime.ExitError", message), JSON, "Runtime.ExitError"))

    # ----------------------------------------------------------------------------------- runtime side

    async def next_event(self, ends: tuple[Endpoint, Endpoint] | None = None) -> Invocation:
        """``GET /next``: raises :class:`~lambdalet_agent.state.InvalidStateTransition` when not allowed.

        ``ends`` (external runtime mode): the (runtime, agent) ends of the connection, to find the runtime's
        process."""
        first = self.state.next()
        loop = asyncio.get_running_loop()
        if first:
            self.init_duration_ms = (time.monotonic() - self._init_started) * 1000
            if self._init_timer is not None:
                self._init_timer.cancel()
                self._init_timer = None
            if self._attached is not None and not self._attached.done():
                # No invocation is handed out before the runtime is under its memory limit.
                generation = self._generation
                await asyncio.shield(self._attached)
                if generation != self._generation or self._closing:
                    raise RuntimeGone()
            if ends is not None and self.process is None:
                # Before the first event is handed out, so that a runtime dying at once is still watched.
                # readyz says ready (the phase is Ready); nothing is delivered until the waiter exists.
                generation = self._generation
                await self._identify(generation, *ends)
                if generation != self._generation or self._closing:
                    raise RuntimeGone()
        if self.concurrent:
            concurrent_waiter: asyncio.Future[Invocation] = loop.create_future()
            self._waiters.append(concurrent_waiter)
            if first:  # init is over: the deadlines of invocations waiting for it start now
                for queued in self._queue:
                    if queued.timer is None:
                        self._arm_timer(queued, loop)
                if self.process is not None:
                    self._attach_workers(self.process.pid)
            self._advance()
            return await concurrent_waiter
        waiter: asyncio.Future[Invocation] = loop.create_future()
        self._waiter = waiter
        self._advance()
        return await waiter

    def _attach_workers(self, pid: int) -> None:
        """Put the runtime's worker processes under the memory limit too. They inherit it when they are
        forked after the runtime was attached (right after its spawn); this covers a runtime that forked
        sooner than the agent attached it. The main process is watched again for its peak RSS."""
        with contextlib.suppress(OSError):
            for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
                self.limiter.attach(int(child))
        self.limiter.attach(pid)

    async def _identify(self, generation: int, runtime_end: Endpoint, agent_end: Endpoint) -> None:
        """Find and watch the external runtime's process (see lambdalet_agent.external)."""
        pid = await asyncio.to_thread(find_peer_process, runtime_end, agent_end)
        if generation != self._generation or self._closing or self.process is not None:
            return
        if pid is None:
            log.warning(
                "external runtime at %s:%d: its process is not visible (shareProcessNamespace, same user?); "
                "a reset cannot restart it",
                runtime_end.host,
                runtime_end.port,
            )
            return
        runtime = ExternalRuntime.adopt(pid, lambda code: self._on_exit(generation, code))
        if runtime is None:
            self._on_exit(generation, None)
            return
        self.process = runtime
        self._processes.add(runtime)
        self.limiter.attach(pid)
        log.info("external runtime: pid %d (session %d)", pid, runtime.session)

    def begin_result(self, request_id: str, *, error: bool) -> Invocation:
        """Validate a ``/response`` or ``/error`` before its body is read (raises RuntimeApiError)."""
        self.state.check_result(request_id, error=error)
        if self.concurrent:
            return self.handed_out[request_id]
        assert self.running is not None
        return self.running

    def finish(self, inv: Invocation, outcome: Outcome) -> None:
        """The runtime's result for ``inv`` is complete."""
        if inv.finished.done():
            return
        if (self.handed_out.get(inv.event.request_id) if self.concurrent else self.running) is not inv:
            return
        self.state.result(inv.event.request_id, error=outcome.error_type is not None)
        self._complete(inv, outcome)

    def start_stream(self, inv: Invocation, content_type: str) -> ResponseStream:
        """Streaming response mode: the caller starts receiving chunks now. The invocation ends with
        :meth:`finish` (its outcome's error, if any, goes to the caller after the last chunk), a timeout or
        the runtime's exit; each closes the stream."""
        stream = ResponseStream()
        inv.stream = stream
        inv.result.set_result(Outcome(b"", content_type, None, stream))
        return stream

    def init_error(self, body: bytes, content_type: str, error_type: str) -> None:
        """``POST /init/error`` (raises InvalidStateTransition after init)."""
        self.state.init_error()
        self._fail_init(InitFailure("posted", body=body, content_type=content_type, error_type=error_type))
