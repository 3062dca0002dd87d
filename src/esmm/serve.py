"""An HTTP scoring server for an exported artifact (FastAPI on uvicorn).

Endpoints:

* ``POST /predict``: ``{"impressions": [{field: value, ...}, ...]}`` ->
  ``{"predictions": [{"p_ctr": .., "p_cvr": .., "p_ctcvr": ..}, ...]}`` in request order.
* ``POST /rank``: one user's fields (encoded once per request) and N candidates' fields ->
  candidates sorted by a weighted score of the three probabilities, best first.
* ``GET /health``, ``GET /metadata``, ``GET /metrics`` (Prometheus text format or OpenMetrics,
  by ``prometheus_client``; with several workers, one set of counters for the whole server:
  :class:`Metrics`).

Every request is validated field by field before scoring: a missing field, a value of the
wrong type, an empty list or too many items is answered with a 4xx and a JSON body
``{"error": message, "field": name, "index": i}`` naming the field and the item. A request is
scored with one vectorised call of :meth:`esmm.export.Predictor.predict_columns`.

Limits (:class:`Limits`) bound what one request can cost, each checked before the step it
protects: the body size while the body streams in (before any JSON decoding, chunked bodies
included), the item count right after decoding (before any item is validated), and the length
of every bag before it is hashed. Over a limit: HTTP 413. A worker decodes and scores at most
``max_in_flight`` requests at once, and gives the memory of a large one back afterwards.

``/metadata`` and ``/openapi.json`` publish names, never paths: the run's name, the artifact's
file name and data files' base names (``show_paths`` adds the full paths). At start-up
(:func:`load_checked`) the artifact's metadata is checked field by field and its bucket counts
against the graph's embedding tables, so a malformed artifact stops the server with one line
naming the artifact and the metadata field.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import re
import reprlib
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePath
from typing import IO, Any

import numpy as np
from fastapi import Body, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, create_model
from starlette.exceptions import HTTPException as StarletteHTTPException

import esmm
from esmm.errors import DataError, EsmmError, UsageError
from esmm.export import (
    FORMAT_VERSION,
    METADATA_KEY,
    Predictor,
    field_list,
    input_names,
    load_artifact,
    synthetic_columns,
)
from esmm.features import (
    HASH_VERSION,
    TRANSFORMS,
    AttentionSpec,
    FeatureSpec,
    FieldSpec,
    FieldStats,
)
from esmm.models.base import OUTPUT_NAMES

log = logging.getLogger(__name__)

DEFAULT_MAX_ITEMS = 10_000
DEFAULT_MAX_BAG_LEN = 10_000
DEFAULT_MAX_IN_FLIGHT = 4
# Without --max-body-bytes a request may carry 1 KiB per allowed item (a full Ali-CCP row with
# its bags is a few hundred bytes), and never less than 1 MiB.
BODY_BYTES_PER_ITEM = 1024
MIN_DEFAULT_BODY_BYTES = 1 << 20
ENDPOINTS = ("/predict", "/rank", "/health", "/metadata", "/metrics")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_F32_MAX = float(np.finfo(np.float32).max)
_JSON_TYPE = {dict: "object", list: "array", str: "string", int: "integer", float: "number",
              bool: "boolean", type(None): "null"}


# ----------------------------------------------------------------------------- request models


class Probabilities(BaseModel):
    """The model's three probabilities for one impression."""

    p_ctr: float = Field(description="P(click | impression)")
    p_cvr: float = Field(description="P(conversion | click, impression)")
    p_ctcvr: float = Field(description="P(click and conversion | impression) = p_ctr * p_cvr")


class PredictRequest(BaseModel):
    impressions: list[dict[str, Any]] = Field(
        description="Impressions to score: each maps every model field to its raw value "
                    "(an integer or string id, a list of ids for a bag field, a number for a "
                    "dense field). Keys that are not fields are ignored.")


class PredictResponse(BaseModel):
    predictions: list[Probabilities] = Field(description="One entry per impression, in order.")


# Three weights of at most this size times probabilities of at most 1 cannot overflow float64,
# so a score is always a finite JSON number.
_MAX_WEIGHT = 1e300


class ScoreWeights(BaseModel):
    """Weights of the ranking score: ``score = sum(weight * probability)``."""

    model_config = ConfigDict(extra="forbid")
    p_ctr: float = Field(0.0, allow_inf_nan=False, ge=-_MAX_WEIGHT, le=_MAX_WEIGHT)
    p_cvr: float = Field(0.0, allow_inf_nan=False, ge=-_MAX_WEIGHT, le=_MAX_WEIGHT)
    p_ctcvr: float = Field(0.0, allow_inf_nan=False, ge=-_MAX_WEIGHT, le=_MAX_WEIGHT)


class RankRequest(BaseModel):
    user: dict[str, Any] = Field(
        default_factory=dict,
        description="The user's fields, given once and shared by every candidate.")
    candidates: list[dict[str, Any]] = Field(
        description="Candidates: each maps the remaining fields (item, context) to raw values.")
    score: ScoreWeights | None = Field(
        None, description="Score weights over p_ctr / p_cvr / p_ctcvr (default: p_ctcvr 1.0).")
    top_k: int | None = Field(None, ge=1, description="Return only the best top_k candidates.")


def request_models(max_items: int) -> tuple[type[PredictRequest], type[RankRequest]]:
    """The request bodies of one server: the item lists carry ``max_length=max_items``.

    Pydantic compares a list's length with ``max_length`` before it validates any element, so
    an over-long list is refused at the cost of one ``len``; the limit also shows in the
    OpenAPI schema as ``maxItems``.
    """
    def limited(base: type[BaseModel], key: str) -> Any:
        doc = base.model_fields[key].description
        field = Field(max_length=max_items, description=doc)
        return create_model(base.__name__, __base__=base, __module__=__name__,
                            **{key: (list[dict[str, Any]], field)})

    return limited(PredictRequest, "impressions"), limited(RankRequest, "candidates")


class RankedCandidate(Probabilities):
    index: int = Field(description="Position of the candidate in the request.")
    score: float


class RankResponse(BaseModel):
    candidates: list[RankedCandidate] = Field(description="Best first (ties keep request order).")


class ErrorBody(BaseModel):
    error: str = Field(description="What is wrong, naming the field and the item.")
    field: str | None = Field(None, description="The offending field (or request key).")
    index: int | None = Field(None, description="Index of the offending item in its list.")


# ----------------------------------------------------------------------------- validation


class BadRequest(Exception):
    """A request the server refuses: answered with ``status`` and an :class:`ErrorBody`;
    ``limit`` names the limit (one of :data:`REFUSAL_LIMITS`) a 413 is about."""

    def __init__(self, message: str, field: str | None = None, index: int | None = None,
                 status: int = 422, limit: str | None = None) -> None:
        super().__init__(message)
        self.message, self.field, self.index, self.status = message, field, index, status
        self.limit = limit


# Error messages quote the offending value; reprlib bounds the cost and the length of that
# quote whatever the value's size or nesting depth.
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict = 2, 4, 4
_REPR.maxstring = _REPR.maxlong = _REPR.maxother = 40


def _short(v: Any) -> str:
    return _REPR.repr(v)


def _tname(v: Any) -> str:
    return _JSON_TYPE.get(type(v), type(v).__name__)


def _id_problem(v: Any) -> str | None:
    """Why ``v`` is not a valid raw id, or None. Ids: integers, integral numbers, strings, null."""
    if v is None:
        return None
    t = type(v)
    if t is int:
        if _INT64_MIN <= v <= _INT64_MAX:
            return None
        return f"id {_short(v)} is outside the 64-bit range"
    if t is str:
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            return "the id string is not valid UTF-8"
        return None
    if t is float:
        if math.isfinite(v) and v.is_integer() and _INT64_MIN <= v < 2.0**63:
            return None
        return f"expected an id (integer or string), got the number {_short(v)}"
    return f"expected an id (integer or string), got {_tname(v)}"


