"""`python -m segr1.serve` / `segr1 serve`: a trained policy and SAM2 as an HTTP service on Ray Serve.

    segr1 serve --policy runs/cod/export --sam2-config configs/sam2.1/sam2.1_hiera_l.yaml \\
        --sam2-checkpoint checkpoints/sam2.1_hiera_large.pt
    segr1 serve --policy tiny-warm --sam2-checkpoint tiny --config tiny      # the tiny models

The web page is at http://127.0.0.1:8000/, the API at POST /v1/segment, readiness at GET /healthz
(docs/serve.md). The settings are the training job's configuration (``--config``, then
``--section.key VALUE``); the short flags are aliases of its keys. ``--serve-config`` reads a Ray
Serve config file (``cluster/serve.yaml``): its application's ``args`` (a config and overrides,
which the command line's override) and its deployments' replicas and autoscaling, and its
``http_options`` unless ``--host``/``--port`` are given. The service runs until interrupted.
"""

from __future__ import annotations

import argparse
import ipaddress
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from segr1.config import Config, command_parser, load_config, resolve_models
from segr1.config.tools import Alias, ConfigError, alias_overrides
from segr1.serving import ANSWER_ALIASES
from segr1.serving.app import APP_NAME, application, token_digest

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000

ALIASES = [*ANSWER_ALIASES, Alias("--max-image-pixels", "serve.max_image_pixels", "larger uploads are refused (413)")]


@dataclass
class ServeFile:
    """What ``segr1 serve`` takes from a Ray Serve config file: the segr1 application's builder
    ``args``, each deployment's options (as Serve applies them: they replace the code's) and
    ``http_options``."""

    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    deployments: dict[str, dict[str, Any]] = field(default_factory=dict)
    http: dict[str, Any] = field(default_factory=dict)


def read_serve_file(path: Path) -> ServeFile:
    from ray.serve.schema import ServeDeploySchema

    try:
        schema = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    except Exception as err:  # noqa: BLE001 - YAML and pydantic errors: a file Serve would refuse too
        raise ConfigError(f"--serve-config {path}: not a Ray Serve config: {err}") from err
    apps = [app for app in schema.applications if app.import_path == "segr1.serving.app:build"]
    if len(apps) != 1:
        raise ConfigError(f"--serve-config {path}: expected one application with import_path "
                          f"segr1.serving.app:build, found {len(apps)}")
    app = apps[0]
    args = dict(app.args or {})
    unknown = set(args) - {"config", "overrides"}
    if unknown:
        raise ConfigError(f"--serve-config {path}: args has unknown keys {sorted(unknown)}; it takes config, overrides")
    deployments = {d.name: d.model_dump(exclude_unset=True, exclude={"name"}) for d in app.deployments}
    http = schema.http_options.model_dump(include={"host", "port"}, exclude_unset=True)
    return ServeFile(args.get("config"), [str(o) for o in args.get("overrides") or []], deployments, http)


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("segr1 serve", "Serve a policy and SAM2 over HTTP (Ray Serve): a web page, "
                       "POST /v1/segment, GET /healthz.", ALIASES)
    p.add_argument("--serve-config", type=Path, default=None,
                   help="a Ray Serve config (cluster/serve.yaml): builder args, replicas, autoscaling, http_options")
    p.add_argument("--host", default=None, help="address to listen on (default: the Serve config's, else "
                   f"{DEFAULT_HOST}); beyond 127.0.0.1 an access token is required (serve.token_env)")
    p.add_argument("--port", type=int, default=None, help=f"port (default: the Serve config's, else {DEFAULT_PORT})")
    return p


def parse(argv: Sequence[str] | None) -> tuple[Config, ServeFile, str, int]:
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    file = read_serve_file(args.serve_config) if args.serve_config else ServeFile()
    config = load_config(args.config or file.config, [*file.overrides, *overrides], alias_overrides(args, ALIASES))
    host = args.host or file.http.get("host", DEFAULT_HOST)
    port = args.port or file.http.get("port", DEFAULT_PORT)
    if not _loopback(host):
        config = replace(config, serve=replace(config.serve, require_token=True))
    return config, file, host, port


def _loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def deploy(config: Config, file: ServeFile, host: str, port: int) -> str:
    """Start Serve's proxy on ``host:port`` and the application; returns the service's URL."""
    from ray import serve

    serve.start(http_options={"host": host, "port": port})
    app = application(config, file.deployments)
    serve.run(app, name=APP_NAME, route_prefix="/")
    return f"http://{host}:{port}/"


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config, file, host, port = parse(argv)
        token_digest(config.serve)  # no token where one is needed: stop before Ray or a model starts
        config = resolve_models(config)
    except SystemExit as exit_:  # --help and usage errors keep argparse's message and status
        return int(exit_.code or 0)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    import ray
    from ray import serve

    from segr1.runtime.ray_cluster import connect

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    info = connect(**asdict(config.ray))
    try:
        url = deploy(config, file, host, port)
        print(f"segr1 serving {config.model.path} at {url} (web page), {url}v1/segment (API), {url}healthz; "
              "Ctrl-C stops it", flush=True)
        stop.wait()
        print("stopping the service", flush=True)
        serve.delete(APP_NAME)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - a replica that failed to start: Serve's own message
        print(f"error: the service did not start: {err}", file=sys.stderr)
        return 1
    finally:
        if info.started_locally:
            serve.shutdown()
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
