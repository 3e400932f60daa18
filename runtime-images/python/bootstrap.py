"""lambdalet's Python runtime: the client side of the Lambda Runtime API, standard library only.

Started as ``python bootstrap.py`` with Lambda's environment (``_HANDLER``, ``AWS_LAMBDA_RUNTIME_API``,
``LAMBDA_TASK_ROOT``, ...). It imports the handler ``module.function`` (dotted packages and ``dir/module``
allowed), then loops: ``GET /next`` -> call the handler -> ``POST /response`` or ``POST /error``.
Errors have the shape AWS's Python runtime gives them (``errorMessage``, ``errorType``, ``requestId``,
``stackTrace`` with this file's frames trimmed); init failures are posted to ``/init/error`` and the
process exits. It is on the cold-start path, so it imports only ``json`` and ``_socket`` up front.
"""

# Cold start: pathlib costs several ms to import, so os.path is used; imports needed only on error paths
# or by some functions (traceback, importlib, logging) are deferred to where they are needed. The Runtime
# API connection uses ``_socket``, the C module under ``socket``: importing ``socket`` costs ~4 ms more (it
# wraps every constant in an enum), and one TCP connection needs none of its conveniences.
# ruff: noqa: PTH100, PTH109, PTH120, PLC0415

from __future__ import annotations

import _socket
import io
import json
import os
import sys
import time

RUNTIME_API_VERSION = "2018-06-01"
ERROR_TYPE_HEADER = "Lambda-Runtime-Function-Error-Type"
ERROR_CONTENT_TYPE = "application/vnd.aws.lambda.error+json"
BOOTSTRAP_FILE = os.path.abspath(__file__)

_request_id = ""
# AWS's Python runtime writes non-ASCII characters as is from python3.12 on, escaped before.
_ENSURE_ASCII = os.environ.get("AWS_EXECUTION_ENV", "") in ("", "AWS_Lambda_python3.11", "AWS_Lambda_python3.10")
_encode = json.JSONEncoder(ensure_ascii=_ENSURE_ASCII, allow_nan=True).encode


class FaultError(Exception):
    """A Runtime.* error detected by the runtime itself."""

    def __init__(self, error_type: str, message: str, trace: list[str] | None = None) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message
        self.trace = trace or []


# ---------------------------------------------------------------------------------------- Runtime API


class Headers(dict[str, str]):
    """Response headers by lower-case name; ``get`` takes any case (HTTP header names are case-insensitive)."""

    def get(self, name: str, default: str | None = None) -> str | None:  # type: ignore[override]
        return dict.get(self, name.lower(), default)


