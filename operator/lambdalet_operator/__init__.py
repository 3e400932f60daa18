"""The lambdalet operator (kopf): reconciles Function resources into Kubernetes workloads.

Layers, outermost first; each imports only the ones below it:

* ``handlers``  — kopf handlers: unpack events, hold a per-Function lock, map outcomes to kopf errors.
* ``reconcile`` — one Function: validate, build, apply through an ``Api`` (a Protocol), write status.
* ``kube``      — the only module that talks to the Kubernetes API (``kubernetes_asyncio``'s ApiClient).
* ``manifests``, ``status``, ``settings`` — pure: no I/O, no clock, no globals; tested without a cluster.

Never imports ``lambdalet_gateway``; shares only ``lambdalet`` (the spec model and the CRD generator).
"""
