"""Using a trained policy: the HTTP service on Ray Serve (``app``, with its web page) and what it
shares with batch prediction (``answer``: one image in, one answer out)."""

from segr1.config.tools import Alias

# The short flags `segr1 serve` and `segr1 predict` share: the models and how the policy answers.
ANSWER_ALIASES = [
    Alias("--policy", "model.path", "Hugging Face model directory (a run's export), or 'tiny'/'tiny-warm'", text=True),
    Alias("--sam2-config", "sam2.config", "SAM2 config name", text=True),
    Alias("--sam2-checkpoint", "sam2.checkpoint", "SAM2 checkpoint file, or 'tiny' (a random tiny SAM2)", text=True),
    Alias("--policy-size", "evaluation.policy_size", "side of the square the image is resized to for the policy "
          "(null: 768 for cod/sod, 1024 for refer/reason)"),
    Alias("--max-tokens", "evaluation.max_tokens"),
    Alias("--kv-cache-mb", "rollout.kv_cache_memory_bytes", "vLLM KV cache on CPU, MiB",
          convert=lambda v: int(v) << 20),
    Alias("--ray-address", "ray.address", "join this Ray cluster (default: RAY_ADDRESS, else start one)", text=True),
    Alias("--num-cpus", "ray.num_cpus", "CPUs of a Ray cluster started here"),
]