def _value_problem(f: FieldSpec, v: Any) -> str | None:
    """Why ``v`` is not a valid raw value of field ``f``, or None."""
    if f.numeric:
        return None if v is None and f.fill != "error" else _number_problem(v)
    if f.kind == "categorical":
        return _id_problem(v) or _id_type_problem(f, [v])
    if f.kind == "multi_categorical":
        if v is None:
            return None
        if type(v) is not list:
            return f"expected a list of ids (a bag), got {_tname(v)}"
        for j, x in enumerate(v):
            p = _id_problem(x) or _id_type_problem(f, [x])
            if p is not None:
                return f"bag element {j}: {p}"
        return None
    return _number_problem(v)


def _id_type_problem(f: FieldSpec, ids: list[Any]) -> str | None:
    """An id of the other type than training saw (``auto`` fields): it would hash elsewhere."""
    if f.dtype != "auto" or f.id_type is None:
        return None
    other = str if f.id_type == "int" else (int, float)
    v = next((v for v in ids if isinstance(v, other)), None)
    if v is None:
        return None
    want, got, noun = (("an integer", "a string", "integer") if f.id_type == "int" else
                       ("a string", "a number", "string"))
    return (f"expected {want} id, got {got} ({_short(v)}): the model was trained on "
            f"{noun} ids (`dtype: auto`) and the other type "
            "hashes to other buckets; send the training type, or train with `dtype: str` on "
            "the field so that both hash alike")


def _number_problem(v: Any) -> str | None:
    if type(v) not in (int, float):
        return f"expected a number, got {_tname(v)}"
    try:
        x = float(v)
    except OverflowError:
        return f"the number {_short(v)} is too large"
    if not math.isfinite(x) or abs(x) > _F32_MAX:
        return f"the number {_short(v)} is not finite as float32"
    return None


def _ids_ok(col: list[Any]) -> bool:
    """Fast, conservative check of a column of ids (False: look value by value)."""
    types = set(map(type, col))
    if not types <= {int, str, type(None)}:
        return False
    if int in types:
        ints = [v for v in col if type(v) is int]
        if min(ints) < _INT64_MIN or max(ints) > _INT64_MAX:
            return False
    if str in types:
        try:
            "".join(v for v in col if type(v) is str).encode("utf-8")
        except UnicodeEncodeError:
            return False
    return True


def _column_ok(f: FieldSpec, col: list[Any]) -> bool:
    if f.numeric:
        if f.fill != "error":
            col = [v for v in col if v is not None]
    elif f.kind == "categorical":
        return _ids_ok(col) and _id_type_problem(f, col) is None
    else:
        if not set(map(type, col)) <= {list, type(None)}:
            return False
        flat = [x for b in col if b is not None for x in b]
        return not flat or (_ids_ok(flat) and _id_type_problem(f, flat) is None)
    if not set(map(type, col)) <= {int, float}:
        return False
    try:
        a = np.asarray(col, dtype=np.float64)
    except OverflowError:
        return False
    return bool(np.all(np.abs(a) <= _F32_MAX))  # NaN and inf fail too


def _check_bags(f: FieldSpec, col: list[Any], where: str, max_bag_len: int) -> None:
    """Refuse (413) the first bag of ``col`` longer than ``max_bag_len``, before any hashing.

    ``where`` is ``impressions``/``candidates`` (``col`` holds one value per item) or
    ``user`` (``col`` holds the user's one value).
    """
    lengths = np.fromiter((len(b) if type(b) is list else 0 for b in col), dtype=np.int64,
                          count=len(col))
    over = np.flatnonzero(lengths > max_bag_len)
    if over.size:
        i = int(over[0])
        index = None if where == "user" else i
        at = f"user.{f.name}" if where == "user" else f"{where}[{i}].{f.name}"
        raise BadRequest(f"{at}: a bag of {int(lengths[i])} ids is over the limit of "
                         f"{max_bag_len} ids per bag (--max-bag-len)", f.name, index, status=413,
                         limit="max_bag_len")


def _column(f: FieldSpec, items: list[dict[str, Any]], where: str, max_bag_len: int
            ) -> list[Any]:
    """The raw values of field ``f`` over ``items``, validated (BadRequest names the item)."""
    name = f.name
    try:
        col = [it[name] for it in items]
    except KeyError:
        i = next(i for i, it in enumerate(items) if name not in it)
        raise BadRequest(f"{where}[{i}]: field {name!r} is missing", name, i) from None
    if f.kind == "multi_categorical":
        _check_bags(f, col, where, max_bag_len)
    if not _column_ok(f, col):
        for i, v in enumerate(col):
            p = _value_problem(f, v)
            if p is not None:
                raise BadRequest(f"{where}[{i}].{name}: {p}", name, i)
    return col


def _check_items(items: list[dict[str, Any]], where: str, max_items: int) -> None:
    if not items:
        raise BadRequest(f"{where}: the list is empty; give at least one item", where)
    if len(items) > max_items:
        raise BadRequest(f"{where}: {len(items)} items is over the limit of {max_items} per "
                         "request (--max-items)", where, status=413, limit="max_items")


# ----------------------------------------------------------------------------- limits


def default_max_body_bytes(max_items: int) -> int:
    """The body limit without ``--max-body-bytes``: 1 KiB per allowed item, at least 1 MiB."""
    return max(MIN_DEFAULT_BODY_BYTES, BODY_BYTES_PER_ITEM * max_items)


