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
MAX_POLICY_BYTES = 1 << 20


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
    window: int = Field(2000, ge=10, le=1_000_000)
    """Finished requests remembered per bucket."""
    max_observed_tokens: int = Field(131_072, ge=1)
    """A finished length above this (or above the request's own max tokens, when the event says it)
    is not learned: a fake or broken `finished` event must not poison the estimates."""


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
    poll_interval_s: float = Field(0.5, gt=0, le=3600)
    """How often each replica's /v1/loads is polled (its liveness check and its load report)."""
    timeout_s: float = Field(1.0, gt=0, le=60)
    """Deadline of each poll request (SGLang answers both in milliseconds; a frozen engine never)."""
    unhealthy_after: int = Field(2, ge=1)
    """Consecutive failed polls before a replica leaves the pool."""
    healthy_after: int = Field(1, ge=1)
    """Consecutive good polls before it comes back."""


class UpstreamSettings(_Strict):
    connect_timeout_s: float = Field(2.0, gt=0, le=60)
    """TCP connect to a replica. A refused or timed-out connect is re-placed on another replica
    (nothing was sent)."""
    first_byte_timeout_s: float = Field(60.0, gt=0, le=3600)
    """Streamed requests: from sending to the first byte of the answer (the engine's queueing and
    prefill); past it the attempt is aborted and the client gets 504 (or the request is re-sent
    once, see `redispatch`)."""
    stall_timeout_s: float = Field(30.0, gt=0, le=3600)
    """Streamed answers: the longest gap between two chunks once the answer started; a stall ends
    the stream with an SSE error event and `data: [DONE]`."""
    response_timeout_s: float = Field(600.0, gt=0, le=86_400)
    """Non-streamed requests: from sending to the end of the answer (it has no earlier first byte);
    past it the engine request is aborted and the client gets 504."""
    redispatch: bool = True
    """A request that has received no answer byte when its attempt fails (connection error, a stale
    pooled connection twice, 5xx, its replica ejected) is sent once to another replica, within the
    deadline above."""
    abort_timeout_s: float = Field(1.0, gt=0, le=30)
    """Deadline of the best-effort `POST /abort_request` sent when the router gives up an attempt."""


class OutlierSettings(_Strict):
    failures: int = Field(3, ge=1, le=1000)
    """Request-path failures (connect errors, timeouts, stalls, broken streams, 5xx answers) within
    `window_s` that eject a replica from the pool, before its health poll notices anything."""
    window_s: float = Field(10.0, gt=0, le=3600)
    ejection_s: float = Field(5.0, gt=0, le=3600)
    """Length of an ejection; doubled for each further ejection in a row, up to `max_ejection_s`.
    After it the replica returns once its health poll succeeds."""
    max_ejection_s: float = Field(60.0, gt=0, le=86_400)


class LimitSettings(_Strict):
    max_body_bytes: int = Field(8 << 20, ge=1024, le=1 << 30)
    """Largest request body; a larger one is refused with 413 before it is read."""
    body_timeout_s: float = Field(10.0, gt=0, le=600)
    """Time for a client to send its whole body once the headers arrived (slow clients: 408)."""
    max_tokens: int = Field(1 << 20, ge=1)
    """Largest `max_tokens` / `max_completion_tokens` / `max_new_tokens` accepted (400 above)."""
    max_abs_priority: int = Field(1 << 20, ge=0)
    """Largest |`priority`| accepted from a client allowed to set it (400 above)."""
    max_batch_requests: int = Field(10_000, ge=1)
    """Requests in one `POST /v1/lenpred/batch` (413 above)."""
    history_bytes: int = Field(32 << 20, ge=1 << 20, le=1 << 34)
    """Memory for the requests the debug endpoint remembers (lengths, counts, states; never the
    prompt text once a request ended); the oldest are forgotten first."""


class PolicyFile(_Strict):
    apiVersion: Literal["lenpred.io/v1alpha1"]
    kind: Literal["RouterPolicy"]
    plugins: list[PluginSpec] = Field(default_factory=list)
    profiles: dict[str, ProfileSpec]
    """Must contain `default`; a request picks another with the `x-lenpred-profile` header."""
    predictions: PredictionSettings = Field(default_factory=PredictionSettings)
    queue: QueueSettings = Field(default_factory=QueueSettings)
    replicas: ReplicaSettings = Field(default_factory=ReplicaSettings)
    upstream: UpstreamSettings = Field(default_factory=UpstreamSettings)
    outlier: OutlierSettings = Field(default_factory=OutlierSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)


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
        try:
            instances[p.name] = cls(p.name, params, handle)
        except Exception as e:  # noqa: BLE001 - a plugin that cannot be built is a problem of the file
            problems.append(f"{where}: cannot build a {p.type}: {type(e).__name__}: {e}")

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
        raw = Path(path).read_bytes()
    except OSError as e:
        raise PolicyError(source, [f"cannot read file: {e.strerror or e}"]) from None
    if len(raw) > MAX_POLICY_BYTES:
        raise PolicyError(source, [f"file is {len(raw)} bytes; a policy file is at most {MAX_POLICY_BYTES}"])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise PolicyError(source, [f"not UTF-8 text: byte 0x{raw[e.start]:02x} at line {line}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise PolicyError(source, [f"invalid YAML{at}: {getattr(e, 'problem', None) or e}"]) from None
    except RecursionError:
        raise PolicyError(source, ["invalid YAML: nested too deeply"]) from None
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
    """Hot reload: reload the file when it changes; keep the last good policy on any error.

    A change is a new (mtime, size, inode) of the file, or the file going missing. Whatever goes
    wrong while reading, decoding, parsing, validating or building the new policy (a PolicyError,
    or any other exception: a bug must not stop the reloads either) keeps the last good policy,
    is logged and is kept in `last_error` (shown in /health) until a good version loads."""

    def __init__(self, path: str, handle: Handle | None = None):
        self.path, self.handle = path, handle
        self.policy = load_policy(path, handle)
        self._sig = self._stat()
        self.last_error: str | None = None

    def _stat(self) -> tuple | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def check(self, force: bool = False) -> bool | None:
        """Reload if changed (or `force`). True: reloaded; False: invalid, the last good policy
        stays; None: unchanged."""
        sig = self._stat()
        if sig == self._sig and not force:
            return None
        self._sig = sig
        try:
            policy = load_policy(self.path, self.handle)
        except PolicyError as e:
            return self._failed(str(e))
        except Exception as e:  # noqa: BLE001 - a reload never takes the router down
            log.exception("unexpected error loading %s", self.path)
            return self._failed(f"invalid router policy {self.path}: unexpected {type(e).__name__}: {e}")
        self.policy, self.last_error = policy, None
        log.info("reloaded router policy %s", self.path)
        return True

    def _failed(self, message: str) -> bool:
        self.last_error = message
        log.error("%s; keeping the previous policy", message)
        return False


@dataclass
class RouterConfig:
    """Everything `make_app` needs; the CLI builds it from flags."""

    backends: list[str]
    policy_path: str = field(default_factory=default_policy_path)
    redis_url: str | None = None
    namespace: str = DEFAULT_NAMESPACE
    reload_interval_s: float = 1.0
    api_keys_file: str | None = None
    """API keys (router/auth.py); None serves without authentication (a warning at start)."""
    handle: Handle = field(default_factory=Handle)
