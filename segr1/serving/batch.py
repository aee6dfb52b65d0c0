"""Batch prediction on Ray Data: a folder of images or a prepared dataset in, one mask PNG and one JSON
line per image out, resumable.

The input is listed on the driver (``pyarrow.fs``, so ``s3://`` and the like work as paths do) and
what ``--out`` already holds is left out: ``predictions.jsonl`` has one line per finished image,
written after its mask, so a run stopped anywhere redoes at most the images in flight. Ray Data
reads the images (``read_binary_files`` or ``read_parquet``) and streams them through two
autoscaling actor pools, which grow as the cluster has room: ``PolicyStage`` (a vLLM engine each, up
to ``rollout.num_actors``, or from ``min_actors`` to ``max_actors`` when it is ``auto``) and ``MaskStage`` (SAM2, up to ``reward.num_actors``). Each image is
answered as ``segr1 serve`` answers it (``segr1.serving.answer``). An image that cannot be read, or
whose query is bad, gets a line with its ``error`` and no mask, and the run goes on.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from tqdm import tqdm

from actors.reward import make_segmenter, segmenter_device
from actors.rollout import RolloutActor, actor_runtime_env
from segr1.config import Config
from segr1.core.files import mask_file_name, write_atomic
from segr1.core.parser import parse_completion
from segr1.core.segment import segment_image
from segr1.data.records import encode_mask
from segr1.data.shards import MANIFEST_NAME
from segr1.serving.answer import BadInput, PolicyPrompts, answer_fields, check_query, model_gpus, read_image

PREDICTIONS = "predictions.jsonl"
MASKS = "masks"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class PredictError(ValueError):
    """Bad input for ``segr1 predict``; the message names it."""


@dataclass(frozen=True)
class Source:
    """What to predict: image files under a folder (ids: their paths below it) or a prepared
    dataset's shards (ids: the records'). ``task``/``expression`` None take each record's."""

    location: str
    task: str | None = None
    expression: str | None = None


def _filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    try:
        return pafs.FileSystem.from_uri(location if "://" in location else os.path.abspath(location))
    except Exception as err:  # noqa: BLE001 - pyarrow's errors for bad URIs and missing buckets vary
        raise PredictError(f"--input {location}: cannot open it: {err}") from err


def list_input(source: Source) -> tuple[str, list[str]]:
    """``("images", files)`` or ``("shards", parquet files)`` of the input, as full paths."""
    fs, root = _filesystem(source.location)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise PredictError(f"--input {source.location}: no such folder or file")
    if info.type == pafs.FileType.File:
        if root.endswith(".parquet"):
            return "shards", [root]
        raise PredictError(f"--input {source.location}: a file that is not a .parquet shard")
    entries = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    files = sorted(e.path for e in entries if e.type == pafs.FileType.File)
    if any(Path(f).name == MANIFEST_NAME for f in files) or any(f.endswith(".parquet") for f in files):
        return "shards", [f for f in files if f.endswith(".parquet")]
    images = [f for f in files if f.lower().endswith(IMAGE_SUFFIXES)]
    if not images:
        raise PredictError(f"--input {source.location}: no images ({', '.join(IMAGE_SUFFIXES)}) and no shards")
    return "images", images


def done_ids(out: Path) -> set[str]:
    """Ids with a finished line in ``out/predictions.jsonl``; a torn last line (a crash mid-write) is
    cut off so the next line starts clean."""
    path = out / PREDICTIONS
    if not path.exists():
        return set()
    done, good_bytes = set(), 0
    with path.open("rb") as handle:
        for line in handle:
            try:
                done.add(json.loads(line)["id"])
            except (ValueError, KeyError):
                break
            good_bytes += len(line)
    if good_bytes < path.stat().st_size:
        with path.open("r+b") as handle:
            handle.truncate(good_bytes)
    return done


