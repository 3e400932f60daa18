"""Operator settings: a frozen dataclass built from an injected environment (the chart sets these).

No I/O: ``from_env`` reads only the mapping it is given and fails fast naming the variable.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

from lambdalet import __version__


class SettingsError(ValueError):
    """An invalid environment variable; the message names it."""


_PULL_POLICIES = ("Always", "IfNotPresent", "Never")


@dataclasses.dataclass(frozen=True)
class Settings:
    #: Registry (and path) of the runtime images: ``<registry>/<runtime>:<tag>``; the agent sidecar for
    #: ``code.image`` functions is ``<registry>/agent:<tag>``.
    image_registry: str = "ghcr.io/lambdalet"
    image_tag: str = __version__
    image_pull_policy: str = "IfNotPresent"
    #: Base URL of the gateway, for ``status.url`` (the chart sets the in-cluster Service URL).
    gateway_url: str = "http://lambdalet-gateway.lambdalet-system.svc:8080"
    #: UID/GID the function pods run as (any non-root id; the runtime images use it too).
    run_as_user: int = 1000

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        defaults = cls()
        registry = environ.get("LAMBDALET_IMAGE_REGISTRY", defaults.image_registry).rstrip("/")
        if not registry or not re.fullmatch(r"[A-Za-z0-9._:/-]+", registry):
            raise SettingsError(f"LAMBDALET_IMAGE_REGISTRY: not an image registry path: {registry!r}")
        tag = environ.get("LAMBDALET_IMAGE_TAG", defaults.image_tag)
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", tag):
            raise SettingsError(f"LAMBDALET_IMAGE_TAG: not an image tag: {tag!r}")
        policy = environ.get("LAMBDALET_IMAGE_PULL_POLICY", defaults.image_pull_policy)
        if policy not in _PULL_POLICIES:
            raise SettingsError(f"LAMBDALET_IMAGE_PULL_POLICY: must be one of {', '.join(_PULL_POLICIES)}")
        gateway = environ.get("LAMBDALET_GATEWAY_URL", defaults.gateway_url).rstrip("/")
        if not re.match(r"^https?://", gateway):
            raise SettingsError(f"LAMBDALET_GATEWAY_URL: must be an http(s) URL (got {gateway!r})")
        uid_text = environ.get("LAMBDALET_RUN_AS_USER", str(defaults.run_as_user))
        if not uid_text.isdigit() or int(uid_text) == 0:
            raise SettingsError(f"LAMBDALET_RUN_AS_USER: must be a non-zero user id (got {uid_text!r})")
        return cls(
            image_registry=registry,
            image_tag=tag,
            image_pull_policy=policy,
            gateway_url=gateway,
            run_as_user=int(uid_text),
        )

    def runtime_image(self, runtime: str) -> str:
        return f"{self.image_registry}/{runtime}:{self.image_tag}"

    @property
    def agent_image(self) -> str:
        return f"{self.image_registry}/agent:{self.image_tag}"