def _positive(option: str, value: Any) -> int:
    if type(value) is not int or value < 1:
        raise UsageError(f"{option}: expected an integer of at least 1, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may hold (over a limit: HTTP 413).

    Attributes:
        max_items: impressions (``/predict``) or candidates (``/rank``) per request.
        max_body_bytes: bytes of the request body, counted as they arrive; None: derived from
            ``max_items`` (:func:`default_max_body_bytes`).
        max_bag_len: ids in one bag (one bag field of one item, or of ``user``).
        max_in_flight: requests with a body that one worker decodes and scores at once; more
            wait, holding only their raw body, so a worker's memory is bounded by this many
            decoded requests of at most ``max_body_bytes`` each.
    """

    max_items: int = DEFAULT_MAX_ITEMS
    max_body_bytes: int | None = None
    max_bag_len: int = DEFAULT_MAX_BAG_LEN
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT

    def __post_init__(self) -> None:
        _positive("--max-items", self.max_items)
        _positive("--max-bag-len", self.max_bag_len)
        _positive("--max-in-flight", self.max_in_flight)
        if self.max_body_bytes is None:
            object.__setattr__(self, "max_body_bytes", default_max_body_bytes(self.max_items))
        _positive("--max-body-bytes", self.max_body_bytes)

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


class _BodyLimitMiddleware:
    """Plain ASGI middleware: reads the request body, refusing it (413) past ``max_bytes``, then
    lets at most ``max_in_flight`` requests with a body into the app at once.

    A declared ``Content-Length`` over the limit is refused before a byte of the body is read
    (so a client that sent ``Expect: 100-continue`` never sends it); otherwise the body is
    counted chunk by chunk as it streams in (``Transfer-Encoding: chunked`` has no length to
    trust) and reading stops at the first chunk past the limit. A 413 closes the connection,
    so the server does not go on reading what the client still sends. The body read is then
    replayed to the app, which therefore never holds more than ``max_bytes`` of raw body.

    The slots are taken after the body is read, so a slow client holds no slot; GET and HEAD
    requests (health checks, metrics) take none and are answered even when every slot is busy.
    """

    def __init__(self, app: Any, max_bytes: int, max_in_flight: int,
                 metrics: Metrics | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.slots = asyncio.Semaphore(max_in_flight)
        self.metrics = metrics if metrics is not None else Metrics()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(send, f"{declared} bytes")
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left: nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(send, f"more than {self.max_bytes} bytes")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        del chunks
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: only http.disconnect can come
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        if scope.get("method") in ("GET", "HEAD"):
            await self.app(scope, replay, send)
            return
        self.metrics.waiting.inc()
        try:
            await self.slots.acquire()
        finally:
            self.metrics.waiting.dec()
        self.metrics.in_flight.inc()
        try:
            await self.app(scope, replay, send)
        finally:
            self.metrics.in_flight.dec()
            self.slots.release()
        if len(body) >= _TRIM_AFTER_BYTES:
            _release_free_memory()

    async def _refuse(self, send: Any, got: str) -> None:
        self.metrics.refuse("max_body_bytes")
        msg = (f"body: the request body of {got} is over the limit of {self.max_bytes} bytes "
               "(--max-body-bytes)")
        data = json.dumps({"error": msg, "field": "body", "index": None}).encode()
        await send({"type": "http.response.start", "status": 413, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
            (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": data})


# A body this large decodes into hundreds of MB of short-lived Python objects and arrays.
_TRIM_AFTER_BYTES = 1 << 20


@functools.cache
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


def _release_free_memory() -> None:
    """Hand the C heap's free pages back to the system.

    glibc keeps memory freed by a large request (its mmap threshold grows after large frees,
    so later large blocks come from heaps it does not shrink): without this, a worker stays at
    its largest request's size. Measured by ``bench/serve.py --hostile``.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _content_length(scope: dict) -> int | None:
    """The declared body length, or None (chunked, or absent). The HTTP layer has already
    refused a malformed or duplicated header."""
    for key, value in scope.get("headers", ()):
        if key.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


# ----------------------------------------------------------------------------- metrics

# The limits whose refusals are counted (esmm_requests_refused_total{limit}); each is the name
# of its command-line option without dashes.
REFUSAL_LIMITS = ("max_body_bytes", "max_items", "max_bag_len")
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def _multiprocess_dir() -> str | None:
    """The folder prometheus_client's multiprocess mode writes to, or None (in-process values).

    Raises:
        EsmmError: the variable is set but prometheus_client was imported before it was, so
            this process would keep its values in memory where no other process reads them.
    """
    path = os.environ.get(MULTIPROC_ENV)
    if not path:
        return None
    from prometheus_client import values

    if not getattr(values.ValueClass, "_multiprocess", False):
        raise EsmmError(f"{MULTIPROC_ENV}={path}: set after prometheus_client was imported; set "
                        "it before the process starts")
    return path


class Metrics:
    """The server's Prometheus metrics, kept by ``prometheus_client``.

    With ``PROMETHEUS_MULTIPROC_DIR`` set (``esmm serve --workers N`` sets it for its workers),
    every worker writes its values to its own files in that folder and :meth:`render` merges
    every worker's files, so any worker answers ``/metrics`` with the whole server's counts.
    Without it, the values live in this process's own registry.

    Args:
        info: the labels of ``esmm_model_info`` (model, format, versions).
        started: Unix time the server started (default: now); all workers of one server
            publish the parent's.
    """

    def __init__(self, info: dict[str, str] | None = None, started: float | None = None
                 ) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        from prometheus_client.multiprocess import MultiProcessCollector

        self.registry = CollectorRegistry(auto_describe=True)
        self.multiprocess_dir = _multiprocess_dir()
        if self.multiprocess_dir is None:
            target: CollectorRegistry | None = self.registry
        else:
            # The values go to this process's files; the collector reads every process's.
            MultiProcessCollector(self.registry, path=self.multiprocess_dir)
            target = None
        self.requests = Counter("esmm_requests", "HTTP requests answered, by endpoint and "
                                "status.", ["endpoint", "status"], registry=target)
        self.duration = Histogram("esmm_request_duration_seconds", "Time to answer a request, "
                                  "by endpoint.", ["endpoint"], buckets=LATENCY_BUCKETS,
                                  registry=target)
        self.items = Counter("esmm_items_scored", "Impressions or candidates scored, by "
                             "endpoint.", ["endpoint"], registry=target)
        self.refused = Counter("esmm_requests_refused", "Requests refused with a 413, by the "
                               "limit they were over.", ["limit"], registry=target)
        # live*: a dead worker's value leaves the sum when it is marked dead
        self.in_flight = Gauge("esmm_requests_in_flight", "Requests being decoded and scored "
                               "(at most --max-in-flight per worker).", registry=target,
                               multiprocess_mode="livesum")
        self.waiting = Gauge("esmm_requests_waiting", "Requests whose body is read, waiting "
                             "for a scoring slot.", registry=target, multiprocess_mode="livesum")
        self.workers = Gauge("esmm_workers", "Worker processes serving.", registry=target,
                             multiprocess_mode="livesum")
        model_info = Gauge("esmm_model_info", "The artifact this server scores with.",
                           sorted(info or {}), registry=target, multiprocess_mode="livemax")
        start = Gauge("esmm_start_time_seconds", "Unix time the server started.",
                      registry=target, multiprocess_mode="max")
        for limit in REFUSAL_LIMITS:
            self.refused.labels(limit=limit)  # published as 0 before the first refusal
        self.workers.set(1)
        (model_info.labels(**info) if info else model_info).set(1)
        self.started = time.time() if started is None else started
        start.set(self.started)

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        """Count one answered request and its latency."""
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()
        self.duration.labels(endpoint=endpoint).observe(seconds)

    def scored(self, endpoint: str, n: int) -> None:
        self.items.labels(endpoint=endpoint).inc(n)

    def refuse(self, limit: str) -> None:
        """Count one request refused (413) for being over ``limit`` (one of REFUSAL_LIMITS)."""
        self.refused.labels(limit=limit).inc()

    def close(self) -> None:
        """Mark this process dead in the multiprocess folder (its live gauges leave the sums;
        its counts stay). Run when the app shuts down: uvicorn ends a single-process server by
        re-raising SIGTERM, so code after ``uvicorn.run`` never runs there."""
        if self.multiprocess_dir is not None:
            from prometheus_client.multiprocess import mark_process_dead

            mark_process_dead(os.getpid(), self.multiprocess_dir)

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition of every metric and its content type: OpenMetrics when ``accept``
        (the request's Accept header) asks for it, else the Prometheus text format."""
        from prometheus_client.exposition import choose_encoder

        encode, content_type = choose_encoder(accept or "")
        return encode(self.registry), content_type


class _MetricsMiddleware:
    """Plain ASGI middleware: counts every HTTP request by endpoint and status, and times it."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = [0]

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except BaseException:
            status[0] = status[0] or 500
            raise
        finally:
            # 0: the client left before an answer was due (nothing was sent, nothing to count)
            if status[0]:
                path = scope.get("path", "")
                ep = path if path in ENDPOINTS else "other"
                self.metrics.observe(ep, status[0], time.perf_counter() - t0)


# ----------------------------------------------------------------------------- what is published

# An absolute path inside free text (POSIX, home-relative or a Windows drive), not preceded by a
# word character (so "a/b" inside a word is left alone).
_ABS_PATH = re.compile(r"(?<![\w.~-])(?:[A-Za-z]:[\\/]|~?/)[^\s'\",;]*")


def _base_name(path: str) -> str:
    parts = [p for p in re.split(r"[\\/]+", path) if p]
    return parts[-1] if parts else path


def run_name(run: Any) -> str | None:
    """The name of the run an artifact came from: its folder's name (``runs/esmm`` and
    ``runs/esmm/checkpoints/best.pt`` are both ``esmm``)."""
    if not isinstance(run, str) or not run:
        return None
    p = PurePath(run.replace("\\", "/"))
    if p.suffix and p.parent.name == "checkpoints" and p.parent.parent.name:
        return p.parent.parent.name
    return p.name or run


def _known_paths(predictor: Predictor) -> list[str]:
    """Paths the metadata may quote (relative ones too): the run, the data files, the artifact;
    longest first, so a path is replaced before any shorter path inside it."""
    meta = predictor.metadata
    config = meta.get("config")
    data = config.get("data") if isinstance(config, dict) else None
    metrics = meta.get("metrics")
    found = [meta.get("run"), str(predictor.path), str(predictor.path.resolve())]
    found += list(data.values()) if isinstance(data, dict) else []
    found += [metrics.get("data")] if isinstance(metrics, dict) else []
    paths = {p for p in found if isinstance(p, str) and _base_name(p) != p}
    return sorted(paths, key=len, reverse=True)


def hide_paths(value: Any, known: list[str]) -> Any:
    """``value`` (JSON-like) with every path in its strings cut to its base name: each path of
    ``known`` wherever it occurs, then anything that looks like an absolute path."""
    if isinstance(value, dict):
        return {k: hide_paths(v, known) for k, v in value.items()}
    if isinstance(value, list):
        return [hide_paths(v, known) for v in value]
    if not isinstance(value, str):
        return value
    for path in known:
        value = value.replace(path, _base_name(path))
    return _ABS_PATH.sub(lambda m: _base_name(m.group(0)), value)


def public_metadata(predictor: Predictor, limits: Limits, show_paths: bool = False
                    ) -> dict[str, Any]:
    """What ``GET /metadata`` answers: the model, its fields, the training metrics it reached,
    versions, the parity report and the limits. Names, not paths (the run's folder name, the
    artifact's file name, base names of data files), unless ``show_paths``, which adds
    ``paths``: the artifact, the run and the data files as the artifact records them."""
    meta = predictor.metadata
    out: dict[str, Any] = {
        "model": predictor.model_name,
        "format": predictor.format,
        "artifact": predictor.path.name,
        "run": run_name(meta.get("run")),
        "fields": field_list(predictor.spec),
        "metrics": meta.get("metrics"),
        "esmm_version": meta.get("esmm_version"),
        "server_version": esmm.__version__,
        "exported_at": meta.get("exported_at"),
        "checkpoint_step": meta.get("checkpoint_step"),
        "parity": meta.get("parity"),
        **limits.to_dict(),
    }
    if show_paths:
        config = meta.get("config")
        data = config.get("data") if isinstance(config, dict) else None
        out["paths"] = {
            "artifact": str(predictor.path.resolve()),
            "run": meta.get("run"),
            "data": {k: data.get(k) for k in ("train", "eval", "test")}
            if isinstance(data, dict) else None,
        }
        return out
    known = _known_paths(predictor)
    out["metrics"] = hide_paths(out["metrics"], known)
    out["parity"] = hide_paths(out["parity"], known)
    return out


# ----------------------------------------------------------------------------- the app


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(body, separators=(",", ":")), status_code=status,
                    media_type="application/json", headers=headers)


def _examples(predictor: Predictor) -> tuple[dict[str, Any], dict[str, Any]]:
    spec = predictor.spec
    cols = synthetic_columns(spec, 2, seed=1)
    rows = [{f.name: cols[f.name][i] for f in spec.fields} for i in range(2)]
    for r in rows:  # readable ids
        for f in spec.fields:
            if f.numeric:
                r[f.name] = round(float(r[f.name]), 3) if r[f.name] is not None else None
            elif f.kind == "categorical" and f.id_type != "str":
                r[f.name] = int(r[f.name]) % 1000
    user_names = {f.name for f in spec.sparse[::2]}
    user = {k: v for k, v in rows[0].items() if k in user_names}
    cands = [{k: v for k, v in r.items() if k not in user_names} for r in rows]
    return ({"impressions": rows},
            {"user": user, "candidates": cands, "score": {"p_ctcvr": 1.0}, "top_k": 2})


_BOUNDS = {"less_than_equal": ("le", "less than or equal to"),
           "greater_than_equal": ("ge", "greater than or equal to"),
           "less_than": ("lt", "less than"), "greater_than": ("gt", "greater than")}


def _short_bound(kind: str, ctx: dict[str, Any]) -> str | None:
    """pydantic writes a float bound such as 1e300 with all its digits; ``%g`` keeps the
    answer one short line."""
    key, words = _BOUNDS.get(kind, (None, None))
    value = ctx.get(key) if key else None
    if not isinstance(value, float):
        return None
    return f"Input should be {words} {value:g}"


def _validation_error(exc: RequestValidationError, limits: Limits, metrics: Metrics
                      ) -> Response:
    """The 4xx answer to a body that does not fit the request model: the first problem in
    ``error`` (``where: what``), all of them in ``detail``; an item list over ``max_items``
    (pydantic refuses it by its length alone) is a 413."""
    details = []
    field = index = None
    for e in exc.errors():
        loc = [p for p in e.get("loc", ()) if p != "body"]
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
        msg = str(e.get("msg"))
        kind = str(e.get("type"))
        bound = _short_bound(kind, e.get("ctx") or {})
        if bound is not None:
            msg = bound
        if kind == "json_invalid":
            reason = (e.get("ctx") or {}).get("error")
            msg = f"the body is not valid JSON ({reason})" if reason else "invalid JSON"
            where, loc = "", []
        elif kind == "too_long" and loc in (["impressions"], ["candidates"]):
            got = (e.get("ctx") or {}).get("actual_length", "too many")
            metrics.refuse("max_items")
            return _json({"error": f"{loc[0]}: {got} items is over the limit of "
                          f"{limits.max_items} per request (--max-items)",
                          "field": loc[0], "index": None}, 413)
        details.append({"loc": [str(p) for p in loc], "msg": msg, "type": kind,
                        "where": where or "body"})
        if field is None and loc:
            field = str(loc[-1] if isinstance(loc[-1], str) else loc[0])
            index = next((p for p in loc if isinstance(p, int)), None)
    first = details[0] if details else {"where": "body", "msg": "invalid request"}
    return _json({"error": f"{first['where']}: {first['msg']}", "field": field,
                  "index": index, "detail": details}, 422)


def _add_error_handlers(app: FastAPI, limits: Limits, metrics: Metrics) -> None:
    @app.exception_handler(BadRequest)
    async def _bad(request: Request, exc: BadRequest) -> Response:
        if exc.limit is not None:
            metrics.refuse(exc.limit)
        return _json({"error": exc.message, "field": exc.field, "index": exc.index}, exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        return _validation_error(exc, limits, metrics)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        cause = exc.__cause__
        if exc.status_code == 400 and cause is not None:
            # JSON the decoder refuses other than by syntax: nesting past Python's recursion
            # limit, an integer of more digits than Python converts
            return _json({"error": f"body: the body cannot be decoded ({_one_line(cause)})",
                          "field": "body", "index": None}, 400)
        return _json({"error": str(exc.detail), "field": None, "index": None}, exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> Response:
        log.exception("internal error on %s", request.url.path)
        return _json({"error": f"internal error: {type(exc).__name__}", "field": None,
                      "index": None}, 500)


class _Scorer:
    """The work behind ``/predict`` and ``/rank``: validate, encode once, run the graph once."""

    def __init__(self, predictor: Predictor, limits: Limits, metrics: Metrics) -> None:
        self.predictor = predictor
        self.spec = predictor.spec
        self.limits = limits
        self.metrics = metrics

    def _score(self, columns: dict[str, list[Any]], user: dict[str, Any], n: int
               ) -> dict[str, Any]:
        try:
            return self.predictor.predict_columns(columns, user, n=n)
        except DataError as e:
            raise BadRequest(str(e)) from None

    def predict(self, items: list[dict[str, Any]]) -> Response:
        _check_items(items, "impressions", self.limits.max_items)
        bag = self.limits.max_bag_len
        cols = {f.name: _column(f, items, "impressions", bag) for f in self.spec.fields}
        p = self._score(cols, {}, len(items))
        self.metrics.scored("/predict", len(items))
        a, b, c = (p[k].tolist() for k in OUTPUT_NAMES)
        return _json({"predictions": [{"p_ctr": x, "p_cvr": y, "p_ctcvr": z}
                                      for x, y, z in zip(a, b, c, strict=True)]})

    def _user(self, given: dict[str, Any], items: list[dict[str, Any]]) -> dict[str, Any]:
        """The user's fields, validated; a field may not also be given by a candidate."""
        user: dict[str, Any] = {}
        for f in self.spec.fields:
            if f.name not in given:
                continue
            v = given[f.name]
            if f.kind == "multi_categorical":
                _check_bags(f, [v], "user", self.limits.max_bag_len)
            p = _value_problem(f, v)
            if p is not None:
                raise BadRequest(f"user.{f.name}: {p}", f.name)
            i = next((i for i, it in enumerate(items) if f.name in it), None)
            if i is not None:
                raise BadRequest(f"candidates[{i}].{f.name}: the field is also given in "
                                 "`user`; give it once", f.name, i)
            user[f.name] = v
        return user

    def rank(self, req: RankRequest) -> Response:
        items = req.candidates
        _check_items(items, "candidates", self.limits.max_items)
        user = self._user(req.user, items)
        bag = self.limits.max_bag_len
        cols = {f.name: _column(f, items, "candidates", bag) for f in self.spec.fields
                if f.name not in user}
        p = self._score(cols, user, len(items))
        w = req.score or ScoreWeights(p_ctcvr=1.0)
        s = w.p_ctr * p["p_ctr"] + w.p_cvr * p["p_cvr"] + w.p_ctcvr * p["p_ctcvr"]
        order = np.argsort(-s, kind="stable")
        if req.top_k is not None:
            order = order[: req.top_k]
        self.metrics.scored("/rank", len(items))
        s_l, a, b, c = (x[order].tolist() for x in (s, p["p_ctr"], p["p_cvr"], p["p_ctcvr"]))
        return _json({"candidates": [
            {"index": i, "score": si, "p_ctr": x, "p_cvr": y, "p_ctcvr": z}
            for i, si, x, y, z in zip(order.tolist(), s_l, a, b, c, strict=True)]})


_ERRORS: dict[int | str, dict[str, Any]] = {
    422: {"model": ErrorBody, "description": "Invalid request (field and index named)"},
    413: {"model": ErrorBody, "description": "Over a limit: --max-body-bytes, --max-items or "
                                             "--max-bag-len (the limit is named)"},
}


def _add_scoring_routes(app: FastAPI, scorer: _Scorer) -> None:
    predict_example, rank_example = _examples(scorer.predictor)
    predict_model, rank_model = request_models(scorer.limits.max_items)

    def predict(req: Any = Body(
            ..., openapi_examples={"two impressions": {"value": predict_example}})) -> Response:
        """p_ctr, p_cvr and p_ctcvr of every impression, in request order."""
        return scorer.predict(req.impressions)

    def rank(req: Any = Body(
            ..., openapi_examples={"user and two candidates": {"value": rank_example}})
             ) -> Response:
        """Candidates sorted by score (default p_ctcvr), best first; the user's fields are
        encoded once and shared by every candidate."""
        return scorer.rank(req)

    # The request models are built per server (their maxItems is this server's limit), so the
    # annotations must name the objects before FastAPI reads them, not module-level names.
    predict.__annotations__["req"] = predict_model
    rank.__annotations__["req"] = rank_model
    app.post("/predict", response_model=PredictResponse, responses=_ERRORS,
             summary="Score impressions")(predict)
    app.post("/rank", response_model=RankResponse, responses=_ERRORS,
             summary="Rank one user's candidates")(rank)


def create_app(predictor: Predictor, limits: Limits | None = None, *,
               show_paths: bool = False, started: float | None = None) -> FastAPI:
    """The FastAPI application serving ``predictor`` (see the module docstring).

    Args:
        limits: what one request may hold (default :class:`Limits`()).
        show_paths: publish the artifact's, run's and data's paths in ``/metadata`` and the
            OpenAPI description (default: names only).
        started: the Unix time ``esmm_start_time_seconds`` publishes (default: now).
    """
    limits = limits or Limits()
    meta = predictor.metadata
    spec = predictor.spec
    info = {"model": predictor.model_name, "format": predictor.format,
            "esmm_version": str(meta.get("esmm_version")), "server_version": esmm.__version__}
    metrics = Metrics(info, started)
    source = meta.get("run") if show_paths else run_name(meta.get("run"))
    app = FastAPI(
        title="esmm scoring server",
        version=esmm.__version__,
        description=f"Scores impressions with the `{predictor.model_name}` model exported from "
                    f"the run `{source}` ({predictor.format}). Fields: "
                    + ", ".join(f"`{f.name}` ({f.kind})" for f in spec.fields),
    )
    app.add_middleware(_BodyLimitMiddleware, max_bytes=limits.max_body_bytes,
                       max_in_flight=limits.max_in_flight, metrics=metrics)
    app.add_middleware(_MetricsMiddleware, metrics=metrics)  # outermost: counts 413s too
    app.state.predictor = predictor
    app.state.metrics = metrics
    app.state.limits = limits
    _add_error_handlers(app, limits, metrics)
    app.router.on_shutdown.append(metrics.close)
    _add_scoring_routes(app, _Scorer(predictor, limits, metrics))
    published = public_metadata(predictor, limits, show_paths)

    @app.get("/health", summary="Liveness")
    def health() -> dict[str, Any]:
        return {"status": "ok", "model": predictor.model_name, "format": predictor.format}

    @app.get("/metadata", summary="The model, its fields, training metrics and limits")
    def metadata() -> dict[str, Any]:
        return published

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    def prometheus(request: Request) -> Response:
        body, content_type = metrics.render(request.headers.get("accept"))
        return Response(body, headers={"content-type": content_type})

    return app


# ----------------------------------------------------------------------------- the artifact

_MAX_METADATA_BYTES = 64 << 20
_FIELD_KEYS = ("name", "kind", "buckets", "dim", "pooling")
# dtype: absent in artifacts of esmm 0.2 (auto); attention: bags with `pooling: attention`
_OPTIONAL_FIELD_KEYS = ("dtype", "attention")
_DTYPES = ("auto", "int", "str")
# The state fitted on the training split (absent in artifacts of esmm 0.2 and in fields
# without transforms).
_FITTED_KEYS = ("transform", "fill", "boundaries", "quantiles", "stats", "id_type")
_STATS_KEYS = ("count", "missing", "mean", "std", "min", "max")
_KINDS = ("categorical", "multi_categorical", "dense")
_POOLINGS = ("sum", "mean", "attention")
_ONNX_METADATA_PROPS = 14  # ModelProto.metadata_props, a repeated StringStringEntryProto


def _one_line(e: BaseException) -> str:
    """An exception as one short line. TorchScript puts the graph's traceback before the error
    itself, which is then the last line."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = lines[-1] if len(lines) > 1 and "Traceback" in str(e) else " ".join(lines)
    return f"{type(e).__name__}: {text[:300]}"


@contextlib.contextmanager
def _runtime_log_to_debug(predictor: Predictor) -> Iterator[None]:
    """Route onnxruntime's own log lines to this module's debug log while the graph is probed:
    a failing probe is reported once, by the error it raises, not also on stderr."""
    if predictor.format != "onnx":
        yield
        return
    import onnxruntime as ort

    ort.set_default_logger_callback(
        lambda severity, category, logid, where, msg: log.debug("onnxruntime: %s", msg), 3)
    try:
        yield
    finally:
        ort.set_default_logger_callback(None)


def _varint(fh: IO[bytes]) -> int:
    value = shift = 0
    while shift < 64:
        b = fh.read(1)
        if not b:
            raise EOFError("the file ends inside a field")
        value |= (b[0] & 0x7F) << shift
        if b[0] < 0x80:
            return value
        shift += 7
    raise ValueError("a malformed varint")


def _proto_strings(fh: IO[bytes], end: int, wanted: int) -> list[bytes]:
    """The length-delimited values of field number ``wanted`` among the top-level protobuf
    fields in ``fh`` up to byte ``end``; every other field is skipped by seeking past it."""
    found = []
    while fh.tell() < end:
        tag = _varint(fh)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            _varint(fh)
        elif wire in (1, 5):
            fh.seek(8 if wire == 1 else 4, os.SEEK_CUR)
        elif wire == 2:
            size = _varint(fh)
            if fh.tell() + size > end:
                raise EOFError("a field runs past the end of the file")
            if number == wanted and size <= _MAX_METADATA_BYTES:
                found.append(fh.read(size))
            else:
                fh.seek(size, os.SEEK_CUR)
        else:
            raise ValueError(f"protobuf wire type {wire} at byte {fh.tell()}")
    return found


def _onnx_metadata(fh: IO[bytes]) -> bytes | None:
    """The ``esmm.json`` entry of an ONNX model's metadata_props, without parsing its graph."""
    import io

    end = fh.seek(0, os.SEEK_END)
    fh.seek(0)
    value = None
    for entry in _proto_strings(fh, end, _ONNX_METADATA_PROPS):
        buf = io.BytesIO(entry)
        key = _proto_strings(buf, len(entry), 1)
        if key and key[-1] == METADATA_KEY.encode():
            buf.seek(0)
            values = _proto_strings(buf, len(entry), 2)
            value = values[-1] if values else b""
    return value


def _torchscript_metadata(fh: IO[bytes]) -> bytes | None:
    """The ``extra/esmm.json`` member of a TorchScript zip archive."""
    with zipfile.ZipFile(fh) as z:
        for info in z.infolist():
            if info.filename.split("/", 1)[-1] == f"extra/{METADATA_KEY}":
                if info.file_size > _MAX_METADATA_BYTES:
                    raise ValueError(f"{METADATA_KEY} holds {info.file_size} bytes")
                return z.read(info)
    return None


def read_artifact_metadata(path: str | os.PathLike) -> Any:
    """The esmm metadata of an artifact file, decoded but not checked, read without loading the
    graph: a member of the TorchScript zip, or an entry of the ONNX model's metadata_props."""
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            zipped = fh.read(4) == b"PK\x03\x04"
            raw = _torchscript_metadata(fh) if zipped else _onnx_metadata(fh)
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
        raise DataError(f"{p}: cannot read as an esmm artifact (TorchScript or ONNX): "
                        f"{_one_line(e)}") from None
    if raw is None:
        raise DataError(f"{p}: no esmm metadata ({METADATA_KEY}) in the file; write the "
                        "artifact with `esmm export`")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise DataError(f"{p}: metadata {METADATA_KEY} is not valid JSON ({_one_line(e)})"
                        ) from None


class _BadMetadata(Exception):
    def __init__(self, key: str, problem: str) -> None:
        super().__init__(problem)
        self.key, self.problem = key, problem


def _int_in(v: Any, key: str, lo: int, hi: int = 2**63 - 1) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise _BadMetadata(key, f"expected an integer from {lo} to {hi}, got {_short(v)}")
    return v


def _one_of(v: Any, key: str, allowed: tuple[str, ...]) -> str:
    if not isinstance(v, str) or v not in allowed:
        raise _BadMetadata(key, f"expected one of {list(allowed)}, got {_short(v)}")
    return v


def _check_field(f: Any, key: str, seen: set[str]) -> FieldSpec:
    if not isinstance(f, dict):
        raise _BadMetadata(key, f"expected an object, got {_tname(f)}")
    missing = [k for k in _FIELD_KEYS if k not in f]
    if missing:
        raise _BadMetadata(f"{key}.{missing[0]}", "missing")
    extra = sorted(set(f) - set(_FIELD_KEYS) - set(_OPTIONAL_FIELD_KEYS) - set(_FITTED_KEYS))
    if extra:
        raise _BadMetadata(f"{key}.{extra[0]}", "unknown key (expected "
                           f"{list(_FIELD_KEYS + _OPTIONAL_FIELD_KEYS + _FITTED_KEYS)})")
    name = f["name"]
    if not isinstance(name, str) or not name or name in seen:
        what = "a second field" if name in seen else _short(name)
        raise _BadMetadata(f"{key}.name", f"expected a new, non-empty field name, got {what}")
    seen.add(name)
    kind = _one_of(f["kind"], f"{key}.kind", _KINDS)
    pooling = _one_of(f["pooling"], f"{key}.pooling", _POOLINGS)
    dim = _int_in(f["dim"], f"{key}.dim", 1, 1 << 20)
    buckets = _int_in(f["buckets"], f"{key}.buckets", 0 if kind == "dense" else 1)
    dtype = _one_of(f.get("dtype", "auto"), f"{key}.dtype", _DTYPES)
    attention = _check_attention(f.get("attention"), f"{key}.attention", pooling)
    return FieldSpec(name, kind, buckets, dim, pooling, dtype=dtype, attention=attention,
                     **_check_fitted(f, key, kind, buckets))


def _number(v: Any, key: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise _BadMetadata(key, f"expected a finite number, got {_short(v)}")
    return float(v)


def _check_fitted(f: dict[str, Any], key: str, kind: str, buckets: int) -> dict[str, Any]:
    """A field's transform and fitted state, complete for its transform (an encoder must never
    meet a transform without its statistics)."""
    transform = _one_of(f.get("transform", "none"), f"{key}.transform", TRANSFORMS)
    numeric = kind == "dense" or transform == "bucketize"
    if transform != "none" and kind != ("categorical" if transform == "bucketize" else "dense"):
        raise _BadMetadata(f"{key}.transform", f"{transform!r} does not go with kind {kind!r}")
    out: dict[str, Any] = {"transform": transform}
    fill = f.get("fill", "error")
    if fill != "error":
        if not numeric:
            raise _BadMetadata(f"{key}.fill", f"applies to dense fields, not kind {kind!r}")
        out["fill"] = _number(fill, f"{key}.fill")
    id_type = f.get("id_type")
    if id_type is not None:
        out["id_type"] = _one_of(id_type, f"{key}.id_type", ("int", "str"))
    if f.get("quantiles") is not None:
        out["quantiles"] = _int_in(f["quantiles"], f"{key}.quantiles", 2)
    stats = f.get("stats")
    if stats is not None or transform in ("zscore", "minmax"):
        if not isinstance(stats, dict) or sorted(stats) != sorted(_STATS_KEYS):
            raise _BadMetadata(f"{key}.stats", f"expected an object with keys "
                               f"{list(_STATS_KEYS)}, got {_short(stats)}")
        nums = {k: _number(stats[k], f"{key}.stats.{k}") for k in _STATS_KEYS}
        out["stats"] = FieldStats(**nums | {"count": _int_in(stats["count"], f"{key}.stats.count",
                                                             1),
                                            "missing": _int_in(stats["missing"],
                                                               f"{key}.stats.missing", 0)})
    if transform == "bucketize":
        b = f.get("boundaries")
        if (not isinstance(b, list) or len(b) != buckets - 1
                or not all(y > x for x, y in zip(b, b[1:], strict=False))):
            raise _BadMetadata(f"{key}.boundaries", f"expected {buckets - 1} ascending numbers "
                               f"(one fewer than buckets), got {_short(b)}")
        out["boundaries"] = tuple(_number(x, f"{key}.boundaries") for x in b)
    return out


def _check_attention(a: Any, key: str, pooling: str) -> AttentionSpec | None:
    """The attention of a field's metadata: present exactly when its pooling is attention.
    (The graph holds the unit itself; the spec names the query for /metadata.)"""
    if (a is None) != (pooling != "attention"):
        raise _BadMetadata(key, "expected an object for `pooling: attention` and nothing "
                           f"otherwise, got {_short(a)} with pooling {pooling!r}")
    if a is None:
        return None
    if not isinstance(a, dict) or sorted(a) != ["chunk", "hidden", "query", "weights"]:
        raise _BadMetadata(key, "expected an object with keys chunk, hidden, query and "
                           f"weights, got {_short(a)}")
    if not isinstance(a["query"], str) or not a["query"]:
        raise _BadMetadata(f"{key}.query", f"expected a field name, got {_short(a['query'])}")
    if not isinstance(a["hidden"], list) or not a["hidden"]:
        raise _BadMetadata(f"{key}.hidden", f"expected a list of widths, got "
                           f"{_short(a['hidden'])}")
    hidden = tuple(_int_in(h, f"{key}.hidden", 1, 1 << 20) for h in a["hidden"])
    weights = _one_of(a["weights"], f"{key}.weights", ("none", "softmax"))
    return AttentionSpec(a["query"], hidden, weights, _int_in(a["chunk"], f"{key}.chunk", 1))


def _check_spec(spec: Any) -> FeatureSpec:
    if spec is None:
        raise _BadMetadata("feature_spec", "missing: without it the inputs cannot be hashed")
    if not isinstance(spec, dict):
        raise _BadMetadata("feature_spec", f"expected an object, got {_tname(spec)}")
    extra = sorted(set(spec) - {"fields", "hash_version"})
    if extra:
        raise _BadMetadata(f"feature_spec.{extra[0]}", "unknown key (expected fields, "
                           "hash_version)")
    version = spec.get("hash_version", HASH_VERSION)
    if version != HASH_VERSION:
        raise _BadMetadata("feature_spec.hash_version", f"{_short(version)} is not this esmm's "
                           f"{HASH_VERSION!r}: ids would land in other buckets than in training")
    fields = spec.get("fields")
    if not isinstance(fields, list) or not fields:
        raise _BadMetadata("feature_spec.fields", "expected a non-empty list of fields, got "
                           f"{_short(fields)}")
    seen: set[str] = set()
    return FeatureSpec(tuple(_check_field(f, f"feature_spec.fields[{i}]", seen)
                             for i, f in enumerate(fields)), version)


def _check_top(meta: dict[str, Any]) -> None:
    version = meta.get("format_version")
    _int_in(version, "format_version", 1)
    if version > FORMAT_VERSION:
        raise _BadMetadata("format_version", f"{version} is newer than this esmm supports "
                           f"({FORMAT_VERSION}); upgrade esmm")
    for key in ("model", "esmm_version", "exported_at", "run"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise _BadMetadata(key, f"expected a string, got {_tname(meta[key])}")
    for key in ("metrics", "parity", "config"):
        if meta.get(key) is not None and not isinstance(meta[key], dict):
            raise _BadMetadata(key, f"expected an object, got {_tname(meta[key])}")
    if meta.get("checkpoint_step") is not None:
        _int_in(meta["checkpoint_step"], "checkpoint_step", 0)


def check_metadata(meta: Any, artifact: str) -> FeatureSpec:
    """Check an artifact's metadata field by field; returns its feature spec.

    Raises:
        DataError naming ``artifact`` and the first malformed field (dotted, e.g.
        ``feature_spec.fields[3].buckets``), what it holds and what was expected.
    """
    if not isinstance(meta, dict):
        raise DataError(f"{artifact}: the esmm metadata is {_tname(meta)}, expected an object")
    try:
        _check_top(meta)
        spec = _check_spec(meta.get("feature_spec"))
        expected = input_names(spec)
        if meta.get("inputs") != expected:
            raise _BadMetadata("inputs", f"{_short(meta.get('inputs'))} does not match "
                               f"feature_spec (expected {_short(expected)})")
        if meta.get("outputs", list(OUTPUT_NAMES)) != list(OUTPUT_NAMES):
            raise _BadMetadata("outputs", f"expected {list(OUTPUT_NAMES)}, got "
                               f"{_short(meta.get('outputs'))}")
    except _BadMetadata as e:
        raise DataError(f"{artifact}: metadata field {e.key}: {e.problem}") from None
    return spec


def _probe_inputs(spec: FeatureSpec) -> dict[str, np.ndarray]:
    """One row of graph inputs, every bucket id 0 and every bag one id long."""
    inputs: dict[str, np.ndarray] = {}
    for f in spec.sparse:
        if f.kind == "categorical":
            inputs[f"ids__{f.name}"] = np.zeros(1, dtype=np.int64)
        else:
            inputs[f"values__{f.name}"] = np.zeros(1, dtype=np.int64)
            inputs[f"offsets__{f.name}"] = np.array([0, 1], dtype=np.int64)
    if spec.dense:
        inputs["dense"] = np.zeros((1, len(spec.dense)), dtype=np.float32)
    inputs["user_index"] = np.zeros(1, dtype=np.int64)
    inputs["user_side"] = np.zeros(len(spec.sparse), dtype=np.int64)
    return inputs


def probe_tables(predictor: Predictor, artifact: str) -> None:
    """Check the metadata's bucket counts against the graph: each sparse field's highest bucket
    id (buckets - 1) is looked up once, so a table with fewer rows than the metadata claims
    fails here, naming the field, rather than on the first request whose id hashes that high.
    """
    spec = predictor.spec
    base = _probe_inputs(spec)
    try:
        predictor.run(base)
    except Exception as e:  # noqa: BLE001 - any runtime failure means graph and metadata differ
        raise DataError(f"{artifact}: the graph does not run on the inputs its metadata "
                        f"describes ({_one_line(e)})") from None
    for f in spec.sparse:
        key = f"ids__{f.name}" if f.kind == "categorical" else f"values__{f.name}"
        try:
            predictor.run(base | {key: np.array([f.buckets - 1], dtype=np.int64)})
        except Exception as e:  # noqa: BLE001
            j = spec.fields.index(f)
            raise DataError(f"{artifact}: metadata field feature_spec.fields[{j}].buckets: "
                            f"{f.buckets} buckets for field {f.name!r}, but bucket "
                            f"{f.buckets - 1} is not in the graph's table ({_one_line(e)})"
                            ) from None


def _warm_up(predictor: Predictor, artifact: str) -> None:
    """A few calls at several sizes, so the first requests do not pay for graph preparation."""
    try:
        for n in (1, 16, 256):
            cols = synthetic_columns(predictor.spec, n, seed=n)
            predictor.predict_columns(cols)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{artifact}: the graph fails on synthetic rows of its fields "
                        f"({_one_line(e)})") from None


def load_checked(path: str | os.PathLike, threads: int | None = None) -> Predictor:
    """Load an artifact for serving, or refuse it with one line naming it and what is wrong.

    The metadata is checked (:func:`check_metadata`) before the graph is loaded, then the
    bucket counts against the graph (:func:`probe_tables`), then the graph is warmed up.
    """
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{p}: no such artifact file; write one with `esmm export`")
    check_metadata(read_artifact_metadata(p), str(p))
    try:
        predictor = load_artifact(p, threads=threads)
    except EsmmError:
        raise
    except Exception as e:  # noqa: BLE001 - the loader's own checks are the ones above
        raise DataError(f"{p}: cannot load the artifact ({_one_line(e)})") from None
    with _runtime_log_to_debug(predictor):
        probe_tables(predictor, str(p))
        _warm_up(predictor, str(p))
    return predictor


# ----------------------------------------------------------------------------- running

_ENV_PATH = "ESMM_SERVE_ARTIFACT"
_ENV_LIMITS = "ESMM_SERVE_LIMITS"
_ENV_SHOW_PATHS = "ESMM_SERVE_SHOW_PATHS"
_ENV_THREADS = "ESMM_SERVE_THREADS"


_ENV_STARTED = "ESMM_SERVE_STARTED"
_REAP_EVERY_S = 1.0


def app_from_env() -> FastAPI:
    """App factory for uvicorn worker processes (reads the artifact path from the environment)."""
    predictor = load_checked(os.environ[_ENV_PATH], threads=int(os.environ[_ENV_THREADS]))
    limits = Limits(**json.loads(os.environ[_ENV_LIMITS]))
    return create_app(predictor, limits, show_paths=os.environ[_ENV_SHOW_PATHS] == "1",
                      started=float(os.environ[_ENV_STARTED]))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


class _DeadWorkerReaper:
    """Marks the multiprocess files of every process that has exited dead
    (``prometheus_client.multiprocess.mark_process_dead``), so the ``live*`` gauges
    (``esmm_workers``, ``esmm_requests_in_flight``) drop a worker that uvicorn replaced, stopped
    or that was killed; its counters stay, as counters must. Sweeps once at start (a folder
    the operator reuses may hold an earlier server's files), then every ``interval`` seconds
    in a thread, and once more at :meth:`stop`.
    """

    def __init__(self, path: str, interval: float = _REAP_EVERY_S) -> None:
        self.path = path
        self.interval = interval
        self.marked: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="esmm-metrics-reaper",
                                        daemon=True)

    def pids(self) -> set[int]:
        """The processes with files in the folder (prometheus_client names them
        ``<kind>_<pid>.db``)."""
        found = set()
        for name in os.listdir(self.path):
            stem, _, tail = name.rpartition("_")
            if stem and tail.endswith(".db") and tail[:-3].isdigit():
                found.add(int(tail[:-3]))
        return found

    def sweep(self, also: tuple[int, ...] = ()) -> None:
        """Mark every exited process (and the pids in ``also``) dead, each once."""
        from prometheus_client.multiprocess import mark_process_dead

        for pid in sorted(self.pids() - self.marked):
            if pid in also or (pid != os.getpid() and not _pid_alive(pid)):
                mark_process_dead(pid, self.path)
                self.marked.add(pid)
                log.debug("metrics: process %d marked dead", pid)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sweep()
            except OSError as e:  # the folder removed under us: nothing left to mark
                log.warning("%s=%s: %s", MULTIPROC_ENV, self.path, e)
                return

    def start(self) -> None:
        self.sweep()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        with contextlib.suppress(OSError):
            self.sweep(also=(os.getpid(),))


def check_metrics_env() -> str | None:
    """Check the folder an operator gave in PROMETHEUS_MULTIPROC_DIR, if any (UsageError, exit
    2, when it is unusable); returns it. Called before the artifact is loaded, to fail fast."""
    path = os.environ.get(MULTIPROC_ENV)
    if not path:
        return None
    p = Path(path)
    if not p.is_dir():
        raise UsageError(f"{MULTIPROC_ENV}={path}: not a folder; create it or unset the "
                         "variable (esmm serve then uses a private temporary folder)")
    if not os.access(p, os.W_OK | os.X_OK):
        raise UsageError(f"{MULTIPROC_ENV}={path}: the folder is not writable")
    _multiprocess_dir()  # with one worker this process keeps the metrics itself
    return path


def _warn_earlier_files(path: str) -> None:
    earlier = [n for n in os.listdir(path) if n.endswith(".db")]
    if earlier:
        log.warning("%s=%s holds %d metric files of earlier processes: their counts are added "
                    "to this server's (empty the folder before starting to count from zero)",
                    MULTIPROC_ENV, path, len(earlier))


@contextlib.contextmanager
def _metrics_folder(workers: int) -> Iterator[str | None]:
    """The folder the workers' metrics are shared through, for the time the server runs.

    ``PROMETHEUS_MULTIPROC_DIR`` when the operator set it (checked, kept at exit); else, with
    more than one worker, a private temporary folder (mode 0700) created before the workers
    start and removed at exit; else None (one process keeps its metrics in memory). Workers
    inherit the variable, which prometheus_client reads when it is first imported.
    """
    import shutil
    import tempfile

    given = check_metrics_env()
    if given:
        _warn_earlier_files(given)
        path, private = given, False
    elif workers > 1:
        path, private = tempfile.mkdtemp(prefix="esmm-metrics-"), True
        os.environ[MULTIPROC_ENV] = path
    else:
        yield None
        return
    reaper = _DeadWorkerReaper(path)
    reaper.start()
    try:
        yield path
    finally:
        reaper.stop()
        if private:
            os.environ.pop(MULTIPROC_ENV, None)
            shutil.rmtree(path, ignore_errors=True)


def _check_port(host: str, port: int) -> bool:
    """Fail early, with a clear message, when the address cannot be bound.

    Returns:
        whether the address is a loopback one (reachable from this machine only).
    """
    import ipaddress
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UsageError(f"--host {host!r}: cannot resolve ({e})") from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            raise EsmmError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def serve(path: str | os.PathLike, host: str = "127.0.0.1", port: int = 8080, workers: int = 1,
          max_items: int = DEFAULT_MAX_ITEMS, threads: int = 1, log_level: str = "info", *,
          max_body_bytes: int | None = None, max_bag_len: int = DEFAULT_MAX_BAG_LEN,
          max_in_flight: int = DEFAULT_MAX_IN_FLIGHT, show_paths: bool = False) -> None:
    """Load the artifact at ``path`` and serve it until interrupted.

    Args:
        host: the address to listen on; the default is loopback (this machine only).
        workers: uvicorn worker processes (each loads the artifact). With more than one, the
            workers share their metrics through prometheus_client's multiprocess folder:
            ``PROMETHEUS_MULTIPROC_DIR`` if set, else a private temporary folder made here
            before they start and removed at exit (:func:`_metrics_folder`).
        max_items, max_body_bytes, max_bag_len, max_in_flight: the request limits
            (:class:`Limits`).
        threads: intra-op threads per worker (1 gives the lowest latency for requests of up
            to a few thousand rows and leaves cores to the HTTP side and other workers); 0 picks
            ``max(1, cpus // workers)``.
        show_paths: publish the artifact's, run's and data's paths in ``/metadata``.
    """
    import uvicorn

    if workers < 1:
        raise UsageError("--workers must be at least 1")
    limits = Limits(max_items, max_body_bytes, max_bag_len, max_in_flight)
    if threads < 0:
        raise UsageError("--threads must be 0 (auto) or more")
    levels = ("critical", "error", "warning", "info", "debug", "trace")
    if log_level not in levels:
        raise UsageError(f"--log-level {log_level!r}: expected one of {list(levels)}")
    if not threads:
        threads = max(1, (os.cpu_count() or 1) // workers)
    loopback = _check_port(host, port)
    check_metrics_env()
    predictor = load_checked(path, threads=threads)
    log.info("serving %s (%s, %s) on http://%s:%d with %d worker(s), %d thread(s) each; "
             "limits: %s", path, predictor.model_name, predictor.format, host, port, workers,
             threads, limits.to_dict())
    if not loopback:
        log.warning("--host %s: the server is reachable from other machines and has no "
                    "authentication or TLS; put it behind a proxy that adds them", host)
    started = time.time()
    try:
        with _metrics_folder(workers):
            if workers == 1:
                uvicorn.run(create_app(predictor, limits, show_paths=show_paths,
                                       started=started),
                            host=host, port=port, log_level=log_level, access_log=False)
            else:
                os.environ.update({_ENV_PATH: str(os.path.abspath(path)),
                                   _ENV_THREADS: str(threads),
                                   _ENV_LIMITS: json.dumps(limits.to_dict()),
                                   _ENV_SHOW_PATHS: "1" if show_paths else "0",
                                   _ENV_STARTED: repr(started)})
                uvicorn.run("esmm.serve:app_from_env", factory=True, host=host, port=port,
                            workers=workers, log_level=log_level, access_log=False)
    except OSError as e:
        raise EsmmError(f"cannot serve on {host}:{port}: {e}") from None
