"""The invocation core: admission, environment pools, the wait queue, forwarding to agents.

``Dispatcher.invoke(name, payload, request_id=...)`` is what every entry point calls (the Invoke API,
the HTTP routes, and the async worker): it admits the invocation against the function's reserved
concurrency and the platform's limit (raising :class:`~lambdalet_gateway.errors.Throttled`), takes an
idle environment or waits in a bounded queue while one starts, forwards the payload to that environment's
agent over a pooled keep-alive connection, and returns an :class:`InvocationResult`.
``Dispatcher.invoke_stream`` is the same with a function's streamed response passed on as it arrives
(:class:`StreamedResult`); ``invoke`` buffers such a response up to Lambda's 6 MB, as Lambda's Invoke does.

An environment takes ``perEnvironmentConcurrency`` (N) invocations at once, one by default as in Lambda:
it is idle (in its function's idle stack, nothing in flight), busy (handed to 1..N invocations; with room
for more it is also in the pool's ``partial`` map, which an invocation tries first) or starting. A new
environment starts only for invocations that find every environment of the function full; reserved
concurrency and the platform limit count invocations, not environments. With N > 1 each invocation in
flight on an environment has its own keep-alive connection (the agent serves one request per connection).
The scaling decision is :func:`lambdalet_gateway.autoscaler.decide`, applied through a
:class:`~lambdalet_gateway.backend.Backend`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace

from lambdalet.names import function_arn
from lambdalet.spec import Function

from .agent_client import AgentConnection, AgentConnectionError, AgentResponse, AgentStream
from .autoscaler import Decision, EnvironmentView, Observations, ScalingSpec, decide
from .backend import Backend, Environment, EnvironmentId, StartError
from .errors import (
    ACCOUNT_LIMIT,
    RATE_LIMIT,
    RESERVED_LIMIT,
    LambdaError,
    ResourceNotReady,
    ServiceError,
    Throttled,
    not_found,
)
from .metrics import FunctionMetrics, Metrics, PoolSnapshot
from .settings import Settings

log = logging.getLogger("lambdalet.gateway.dispatcher")

LATEST = "$LATEST"
#: How many environments an invocation is offered when each refuses the connection.
_DELIVERY_ATTEMPTS = 3
_INVOKE_PATH = b"/2015-03-31/functions/function/invocations"
#: Lambda's limit on a response returned whole, in bytes (the Runtime API's, which the agent enforces);
#: a streamed response read through ``invoke`` past it is a ``Function.ResponseSizeTooLarge`` error.
MAX_BUFFERED_RESPONSE = 6291556
_OVERSIZE = json.dumps(
    {
        "errorType": "Function.ResponseSizeTooLarge",
        "errorMessage": f"Response payload size exceeded maximum allowed payload size ({MAX_BUFFERED_RESPONSE} bytes).",
    }
).encode()


class NotDelivered(ServiceError):
    """The agent could not be reached before any of the request was sent: safe to send elsewhere."""


@dataclass(frozen=True, slots=True)
class InvocationResult:
    """What an invocation returned: the payload, and the metadata Lambda sends as headers."""

    request_id: str
    payload: bytes
    content_type: str
    #: ``Unhandled`` (or ``Handled``) when the function or its runtime failed.
    function_error: str | None = None
    #: Base64 of the log tail, when asked for.
    log_result: str | None = None
    executed_version: str = LATEST
    duration_ms: float | None = None
    billed_duration_ms: float | None = None
    init_duration_ms: float | None = None


class StreamedResult:
    """A result whose body the function streams: iterate it for the chunks as they arrive.

    When the iteration ends, the values the agent sends after the body are set: ``function_error``
    (``Unhandled``) and ``error`` (the error object, JSON bytes) when the function failed mid-stream, or
    ``failure`` (a message) when the platform did (the environment died, the stream overran the deadline);
    ``log_result`` and the report values. The environment and the invocation's share of concurrency stay
    taken until the stream has ended. Always ``close()`` it: an unfinished stream (its caller went away)
    is then read to its end in the background, which frees the environment when the function finishes.
    """

    def __init__(
        self,
        dispatcher: Dispatcher,
        pool: _Pool,
        env: Environment,
        response: AgentResponse,
        stream: AgentStream,
        *,
        connection: AgentConnection,
        request_id: str,
        deadline: float,
        on_end: Callable[[], None],
    ) -> None:
        headers = response.headers
        self.request_id = request_id
        self.content_type = headers.get("content-type", "application/octet-stream")
        self.executed_version = headers.get("x-amz-executed-version", LATEST)
        self.function_error: str | None = None
        self.error: bytes | None = None
        self.failure: str | None = None
        self.log_result: str | None = None
        self.duration_ms: float | None = None
        self.billed_duration_ms: float | None = None
        self.init_duration_ms: float | None = None
        self._headers = headers
        self._stream = stream
        self._dispatcher = dispatcher
        self._pool = pool
        self._env = env
        self._connection = connection
        self._deadline = deadline
        self._on_end = on_end
        self._draining = False
        self.finished = False

    def __aiter__(self) -> StreamedResult:
        return self

    async def __anext__(self) -> bytes:
        if self.finished:
            raise StopAsyncIteration
        try:
            async with asyncio.timeout_at(self._deadline):
                chunk = await self._stream.read()
        except (AgentConnectionError, OSError, TimeoutError) as exc:
            self._end(exc)
            raise StopAsyncIteration from None
        if chunk is None:
            self._end(None)
            raise StopAsyncIteration
        return chunk

    def _end(self, failure: BaseException | None) -> None:
        self.finished = True
        pool, env = self._pool, self._env
        try:
            if failure is not None:
                self._stream.close()
                self.failure = f"the execution environment failed mid-stream: {failure!r}"
                pool.metrics.outcomes["error"] += 1
                self._dispatcher._fail(pool, env)
                return
            values = self._headers | self._stream.trailers
            error_type = values.get(STREAM_ERROR_TYPE)
            if error_type:
                self.function_error = "Unhandled"
                self.error = _stream_error(error_type, values.get(STREAM_ERROR_BODY))
            self.log_result = values.get("x-amz-log-result")
            self.duration_ms, self.billed_duration_ms, self.init_duration_ms = _account(
                pool, values, self.function_error
            )
            if self._connection is not env.connection:
                self._dispatcher._put_back(env, self._connection)
            self._dispatcher._release(pool, env)
        finally:
            self._on_end()

    def close(self) -> None:
        """Done with the stream: if it has not ended, read the rest in the background (see the class)."""
        if not self.finished and not self._draining:
            self._draining = True
            self._dispatcher._drain(self)


class _Pool:
    """One function's environments and waiters."""

    def __init__(self, function: Function, metrics: FunctionMetrics, region: str, account: str) -> None:
        self.function = function
        self.metrics = metrics
        self.arn = function_arn(function.name, region=region, account=account)
        self.generation = 0
        self.revision = ""
        self.removed = False
        self.in_flight = 0
        self.idle_provisioned: list[Environment] = []
        self.idle_on_demand: list[Environment] = []
        self.idle_since: dict[EnvironmentId, float] = {}
        self.busy: dict[EnvironmentId, Environment] = {}
        #: Invocations one environment takes at once (``perEnvironmentConcurrency``).
        self.capacity = function.spec.perEnvironmentConcurrency
        #: In-flight invocations of each busy environment, and the busy ones with room for more (N > 1 only).
        self.load: dict[EnvironmentId, int] = {}
        self.partial: dict[EnvironmentId, Environment] = {}
        self.starting_on_demand = 0
        self.starting_provisioned = 0
        self.waiters: deque[asyncio.Future[Environment]] = deque()
        self.timeout = function.spec.timeoutSeconds + 30.0

    @property
    def reserved(self) -> int | None:
        return self.function.spec.reservedConcurrency

    def environments(self) -> Iterator[Environment]:
        yield from self.idle_provisioned
        yield from self.idle_on_demand
        yield from self.busy.values()


