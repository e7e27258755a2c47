"""The distributions as a user installs them: built as wheels, installed in fresh venvs.

- Every import name lives under ``loraserve``: the wheels hold no other top-level name, so the
  server installs beside AdapterHub's ``adapters`` (and anything called ``server`` or
  ``client``) without shadowing it.
- The client distribution installs and runs without torch, tokenizers or safetensors.

Slow (two venvs, pip from the registry's cache and torch from its wheel), so both checks share
one module-scoped build.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCH = "torch==2.13.0"  # what the Makefile installs


def run(*cmd, cwd=None, timeout=600) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("wheels")
    # Build from a copy of the tracked files: what a clean checkout builds, and no build/ or
    # egg-info left behind in the working tree (nor stale files from an earlier build).
    source = tmp_path_factory.mktemp("source")
    tracked = run("git", "ls-files", "-z", cwd=ROOT).stdout.split("\0")
    for name in filter(None, tracked):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / name).is_symlink():  # client/v1 -> the stubs
            (source / name).symlink_to(os.readlink(ROOT / name))
        elif (ROOT / name).is_file():
            shutil.copy2(ROOT / name, source / name)
    # --no-build-isolation: build with this venv's setuptools instead of fetching one
    for project in (source / "client", source):
        run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
            "-w", out, project)  # fmt: skip
    found = {p.name.split("-")[0]: p for p in out.glob("*.whl")}
    assert set(found) == {"loraserve", "loraserve_client"}, found
    return found


def venv(path: Path) -> Path:
    run(sys.executable, "-m", "venv", path)
    return path / "bin" / "python"


def top_level_names(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as z:
        return {name.split("/")[0] for name in z.namelist()}


def test_every_top_level_name_is_loraserve(wheels):
    for wheel in wheels.values():
        names = top_level_names(wheel)
        dist_info = {n for n in names if n.endswith(".dist-info")}
        assert names - dist_info == {"loraserve"}, (wheel.name, names)
        with zipfile.ZipFile(wheel) as z:
            # a namespace package: a loraserve/__init__.py would hide the other distribution
            assert "loraserve/__init__.py" not in z.namelist()
    with zipfile.ZipFile(wheels["loraserve"]) as z:
        files = z.namelist()
    assert "loraserve/server/runtime.py" in files
    assert "loraserve/adapters/demo/base/model.safetensors" in files  # the demo ships
    assert "loraserve/adapters/smollm2/adapters/json.safetensors" in files  # SmolLM2's adapters
    assert not any(f.startswith("loraserve/client/") for f in files)  # it comes from the client
    # every package of the tree is in the wheel (pyproject lists them by hand)
    for folder in ("adapters", "server"):
        for init in (ROOT / folder).rglob("__init__.py"):
            module = init.relative_to(ROOT).as_posix()
            assert f"loraserve/{module}" in files, f"{module}: add its package to pyproject.toml"
    # and everything the native CPU ops are built from (the server builds them on first start)
    for source in (ROOT / "adapters" / "kernels" / "csrc").iterdir():
        assert f"loraserve/adapters/kernels/csrc/{source.name}" in files, source.name


def test_the_client_installs_and_runs_without_torch(wheels, tmp_path):
    python = venv(tmp_path / "client-only")
    run(python, "-m", "pip", "install", "-q", wheels["loraserve_client"])
    probe = (
        "import importlib.util, loraserve.client, loraserve.v1.inference_pb2\n"
        "heavy = ['torch', 'tokenizers', 'safetensors']\n"
        "heavy = [m for m in heavy if importlib.util.find_spec(m)]\n"
        "assert not heavy, heavy\n"
        "print(loraserve.client.LoraClient.__name__)"
    )
    assert run(python, "-c", probe, cwd=tmp_path).stdout.strip() == "LoraClient"
    cli = run(tmp_path / "client-only" / "bin" / "loraserve", "--help")
    assert "generate" in cli.stdout


def test_the_server_installs_beside_adapterhub_adapters(wheels, tmp_path):
    python = venv(tmp_path / "both")
    run(python, "-m", "pip", "install", "-q", TORCH)
    run(python, "-m", "pip", "install", "-q", wheels["loraserve_client"], wheels["loraserve"],
        "adapters")  # fmt: skip
    probe = (
        "import adapters, loraserve.adapters.lora, loraserve.server.runtime, loraserve.client\n"
        "assert hasattr(adapters, 'AutoAdapterModel'), adapters.__file__  # AdapterHub's own\n"
        "assert 'site-packages/adapters' in adapters.__file__\n"
        "print(loraserve.server.runtime.SERVER_VERSION)"
    )
    assert run(python, "-c", probe, cwd=tmp_path).stdout.strip()
    server = run(tmp_path / "both" / "bin" / "loraserve-server", "--help")
    assert "--max-active-adapters" in server.stdout


def test_the_client_sdist_carries_the_stubs(tmp_path):
    """A source distribution of client/ (what an index would serve) builds a complete wheel."""
    build = (
        "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    )
    source = tmp_path / "source"
    shutil.copytree(ROOT / "client", source / "client", symlinks=True)
    shutil.copytree(ROOT / "protos", source / "protos")
    name = run(sys.executable, "-c", build, tmp_path / "sdist", cwd=source / "client").stdout
    with tarfile.open(tmp_path / "sdist" / name.strip().splitlines()[-1]) as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    (unpacked,) = (tmp_path / "unpacked").iterdir()
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
        "-w", tmp_path / "wheel", unpacked)  # fmt: skip
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        assert "loraserve/v1/inference_pb2_grpc.py" in z.namelist()
        assert "loraserve/client/client.py" in z.namelist()
