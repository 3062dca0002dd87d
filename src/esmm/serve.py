"""An HTTP scoring server for an exported artifact (FastAPI on uvicorn).

Endpoints:

* ``POST /predict``: ``{"impressions": [{field: value, ...}, ...]}`` ->
  ``{"predictions": [{"p_ctr": .., "p_cvr": .., "p_ctcvr": ..}, ...]}`` in request order.
* ``POST /rank``: one user's fields (encoded once per request) and N candidates' fields ->
  candidates sorted by a weighted score of the three probabilities, best first.
* ``GET /health``, ``GET /metadata``, ``GET /metrics`` (Prometheus text format).

Every request is validated field by field before scoring: a missing field, a value of the
wrong type, an empty list or too many items is answered with a 4xx and a JSON body
``{"error": message, "field": name, "index": i}`` naming the field and the item. A request is
scored with one vectorised call of :meth:`esmm.export.Predictor.predict_columns`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from typing import Any

import numpy as np
from fastapi import Body, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

import esmm
from esmm.errors import DataError, EsmmError, UsageError
from esmm.export import Predictor, load_artifact, synthetic_columns
from esmm.features import FieldSpec
from esmm.models.base import OUTPUT_NAMES

log = logging.getLogger(__name__)

DEFAULT_MAX_ITEMS = 10_000
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


class ScoreWeights(BaseModel):
    """Weights of the ranking score: ``score = sum(weight * probability)``."""

    model_config = ConfigDict(extra="forbid")
    p_ctr: float = Field(0.0, allow_inf_nan=False)
    p_cvr: float = Field(0.0, allow_inf_nan=False)
    p_ctcvr: float = Field(0.0, allow_inf_nan=False)


class RankRequest(BaseModel):
    user: dict[str, Any] = Field(
        default_factory=dict,
        description="The user's fields, given once and shared by every candidate.")
    candidates: list[dict[str, Any]] = Field(
        description="Candidates: each maps the remaining fields (item, context) to raw values.")
    score: ScoreWeights | None = Field(
        None, description="Score weights over p_ctr / p_cvr / p_ctcvr (default: p_ctcvr 1.0).")
    top_k: int | None = Field(None, ge=1, description="Return only the best top_k candidates.")


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
    """A request the server refuses: answered with ``status`` and an :class:`ErrorBody`."""

    def __init__(self, message: str, field: str | None = None, index: int | None = None,
                 status: int = 422) -> None:
        super().__init__(message)
        self.message, self.field, self.index, self.status = message, field, index, status


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


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
    if f.kind == "categorical":
        return _id_problem(v)
    if f.kind == "multi_categorical":
        if v is None:
            return None
        if type(v) is not list:
            return f"expected a list of ids (a bag), got {_tname(v)}"
        for j, x in enumerate(v):
            p = _id_problem(x)
            if p is not None:
                return f"bag element {j}: {p}"
        return None
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
    if f.kind == "categorical":
        return _ids_ok(col)
    if f.kind == "multi_categorical":
        if not set(map(type, col)) <= {list, type(None)}:
            return False
        flat = [x for b in col if b is not None for x in b]
        return not flat or _ids_ok(flat)
    if not set(map(type, col)) <= {int, float}:
        return False
    try:
        a = np.asarray(col, dtype=np.float64)
    except OverflowError:
        return False
    return bool(np.all(np.abs(a) <= _F32_MAX))  # NaN and inf fail too


def _column(f: FieldSpec, items: list[dict[str, Any]], where: str) -> list[Any]:
    """The raw values of field ``f`` over ``items``, validated (BadRequest names the item)."""
    name = f.name
    try:
        col = [it[name] for it in items]
    except KeyError:
        i = next(i for i, it in enumerate(items) if name not in it)
        raise BadRequest(f"{where}[{i}]: field {name!r} is missing", name, i) from None
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
                         "request (--max-items)", where, status=413)


# ----------------------------------------------------------------------------- metrics


class Metrics:
    """Request counters and latency histograms, rendered in the Prometheus text format."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.buckets: dict[str, list[int]] = {}
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.items: dict[str, int] = {}
        self.started = time.time()

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            key = (endpoint, status)
            self.requests[key] = self.requests.get(key, 0) + 1
            b = self.buckets.setdefault(endpoint, [0] * len(LATENCY_BUCKETS))
            for i, le in enumerate(LATENCY_BUCKETS):
                if seconds <= le:
                    b[i] += 1
            self.sums[endpoint] = self.sums.get(endpoint, 0.0) + seconds
            self.counts[endpoint] = self.counts.get(endpoint, 0) + 1

    def scored(self, endpoint: str, n: int) -> None:
        with self._lock:
            self.items[endpoint] = self.items.get(endpoint, 0) + n

    def render(self, info: dict[str, str]) -> str:
        with self._lock:
            lines = [
                "# HELP esmm_requests_total HTTP requests answered, by endpoint and status.",
                "# TYPE esmm_requests_total counter",
            ]
            for (ep, st), n in sorted(self.requests.items()):
                lines.append(f'esmm_requests_total{{endpoint="{ep}",status="{st}"}} {n}')
            lines += [
                "# HELP esmm_request_duration_seconds Time to answer a request, by endpoint.",
                "# TYPE esmm_request_duration_seconds histogram",
            ]
            for ep in sorted(self.counts):
                for le, n in zip(LATENCY_BUCKETS, self.buckets[ep], strict=True):
                    lines.append(f'esmm_request_duration_seconds_bucket{{endpoint="{ep}",'
                                 f'le="{le}"}} {n}')
                lines.append(f'esmm_request_duration_seconds_bucket{{endpoint="{ep}",le="+Inf"}} '
                             f"{self.counts[ep]}")
                lines.append(f'esmm_request_duration_seconds_sum{{endpoint="{ep}"}} '
                             f"{self.sums[ep]:.6f}")
                lines.append(f'esmm_request_duration_seconds_count{{endpoint="{ep}"}} '
                             f"{self.counts[ep]}")
            lines += [
                "# HELP esmm_items_scored_total Impressions or candidates scored, by endpoint.",
                "# TYPE esmm_items_scored_total counter",
            ]
            for ep, n in sorted(self.items.items()):
                lines.append(f'esmm_items_scored_total{{endpoint="{ep}"}} {n}')
        labels = ",".join(f'{k}="{_escape(v)}"' for k, v in info.items())
        lines += [
            "# HELP esmm_model_info The artifact this server scores with.",
            "# TYPE esmm_model_info gauge",
            f"esmm_model_info{{{labels}}} 1",
            "# HELP esmm_start_time_seconds Unix time the server started.",
            "# TYPE esmm_start_time_seconds gauge",
            f"esmm_start_time_seconds {self.started:.3f}",
        ]
        return "\n".join(lines) + "\n"


