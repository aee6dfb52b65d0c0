"""Shared session fixtures: the tiny models and one in-process vLLM engine over the tiny Qwen.

Tiny models are built once into the user cache (~/.cache/segr1/tiny, or $SEGR1_CACHE/tiny),
so repeated runs start in milliseconds; set SEGR1_CACHE to a temporary directory for a cold
build. Fixtures that start heavy things are only created by tests that ask for them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# In-process engine: starts in ~2 s and ~1.3 GB instead of ~18 s and 3.4 GB with vLLM's extra
# processes. Must be set before anything imports vllm.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from segr1.tiny import Sam2Checkpoint, build_qwen, build_sam2  # noqa: E402

VLLM_MAX_MODEL_LEN = 1024


@pytest.fixture(scope="session")
def tiny_qwen_dir() -> Path:
    return build_qwen(seed=0)


@pytest.fixture(scope="session")
def tiny_sam2() -> Sam2Checkpoint:
    return build_sam2(seed=0)


@pytest.fixture(scope="session")
def vllm_engine(tiny_qwen_dir: Path) -> Iterator[object]:
    """A vLLM `LLM` over the tiny Qwen2.5-VL in float32 (comparable with HF to ~1e-6).

    Note: vLLM seeds Python's, NumPy's and torch's global RNGs with `seed` when it starts.
    """
    from vllm import LLM

    llm = LLM(
        model=str(tiny_qwen_dir),
        dtype="float32",
        enforce_eager=True,
        max_model_len=VLLM_MAX_MODEL_LEN,
        limit_mm_per_prompt={"image": 1, "video": 0},
        kv_cache_memory_bytes=128 << 20,  # the default reserves ~90% of RAM on CPU
        seed=0,
    )
    yield llm
    llm.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """One local Ray cluster for the whole session (loopback only, no dashboard).

    Four logical CPUs on a 2-core machine: actors ask for fractions, and the tests need rollout,
    reward and learner actors alive at once, not four cores of throughput. Workers inherit this
    process's environment, including the in-process vLLM switch set above.
    """
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield
    ray.shutdown()