class Dispatcher:
    def __init__(
        self,
        backend: Backend,
        settings: Settings,
        metrics: Metrics,
    ) -> None:
        self._backend = backend
        self._settings = settings
        self._metrics = metrics
        self._pools: dict[str, _Pool] = {}
        self._unreserved_in_flight = 0
        self._unreserved_limit = settings.concurrency_limit
        self._tasks: set[asyncio.Task[None]] = set()
        self._drains: set[asyncio.Task[None]] = set()
        #: Free connections of each environment that takes several invocations at once.
        self._shared: dict[EnvironmentId, list[AgentConnection]] = {}
        self._loop = asyncio.get_running_loop()
        self._closed = False
        metrics.watch(self.snapshots)

    # ---- functions -------------------------------------------------------------------------------

    def function(self, name: str) -> Function | None:
        pool = self._pools.get(name)
        return pool.function if pool is not None else None

    def functions(self) -> list[Function]:
        return [pool.function for pool in self._pools.values()]

    @property
    def account_id(self) -> str:
        return self._settings.account_id

    def arn(self, name: str, qualifier: str | None = None) -> str:
        return function_arn(name, region=self._settings.region, account=self._settings.account_id, qualifier=qualifier)

    def set_functions(self, functions: Mapping[str, Function], revisions: Mapping[str, str] | None = None) -> None:
        """Serve exactly these functions: add new ones, restart changed ones, drain removed ones.

        ``revisions`` (name to an opaque string) marks code changes the spec does not show.
        """
        revisions = revisions or {}
        for name in list(self._pools):
            if name not in functions:
                self._remove(self._pools.pop(name))
        for name, function in functions.items():
            pool = self._pools.get(name)
            if pool is None:
                pool = _Pool(function, self._metrics.function(name), self._settings.region, self._settings.account_id)
                pool.revision = revisions.get(name, "")
                self._pools[name] = pool
            elif pool.function != function or pool.revision != revisions.get(name, ""):
                pool.function = function
                pool.revision = revisions.get(name, "")
                pool.generation += 1
                pool.timeout = function.spec.timeoutSeconds + 30.0
                pool.capacity = function.spec.perEnvironmentConcurrency
                pool.partial.clear()  # environments of the old spec take no new invocations
                self._retire_idle(pool)
        reserved = sum(p.reserved or 0 for p in self._pools.values())
        self._unreserved_limit = max(0, self._settings.concurrency_limit - reserved)
        if reserved > self._settings.concurrency_limit:
            log.warning(
                "reserved concurrency (%d in total) exceeds the concurrency limit (%d): "
                "functions without a reservation are throttled",
                reserved,
                self._settings.concurrency_limit,
            )
        for pool in self._pools.values():
            self._scale(pool)

    def _remove(self, pool: _Pool) -> None:
        pool.removed = True
        pool.partial.clear()
        while pool.waiters:
            waiter = pool.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(not_found(pool.arn))
        self._retire_idle(pool)

    # ---- admission and invocation ----------------------------------------------------------------

    def admit_check(self, name: str) -> Function:
        """What ``DryRun`` validates: the function exists and is not throttled to zero."""
        pool = self._pools.get(name)
        if pool is None:
            raise not_found(self.arn(name))
        if pool.reserved == 0:
            raise Throttled(RESERVED_LIMIT)
        return pool.function

    async def invoke(
        self,
        name: str,
        payload: bytes,
        *,
        request_id: str,
        client_context: str | None = None,
        log_tail: bool = False,
        invoked_arn: str | None = None,
        trace_id: str | None = None,
    ) -> InvocationResult:
        """Run one invocation synchronously; raise a :class:`LambdaError` (``Throttled`` when refused).

        A streamed response is buffered up to :data:`MAX_BUFFERED_RESPONSE` bytes, as Lambda's Invoke
        does: an error the function reports mid-stream is a function error, a longer response is
        ``Function.ResponseSizeTooLarge``.
        """
        result = await self.invoke_stream(
            name,
            payload,
            request_id=request_id,
            client_context=client_context,
            log_tail=log_tail,
            invoked_arn=invoked_arn,
            trace_id=trace_id,
        )
        if isinstance(result, InvocationResult):
            return result
        return await _buffer(result)

    async def invoke_stream(
        self,
        name: str,
        payload: bytes,
        *,
        request_id: str,
        client_context: str | None = None,
        log_tail: bool = False,
        invoked_arn: str | None = None,
        trace_id: str | None = None,
    ) -> InvocationResult | StreamedResult:
        """Like :meth:`invoke`, but a response the function streams comes back as a
        :class:`StreamedResult` as soon as it starts (everything refused before that raises, as in
        ``invoke``)."""
        pool = self._pools.get(name)
        if pool is None:
            raise not_found(self.arn(name), request_id=request_id)
        reserved = pool.reserved
        if reserved is not None:
            if pool.in_flight >= reserved:
                pool.metrics.throttled(RESERVED_LIMIT)
                raise Throttled(RESERVED_LIMIT, request_id=request_id)
        elif self._unreserved_in_flight >= self._unreserved_limit:
            pool.metrics.throttled(ACCOUNT_LIMIT)
            raise Throttled(ACCOUNT_LIMIT, request_id=request_id)
        pool.in_flight += 1
        if reserved is None:
            self._unreserved_in_flight += 1

        def leave() -> None:
            pool.in_flight -= 1
            if reserved is None:
                self._unreserved_in_flight -= 1

        streaming = False
        try:
            attempts = 0
            while True:
                env = self._take_idle(pool)
                if env is None:
                    env = await self._wait(pool, request_id)
                deadline = self._loop.time() + pool.timeout
                connection = self._connection(env) if self._shared else env.connect()
                try:
                    response = await self._send(
                        pool,
                        connection,
                        payload,
                        deadline,
                        request_id=request_id,
                        client_context=client_context,
                        log_tail=log_tail,
                        invoked_arn=invoked_arn,
                        trace_id=trace_id,
                    )
                except NotDelivered:
                    # Provably never reached the agent: the environment is gone; another one gets it.
                    self._fail(pool, env)
                    attempts += 1
                    if attempts >= _DELIVERY_ATTEMPTS:
                        raise
                    log.warning(
                        "environment %s of %s refused the connection; delivering elsewhere",
                        env.id,
                        name,
                        extra=_fields(env),
                    )
                    continue
                except BaseException:
                    self._fail(pool, env)
                    raise
                if response.stream is not None:
                    streaming = True
                    return StreamedResult(
                        self,
                        pool,
                        env,
                        response,
                        response.stream,
                        connection=connection,
                        request_id=request_id,
                        deadline=deadline,
                        on_end=leave,
                    )
                result = _result(pool, response, request_id)
                if connection is not env.connection:
                    self._put_back(env, connection)
                self._release(pool, env)
                return result
        except StartError as exc:
            if not exc.function_error:
                pool.metrics.outcomes["error"] += 1
                raise ServiceError(str(exc), request_id=request_id) from exc
            pool.metrics.outcomes["function_error"] += 1
            body = json.dumps({"errorMessage": str(exc), "errorType": exc.error_type, "stackTrace": []}).encode()
            return InvocationResult(request_id, body, "application/json", function_error="Unhandled")
        except LambdaError as exc:
            exc.request_id = request_id
            if not isinstance(exc, Throttled):
                pool.metrics.outcomes["error"] += 1
            raise
        finally:
            if not streaming:
                leave()

    def _take_idle(self, pool: _Pool) -> Environment | None:
        if pool.partial:
            # a busy environment with a free slot first: a new one is used only when all are full
            env = next(iter(pool.partial.values()))
            load = pool.load[env.id] + 1
            pool.load[env.id] = load
            if load >= pool.capacity:
                del pool.partial[env.id]
            return env
        if pool.idle_provisioned:
            env = pool.idle_provisioned.pop()
        elif pool.idle_on_demand:
            env = pool.idle_on_demand.pop()
        else:
            return None
        pool.busy[env.id] = env
        if pool.capacity > 1:
            pool.load[env.id] = 1
            pool.partial[env.id] = env
        return env

    async def _wait(self, pool: _Pool, request_id: str) -> Environment:
        if len(pool.waiters) >= self._settings.queue_size:
            pool.metrics.throttled(RATE_LIMIT)
            raise Throttled(RATE_LIMIT, request_id=request_id)
        waiter: asyncio.Future[Environment] = self._loop.create_future()
        pool.waiters.append(waiter)
        timeout = self._settings.queue_timeout_s
        expiry = self._loop.call_later(timeout, _expire, waiter, timeout, pool.function.name)
        self._scale(pool)
        try:
            env = await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._release(pool, waiter.result())
            raise
        finally:
            expiry.cancel()
            if not waiter.done() or waiter.cancelled() or waiter.exception() is not None:
                with contextlib.suppress(ValueError):
                    pool.waiters.remove(waiter)
        return env

    async def _send(
        self,
        pool: _Pool,
        connection: AgentConnection,
        payload: bytes,
        deadline: float,
        *,
        request_id: str,
        client_context: str | None,
        log_tail: bool,
        invoked_arn: str | None,
        trace_id: str | None,
    ) -> AgentResponse:
        """Send the invocation to the agent; its answer (a streamed one with only the head read)."""
        headers = {
            "Content-Type": "application/json",
            "X-Lambdalet-Request-Id": request_id,
            "X-Lambdalet-Invoked-Function-Arn": invoked_arn or pool.arn,
        }
        if client_context:
            headers["X-Amz-Client-Context"] = client_context
        if log_tail:
            headers["X-Amz-Log-Type"] = "Tail"
        if trace_id:
            headers["X-Amzn-Trace-Id"] = trace_id
        try:
            response = await connection.post(_INVOKE_PATH, headers, payload, deadline=deadline)
        except (OSError, AgentConnectionError, TimeoutError) as exc:
            if not isinstance(exc, AgentConnectionError | TimeoutError):
                # The client raises a plain OSError only when connecting failed: nothing was sent.
                raise NotDelivered(f"the execution environment refused the connection: {exc!r}") from exc
            raise ServiceError(f"the execution environment failed: {exc!r}") from exc
        if response.status != 200:
            if response.stream is not None:
                response.stream.close()
            raise ServiceError(f"the execution environment answered {response.status}: {response.body[:500]!r}")
        return response

    # ---- environments ----------------------------------------------------------------------------

    def _connection(self, env: Environment) -> AgentConnection:
        """The connection for one invocation: the environment's own, or with N > 1 a free one of its."""
        free = self._shared.get(env.id)
        if free is None:
            return env.connect()
        if free:
            return free.pop()
        base = env.connect()  # never used for requests: it only parses the URL
        return AgentConnection(base.host, base.port)

    def _put_back(self, env: Environment, connection: AgentConnection) -> None:
        """An invocation is done with one of an N > 1 environment's connections: keep it for the next."""
        free = self._shared.get(env.id)
        if free is not None:
            free.append(connection)
        else:
            connection.close()  # the environment is gone

    def _release(self, pool: _Pool, env: Environment) -> None:
        load = pool.load.get(env.id) if pool.load else None
        if load is not None:
            if load > 1:
                # others are still in flight on it: free one slot
                pool.load[env.id] = load - 1
                if pool.removed or env.generation != pool.generation or self._closed:
                    pool.partial.pop(env.id, None)
                    return
                self._give(pool, env)
                return
            del pool.load[env.id]
            pool.partial.pop(env.id, None)
        elif env.id not in pool.busy:
            return  # discarded when another invocation on it failed
        pool.busy.pop(env.id, None)
        if pool.removed or env.generation != pool.generation or self._closed:
            self._discard(env)
            return
        self._give(pool, env)

    def _fail(self, pool: _Pool, env: Environment) -> None:
        """An invocation failed in a way that condemns its environment: stop it (once)."""
        if pool.busy.pop(env.id, None) is None:
            return  # already discarded when another invocation on it failed
        pool.load.pop(env.id, None)
        pool.partial.pop(env.id, None)
        self._discard(env)

    def _give(self, pool: _Pool, env: Environment) -> None:
        """Hand a free environment to the oldest waiter, or put it on the idle stack."""
        if pool.capacity > 1:
            self._give_slots(pool, env)
            return
        while pool.waiters:
            waiter = pool.waiters.popleft()
            if not waiter.done():
                pool.busy[env.id] = env
                waiter.set_result(env)
                return
        pool.idle_since[env.id] = self._loop.time()
        (pool.idle_provisioned if env.provisioned else pool.idle_on_demand).append(env)

    def _give_slots(self, pool: _Pool, env: Environment) -> None:
        """``_give`` for N > 1: the environment's free slots go to the oldest waiters; idle if none."""
        load = pool.load.get(env.id, 0)
        while load < pool.capacity and pool.waiters:
            waiter = pool.waiters.popleft()
            if not waiter.done():
                waiter.set_result(env)
                load += 1
        if load == 0:
            pool.busy.pop(env.id, None)
            pool.load.pop(env.id, None)
            pool.partial.pop(env.id, None)
            pool.idle_since[env.id] = self._loop.time()
            (pool.idle_provisioned if env.provisioned else pool.idle_on_demand).append(env)
            return
        pool.busy[env.id] = env
        pool.load[env.id] = load
        if load < pool.capacity:
            pool.partial[env.id] = env
        else:
            pool.partial.pop(env.id, None)

    def _discard(self, env: Environment) -> None:
        if env.connection is not None:
            env.connection.close()
        for connection in self._shared.get(env.id, ()):
            connection.close()
        pool = self._pools.get(env.function)
        if pool is not None:
            pool.idle_since.pop(env.id, None)
        self._spawn(self._stop(env))

    async def _stop(self, env: Environment) -> None:
        try:
            await self._backend.stop(env)
        except Exception:
            log.exception("stopping environment %s of %s failed", env.id, env.function, extra=_fields(env))
        for connection in self._shared.pop(env.id, ()):
            connection.close()
        pool = self._pools.get(env.function)
        if pool is not None and not self._closed:
            self._scale(pool)

    def environment_lost(self, env: Environment) -> None:
        """A backend reports that an environment went away on its own."""
        pool = self._pools.get(env.function)
        if pool is None:
            return
        for stack in (pool.idle_provisioned, pool.idle_on_demand):
            if env in stack:
                stack.remove(env)
                pool.idle_since.pop(env.id, None)
                log.warning("environment %s of %s exited while idle", env.id, env.function, extra=_fields(env))
                if not self._closed:
                    self._scale(pool)

    def _retire_idle(self, pool: _Pool) -> None:
        for stack in (pool.idle_provisioned, pool.idle_on_demand):
            for env in stack:
                self._discard(env)
            stack.clear()

    def _observe(self, pool: _Pool) -> Observations:
        since = pool.idle_since
        views = [
            EnvironmentView(env.id, env.provisioned, False, since.get(env.id, 0.0)) for env in pool.idle_provisioned
        ]
        views += [
            EnvironmentView(env.id, env.provisioned, False, since.get(env.id, 0.0)) for env in pool.idle_on_demand
        ]
        views += [EnvironmentView(env.id, env.provisioned, True, 0.0) for env in pool.busy.values()]
        return Observations(
            environments=tuple(views),
            starting_on_demand=pool.starting_on_demand,
            starting_provisioned=pool.starting_provisioned,
            waiting=sum(1 for w in pool.waiters if not w.done()),
        )

    def _scaling_spec(self, pool: _Pool) -> ScalingSpec:
        spec = pool.function.spec
        cap = spec.reservedConcurrency if spec.reservedConcurrency is not None else self._unreserved_limit
        per_environment = spec.perEnvironmentConcurrency
        return ScalingSpec(
            provisioned=spec.provisionedConcurrency,
            idle_timeout_s=float(spec.idleTimeoutSeconds),
            # the cap counts invocations; N of them share an environment (provisioned ones are kept)
            max_environments=max(-(-cap // per_environment), min(spec.provisionedConcurrency, cap)),
            per_environment=per_environment,
        )

    def _scale(self, pool: _Pool) -> Decision:
        if pool.removed or self._closed:
            return Decision()
        decision = decide(self._loop.time(), self._observe(pool), self._scaling_spec(pool))
        self._apply(pool, decision)
        return decision

    def _apply(self, pool: _Pool, decision: Decision) -> None:
        if decision.retire:
            retire = set(decision.retire)
            for stack in (pool.idle_provisioned, pool.idle_on_demand):
                keep = [env for env in stack if env.id not in retire]
                for env in stack:
                    if env.id in retire:
                        log.info("retiring idle environment %s of %s", env.id, env.function, extra=_fields(env))
                        self._discard(env)
                stack[:] = keep
        for _ in range(decision.start_provisioned):
            pool.starting_provisioned += 1
            self._spawn(self._start(pool, provisioned=True))
        for _ in range(decision.start_on_demand):
            pool.starting_on_demand += 1
            self._spawn(self._start(pool, provisioned=False))

    async def _start(self, pool: _Pool, *, provisioned: bool) -> None:
        generation = pool.generation
        function = pool.function
        try:
            env = await self._backend.start(function, provisioned=provisioned)
        except Exception as exc:
            error = exc if isinstance(exc, StartError) else StartError(f"starting an environment failed: {exc!r}")
            if not isinstance(exc, StartError):
                log.exception("starting an environment of %s failed", function.name, extra={"function": function.name})
            else:
                log.warning(
                    "starting an environment of %s failed: %s", function.name, exc, extra={"function": function.name}
                )
            self._started(pool, provisioned)
            # Waiters that no other starting environment will serve get the reason now.
            pending = (pool.starting_on_demand + pool.starting_provisioned) * pool.capacity
            excess = sum(1 for w in pool.waiters if not w.done()) - pending
            while excess > 0 and pool.waiters:
                waiter = pool.waiters.popleft()
                if not waiter.done():
                    waiter.set_exception(error)
                    excess -= 1
            return
        self._started(pool, provisioned)
        env.generation = generation
        if pool.removed or generation != pool.generation or self._closed or self._pools.get(function.name) is not pool:
            self._discard(env)
            return
        if pool.capacity > 1:
            self._shared[env.id] = []
        self._give(pool, env)

    def _started(self, pool: _Pool, provisioned: bool) -> None:
        if provisioned:
            pool.starting_provisioned -= 1
        else:
            pool.starting_on_demand -= 1

    def _drain(self, streamed: StreamedResult) -> None:
        """Read an abandoned stream to its end, so its environment is freed when the function finishes."""

        async def drain() -> None:
            async for _ in streamed:
                pass

        task = self._loop.create_task(drain())
        self._drains.add(task)
        task.add_done_callback(self._drains.discard)

    def _spawn(self, coro: object) -> None:
        task: asyncio.Task[None] = self._loop.create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- background ------------------------------------------------------------------------------

    async def run_autoscaler(self) -> None:
        """Apply the scaling decision to every function on a timer (provisioned, idle scale-to-zero)."""
        while not self._closed:
            for pool in list(self._pools.values()):
                try:
                    self._scale(pool)
                except Exception:
                    log.exception("scaling %s failed", pool.function.name, extra={"function": pool.function.name})
            await asyncio.sleep(self._settings.scale_interval_s)

    def snapshots(self) -> list[PoolSnapshot]:
        return [
            PoolSnapshot(
                function=name,
                idle=len(pool.idle_provisioned) + len(pool.idle_on_demand),
                busy=len(pool.busy),
                starting=pool.starting_on_demand + pool.starting_provisioned,
                waiting=sum(1 for w in pool.waiters if not w.done()),
                in_flight=pool.in_flight,
            )
            for name, pool in self._pools.items()
        ]

    async def close(self) -> None:
        self._closed = True
        for task in list(self._drains):
            task.cancel()
        for pool in self._pools.values():
            while pool.waiters:
                waiter = pool.waiters.popleft()
                if not waiter.done():
                    waiter.set_exception(ServiceError("the gateway is shutting down"))
            self._retire_idle(pool)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._backend.close()


STREAM_ERROR_TYPE = "lambda-runtime-function-error-type"
STREAM_ERROR_BODY = "lambda-runtime-function-error-body"


def _account(
    pool: _Pool, values: Mapping[str, str], function_error: str | None
) -> tuple[float | None, float | None, float | None]:
    """Record an invocation's outcome and report values (from the agent's headers or trailers)."""
    metrics = pool.metrics
    duration = _ms(values.get("x-lambdalet-duration-ms"))
    billed = _ms(values.get("x-lambdalet-billed-duration-ms"))
    init = _ms(values.get("x-lambdalet-init-duration-ms"))
    metrics.outcomes["function_error" if function_error else "success"] += 1
    if duration is not None:
        metrics.duration.observe(duration / 1000)
    if init is not None:
        metrics.cold_starts += 1
        metrics.init_duration.observe(init / 1000)
    if billed is not None:
        metrics.billed_gb_seconds += billed / 1000 * pool.function.spec.memoryMB / 1024
    return duration, billed, init


def _result(pool: _Pool, response: AgentResponse, request_id: str) -> InvocationResult:
    rh = response.headers
    function_error = rh.get("x-amz-function-error")
    duration, billed, init = _account(pool, rh, function_error)
    return InvocationResult(
        request_id=request_id,
        payload=response.body,
        content_type=rh.get("content-type", "application/json"),
        function_error=function_error,
        log_result=rh.get("x-amz-log-result"),
        executed_version=rh.get("x-amz-executed-version", LATEST),
        duration_ms=duration,
        billed_duration_ms=billed,
        init_duration_ms=init,
    )


def _stream_error(error_type: str, encoded_body: str | None) -> bytes:
    """The error object of a failed stream: its base64 trailer, or one built from the error type."""
    if encoded_body:
        try:
            body = base64.b64decode(encoded_body, validate=True)
            if isinstance(json.loads(body), dict):
                return body
        except (binascii.Error, ValueError):
            pass
    return json.dumps({"errorType": error_type, "errorMessage": error_type}).encode()


async def _buffer(streamed: StreamedResult) -> InvocationResult:
    """A streamed result read whole, as Lambda's Invoke returns a streaming function's response."""
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in streamed:
            size += len(chunk)
            if size > MAX_BUFFERED_RESPONSE:
                return InvocationResult(
                    streamed.request_id,
                    _OVERSIZE,
                    "application/json",
                    function_error="Unhandled",
                    executed_version=streamed.executed_version,
                )
            chunks.append(chunk)
    finally:
        streamed.close()
    if streamed.failure is not None:
        raise ServiceError(streamed.failure, request_id=streamed.request_id)
    result = InvocationResult(
        streamed.request_id,
        b"".join(chunks),
        streamed.content_type,
        log_result=streamed.log_result,
        executed_version=streamed.executed_version,
        duration_ms=streamed.duration_ms,
        billed_duration_ms=streamed.billed_duration_ms,
        init_duration_ms=streamed.init_duration_ms,
    )
    if streamed.error is not None:
        return replace(result, payload=streamed.error, content_type="application/json", function_error="Unhandled")
    return result


def _fields(env: Environment) -> dict[str, str]:
    """Structured log fields of an environment."""
    return {"function": env.function, "environment": env.id}


def _expire(waiter: asyncio.Future[Environment], timeout: float, name: str) -> None:
    if not waiter.done():
        waiter.set_exception(
            ResourceNotReady(f"no execution environment of {name} became ready within {timeout:g} seconds")
        )


def _ms(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None