def _escape(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


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
        status = [500]

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope.get("path", "")
            ep = path if path in ENDPOINTS else "other"
            self.metrics.observe(ep, status[0], time.perf_counter() - t0)


# ----------------------------------------------------------------------------- the app


def _json(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body, separators=(",", ":")), status_code=status,
                    media_type="application/json")


def _examples(predictor: Predictor) -> tuple[dict[str, Any], dict[str, Any]]:
    spec = predictor.spec
    cols = synthetic_columns(spec, 2, seed=1)
    rows = [{f.name: cols[f.name][i] for f in spec.fields} for i in range(2)]
    for r in rows:  # readable ids
        for f in spec.fields:
            if f.kind == "categorical":
                r[f.name] = int(r[f.name]) % 1000
            elif f.kind == "dense":
                r[f.name] = round(float(r[f.name]), 3)
    user_names = {f.name for f in spec.sparse[::2]}
    user = {k: v for k, v in rows[0].items() if k in user_names}
    cands = [{k: v for k, v in r.items() if k not in user_names} for r in rows]
    return ({"impressions": rows},
            {"user": user, "candidates": cands, "score": {"p_ctcvr": 1.0}, "top_k": 2})


def create_app(predictor: Predictor, max_items: int = DEFAULT_MAX_ITEMS) -> FastAPI:
    """The FastAPI application serving ``predictor`` (see the module docstring)."""
    if max_items < 1:
        raise UsageError("--max-items must be at least 1")
    meta = predictor.metadata
    spec = predictor.spec
    metrics = Metrics()
    info = {"model": predictor.model_name, "format": predictor.format,
            "esmm_version": str(meta.get("esmm_version")), "server_version": esmm.__version__}
    predict_example, rank_example = _examples(predictor)
    errors = {422: {"model": ErrorBody, "description": "Invalid request (field and index named)"},
              413: {"model": ErrorBody, "description": "Too many items (--max-items)"}}

    app = FastAPI(
        title="esmm scoring server",
        version=esmm.__version__,
        description=f"Scores impressions with the `{predictor.model_name}` model exported from "
                    f"`{meta.get('run')}` ({predictor.format}). Fields: "
                    + ", ".join(f"`{f.name}` ({f.kind})" for f in spec.fields),
    )
    app.add_middleware(_MetricsMiddleware, metrics=metrics)
    app.state.predictor = predictor
    app.state.metrics = metrics

    @app.exception_handler(BadRequest)
    async def _bad(request: Request, exc: BadRequest) -> Response:
        return _json({"error": exc.message, "field": exc.field, "index": exc.index}, exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        details = []
        field = index = None
        for e in exc.errors():
            loc = [p for p in e.get("loc", ()) if p != "body"]
            where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
            msg = str(e.get("msg"))
            if e.get("type") == "json_invalid":
                reason = (e.get("ctx") or {}).get("error")
                msg = f"the body is not valid JSON ({reason})" if reason else "invalid JSON"
                where, loc = "", []
            details.append({"loc": [str(p) for p in loc], "msg": msg,
                            "type": str(e.get("type"))})
            if field is None and loc:
                field = str(loc[-1] if isinstance(loc[-1], str) else loc[0])
                index = next((p for p in loc if isinstance(p, int)), None)
            details[-1]["where"] = where or "body"
        first = details[0] if details else {"where": "body", "msg": "invalid request"}
        return _json({"error": f"{first['where']}: {first['msg']}", "field": field,
                      "index": index, "detail": details}, 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        return _json({"error": str(exc.detail), "field": None, "index": None}, exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> Response:
        log.exception("internal error on %s", request.url.path)
        return _json({"error": f"internal error: {type(exc).__name__}", "field": None,
                      "index": None}, 500)

    def score(columns: dict[str, list[Any]], user: dict[str, Any], n: int) -> dict[str, Any]:
        try:
            return predictor.predict_columns(columns, user, n=n)
        except DataError as e:
            raise BadRequest(str(e)) from None

    @app.post("/predict", response_model=PredictResponse, responses=errors,
              summary="Score impressions")
    def predict(req: PredictRequest = Body(
            ..., openapi_examples={"two impressions": {"value": predict_example}})) -> Response:
        """p_ctr, p_cvr and p_ctcvr of every impression, in request order."""
        items = req.impressions
        _check_items(items, "impressions", max_items)
        cols = {f.name: _column(f, items, "impressions") for f in spec.fields}
        p = score(cols, {}, len(items))
        metrics.scored("/predict", len(items))
        a, b, c = (p[k].tolist() for k in OUTPUT_NAMES)
        return _json({"predictions": [{"p_ctr": x, "p_cvr": y, "p_ctcvr": z}
                                      for x, y, z in zip(a, b, c, strict=True)]})

    @app.post("/rank", response_model=RankResponse, responses=errors,
              summary="Rank one user's candidates")
    def rank(req: RankRequest = Body(
            ..., openapi_examples={"user and two candidates": {"value": rank_example}})
             ) -> Response:
        """Candidates sorted by score (default p_ctcvr), best first; the user's fields are
        encoded once and shared by every candidate."""
        items = req.candidates
        _check_items(items, "candidates", max_items)
        user: dict[str, Any] = {}
        for f in spec.fields:
            if f.name in req.user:
                v = req.user[f.name]
                p = _value_problem(f, v)
                if p is not None:
                    raise BadRequest(f"user.{f.name}: {p}", f.name)
                i = next((i for i, it in enumerate(items) if f.name in it), None)
                if i is not None:
                    raise BadRequest(f"candidates[{i}].{f.name}: the field is also given in "
                                     "`user`; give it once", f.name, i)
                user[f.name] = v
        cols = {f.name: _column(f, items, "candidates") for f in spec.fields
                if f.name not in user}
        p = score(cols, user, len(items))
        w = req.score or ScoreWeights(p_ctcvr=1.0)
        s = w.p_ctr * p["p_ctr"] + w.p_cvr * p["p_cvr"] + w.p_ctcvr * p["p_ctcvr"]
        order = np.argsort(-s, kind="stable")
        if req.top_k is not None:
            order = order[: req.top_k]
        metrics.scored("/rank", len(items))
        s_l, a, b, c = (x[order].tolist() for x in (s, p["p_ctr"], p["p_cvr"], p["p_ctcvr"]))
        return _json({"candidates": [
            {"index": i, "score": si, "p_ctr": x, "p_cvr": y, "p_ctcvr": z}
            for i, si, x, y, z in zip(order.tolist(), s_l, a, b, c, strict=True)]})

    @app.get("/health", summary="Liveness")
    def health() -> dict[str, Any]:
        return {"status": "ok", "model": predictor.model_name, "format": predictor.format}

    @app.get("/metadata", summary="The model, its fields and training metrics")
    def metadata() -> dict[str, Any]:
        return {
            "model": predictor.model_name,
            "format": predictor.format,
            "fields": meta.get("fields"),
            "metrics": meta.get("metrics"),
            "esmm_version": meta.get("esmm_version"),
            "server_version": esmm.__version__,
            "exported_at": meta.get("exported_at"),
            "checkpoint_step": meta.get("checkpoint_step"),
            "parity": meta.get("parity"),
            "max_items": max_items,
        }

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    def prometheus() -> Response:
        return Response(metrics.render(info),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


# ----------------------------------------------------------------------------- running

_ENV_PATH = "ESMM_SERVE_ARTIFACT"
_ENV_MAX = "ESMM_SERVE_MAX_ITEMS"
_ENV_THREADS = "ESMM_SERVE_THREADS"


def app_from_env() -> FastAPI:
    """App factory for uvicorn worker processes (reads the artifact path from the environment)."""
    predictor = load_artifact(os.environ[_ENV_PATH], threads=int(os.environ[_ENV_THREADS]))
    _warm_up(predictor)
    return create_app(predictor, int(os.environ[_ENV_MAX]))


def _warm_up(predictor: Predictor) -> None:
    """A few calls at several sizes, so the first requests do not pay for graph preparation."""
    for n in (1, 16, 256):
        cols = synthetic_columns(predictor.spec, n, seed=n)
        predictor.predict_columns(cols)


def _check_port(host: str, port: int) -> None:
    """Fail early, with a clear message, when the address cannot be bound."""
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


def serve(path: str | os.PathLike, host: str = "127.0.0.1", port: int = 8080, workers: int = 1,
          max_items: int = DEFAULT_MAX_ITEMS, threads: int = 1, log_level: str = "info") -> None:
    """Load the artifact at ``path`` and serve it until interrupted.

    Args:
        workers: uvicorn worker processes (each loads the artifact).
        max_items: most impressions or candidates in one request (more: HTTP 413).
        threads: intra-op threads per worker (1 gives the lowest latency for requests of up
            to a few thousand rows and leaves cores to the HTTP side and other workers); 0 picks
            ``max(1, cpus // workers)``.
    """
    import uvicorn

    if workers < 1:
        raise UsageError("--workers must be at least 1")
    if max_items < 1:
        raise UsageError("--max-items must be at least 1")
    if threads < 0:
        raise UsageError("--threads must be 0 (auto) or more")
    levels = ("critical", "error", "warning", "info", "debug", "trace")
    if log_level not in levels:
        raise UsageError(f"--log-level {log_level!r}: expected one of {list(levels)}")
    if not threads:
        threads = max(1, (os.cpu_count() or 1) // workers)
    _check_port(host, port)
    predictor = load_artifact(path, threads=threads)
    log.info("serving %s (%s, %s) on http://%s:%d with %d worker(s), %d thread(s) each",
             path, predictor.model_name, predictor.format, host, port, workers, threads)
    try:
        if workers == 1:
            _warm_up(predictor)
            uvicorn.run(create_app(predictor, max_items), host=host, port=port,
                        log_level=log_level, access_log=False)
        else:
            os.environ.update({_ENV_PATH: str(os.path.abspath(path)), _ENV_MAX: str(max_items),
                               _ENV_THREADS: str(threads)})
            uvicorn.run("esmm.serve:app_from_env", factory=True, host=host, port=port,
                        workers=workers, log_level=log_level, access_log=False)
    except OSError as e:
        raise EsmmError(f"cannot serve on {host}:{port}: {e}") from None