class RuntimeClient:
    """One persistent HTTP/1.1 connection to the Runtime API, spoken directly on a socket.

    The Runtime API is a fixed, local peer: requests are written with one ``sendall`` and responses are
    framed by ``Content-Length`` (or chunked), which costs a fraction of ``http.client`` per request and
    keeps its imports (``email``, ``ssl``, ``urllib``) off the cold-start path.
    """

    def __init__(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        self._host = host
        self._port = int(port)
        self._prefix = f"/{RUNTIME_API_VERSION}/runtime"
        self._head = f"Host: {address}\r\nUser-Agent: lambdalet-python-runtime\r\n".encode("latin-1")
        self._sock: _socket.socket | None = None
        self._buffer = b""

    def _connect(self) -> _socket.socket:
        """Connect to the first address the host resolves to that accepts (as ``socket.create_connection``)."""
        error: OSError | None = None
        for family, kind, proto, _, address in _socket.getaddrinfo(self._host, self._port, 0, _socket.SOCK_STREAM):
            sock = _socket.socket(family, kind, proto)
            try:
                sock.connect(address)
            except OSError as exc:
                sock.close()
                error = exc
                continue
            sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
            self._sock = sock
            self._buffer = b""
            return sock
        raise error or OSError(f"{self._host}:{self._port} resolves to no address")

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock = None
        self._buffer = b""

    def _request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> tuple[int, Headers, bytes]:
        head = [f"{method} {self._prefix}{path} HTTP/1.1\r\n".encode("latin-1"), self._head]
        for name, value in (headers or {}).items():
            head.append(f"{name}: {value}\r\n".encode("latin-1"))
        head.append(b"Content-Length: %d\r\n\r\n" % len(body))
        message = b"".join(head) + body
        for attempt in (0, 1):
            try:
                sock = self._sock or self._connect()
                sock.sendall(message)
                return self._response(sock)
            except (ConnectionError, EOFError):
                self._close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _fill(self, sock: _socket.socket) -> None:
        data = sock.recv(65536)
        if not data:
            raise EOFError("the Runtime API closed the connection")
        self._buffer += data

    def _response(self, sock: _socket.socket) -> tuple[int, Headers, bytes]:
        while (end := self._buffer.find(b"\r\n\r\n")) < 0:
            self._fill(sock)
        lines = self._buffer[:end].decode("latin-1").split("\r\n")
        self._buffer = self._buffer[end + 4 :]
        status = int(lines[0].split(" ", 2)[1])
        headers = Headers()
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if (headers.get("transfer-encoding") or "").lower() == "chunked":
            body = self._chunked(sock)
        else:
            length = int(headers.get("content-length") or 0)
            while len(self._buffer) < length:
                self._fill(sock)
            body, self._buffer = self._buffer[:length], self._buffer[length:]
        if (headers.get("connection") or "").lower() == "close":
            self._close()
        return status, headers, body

    def _chunked(self, sock: _socket.socket) -> bytes:
        parts = []
        while True:
            while (end := self._buffer.find(b"\r\n")) < 0:
                self._fill(sock)
            size = int(self._buffer[:end].split(b";", 1)[0], 16)
            self._buffer = self._buffer[end + 2 :]
            while len(self._buffer) < size + 2:
                self._fill(sock)
            parts.append(self._buffer[:size])
            self._buffer = self._buffer[size + 2 :]
            if size == 0:
                return b"".join(parts)

    def next(self) -> tuple[bytes, Headers]:
        status, headers, body = self._request("GET", "/invocation/next")
        if status != 200:
            raise SystemExit(f"Runtime API /next failed: {status} {body[:200]!r}")
        return body, headers

    def _post(self, path: str, body: bytes, headers: dict[str, str]) -> None:
        status, _, data = self._request("POST", path, body, headers)
        if status >= 500:
            raise SystemExit(f"Runtime API {path} failed: {status} {data[:200]!r}")
        if status != 202:
            print(f"Runtime API {path}: {status} {data.decode(errors='replace')}", file=sys.stderr)

    def respond(self, request_id: str, body: bytes, content_type: str) -> None:
        self._post(f"/invocation/{request_id}/response", body, {"Content-Type": content_type})

    def fail(self, request_id: str, error: dict[str, object]) -> None:
        headers = {"Content-Type": ERROR_CONTENT_TYPE, ERROR_TYPE_HEADER: str(error["errorType"])}
        self._post(f"/invocation/{request_id}/error", _encode(error).encode(), headers)

    def init_error(self, error: dict[str, object]) -> None:
        headers = {"Content-Type": ERROR_CONTENT_TYPE, ERROR_TYPE_HEADER: str(error["errorType"])}
        status, _, data = self._request("POST", "/init/error", _encode(error).encode(), headers)
        # 403: another worker of this runtime (AWS_LAMBDA_MAX_CONCURRENCY > 1) reported its init error first.
        if status not in (202, 403):
            print(f"Runtime API /init/error: {status} {data.decode(errors='replace')}", file=sys.stderr)


# ---------------------------------------------------------------------------------------- context


class _Record:
    """A plain attribute bag (the shape of AWS's ClientContext, Client and CognitoIdentity)."""

    def __init__(self, **fields: object) -> None:
        self.__dict__.update(fields)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.__dict__!r})"


