"""Shared fixtures: tiny checkpoints built once per session in a temporary folder (nothing downloaded)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# under pytest-xdist (`make test` runs two workers on a 2-core machine) each worker and the
# tools it launches take one thread, so the workers do not fight over the cores
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A folder with every tiny part written by make_tiny (``qwen2_5_vl``, ``qwen3_vl``, the generators, ``demo_data``)."""
    from backbones.mllm.tiny_qwen2_5_vl import make_tiny
    from fusion.demo_data import make_demo_data

    from backbones.generator import cosmos, sana, wan

    out = tmp_path_factory.mktemp("tiny")
    make_tiny(out, seed=0)
    make_demo_data(out)
    wan.make_tiny(out, seed=0, name="wan")
    wan.make_tiny(out, seed=0, name="wan2_2", variant="2.2")
    cosmos.make_tiny(out, seed=0, name="cosmos", variant="2.5")
    cosmos.make_tiny(out, seed=0, name="cosmos2", variant="2")
    sana.make_tiny(out, seed=0, name="sana")
    from backbones.mllm import qwen3_vl

    qwen3_vl.make_tiny(out, seed=0)
    return out


def compose_config(overrides=(), name="config"):
    """Compose the repo's Hydra config like a tool does."""
    from hydra import compose, initialize_config_dir

    from fusion.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


@pytest.fixture(scope="session")
def tiny_mllm_path(tiny_dir) -> Path:
    return tiny_dir / "qwen2_5_vl"


#: every MLLM family: its tiny folder (tools/make_tiny.py part), adapter class and tiny config (conf/mllm/). A new family is a line here.
MLLM_FAMILIES = {
    "qwen2_5_vl": ("backbones.mllm.qwen2_5_vl.Qwen25VLAdapter", "tiny"),
    "qwen3_vl": ("backbones.mllm.qwen3_vl.Qwen3VLAdapter", "tiny_qwen3_vl"),
}


#: the families after the first run their per-family tests in the slow tier (the fast tier keeps `make test` under 15 minutes);
#: the fast tier still trains both stages and runs a fused smoke step on each (tests/tools)
@pytest.fixture(scope="session", params=[name if i == 0 else pytest.param(name, marks=pytest.mark.slow) for i, name in enumerate(MLLM_FAMILIES)])
def mllm_family(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def mllm(tiny_dir, mllm_family):
    """The tiny adapter of each family, layers [0, 2, -1], in eval mode (shared: tests must not modify it)."""
    from hydra.utils import get_class

    a = get_class(MLLM_FAMILIES[mllm_family][0]).from_pretrained(str(tiny_dir / mllm_family), hidden_layers=[0, 2, -1])
    return a.eval()


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> dict[str, Path]:
    """Two small images of different sizes (square and 3:2)."""
    from fusion.demo_data import draw_scene

    d = tmp_path_factory.mktemp("images")
    paths = {"square": d / "square.png", "wide": d / "wide.png"}
    draw_scene([("circle", "red", 1, 1)]).save(paths["square"])
    draw_scene([("square", "blue", 0, 2)], size=96).resize((96, 64)).save(paths["wide"])
    return paths