def dataset(source: Source, kind: str, files: list[str], done: set[str]) -> tuple[Any, int]:
    """The Ray Data dataset of the images still to predict and their count. Columns: id, task,
    expression, image, error; "" for no expression and no error, since Ray Data's numpy batches
    would turn None into NaN."""
    import ray.data

    fs, root = _filesystem(source.location)
    if kind == "images":
        ids = {path: Path(path).relative_to(root).as_posix() for path in files}
        pending = [path for path in files if ids[path] not in done]
        if not pending:
            return None, 0
        ds = ray.data.read_binary_files(pending, include_paths=True, filesystem=fs)
        ds = ds.map(lambda row: {"id": ids[row["path"]], "task": source.task, "expression": source.expression or "",
                                 "image": row["bytes"], "error": ""})
        return ds, len(pending)
    # the ids alone, read on the driver: counting the filtered dataset would read every image twice
    ids = pq.read_table(files, columns=["id"], filesystem=fs).column("id").to_pylist()
    count = sum(1 for item_id in ids if item_id not in done)
    if not count:
        return None, 0
    ds = ray.data.read_parquet(files, filesystem=fs, columns=["id", "task", "image", "texts"])
    ds = ds.filter(lambda row: row["id"] not in done)
    return ds.map(lambda row: {
        "id": row["id"], "task": source.task or row["task"],
        "expression": source.expression or (row["texts"][0] if len(row["texts"]) else ""),
        "image": row["image"], "error": "",
    }), count


class PolicyStage:
    """One vLLM engine: each batch's checked queries in one ``generate`` call. Adds ``completion``
    and the policy frame (``frame_w``, ``frame_h``); a bad row gets ``error`` instead."""

    def __init__(self, config: Config, tensor_parallel_size: int) -> None:
        self.engine = RolloutActor(config.model, config.rollout, name=f"predict-policy-{os.getpid()}",
                                   seed=config.evaluation.seed, tensor_parallel_size=tensor_parallel_size)
        self.prompts = PolicyPrompts(config.model, config.evaluation.policy_size)
        self.sampling = config.evaluation.sampling()
        self.max_pixels = config.serve.max_image_pixels

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = len(batch["id"])
        errors = [""] * rows
        items, owners = [], []
        for i in range(rows):
            try:
                query = check_query(batch["task"][i], batch["expression"][i])
                image = read_image(bytes(batch["image"][i]), self.max_pixels)
            except BadInput as err:
                errors[i] = str(err)
                continue
            items.append(self.prompts.item(str(batch["id"][i]), query, image))
            owners.append(i)
        completions, frames = [""] * rows, [(0, 0)] * rows
        for i, group in zip(owners, self.engine.generate(items, self.sampling) if items else []):
            completions[i], frames[i] = group.completions[0].text, group.item.policy_size
        return {**batch, "error": np.array(errors, dtype=object), "completion": np.array(completions, dtype=object),
                "frame_w": np.array([f[0] for f in frames]), "frame_h": np.array([f[1] for f in frames])}


class MaskStage:
    """SAM2: each answered row's mask on the full-size image. Returns ``id``, the JSON line's
    ``answer`` and the ``mask_png`` (empty for an error row)."""

    def __init__(self, config: Config) -> None:
        self.segmenter = make_segmenter(config.sam2, config.reward, segmenter_device(config.sam2))
        self.limits, self.max_pixels = config.reward.limits, config.serve.max_image_pixels

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        answers, masks = [], []
        for i, item_id in enumerate(batch["id"]):
            line: dict[str, Any] = {"id": str(item_id), "task": str(batch["task"][i]),
                                    "expression": str(batch["expression"][i]) or None}
            if batch["error"][i]:
                answers.append(json.dumps({**line, "error": batch["error"][i]}))
                masks.append(b"")
                continue
            image = read_image(bytes(batch["image"][i]), self.max_pixels)
            frame = (int(batch["frame_w"][i]), int(batch["frame_h"][i]))
            prompt_set = parse_completion(batch["completion"][i], frame, self.limits)
            mask = segment_image(self.segmenter, image, prompt_set, frame)
            fields = answer_fields(batch["completion"][i], prompt_set, frame, mask)
            answers.append(json.dumps({**line, "mask": mask_file_name(str(item_id)), **fields}))
            masks.append(encode_mask(mask))
        return {"id": batch["id"], "answer": np.array(answers, dtype=object), "mask_png": np.array(masks, dtype=object)}