class ClientContext(_Record):
    client: object = None
    custom: object = None
    env: object = None


class Client(_Record):
    installation_id: object = None
    app_title: object = None
    app_version_name: object = None
    app_version_code: object = None
    app_package_name: object = None


class CognitoIdentity(_Record):
    cognito_identity_id: object = None
    cognito_identity_pool_id: object = None


class LambdaContext:
    """The ``context`` argument of a handler, with the attributes of AWS's Python runtime."""

    def __init__(
        self,
        request_id: str,
        deadline_ms: int,
        invoked_function_arn: str | None,
        client_context: dict[str, object] | None,
        cognito_identity: dict[str, object] | None,
        *,
        tenant_id: str | None = None,
    ) -> None:
        env = os.environ
        self.aws_request_id = request_id
        self.log_group_name = env.get("AWS_LAMBDA_LOG_GROUP_NAME")
        self.log_stream_name = env.get("AWS_LAMBDA_LOG_STREAM_NAME")
        self.function_name = env.get("AWS_LAMBDA_FUNCTION_NAME")
        self.memory_limit_in_mb = env.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE")
        self.function_version = env.get("AWS_LAMBDA_FUNCTION_VERSION")
        self.invoked_function_arn = invoked_function_arn
        self.tenant_id = tenant_id
        self.client_context: ClientContext | None = None
        if client_context is not None:
            self.client_context = ClientContext(**{k: v for k, v in client_context.items() if isinstance(k, str)})
            client = client_context.get("client")
            if isinstance(client, dict):
                self.client_context.client = Client(**client)
        self.identity = CognitoIdentity()
        if cognito_identity is not None:
            self.identity.cognito_identity_id = cognito_identity.get("cognitoIdentityId")
            self.identity.cognito_identity_pool_id = cognito_identity.get("cognitoIdentityPoolId")
        self._deadline_ms = deadline_ms

    def get_remaining_time_in_millis(self) -> int:
        return max(0, self._deadline_ms - int(time.time() * 1000))

    def __repr__(self) -> str:
        return (
            f"LambdaContext([aws_request_id={self.aws_request_id},function_name={self.function_name},"
            f"function_version={self.function_version},invoked_function_arn={self.invoked_function_arn}])"
        )


# ---------------------------------------------------------------------------------------- errors


def _error(message: str, error_type: str, trace: list[str], request_id: str | None = None) -> dict[str, object]:
    return {"errorMessage": message, "errorType": error_type, "requestId": request_id or "", "stackTrace": trace}


def _user_frames(exc: BaseException) -> list[str]:
    """The formatted traceback of ``exc`` without this bootstrap's own leading frames."""
    import traceback  # only on the error path

    # Plain (file, line, function, text) tuples, as AWS's runtime formats them (no column carets).
    frames = [(f.filename, f.lineno or 0, f.name, f.line) for f in traceback.extract_tb(exc.__traceback__)]
    for index, frame in enumerate(frames):
        if frame[0] != BOOTSTRAP_FILE:
            return traceback.format_list(frames[index:])
    return []


