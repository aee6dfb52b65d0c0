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

from segr1.testing.tiny import Sam2Checkpoint, build_qwen, build_sam2  # noqa: E402

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
    process's environment, including the in-process vLLM switch set above. Started the way the
    job starts one (``segr1.runtime.ray_cluster``'s single-machine mode): without it Ray takes the
    machine's network address and its workers listen on every interface.
    """
    import ray

    from segr1.runtime.ray_cluster import _single_machine_mode

    if not ray.is_initialized():
        with _single_machine_mode():
            ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_uri() -> Iterator[str]:
    """A bucket on a local S3 server (moto's, its own process on 127.0.0.1) as a URI pyarrow reads.

    A process of its own: moto's Flask app, imported here, breaks vLLM engines started later in this
    process ("Working outside of application context"). The test credentials travel in the URI, so
    Ray workers reach the bucket without environment variables (real runs use the cloud's
    credential chain, never keys in a URI).
    """
    import socket
    import subprocess
    import sys
    import time

    import pyarrow.fs as pafs

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    options = f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    deadline = time.monotonic() + 60
    while True:
        try:
            fs, _ = pafs.FileSystem.from_uri(f"s3://test:test@segr1-test?{options}&allow_bucket_creation=true")
            fs.create_dir("segr1-test")
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise
            time.sleep(0.5)
    yield f"s3://test:test@segr1-test/run?{options}"
    server.terminate()
    server.wait(timeout=30)
