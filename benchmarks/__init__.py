"""lambdalet's benchmark harness, run as ``python -m benchmarks [--quick]`` (``make bench``).

Every figure is measured beside a peer (AWS's runtime interface emulator driving ``awslambdaric``) or a
physical floor (a minimal aiohttp handler, a raw asyncio HTTP responder) in the same run, interleaved, and
reported as a ratio, because the machines it runs on are shared and noisy.

Layers: ``stats``, ``wrk`` (parsing), ``summary`` and ``report`` are pure and unit-tested; ``procs``,
``targets`` and the scenario modules (``warm``, ``cold``, ``scale``, ``memory``) start processes and time
them. Nothing here is a test: no figure is asserted anywhere.
"""
