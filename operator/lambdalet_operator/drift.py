"""What drifted: the fields of a child object the operator writes, compared with the object as stored.

Pure: ``differences(desired, live)`` takes the manifest the operator would write (``manifests``) and the
object the API server returns, and lists the paths where they disagree. It is a server-side-apply-like
view of the operator's own fields:

* **Only the fields the operator sets are compared.** A key the operator does not write (a field the API
  server defaults, such as a Service's ``clusterIP`` or a container's ``terminationMessagePath``; status;
  ``metadata`` other than labels, annotations and owner references; a Deployment's ``spec.replicas``,
  which the gateway owns through the scale subresource; an annotation ``kubectl rollout restart`` adds)
  is never a difference.
* **Lists are compared item by item and must have the same length**: an extra container, environment
  variable or egress rule is drift. Keys the server adds inside an item (a probe's ``scheme``, a
  ``fieldRef``'s ``apiVersion``, a port's ``protocol``) are not.
* **A key that is absent equals an empty value** (``[]``, ``{}``, ``""``, null): the API server drops
  empty ``omitempty`` fields, e.g. a NetworkPolicy's ``egress: []`` comes back without ``egress``.
  ``false`` and ``0`` are not empty: ``automountServiceAccountToken: false`` missing means ``true``.
* **Resource quantities compare by value**: the server canonicalises ``1000m`` to ``1`` and ``2048Mi``
  to ``2Gi`` (``resources.requests``/``limits``, ``sizeLimit``).
* **Maps the operator owns entirely** (``EXACT``: a ConfigMap's ``data``, the code files) must not have
  extra keys either.

The quantity parser is hand-written: ``kubernetes_asyncio`` (the client the operator uses) has none, and
the synchronous ``kubernetes`` package, which does, is a second full API client for one function.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any, Final

#: Top-level keys of a manifest that are compared (``apiVersion``/``kind`` select the object itself).
_SKIP_TOP: Final = frozenset({"apiVersion", "kind", "status"})
#: The metadata the operator writes; the rest (uid, resourceVersion, managedFields...) is the server's.
_METADATA_KEYS: Final = ("labels", "annotations", "ownerReferences")
#: Paths (tuples of keys) whose maps must match exactly, not just contain the operator's keys.
EXACT: Final = frozenset({("data",)})
#: Keys under which strings are resource quantities.
_QUANTITY_PARENTS: Final = frozenset({"requests", "limits"})
_QUANTITY_KEYS: Final = frozenset({"sizeLimit"})

_SUFFIXES: Final[dict[str, Decimal]] = {
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "": Decimal(1),
    "k": Decimal("1e3"),
    "M": Decimal("1e6"),
    "G": Decimal("1e9"),
    "T": Decimal("1e12"),
    "P": Decimal("1e15"),
    "E": Decimal("1e18"),
    **{suffix: Decimal(1024) ** (power + 1) for power, suffix in enumerate(("Ki", "Mi", "Gi", "Ti", "Pi", "Ei"))},
}
_QUANTITY: Final = re.compile(r"^([+-]?(?:\d+\.?\d*|\.\d+))(?:([eE][+-]?\d+)|(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE])?)$")


def parse_quantity(text: str) -> Decimal | None:
    """The value of a Kubernetes resource quantity (``128Mi``, ``500m``, ``1e3``), or None if ``text`` is
    not one."""
    match = _QUANTITY.match(text.strip())
    if match is None:
        return None
    number, exponent, suffix = match.groups()
    try:
        value = Decimal(number)
        if exponent:
            return value * Decimal(10) ** int(exponent[1:])
    except InvalidOperation:
        return None
    return value * _SUFFIXES[suffix or ""]


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, str | list | dict) and not value)


def _is_quantity_path(path: Sequence[str | int]) -> bool:
    if not path:
        return False
    last = path[-1]
    parent = path[-2] if len(path) > 1 else None
    return last in _QUANTITY_KEYS or parent in _QUANTITY_PARENTS


def _render(path: Sequence[str | int]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _compare(desired: Any, live: Any, path: tuple[str | int, ...], out: list[str]) -> None:
    if isinstance(desired, Mapping):
        if not isinstance(live, Mapping):
            if not (_empty(live) and not desired):
                out.append(_render(path))
            return
        for key, value in desired.items():
            if key not in live or live[key] is None:
                if not _empty(value):
                    out.append(_render((*path, key)))
                continue
            _compare(value, live[key], (*path, key), out)
        if path in EXACT and set(live) - set(desired):
            out.append(_render(path))
        return
    if isinstance(desired, list):
        if not isinstance(live, list):
            if not (_empty(live) and not desired):
                out.append(_render(path))
            return
        if len(desired) != len(live):
            out.append(_render(path))
            return
        for index, (want, have) in enumerate(zip(desired, live, strict=True)):
            _compare(want, have, (*path, index), out)
        return
    if desired == live and type(desired) is type(live):
        return
    if isinstance(desired, str) and isinstance(live, str | int) and _is_quantity_path(path):
        want, have = parse_quantity(desired), parse_quantity(str(live))
        if want is not None and want == have:
            return
    out.append(_render(path))


def differences(desired: Mapping[str, Any], live: Mapping[str, Any]) -> list[str]:
    """Paths (``spec.template.spec.containers[0].env``) where ``live`` differs from what the operator
    writes (``desired``); empty when the object is as the operator would leave it."""
    out: list[str] = []
    want_meta = desired.get("metadata") or {}
    have_meta = live.get("metadata") or {}
    for key in _METADATA_KEYS:
        if key in want_meta:
            _compare(want_meta[key], have_meta.get(key), ("metadata", key), out)
    for key, value in desired.items():
        if key in _SKIP_TOP or key == "metadata":
            continue
        if key not in live or live[key] is None:
            if not _empty(value):
                out.append(key)
            continue
        _compare(value, live[key], (key,), out)
    return out
