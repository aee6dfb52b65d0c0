"""The Ray Serve application: a policy deployment, a SAM2 deployment and an HTTP ingress.

``Policy`` holds one vLLM engine (the rollout actor's, with the rollout section's settings) and
answers with ``evaluation``'s sampling (greedy by default); concurrent requests are batched into
one engine call (``serve.batch``). ``Segmenter`` holds SAM2 (the reward actor's loader and the
reward's prompt rule). ``Ingress`` is a FastAPI app: it checks and decodes each upload, renders the
prompt, asks the two deployments and writes the answer (``segr1.serving.answer``). The blocking
work of each deployment runs in a thread, so a replica keeps answering health checks and queueing
requests while an engine call runs. Bad input is refused in the ingress and never reaches a model.

``build`` is the application builder that ``serve run cluster/serve.yaml`` imports
(``segr1.serving.app:build``); ``segr1 serve`` calls ``application`` with its parsed config. The
GPUs a replica asks for are the job's (``rollout.num_gpus_per_actor``, ``reward.num_gpus_per_actor``)
when the cluster has GPUs, none otherwise; replicas and autoscaling come from the Serve config.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import os
import threading
import time
from importlib import resources
from typing import Any

import numpy as np
import ray
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from actors.reward import RewardSettings, make_segmenter, segmenter_device
from actors.rollout import RolloutActor, RolloutSettings, SamplingSettings, actor_runtime_env
from segr1.config import Config, EvalSettings, ServeSettings, load_config, resolve_models
from segr1.core.parser import ParserLimits, PromptSet, parse_completion
from segr1.core.policy import ModelSettings
from segr1.core.schema import PromptItem, RolloutGroup
from segr1.core.segment import segment_image
from segr1.segmenters.settings import Sam2Settings
from segr1.serving.answer import BadInput, PolicyPrompts, answer_json, check_query, model_gpus, read_image

APP_NAME = "segr1"
HEALTH_TIMEOUT_S = 5.0

web = FastAPI(title="segr1", description="Seg-R1 segmentation: a policy writes prompts, SAM2 draws the mask.")


@serve.deployment(name="Policy", max_ongoing_requests=64)
class Policy:
    """One vLLM engine of the policy; requests arriving together share one ``generate`` call."""

    def __init__(self, model: ModelSettings, rollout: RolloutSettings, evaluation: EvalSettings,
                 settings: ServeSettings, tensor_parallel_size: int) -> None:
        context = serve.get_replica_context()
        self.engine = RolloutActor(model, rollout, name=f"serve-policy-{context.replica_id.unique_id}",
                                   seed=evaluation.seed, tensor_parallel_size=tensor_parallel_size)
        self.sampling: SamplingSettings = evaluation.sampling()
        self.answer.set_max_batch_size(settings.max_batch_size)
        self.answer.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)

    def ready(self) -> bool:
        return True

    @serve.batch
    async def answer(self, items: list[PromptItem]) -> list[RolloutGroup]:
        return await asyncio.to_thread(self.engine.generate, items, self.sampling)


@serve.deployment(name="Segmenter", max_ongoing_requests=32)
class Segmenter:
    """SAM2 on the replica's device; one image at a time (the predictor holds state while encoding)."""

    def __init__(self, sam2: Sam2Settings, reward: RewardSettings) -> None:
        self.segmenter = make_segmenter(sam2, reward, segmenter_device(sam2))
        self.lock = threading.Lock()

    def ready(self) -> bool:
        return True

    async def segment(self, image: np.ndarray, prompt_set: PromptSet, policy_size: tuple[int, int]) -> np.ndarray:
        def run() -> np.ndarray:
            with self.lock:
                return segment_image(self.segmenter, image, prompt_set, policy_size)

        return await asyncio.to_thread(run)


async def _answered(response: Any) -> Any:
    return await response


def _page() -> str:
    return resources.files("segr1.serving").joinpath("page.html").read_text(encoding="utf-8")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