def _log_error(error: dict[str, object]) -> None:
    lines = [
        f"[ERROR] {error['errorType']}: {error['errorMessage']}"
        if error["errorMessage"]
        else f"[ERROR] {error['errorType']}"
    ]
    trace = error.get("stackTrace")
    if isinstance(trace, list):
        lines.append("Traceback (most recent call last):")
        for element in trace:
            lines.extend(str(element).splitlines())
    sys.stdout.write("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------- handler


def load_handler(handler: str) -> object:
    module_name, dot, function_name = handler.rpartition(".")
    if not dot or not module_name or not function_name:
        raise FaultError(
            "Runtime.MalformedHandlerName", f"Bad handler '{handler}': not enough values to unpack (expected 2, got 1)"
        )
    module_path = module_name.replace("/", ".")
    top = module_path.split(".")[0]
    if top in sys.builtin_module_names:
        raise FaultError(
            "Runtime.BuiltInModuleConflict", f"Cannot use built-in module {module_name} as a handler module"
        )
    if top in sys.stdlib_module_names:
        raise FaultError(
            "Runtime.ImportModuleError",
            f"Unable to import module '{module_name}': the handler module '{top}' has the name of a Python "
            f"standard library module, which it would shadow; rename it (for example to '{top}_handler.py') "
            "and update the handler setting",
        )
    import importlib

    try:
        module = importlib.import_module(module_path)
    except ImportError as exc:
        raise FaultError("Runtime.ImportModuleError", f"Unable to import module '{module_name}': {exc}") from None
    except SyntaxError as exc:
        trace = [f'  File "{exc.filename}" Line {exc.lineno}\n    {exc.text}']
        raise FaultError(
            "Runtime.UserCodeSyntaxError", f"Syntax error in module '{module_name}': {exc}", trace
        ) from None
    try:
        return getattr(module, function_name)
    except AttributeError:
        raise FaultError(
            "Runtime.HandlerNotFound", f"Handler '{function_name}' missing on module '{module_name}'"
        ) from None


def _install_logging() -> None:
    """When the function uses ``logging``, give the root logger the handler AWS's runtime installs."""
    if "logging" not in sys.modules:
        return
    import logging

    root = logging.getLogger()
    if root.handlers:
        return

    class _RequestId(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            record.aws_request_id = _request_id
            return True

    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        logging.Formatter(
            "[%(levelname)s]\t%(asctime)s.%(msecs)03dZ\t%(aws_request_id)s\t%(message)s", "%Y-%m-%dT%H:%M:%S"
        )
    )
    logging.Formatter.converter = time.gmtime
    handler.addFilter(_RequestId())
    root.addHandler(handler)


def _json_header(value: str | None, name: str) -> dict[str, object] | None:
    if not value:
        return None
    try:
        parsed = json.loads(value)
    except ValueError as exc:
        raise FaultError("Runtime.LambdaContextUnmarshalError", f"Unable to parse {name} JSON: {exc}") from None
    return parsed if isinstance(parsed, dict) else None


def handle(client: RuntimeClient, handler: object, body: bytes, headers: Headers) -> None:
    global _request_id
    request_id = headers.get("Lambda-Runtime-Aws-Request-Id") or ""
    _request_id = request_id
    trace_id = headers.get("Lambda-Runtime-Trace-Id")
    if trace_id:
        os.environ["_X_AMZN_TRACE_ID"] = trace_id
    else:
        os.environ.pop("_X_AMZN_TRACE_ID", None)
    try:
        context = LambdaContext(
            request_id,
            int(headers.get("Lambda-Runtime-Deadline-Ms") or 0),
            headers.get("Lambda-Runtime-Invoked-Function-Arn"),
            _json_header(headers.get("Lambda-Runtime-Client-Context"), "Client Context"),
            _json_header(headers.get("Lambda-Runtime-Cognito-Identity"), "Cognito Identity"),
            tenant_id=headers.get("Lambda-Runtime-Aws-Tenant-Id"),
        )
        content_type = headers.get("Content-Type") or "application/json"
        if content_type == "application/json":
            try:
                event = json.loads(body)
            except ValueError as exc:
                raise FaultError("Runtime.UnmarshalError", f"Unable to unmarshal input: {exc}") from None
        else:
            event = body
        result = handler(event, context)  # type: ignore[operator]
        if isinstance(result, bytes):
            payload, result_type = result, "application/unknown"
        else:
            try:
                payload, result_type = _encode(result).encode(), "application/json"
            except (TypeError, ValueError) as exc:
                raise FaultError("Runtime.MarshalError", f"Unable to marshal response: {exc}") from None
    except FaultError as fault:
        error = _error(fault.message, fault.error_type, fault.trace, request_id)
    except Exception as exc:
        error = _error(str(exc), type(exc).__name__, _user_frames(exc), request_id)
    else:
        client.respond(request_id, payload, result_type)
        return
    _log_error(error)
    client.fail(request_id, error)


def _serve() -> int:
    """Init (import the handler), then loop on ``/next``; returns only after an init error."""
    client = RuntimeClient(os.environ["AWS_LAMBDA_RUNTIME_API"])
    task_root = os.environ.get("LAMBDA_TASK_ROOT") or os.getcwd()
    # The function's code, not this file's folder, comes first on the import path.
    here = os.path.dirname(BOOTSTRAP_FILE)
    sys.path[:] = [task_root] + [p for p in sys.path if p not in (here, "", task_root)]
    error: dict[str, object] | None = None
    try:
        handler = load_handler(os.environ.get("_HANDLER", ""))
        _install_logging()
    except FaultError as fault:
        error = _error(fault.message, fault.error_type, fault.trace)
    except Exception as exc:
        error = _error(str(exc), type(exc).__name__, _user_frames(exc))
    if error is not None:
        _log_error(error)
        client.init_error(error)
        return 1
    while True:
        body, headers = client.next()
        handle(client, handler, body, headers)


# ---------------------------------------------------------------------------------------- concurrency


def worker_count(environ: dict[str, str] | os._Environ[str]) -> int:
    """``AWS_LAMBDA_MAX_CONCURRENCY`` (Lambda Managed Instances): how many invocations run at once."""
    text = environ.get("AWS_LAMBDA_MAX_CONCURRENCY", "").strip()
    if not text:
        return 1
    if not text.isdigit() or int(text) < 1:
        raise SystemExit(f"AWS_LAMBDA_MAX_CONCURRENCY={text!r} is not a whole number of at least 1")
    return int(text)


def _worker() -> None:
    """A forked worker: serve until the loop ends, then leave without returning into the parent's code."""
    code = 1
    try:
        code = _serve()
    except SystemExit as exc:
        if isinstance(exc.code, int):
            code = exc.code
        elif exc.code is None:
            code = 0
        else:
            print(exc.code, file=sys.stderr)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        os._exit(code)


def supervise(workers: int) -> int:
    """Run ``workers`` processes that each init and loop on ``/next`` (AWS's Python runtime does the same
    under Lambda Managed Instances: one process per concurrent invocation, so handlers need not be
    thread-safe). The first worker to end ends the runtime with its status (the others are killed), so
    the platform sees a crash as the runtime exiting, as it would with one process."""
    import signal

    children = set()
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:
            _worker()
        children.add(pid)
    pid, status = os.wait()
    children.discard(pid)
    for child in children:
        os.kill(child, signal.SIGKILL)
    for child in children:
        os.waitpid(child, 0)
    code = os.waitstatus_to_exitcode(status)
    if code < 0:  # killed by a signal: end the same way
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


def wait_for_memory_limit() -> None:
    """The agent puts this process under the function's memory limit while the interpreter starts, then
    closes the pipe whose read end it passed in ``_LAMBDALET_MEMORY_GATE_FD``: the function's code (and any
    worker process) starts only after that. Without the variable (another platform) there is nothing to wait for."""
    fd = os.environ.pop("_LAMBDALET_MEMORY_GATE_FD", "")
    if not fd.isdigit():
        return
    try:
        while os.read(int(fd), 64):
            pass
        os.close(int(fd))
    except OSError:
        pass


def main() -> int:
    wait_for_memory_limit()
    workers = worker_count(os.environ)
    # Unbuffered output: the agent frames the function's lines per invocation as they arrive. Several
    # workers share the pipe: each line is then written with one write() so lines never interleave.
    for fd, name in ((1, "stdout"), (2, "stderr")):
        stream = io.TextIOWrapper(
            io.FileIO(fd, "w", closefd=False),
            encoding="utf-8",
            errors="backslashreplace",
            write_through=workers == 1,
            line_buffering=workers > 1,
        )
        setattr(sys, name, stream)
    if workers > 1:
        return supervise(workers)
    return _serve()


if __name__ == "__main__":
    sys.exit(main())
