"""Methods added to every vLLM worker (``worker_extension_cls``) for versioned weight sync.

vLLM mixes this class into its worker class, so ``self`` below is the worker (``self.rank`` is
its rank inside the engine, ``self.reload_weights`` is vLLM's in-place reloader, which goes
through the model's own ``load_weights`` and therefore accepts Hugging Face parameter names and
re-packs weights the way the CPU and GPU backends need). The rollout actor reaches these methods
with ``LLM.collective_rpc``: one call per sync runs on every worker (every tensor-parallel rank)
at once, and each worker receives the buckets from the learner itself, so no weight ever passes
through the control path.

Method names carry a ``segr1_`` prefix because vLLM refuses extensions whose attribute names
clash with the worker's own.
"""

from __future__ import annotations

import logging
import warnings

from segr1.weightsync.weight_sync import BucketPlan, WeightGroup, drain, join_group, receive_buckets

# Layers whose only tensors are buffers vLLM computes itself (rotary cos/sin caches, the image
# normalisation of the fused multimodal input): no checkpoint and no weight sync carries them, so
# vLLM's layer-wise reloader reports each as "Failed to load weights" at every reload, although it
# puts the computed buffers back. A layer with real weights that failed still reports.
COMPUTED_BUFFER_LAYERS = frozenset({"RotaryEmbedding", "MRotaryEmbedding", "FusedMMInputNorm"})
_SET_NUM_THREADS = "CPU backend doesn't allow to use `torch.set_num_threads`"


class _KnownVllmNoise(logging.Filter):
    """Drops two vLLM warnings that come from vLLM's own code and say nothing about this job.

    - vLLM's CPU worker replaces ``torch.set_num_threads`` process-wide with a function that only
      warns; with the engine in-process (the CPU setup) vLLM's own input renderer then calls it
      twice per image prompt. The first is kept (it does say the call is ignored), the rest dropped.
    - The reloader's "Failed to load weights" for ``COMPUTED_BUFFER_LAYERS`` (see there).
    """

    def __init__(self) -> None:
        super().__init__()
        self._seen_set_num_threads = False

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith(_SET_NUM_THREADS):
            seen, self._seen_set_num_threads = self._seen_set_num_threads, True
            return not seen
        if record.msg == "%s: Failed to load weights" and isinstance(record.args, tuple) and record.args:
            return record.args[0] not in COMPUTED_BUFFER_LAYERS
        return True


_NOISY_LOGGERS = ("vllm.v1.worker.cpu_worker", "vllm.model_executor.model_loader.reload.layerwise")


def quiet_known_vllm_noise() -> None:
    """Install ``_KnownVllmNoise`` on the two vLLM loggers of this process (once), and silence one
    deprecation warning that vLLM's processor calls raise in transformers (below).

    Called by the rollout actor (an in-process engine runs its worker there) and by each engine
    worker when it joins the weight group (a multiprocess engine's workers are other processes).
    """
    for name in _NOISY_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _KnownVllmNoise) for f in logger.filters):
            logger.addFilter(_KnownVllmNoise())
    # The engines take the image bounds as flat min_pixels/max_pixels (the only form vLLM 0.32 lets
    # win over a checkpoint's own), which vLLM hands to every HF processor call, where transformers
    # calls the form deprecated. It still works in the pinned transformers (< 5.20; removal is due
    # in 5.23), and tests/test_rollout.py checks the bounds hold.
    warnings.filterwarnings("ignore", message="Passing `min_pixels` and `max_pixels` to a processor call",
                            category=FutureWarning)


class WeightSyncWorkerExtension:
    """Joins the learner's weight group and loads broadcast buckets into the running model."""

    _segr1_group: WeightGroup | None = None

    def segr1_join_weight_group(
        self,
        host: str,
        port: int,
        rank_offset: int,
        world_size: int,
        backend: str,
        local_host: str,
        timeout_s: float,
        secret: str,
    ) -> int:
        """Join (or re-join, replacing the old group) as rank ``rank_offset + self.rank``.

        ``secret`` is the job's, proven to the group's store; it arrives as an argument of this
        call only, never through the environment.
        """
        quiet_known_vllm_noise()  # this worker's process, before its first reload
        self._segr1_group = None  # drop the previous group before building the next one
        rank = rank_offset + self.rank  # type: ignore[attr-defined]
        self._segr1_group = join_group(
            host, port, rank, world_size, backend, secret=secret, local_host=local_host, timeout_s=timeout_s
        )
        return rank

    def segr1_receive_weights(self, plan: dict, version: int) -> int:
        """Receive one sync and reload it in place; returns how many tensors were loaded.

        Whatever happens inside the loader, the rest of the sync is still received (``drain``),
        so the sender and the other receivers are never left blocked in a collective. A failed
        load (the sender aborted, a tensor was rejected) leaves vLLM's layer-wise reloader half
        way, with not-yet-loaded layers on the meta device; finishing it puts the old tensors
        back into those layers, so the engine runs again (on a mix of versions, which the actor
        refuses to sample from until a full sync succeeds).
        """
        if self._segr1_group is None:
            raise RuntimeError("this worker has not joined a weight group (call join_weight_group first)")
        parsed = BucketPlan.from_json(plan)
        weights = receive_buckets(self._segr1_group, parsed, version)
        try:
            self.reload_weights(weights_iterator=weights)  # type: ignore[attr-defined]
        except BaseException:
            self._segr1_finish_failed_reload()
            raise
        finally:
            drain(weights)
        return parsed.num_tensors

    def _segr1_finish_failed_reload(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload

        with set_current_vllm_config(self.vllm_config):  # type: ignore[attr-defined]
            finalize_layerwise_reload(self.model_runner.get_model(), self.model_config)  # type: ignore[attr-defined]
