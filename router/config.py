"""The router policy file: at-rest models, loading, validation, compilation and hot reload.

Shape (llm-d EndpointPickerConfig style; see router/README.md):

    apiVersion: lenpred.io/v1alpha1
    kind: RouterPolicy
    plugins: [{name, type, parameters}]      # instances
    profiles: {<name>: {admission, ordering, scorers: [{ref, weight}], picker}}
    predictions: {...}  queue: {...}  replicas: {...}   # router settings, all optional

A profile reference names a plugin instance, or a registered type (with or without its role
suffix: `max-score` = `max-score-picker`) which is then used with its default parameters.
"""
from __future__ import annotations

import difflib
import json
import logging
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lenpred.contract.keys import DEFAULT_NAMESPACE
from lenpred.router import registry
from lenpred.router.interfaces import (Admitter, Batcher, Handle, Orderer, Picker, Plugin, Preemptor, Role,
                                       Scorer)

log = logging.getLogger(__name__)

API_VERSION = "lenpred.io/v1alpha1"
KIND = "RouterPolicy"
DEFAULT_PROFILE = "default"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class PluginSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """Instance name, referenced from profiles."""
    type: str
    """Registered plugin type (kebab-case, ends in its role: -admitter, -orderer, -scorer, -picker,
    -batcher, -preemptor)."""
    parameters: dict[str, Any] = Field(default_factory=dict)
    """Checked against the type's parameters model; unknown keys are errors."""


class ScorerRef(_Strict):
    ref: str
    weight: float = Field(1.0, gt=0)


class ProbeSettings(_Strict):
    enabled: bool = False
    """Probe-then-dispatch for single requests: before queueing, send a prefill-only copy of the
    prompt (max tokens 1, rid `<rid>-probe`) to the replica the scorers pick, wait for its EGTP
    prediction, order/admit on it and send the real request to that same replica (prefix-cache hit).
    Needs Redis (`--redis-url`); without it the profile behaves as if disabled."""
    timeout_ms: float = Field(50.0, gt=0, le=10_000)
    """Longest wait for the probe's prediction; after it the request goes on with the fallback
    estimate (never an error)."""


class ProfileSpec(_Strict):
    admission: str | None = None
    """Admitter reference; none admits everything to any healthy replica."""
    ordering: str = "fcfs-orderer"
    """Orderer reference for this profile's queue."""
    scorers: list[ScorerRef] = Field(default_factory=lambda: [ScorerRef(ref="least-load-scorer")],
                                     min_length=1)
    """Scorers combined as a weighted sum (weights normalised to 1)."""
    picker: str = "max-score-picker"
    batching: str = "fcfs-batcher"
    """Batcher reference for batch submissions (POST /v1/lenpred/batch)."""
    preemption: str | None = None
    """Preemptor reference; none never moves a running request."""
    probe: ProbeSettings = Field(default_factory=ProbeSettings)
    """Probe-then-dispatch for single online requests (off by default)."""


class FallbackSettings(_Strict):
    default_output_tokens: int = Field(256, ge=1)
    """Estimate (p50) before any history exists."""
    p90_factor: float = Field(2.5, ge=1.0)
    """p90 = p50 x p90_factor for the constant estimate."""
    min_samples: int = Field(20, ge=1)
    """Finished requests an input-length bucket needs before its history is used."""
    window: int = Field(2000, ge=10)
    """Finished requests remembered per bucket."""


class PredictionSettings(_Strict):
    max_age_s: float = Field(30.0, gt=0)
    """A prediction older than this is treated as missing (the fallback is used)."""
    redis_timeout_s: float = Field(0.05, gt=0)
    """Per-command Redis timeout; Redis is soft state and must never stall a request."""
    fallback: FallbackSettings = Field(default_factory=FallbackSettings)


class QueueSettings(_Strict):
    max_size: int = Field(4096, ge=0)
    """Requests waiting in the router; beyond it new ones are shed (429 queue-full)."""
    max_wait_s: float = Field(60.0, gt=0)
    """Longest wait before a queued request is dropped (503 queue-timeout)."""


