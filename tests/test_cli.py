"""`luffy-trl` (console entry point): packaged recipes by name, and the whole path from a wheel installed into a
fresh virtual environment outside the repository (no checkout needed)."""

import os
import pathlib
import shutil
import site
import subprocess
import sys

import pytest

from luffy_trl.cli import main
from luffy_trl.configs import accelerate_config_path, list_accelerate_configs, list_recipes, recipe_path

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_recipes_lists_every_packaged_recipe_and_accelerate_config(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert {"qwen2.5-math-7b", "demo_cpu", "grpo_baseline"} <= set(list_recipes())
    assert set(list_accelerate_configs()) == {"single_gpu", "multi_gpu", "zero2", "zero3", "zero3_offload"}
    for name in [*list_recipes(), *list_accelerate_configs()]:
        assert f"  {name} " in out
    assert "LUFFY's headline run" in out  # each line carries the file's description


def test_names_and_paths_resolve(tmp_path, capsys):
    assert recipe_path("qwen2.5-math-7b") == recipe_path("qwen2.5-math-7b.yaml") == list_recipes()["qwen2.5-math-7b"]
    own = tmp_path / "mine.yaml"
    own.write_text("task: sorting\n")
    assert recipe_path(str(own)) == own  # a file wins over a packaged name
    assert accelerate_config_path("zero3").name == "zero3.yaml"
    with pytest.raises(FileNotFoundError, match="qwen2.5-math-7b"):
        recipe_path("qwen-7b")
    assert main(["recipes", "--path", "zero3"]) == 0
    assert capsys.readouterr().out.strip() == str(accelerate_config_path("zero3"))
    assert main(["recipes", "--path", "nope"]) == 2
    assert main(["frobnicate"]) == 2


def can_build_without_isolation() -> bool:
    """pyproject's build requirements (setuptools>=68, wheel) are installed, so the wheel builds offline."""
    try:
        import setuptools
        import wheel  # noqa: F401
    except ImportError:
        return False
    from packaging.version import Version

    return Version(setuptools.__version__) >= Version("68")


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_lists_recipes_and_trains(tmp_path):
    """Build a wheel, install it (no deps) into `python -m venv --system-site-packages` outside the repository, then
    `luffy-trl recipes` and one offline training step of a packaged recipe, from an empty directory."""
    src = tmp_path / "src-copy"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_REQUIRE_VIRTUALENV")}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    pip = [sys.executable, "-m", "pip"]
    run = dict(env=env, capture_output=True, text=True, timeout=240)
    build = ["--no-build-isolation"] if can_build_without_isolation() else []  # else pip fetches setuptools, wheel
    result = subprocess.run([*pip, "wheel", "--no-deps", *build, "-q", "-w", str(tmp_path / "dist"), str(src)], **run)
    assert result.returncode == 0, result.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("luffy_trl-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    # The dependencies (torch, trl, ...) live in this test's environment, which may itself be a virtual environment
    # (CI's): make its site-packages visible too, after the new environment's own (where the wheel goes).
    venv_site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip()
    (pathlib.Path(venv_site) / "_parent_env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    result = subprocess.run([*pip, "--python", str(python), "install", "--no-deps", "-q", str(wheel)], **run)
    assert result.returncode == 0, result.stderr[-2000:]

    work = tmp_path / "elsewhere"
    work.mkdir()
    run["cwd"] = work
    where = subprocess.run([str(python), "-c", "import luffy_trl; print(luffy_trl.__file__)"], **run)
    assert pathlib.Path(where.stdout.strip()).is_relative_to(venv), where.stdout  # the wheel, not a checkout
    listing = subprocess.run([str(venv / "bin" / "luffy-trl"), "recipes"], **run)
    assert listing.returncode == 0, listing.stderr[-2000:]
    assert "qwen2.5-math-7b" in listing.stdout and "zero3" in listing.stdout
    path = subprocess.run([str(venv / "bin" / "luffy-trl"), "recipes", "--path", "demo_cpu"], **run).stdout.strip()
    assert pathlib.Path(path).is_relative_to(venv) and pathlib.Path(path).is_file()

    train = subprocess.run(
        [str(venv / "bin" / "luffy-trl"), "train", "--config", "demo_cpu", "--output_dir", "out", "--max_steps", "1",
         "--demo_train_rows", "32", "--demo_heldout_every", "0", "--per_device_train_batch_size", "8",
         "--logging_steps", "1", "--report_to", "none"], **run)
    assert train.returncode == 0, train.stderr[-3000:]
    assert (work / "out" / "model.safetensors").is_file()
    assert "'loss'" in train.stdout or "'loss'" in train.stderr
