"""The lambdalet agent: the server side of the Lambda Runtime API, one per execution environment.

Layers, from pure to I/O (a module only imports the ones above it):

- ``state`` (Runtime API state machine), ``report`` (deadlines, billing, START/END/REPORT lines, log tail),
  ``settings`` (flags > environment > defaults): pure, no I/O, no clock.
- ``runtimes`` (``runtime.json`` discovery), ``memory`` (cgroup or rlimit, peak memory), ``metrics``,
  ``process`` (the bootstrap's process group and its output): one concern each at the OS edge.
- ``environment``: the lifecycle of one execution environment (init, invoke, timeout, crash, reset);
  no HTTP here.
- ``httpserver``: the HTTP/1.1 server (httptools; request and response trailers), no Lambda logic.
- ``server``: the two faces (Runtime API and invoke endpoint) as routes of that server, translating HTTP
  to ``environment`` calls; ``agent`` wires everything; ``cli`` is ``lambdalet agent``.
"""