class ReplicaSettings(_Strict):
    poll_interval_s: float = Field(0.5, gt=0)
    """How often each replica's /health and /v1/loads are polled."""
    timeout_s: float = Field(2.0, gt=0)
    unhealthy_after: int = Field(2, ge=1)
    """Consecutive failed polls before a replica leaves the pool."""
    healthy_after: int = Field(1, ge=1)
    """Consecutive good polls before it comes back."""


class PolicyFile(_Strict):
    apiVersion: Literal["lenpred.io/v1alpha1"]
    kind: Literal["RouterPolicy"]
    plugins: list[PluginSpec] = Field(default_factory=list)
    profiles: dict[str, ProfileSpec]
    """Must contain `default`; a request picks another with the `x-lenpred-profile` header."""
    predictions: PredictionSettings = Field(default_factory=PredictionSettings)
    queue: QueueSettings = Field(default_factory=QueueSettings)
    replicas: ReplicaSettings = Field(default_factory=ReplicaSettings)


class PolicyError(ValueError):
    """An invalid policy file; the message lists every problem with its location."""

    def __init__(self, source: str, problems: list[str]):
        self.source, self.problems = source, problems
        super().__init__(f"invalid router policy {source}:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass
class Profile:
    """Runtime form of a profile: plugin instances, weights normalised to sum 1."""

    name: str
    admitter: Admitter | None
    orderer: Orderer
    scorers: list[tuple[Scorer, float]]
    picker: Picker
    batcher: Batcher | None = None
    preemptor: Preemptor | None = None
    probe: ProbeSettings = field(default_factory=ProbeSettings)

    def plugins(self) -> list[Plugin]:
        out = [p for p in (self.admitter, self.orderer, self.picker, self.batcher, self.preemptor) if p is not None]
        return out + [s for s, _ in self.scorers]


@dataclass
class Policy:
    source: str
    spec: PolicyFile
    profiles: dict[str, Profile]
    plugins: dict[str, Plugin] = field(default_factory=dict)

    @property
    def default(self) -> Profile:
        return self.profiles[DEFAULT_PROFILE]


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _pydantic_problems(err: ValidationError, prefix: str = "") -> list[str]:
    return [f"{prefix}{_loc(e['loc'])}: {e['msg']}" if (prefix or e["loc"]) else e["msg"]
            for e in err.errors()]


def parse_policy(data: Any, source: str = "<policy>", handle: Handle | None = None) -> Policy:
    """Validate a loaded YAML document and build its plugin instances; raise PolicyError."""
    if not isinstance(data, dict):
        raise PolicyError(source, [f"top level must be a mapping, got {type(data).__name__}"])
    try:
        spec = PolicyFile.model_validate(data)
    except ValidationError as e:
        raise PolicyError(source, _pydantic_problems(e)) from None
    handle = handle or Handle()
    problems: list[str] = []
    instances: dict[str, Plugin] = {}
    for i, p in enumerate(spec.plugins):
        where = f"plugins[{i}] ({p.name!r})"
        if p.name in instances:
            problems.append(f"{where}: duplicate plugin name")
            continue
        cls = registry.lookup(p.type)
        if cls is None:
            hint = difflib.get_close_matches(p.type, registry.types(), n=1)
            problems.append(f"{where}.type: unknown plugin type {p.type!r}"
                            + (f" (did you mean {hint[0]!r}?)" if hint else "")
                            + f"; known types: {', '.join(registry.types())}")
            continue
        try:
            params = cls.Parameters.model_validate(p.parameters)
        except ValidationError as e:
            problems += _pydantic_problems(e, f"{where}.parameters.")
            continue
        instances[p.name] = cls(p.name, params, handle)

    defaults: dict[str, Plugin] = {}

    declared = {p.name for p in spec.plugins}

    def resolve(ref: str, role: Role, where: str) -> Plugin | None:
        plugin = instances.get(ref)
        if plugin is None and ref in declared:
            return None  # declared but invalid: already reported
        if plugin is None:
            type_name = ref if registry.lookup(ref) else f"{ref}-{role.value}"
            cls = registry.lookup(type_name)
            if cls is None:
                problems.append(f"{where}: {ref!r} is neither a plugin name in `plugins` nor a "
                                f"registered {role.value} type")
                return None
            plugin = defaults.get(type_name) or cls(type_name, cls.Parameters(), handle)
            defaults[type_name] = plugin
        if plugin.role != role:
            problems.append(f"{where}: {ref!r} is a {plugin.type_name}, not a {role.value}")
            return None
        return plugin

    if DEFAULT_PROFILE not in spec.profiles:
        problems.append(f"profiles: a profile named {DEFAULT_PROFILE!r} is required")
    profiles: dict[str, Profile] = {}
    for pname, ps in spec.profiles.items():
        where = f"profiles.{pname}"
        admitter = resolve(ps.admission, Role.ADMITTER, f"{where}.admission") if ps.admission else None
        orderer = resolve(ps.ordering, Role.ORDERER, f"{where}.ordering")
        picker = resolve(ps.picker, Role.PICKER, f"{where}.picker")
        total = sum(s.weight for s in ps.scorers)
        scorers = [(resolve(s.ref, Role.SCORER, f"{where}.scorers[{j}]"), s.weight / total)
                   for j, s in enumerate(ps.scorers)]
        batcher = resolve(ps.batching, Role.BATCHER, f"{where}.batching")
        preemptor = resolve(ps.preemption, Role.PREEMPTOR, f"{where}.preemption") if ps.preemption else None
        if not problems:
            profiles[pname] = Profile(pname, admitter, orderer, scorers, picker,  # type: ignore[arg-type]
                                      batcher, preemptor, ps.probe)  # type: ignore[arg-type]
    if problems:
        raise PolicyError(source, problems)
    return Policy(source, spec, profiles, {**defaults, **instances})


def load_policy(path: str | os.PathLike, handle: Handle | None = None) -> Policy:
    """Read, validate and compile a policy file; raise PolicyError with every problem found."""
    source = str(path)
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise PolicyError(source, [f"cannot read file: {e.strerror or e}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise PolicyError(source, [f"invalid YAML{at}: {getattr(e, 'problem', None) or e}"]) from None
    return parse_policy(data, source, handle)


def default_policy_path() -> str:
    return str(resources.files("lenpred.router") / "policies" / "default.yaml")


def policy_json_schema() -> dict:
    """JSON schema of the policy file, with each plugin type's parameters spelled out."""
    schema = PolicyFile.model_json_schema()
    variants = []
    for type_name, cls in registry.types().items():
        params = cls.Parameters.model_json_schema()
        defs = params.pop("$defs", {})
        schema.setdefault("$defs", {}).update(defs)
        variants.append({
            "type": "object", "title": type_name, "additionalProperties": False,
            "required": ["name", "type"],
            "properties": {"name": {"type": "string"}, "type": {"const": type_name},
                           "parameters": params},
        })
    schema["properties"]["plugins"]["items"] = {"oneOf": variants}
    schema["$defs"].pop("PluginSpec", None)
    schema["$id"] = "https://lenpred.io/schemas/router-policy-v1alpha1.json"
    return schema


def schema_text() -> str:
    return json.dumps(policy_json_schema(), indent=2, sort_keys=True) + "\n"


class PolicyWatcher:
    """Hot reload: reload the file when its mtime changes; keep the last good policy on error."""

    def __init__(self, path: str, handle: Handle | None = None):
        self.path, self.handle = path, handle
        self.policy = load_policy(path, handle)
        self._mtime = self._stat()
        self.last_error: str | None = None

    def _stat(self) -> float | None:
        try:
            return os.stat(self.path).st_mtime_ns
        except OSError:
            return None

    def check(self) -> bool | None:
        """Reload if changed. Returns True (reloaded), False (invalid, kept old), None (unchanged)."""
        mtime = self._stat()
        if mtime is None or mtime == self._mtime:
            return None
        self._mtime = mtime
        try:
            self.policy = load_policy(self.path, self.handle)
        except PolicyError as e:
            self.last_error = str(e)
            log.error("%s; keeping the previous policy", e)
            return False
        self.last_error = None
        log.info("reloaded router policy %s", self.path)
        return True


@dataclass
class RouterConfig:
    """Everything `make_app` needs; the CLI builds it from flags."""

    backends: list[str]
    policy_path: str = field(default_factory=default_policy_path)
    redis_url: str | None = None
    namespace: str = DEFAULT_NAMESPACE
    reload_interval_s: float = 1.0
    handle: Handle = field(default_factory=Handle)