@serve.deployment(name="Ingress", max_ongoing_requests=128)
@serve.ingress(web)
class Ingress:
    """``GET /`` the web page, ``GET /healthz``, ``POST /v1/segment`` (multipart: image, task, expression)."""

    def __init__(self, policy: DeploymentHandle, segmenter: DeploymentHandle, model: ModelSettings,
                 evaluation: EvalSettings, limits: ParserLimits, settings: ServeSettings,
                 token_sha256: str | None) -> None:
        self.policy, self.segmenter = policy, segmenter
        self.limits, self.settings = limits, settings
        self.prompts = PolicyPrompts(model, evaluation.policy_size)  # the engines resize with the same bounds
        self.token_sha256 = token_sha256
        self.page = _page()
        self.requests = itertools.count()

    @web.get("/", response_class=HTMLResponse)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(self.page)

    @web.get("/healthz")
    async def healthz(self) -> JSONResponse:
        """200 once a replica of each deployment answers; 503 naming the one still starting or down."""
        for name, handle in (("Policy", self.policy), ("Segmenter", self.segmenter)):
            try:
                await asyncio.wait_for(_answered(handle.ready.remote()), HEALTH_TIMEOUT_S)
            except Exception as err:  # noqa: BLE001 - a timeout or a dead replica: not ready either way
                reason = f"{name}: {type(err).__name__} {err}".strip()
                return JSONResponse({"status": "unavailable", "reason": reason}, 503)
        return JSONResponse({"status": "ok"})

    @web.post("/v1/segment")
    async def segment(self, request: Request) -> JSONResponse:
        start = time.perf_counter()
        try:
            self._authorise(request)
            query, image = await self._read(request)
        except BadInput as err:
            return _error(err.status, str(err))
        read_ms = (time.perf_counter() - start) * 1000
        request_id = f"serve-{os.getpid()}-{next(self.requests)}"
        item = self.prompts.item(request_id, query, image)
        try:
            group: RolloutGroup = await self.policy.answer.remote(item)
            policy_ms = (time.perf_counter() - start) * 1000 - read_ms
            completion = group.completions[0].text
            prompt_set = parse_completion(completion, item.policy_size, self.limits)
            mask = await self.segmenter.segment.remote(image, prompt_set, item.policy_size)
        except Exception as err:  # noqa: BLE001 - a failed model call: this request's 500, the replicas stay
            cause = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            return _error(500, f"request {request_id} failed in a model call: {cause}")
        total_ms = (time.perf_counter() - start) * 1000
        timings = {"read_ms": read_ms, "policy_ms": policy_ms, "segment_ms": total_ms - read_ms - policy_ms,
                   "total_ms": total_ms}
        return JSONResponse(answer_json(completion, prompt_set, item.policy_size, mask, timings))

    def _authorise(self, request: Request) -> None:
        if self.token_sha256 is None:
            return
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(hashlib.sha256(given.encode()).hexdigest(), self.token_sha256):
            raise BadInput(401, "authorization: a valid 'Authorization: Bearer <token>' header is required")

    async def _read(self, request: Request) -> tuple[Any, np.ndarray]:
        """The form's task, expression and image, checked in that order (the cheap checks first)."""
        limit = self.settings.max_upload_mb << 20
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise BadInput(413, f"request body: {int(length)} bytes, over the limit of {limit}")
        try:
            form = await request.form(max_files=1, max_fields=8)
        except Exception as err:  # noqa: BLE001 - starlette's parse errors: not a multipart form we take
            raise BadInput(400, f"request body: not a multipart form with image, task and expression ({err})") from err
        task, expression = form.get("task"), form.get("expression")
        if not isinstance(task, (str, type(None))) or not isinstance(expression, (str, type(None))):
            raise BadInput(400, "task and expression must be text fields, not files")
        query = check_query(task, expression)
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise BadInput(400, "image: missing; send the image as a file field named 'image'")
        data = await upload.read(limit + 1)
        if len(data) > limit:
            raise BadInput(413, f"image: over the upload limit of {limit} bytes")
        image = await asyncio.to_thread(read_image, data, self.settings.max_image_pixels)
        return query, image


def token_digest(settings: ServeSettings) -> str | None:
    """SHA-256 of the access token in ``$<settings.token_env>`` (None: requests need none). Only the
    digest goes into the application, so the token itself is stored nowhere in the cluster."""
    token = os.environ.get(settings.token_env, "").strip()
    if not token:
        if settings.require_token:
            raise ValueError(f"serve.require_token is set but ${settings.token_env} is empty: a service "
                             "reachable beyond this machine needs an access token")
        return None
    return hashlib.sha256(token.encode()).hexdigest()


def application(config: Config, deployments: dict[str, dict[str, Any]] | None = None) -> Any:
    """The bound application for ``config`` (models resolved): GPUs for the replicas when the cluster
    has some, the repo importable in the policy's replicas (vLLM loads its worker extension by name).
    ``deployments``: options per deployment name from a Serve config, applied over these as Serve
    applies them (a given ``ray_actor_options`` replaces segr1's)."""
    options = dict(deployments or {})
    unknown = set(options) - {"Policy", "Segmenter", "Ingress"}
    if unknown:
        raise ValueError(f"Serve config: unknown deployments {sorted(unknown)}; segr1's are Policy, Segmenter, Ingress")
    rollout, reward = config.rollout, config.reward
    policy_gpus, sam2_gpus = model_gpus(config, ray.cluster_resources().get("GPU", 0))
    policy_actor = {"num_cpus": rollout.num_cpus_per_actor, "num_gpus": policy_gpus,
                    "runtime_env": actor_runtime_env(None, use_gpu=policy_gpus > 0)}
    policy = Policy.options(**{"ray_actor_options": policy_actor, **options.get("Policy", {})}).bind(
        config.model, rollout, config.evaluation, config.serve, max(1, int(policy_gpus)))
    sam2_actor = {"num_cpus": reward.num_cpus_per_actor, "num_gpus": sam2_gpus}
    segmenter = Segmenter.options(**{"ray_actor_options": sam2_actor, **options.get("Segmenter", {})}).bind(
        config.sam2, reward)
    ingress = Ingress.options(**{"ray_actor_options": {"num_cpus": 0}, **options.get("Ingress", {})})
    return ingress.bind(policy, segmenter, config.model, config.evaluation, reward.limits, config.serve,
                        token_digest(config.serve))


def build(args: dict[str, Any]) -> Any:
    """Serve's application builder: ``args`` holds ``config`` (a preset or YAML file; none: the
    settings' defaults) and ``overrides`` (a list of ``section.key=value``), as ``segr1 serve`` takes."""
    unknown = set(args) - {"config", "overrides"}
    if unknown:
        raise ValueError(f"segr1.serving.app:build args: unknown keys {sorted(unknown)}; it takes config, overrides")
    overrides = [str(o) for o in args.get("overrides") or []]
    return application(resolve_models(load_config(args.get("config"), overrides)))
