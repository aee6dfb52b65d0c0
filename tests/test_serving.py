"""The service's steps without Ray (``segr1.serving.answer``) and its Serve config file (``segr1.serve``)."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from segr1.config import load_config
from segr1.config.tools import ConfigError
from segr1.core.parser import ParserLimits, parse_completion
from segr1.core.prompts import answer_text
from segr1.core.segment import BoxSegmenter, segment_image
from segr1.serve import read_serve_file
from segr1.serving.answer import BadInput, answer_json, check_query, read_image

REPO = Path(__file__).resolve().parents[1]


def _encoded(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


@pytest.mark.parametrize("task, expression, status, message", [
    (None, None, 400, "task: missing"),
    ("everything", None, 400, "task 'everything': unknown; expected one of cod, sod, refer, reason"),
    ("refer", "  ", 400, "expression: task 'refer' segments what an expression describes"),
    ("cod", "the cat", 400, "expression: task 'cod' takes no expression"),
    ("reason", "x" * 1001, 400, "expression: 1001 characters, over the limit of 1000"),
])
def test_a_bad_query_is_refused_naming_the_field(task, expression, status, message):
    with pytest.raises(BadInput, match=message) as caught:
        check_query(task, expression)
    assert caught.value.status == status


def test_a_good_query_keeps_a_stripped_expression():
    assert check_query("refer", "  the dog on the left ").expression == "the dog on the left"
    assert check_query("sod", "").expression is None


def test_an_image_over_the_pixel_limit_is_refused_from_its_header():
    huge = _encoded(Image.new("1", (5000, 5000)))  # 25 Mpx in a few kB: nothing is decoded
    assert len(huge) < 100_000
    with pytest.raises(BadInput, match="image: 5000x5000 = 25000000 pixels, over the limit of 16777216") as caught:
        read_image(huge, max_pixels=4096 * 4096)
    assert caught.value.status == 413
    for data, status, message in [(b"", 400, "image: empty file"), (b"GIF89a broken", 415, "not an image")]:
        with pytest.raises(BadInput, match=message) as caught:
            read_image(data, max_pixels=4096 * 4096)
        assert caught.value.status == status


def test_an_image_is_read_upright_as_a_browser_shows_it():
    stored = np.zeros((30, 80, 3), np.uint8)
    stored[:, :10] = 255  # a white band on the stored image's left
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation: rotate 90 degrees clockwise to display
    data = _encoded(Image.fromarray(stored), "JPEG", exif=exif, quality=95)
    image = read_image(data, max_pixels=10_000)
    assert image.shape == (80, 30, 3)  # displayed portrait
    assert image[:10, :, 0].mean() > 200 and image[-10:, :, 0].mean() < 50  # the band is on top now


def test_the_answer_is_in_the_images_pixels_and_its_mask_the_segmenters():
    policy_size, image = (84, 84), np.zeros((768, 1024, 3), np.uint8)
    text = "<think>the object is lower right</think>" + answer_text(
        boxes=[[42, 42, 84, 84]], points=[[63, 63], [10, 10]], labels=[1, 0])
    prompt_set = parse_completion(text, policy_size, ParserLimits())
    mask = segment_image(BoxSegmenter(point_radius=0), image, prompt_set, policy_size)
    answer = answer_json(text, prompt_set, policy_size, mask, {"total_ms": 12.345})
    assert answer["boxes"] == [[512.0, 384.0, 1024.0, 768.0]]
    # every point the policy wrote (SAM2 is given only those inside a box: the reward's rule)
    assert answer["points"] == [[768.0, 576.0], [121.9, 91.4]]
    assert answer["labels"] == [1, 0]
    decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["mask_png"])))) > 127
    assert decoded.shape == (768, 1024) and answer["image_size"] == [1024, 768]
    assert decoded[384:, 512:].all() and not decoded[:384].any() and not decoded[:, :512].any()
    assert answer["mask_pixels"] == 384 * 512
    assert answer["think"] == "the object is lower right"
    assert answer["timings"] == {"total_ms": 12.3}


def test_cluster_serve_yaml_is_a_serve_config_of_segr1s_application():
    file = read_serve_file(REPO / "cluster" / "serve.yaml")
    assert set(file.deployments) == {"Policy", "Segmenter", "Ingress"}
    assert file.deployments["Policy"]["autoscaling_config"]["max_replicas"] == 4
    assert file.deployments["Ingress"]["num_replicas"] == 2
    assert file.http == {"host": "0.0.0.0", "port": 8000}
    config = load_config(file.config, file.overrides)  # the builder's args are segr1 settings
    assert config.model.path == "/models/segr1-cod/export"
    assert (config.rollout.num_gpus_per_actor, config.reward.num_gpus_per_actor) == (1, 0.5)
    assert config.serve.require_token


def test_a_serve_config_without_segr1s_application_is_refused(tmp_path):
    spec = yaml.safe_load((REPO / "cluster" / "serve.yaml").read_text())
    spec["applications"][0]["import_path"] = "somewhere.else:app"
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match="expected one application with import_path segr1.serving.app:build, found 0"):
        read_serve_file(path)
    spec["applications"][0].update(import_path="segr1.serving.app:build", args={"policy": "x"})
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match=r"args has unknown keys \['policy'\]"):
        read_serve_file(path)


def test_segr1_serve_refuses_a_public_host_without_a_token(monkeypatch, capsys):
    from segr1 import serve

    monkeypatch.delenv("SEGR1_SERVE_TOKEN", raising=False)
    assert serve.main(["--config", "tiny", "--host", "0.0.0.0"]) == 2  # before Ray or any model starts
    assert "serve.require_token is set but $SEGR1_SERVE_TOKEN is empty" in capsys.readouterr().err
