"""Installing the project as a user would: a non-editable install ships the bundled sample
problems, and a render-only install (no torch) answers `capture` / `run` in one line.

Offline and fast: the package is built with the running environment's setuptools
(`--no-build-isolation`, no index) and installed with `--no-deps` into a folder that is put
first on the path; its dependencies come from the running environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA_FILES = sorted(p.name for p in (REPO / "data").glob("*.jsonl"))


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LATENTMAS_DATA_DIR")}
    env.update(HF_HUB_OFFLINE="1", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", **extra)
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """`pip install --no-deps .` of this checkout into a fresh folder (a copy, so the checkout gets no build/)."""
    pytest.importorskip("setuptools", minversion="77")
    work = tmp_path_factory.mktemp("install")
    source = work / "source"
    tracked = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                             capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, tracked):
        original, copy = REPO / name, source / name
        if original.is_symlink():  # latentmas/sample_data -> ../data
            copy.parent.mkdir(parents=True, exist_ok=True)
            copy.symlink_to(os.readlink(original))
        elif original.is_file():
            copy.parent.mkdir(parents=True, exist_ok=True)
            copy.write_bytes(original.read_bytes())
    target = work / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                           "--no-index", "--target", str(target), str(source)], capture_output=True, text=True,
                          env=_env(), timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    return target


def _python(code: str, target: Path, cwd: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=240,
                          env=_env(PYTHONPATH=str(target), **env))


def test_installed_package_ships_the_bundled_problems(installed, tmp_path):
    shipped = sorted(p.name for p in (installed / "latentmas" / "sample_data").glob("*.jsonl"))
    assert shipped == DATA_FILES and DATA_FILES
    code = textwrap.dedent("""
        import json, latentmas
        from latentmas.tasks import load_problems
        from latentmas.tasks.loading import data_dir, problem_origin
        problems = load_problems("gsm8k", max_samples=2)
        print(json.dumps({"package": latentmas.__file__, "data_dir": str(data_dir()),
                          "origin": problem_origin(problems), "first": problems[0].question}))
    """)
    done = _python(code, installed, tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert Path(report["package"]).is_relative_to(installed)  # the installed copy, not the checkout
    assert Path(report["data_dir"]) == installed / "latentmas" / "sample_data"
    assert report["origin"] == {"problem_source": "bundled:data/gsm8k.jsonl", "problem_count": 2}
    first = json.loads((REPO / "data" / "gsm8k.jsonl").read_text().splitlines()[0])
    assert report["first"] == first["question"]
    assert "using 2 bundled gsm8k problems" in done.stderr


@pytest.mark.slow
def test_installed_cli_runs_offline_on_the_bundled_problems(installed, tmp_path, tiny_lm_cache_env):
    code = ("import sys; from latentmas.app.cli import main; "
            "main(sys.argv[1:], prog_name='latentmas')")
    done = subprocess.run(
        [sys.executable, "-c", code, "run", "--method", "baseline", "--model_name", "tiny-qwen3", "--task", "gsm8k",
         "--max_samples", "1", "--max_new_tokens", "4", "--device", "cpu"],
        cwd=tmp_path, capture_output=True, text=True, timeout=240,
        env=_env(PYTHONPATH=str(installed), **tiny_lm_cache_env))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "data file not found" not in done.stderr
    assert "bundled gsm8k problems" in done.stderr


# Makes torch and transformers unimportable, as in a render-only install (`pip install latentmas`).
_BLOCK_TORCH = textwrap.dedent("""
    import importlib.abc, sys
    class NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "transformers", "tokenizers", "safetensors"):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None
    sys.meta_path.insert(0, NoTorch())
""")


def test_the_blocker_really_hides_torch(tmp_path):
    done = subprocess.run([sys.executable, "-c", _BLOCK_TORCH + "import torch"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, env=_env(PYTHONPATH=str(REPO)))
    assert done.returncode != 0 and "No module named 'torch'" in done.stderr


@pytest.mark.parametrize("command", ["capture", "run"])
def test_capture_without_torch_says_which_extra_in_one_line(command, tmp_path):
    code = _BLOCK_TORCH + "import sys; from latentmas.app.cli import main; main(sys.argv[1:], prog_name='latentmas')"
    done = subprocess.run([sys.executable, "-c", code, command, "--model_name", "tiny-qwen3", "--max_samples", "1",
                           "--device", "cpu"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=_env(PYTHONPATH=str(REPO)))
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode != 0
    assert len(lines) == 1, done.stderr[-2000:]
    assert 'pip install "latentmas[capture]"' in lines[0]
