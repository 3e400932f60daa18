"""The lambdalet gateway: the Lambda Invoke API, HTTP routes, admission, the autoscaler and its backends.

Layers (imports point downwards only):

- pure, no I/O, no asyncio: ``autoscaler`` (the scaling decision), ``http_events`` (payload format 2.0),
  ``control`` (Lambda's FunctionConfiguration shapes), ``errors`` (Lambda's error wire format),
  ``settings``;
- the invocation core: ``dispatcher`` (admission, environment pools, the wait queue), which reaches
  environments only through ``backend.Backend`` and ``agent_client``;
- backends: ``local`` (agent processes on loopback, with ``cpu`` cgroups when asked);
- edges: ``app`` (the aiohttp application), ``invoke`` (data-path handlers), ``registry`` (manifests),
  ``logs``, ``metrics``, ``cli`` and ``__main__``.
"""
