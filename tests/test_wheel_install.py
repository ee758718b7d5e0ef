"""A wheel install (``pip install``, not ``-e``) carries what diffalign reads at run time: every shipped prompt set.

The wheel is built from a copy of the source (``pip wheel --no-build-isolation``: setuptools from this
environment, no network) and installed with ``--no-deps`` into a throwaway venv. That venv sees this environment's
packages (torch, diffusers, ...) through one ``.pth`` line; a folder added that way does not have its own ``.pth``
files run, so the editable install's finder stays out and ``import diffalign`` can only find the wheel's copy. From
a folder outside the repository, the installed package then loads every shipped set of ``PROMPT_SETS`` through
``load_prompts``.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from conftest import ROOT

from diffalign.evaluation.prompts import PROMPT_SETS, load_prompts

PROBE = """
import json
import diffalign
from diffalign.evaluation.prompts import PROMPT_SETS, load_prompts

shipped = [entry.name for entry in PROMPT_SETS.entries() if entry.value.shipped]
print(json.dumps({"file": diffalign.__file__, "sets": {name: load_prompts(name) for name in shipped}}))
"""


def run(command: list[str], cwd: Path, env: dict | None = None) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(map(str, command))} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def build_wheel(tmp_path: Path) -> Path:
    """The wheel of a copy of the source tree (so the build writes nothing into the repository)."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "diffalign", source / "diffalign", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    wheels = tmp_path / "wheels"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", str(wheels), str(source)], cwd=tmp_path)
    (wheel,) = wheels.glob("diffalign-*.whl")
    return wheel


def make_venv(tmp_path: Path) -> tuple[Path, Path]:
    """A bare venv that sees this environment's site-packages (not its .pth files): (python, site-packages)."""
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                    cwd=tmp_path).strip())
    (site / "outer_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python, site


def test_a_wheel_install_imports_from_itself_and_loads_every_shipped_prompt_set(tmp_path):
    wheel = build_wheel(tmp_path)
    python, site = make_venv(tmp_path)
    run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site), str(wheel)],
        cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"  # not the repository: its diffalign/ must not shadow the install
    elsewhere.mkdir()
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    found = json.loads(run([str(python), "-c", PROBE], cwd=elsewhere, env=env).strip().splitlines()[-1])

    installed = Path(found["file"]).resolve()
    assert installed.is_relative_to(site.resolve()), installed
    assert not installed.is_relative_to(ROOT.resolve())
    shipped_here = sorted(path.stem for path in (ROOT / "diffalign" / "assets" / "prompts").glob("*.txt"))
    assert shipped_here and sorted(found["sets"]) == shipped_here
    assert [name for name in PROMPT_SETS if PROMPT_SETS.get(name).shipped] == list(found["sets"])
    for name, prompts in found["sets"].items():
        assert prompts and prompts == load_prompts(name), name