def _pool_size(actors: int, fewest: int = 1) -> int | tuple[int, int]:
    """Ray Data's ``concurrency``: an autoscaling pool of ``fewest`` up to ``actors``, which grows as
    the cluster has room (nodes the autoscaler adds included)."""
    return actors if actors == fewest else (fewest, actors)


def stages(ds: Any, config: Config, batch_size: int) -> Any:
    """``ds`` through the policy's and SAM2's actor pools, GPUs for them when the cluster has some."""
    import ray

    rollout, reward = config.rollout, config.reward
    policy_gpus, sam2_gpus = model_gpus(config, ray.cluster_resources().get("GPU", 0))
    ds = ds.map_batches(
        PolicyStage, fn_constructor_args=(config, max(1, int(policy_gpus))), batch_size=batch_size,
        batch_format="numpy", concurrency=_pool_size(rollout.most_actors, rollout.min_actors if rollout.elastic else 1), num_cpus=rollout.num_cpus_per_actor,
        num_gpus=policy_gpus, runtime_env=actor_runtime_env(None, use_gpu=policy_gpus > 0),
    )
    return ds.map_batches(MaskStage, fn_constructor_args=(config,), batch_size=batch_size, batch_format="numpy",
                          concurrency=_pool_size(reward.num_actors), num_cpus=reward.num_cpus_per_actor,
                          num_gpus=sam2_gpus)


def write_results(rows: Iterator[dict[str, Any]], out: Path, total: int, progress: bool) -> tuple[int, int]:
    """Each row's mask (atomically), then its line; returns (predicted, errors)."""
    (out / MASKS).mkdir(parents=True, exist_ok=True)
    predicted = errors = 0
    with (out / PREDICTIONS).open("a", encoding="utf-8") as lines, \
            tqdm(total=total, unit="image", disable=not progress, desc="predict") as bar:
        for row in rows:
            answer = json.loads(row["answer"])
            if "error" in answer:
                errors += 1
            else:
                write_atomic(out / MASKS / answer["mask"], bytes(row["mask_png"]))
                predicted += 1
            lines.write(row["answer"] + "\n")
            lines.flush()
            bar.update(1)
    return predicted, errors


def check_source(source: Source) -> tuple[str, list[str]]:
    """The input's kind and files, and its ``--task``/``--expression`` checked: before any model starts."""
    if source.task is not None or source.expression is not None:
        check_query(source.task, source.expression)
    kind, files = list_input(source)
    if kind == "images" and source.task is None:
        raise PredictError(f"--input {source.location}: a folder of images needs --task (and --expression for "
                           "refer/reason)")
    return kind, files


def predict(config: Config, source: Source, listed: tuple[str, list[str]], out: Path, batch_size: int,
            limit: int | None, progress: bool) -> dict[str, int]:
    """Predict every image ``listed`` (``check_source``) not yet in ``out`` (at most ``limit`` of them)."""
    import ray.data

    out.mkdir(parents=True, exist_ok=True)
    done = done_ids(out)
    ds, todo = dataset(source, *listed, done)
    if limit is not None and ds is not None:
        ds, todo = ds.limit(limit), min(limit, todo)
    print(f"{todo} images to predict, {len(done)} already in {out / PREDICTIONS}", flush=True)
    if ds is None or todo == 0:
        return {"predicted": 0, "errors": 0, "done_before": len(done)}
    ray.data.DataContext.get_current().enable_progress_bars = False  # one bar: the driver's, per image
    rows = stages(ds, config, batch_size).iter_rows()
    predicted, errors = write_results(rows, out, todo, progress)
    return {"predicted": predicted, "errors": errors, "done_before": len(done)}
