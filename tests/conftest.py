"""Make the flat library importable from tests/ (the repo root is the package root), and share the
tiny random pipelines that several test files compare against, built once per session.

The pipeline folders are read-only by agreement: a test that needs a variant copies one first
(shutil.copytree) and changes the copy.
"""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests reaches the network, hub ids included


@pytest.fixture(scope="session")
def sd15_root(tmp_path_factory):
    """A tiny random SD 1.5 pipeline in the hub layout (tiny_pipelines.make_sd15)."""
    from tiny_pipelines import make_sd15

    return make_sd15(tmp_path_factory.mktemp("sd15"))


@pytest.fixture(scope="session")
def sd21_root(tmp_path_factory):
    """A tiny random SD 2.1 pipeline in the hub layout (tiny_pipelines.make_sd21)."""
    from tiny_pipelines import make_sd21  # imports diffusers: only where a test asks for it

    return make_sd21(tmp_path_factory.mktemp("sd21"))


@pytest.fixture(scope="session")
def sdxl_root(tmp_path_factory):
    """A tiny random SDXL base pipeline in the hub layout (tiny_pipelines.make_sdxl)."""
    from tiny_pipelines import make_sdxl

    return make_sdxl(tmp_path_factory.mktemp("sdxl"))


@pytest.fixture(scope="session")
def sd3_root(tmp_path_factory):
    """A tiny random SD3 pipeline in the hub layout (tiny_pipelines.make_sd3)."""
    from tiny_pipelines import make_sd3

    return make_sd3(tmp_path_factory.mktemp("sd3"))


@pytest.fixture(scope="session")
def sd35_root(tmp_path_factory):
    """A tiny random SD3.5-like pipeline: q / k RMSNorm and a dual-attention block (tiny_pipelines.make_sd3)."""
    from tiny_pipelines import make_sd3

    return make_sd3(tmp_path_factory.mktemp("sd35"), sd35=True)
