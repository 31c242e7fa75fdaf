"""The package as a user installs it: pyproject.toml declares what mdt_ray imports, the pinned
set in requirements*.txt satisfies those ranges and is what this environment runs, a wheel built
from the checkout installs into a fresh venv and gives a working `mdt-ray`, scripts/setup.sh
honours TORCH_INDEX_URL, and `scripts/test.sh -m slow` selects tests.

Nothing here touches the network: the wheel is built with this venv's setuptools, installed
with --no-index, and the fresh venv borrows this venv's site-packages for the dependencies (the
pinned set, already installed) through a .pth file that comes after its own site-packages."""

from __future__ import annotations

import ast
import importlib.metadata as md
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import mdt_ray

tomllib = pytest.importorskip("tomllib")
requirements = pytest.importorskip("packaging.requirements")

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def declared(group: str = "") -> dict[str, "requirements.Requirement"]:
    """pyproject.toml's requirements (the run-time ones, or an extra's), by normalised name."""
    project = PYPROJECT["project"]
    lines = project["optional-dependencies"][group] if group else project["dependencies"]
    return {norm(r.name): r for r in map(requirements.Requirement, lines)}


def pins(path: Path) -> dict[str, "requirements.Requirement"]:
    """The requirements of a requirements file, following its `-r` includes."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("-r"):
            out.update(pins(path.parent / line[2:].strip()))
        elif line:
            r = requirements.Requirement(line)
            out[norm(r.name)] = r
    return out


def norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def third_party_imports() -> dict[str, set[str]]:
    """Top-level modules outside the standard library that mdt_ray/ imports, with the files."""
    found: dict[str, set[str]] = {}
    for path in (REPO / "mdt_ray").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for top in {n.split(".")[0] for n in names} - set(sys.stdlib_module_names) - {"mdt_ray"}:
                found.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return found


def test_every_import_of_the_package_is_a_declared_dependency():
    deps = declared()
    providers = md.packages_distributions()
    missing = {}
    for module, files in third_party_imports().items():
        names = {norm(d) for d in providers.get(module, [module])}
        # mlflow's modules ship in mlflow-skinny and mlflow-tracing, which `mlflow` requires.
        if not names & set(deps):
            missing[module] = sorted(files)
    assert not missing, f"imported by mdt_ray/ but not in pyproject.toml dependencies: {missing}"
    assert str(declared()["ray"].specifier) == "<2.61,>=2.60" and declared()["ray"].extras == {
        "default", "train", "data", "tune"}


def test_the_pinned_set_satisfies_the_ranges_and_is_what_runs_here():
    runtime, tests = pins(REPO / "requirements.txt"), pins(REPO / "requirements-test.txt")
    for group, pinned in (("", runtime), ("test", tests)):
        for name, req in declared(group).items():
            assert name in pinned, f"pyproject.toml's {group or 'run-time'} dependency {name} has no pin"
            version = next(iter(pinned[name].specifier)).version
            assert req.specifier.contains(version), f"{name}=={version} is outside pyproject.toml's {req}"
            assert pinned[name].extras == req.extras, f"{name}: extras differ between the pin and pyproject.toml"
    for name, pin in tests.items():
        assert len(pin.specifier) == 1 and next(iter(pin.specifier)).operator == "==", f"{pin} is not a pin"
        installed = md.version(name)
        # A local build label (torch 2.13.0+cpu) satisfies the plain pin, as it does for pip.
        assert pin.specifier.contains(installed, prereleases=True), f"{name} {installed} installed, pinned {pin}"


def test_version_has_one_source():
    assert "version" not in PYPROJECT["project"] and PYPROJECT["project"]["dynamic"] == ["version"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "mdt_ray.__version__"}


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory) -> Path:
    """A venv without pip or system site-packages holding only the wheel built from a copy of the
    checkout, its dependencies borrowed from this venv."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "mdt_ray", src / "mdt_ray", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp / "dist"), str(src)])
    wheel, = (tmp / "dist").glob("mdt_ray-*.whl")
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    run([*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)])
    site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip())
    (site / "zz_pinned_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def run(command: list[str], **kwargs) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, **kwargs)
    assert out.returncode == 0, f"{command}: {out.stdout[-2000:]}{out.stderr[-3000:]}"
    return out.stdout


def test_a_fresh_venv_gets_a_working_mdt_ray(fresh_venv, tmp_path):
    cli = str(fresh_venv / "bin" / "mdt-ray")
    assert run([cli, "--version"], cwd=tmp_path).strip() == f"mdt-ray {mdt_ray.__version__}"
    text = run([cli, "--help"], cwd=tmp_path)
    assert "distill" in text and "--verbose" in text
    # The package (and its committed teacher) comes from the venv, not from the checkout, and its
    # training stack imports with the pinned dependencies.
    probe = ("import importlib.metadata as md, json, pathlib, mdt_ray, mdt_ray.train.launch, mdt_ray.eval.command; "
             "p = pathlib.Path(mdt_ray.__file__).parent; "
             "print(json.dumps([str(p), (p / 'assets/teacher_ss_demo.json').is_file(), md.requires('mdt-ray')]))")
    where, has_teacher, requires = json.loads(run([str(fresh_venv / "bin" / "python"), "-c", probe], cwd=tmp_path))
    assert Path(where).is_relative_to(fresh_venv) and has_teacher
    names = {norm(requirements.Requirement(r).name) for r in requires}
    assert set(declared()) <= names and set(declared("test")) <= names


# A PEP 660 build backend in a dozen lines, so that the stand-in project of the setup test builds
# with nothing to download (setuptools would need itself and, before 70.1, `wheel`).
STUB_BACKEND = """
import base64, hashlib, os, zipfile

def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    info = "demo_pkg-0.dist-info"
    files = {"demo_pkg.pth": (os.path.abspath(".") + "\\n").encode(),
             info + "/METADATA": b"Metadata-Version: 2.1\\nName: demo-pkg\\nVersion: 0\\n",
             info + "/WHEEL": b"Wheel-Version: 1.0\\nGenerator: stub\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n"}
    digest = lambda d: base64.urlsafe_b64encode(hashlib.sha256(d).digest()).rstrip(b"=").decode()
    record = [f"{n},sha256={digest(d)},{len(d)}" for n, d in files.items()] + [info + "/RECORD,,"]
    name = "demo_pkg-0-py3-none-any.whl"
    with zipfile.ZipFile(os.path.join(wheel_directory, name), "w") as z:
        for n, d in files.items():
            z.writestr(n, d)
        z.writestr(info + "/RECORD", "\\n".join(record) + "\\n")
    return name
"""


def stub_torch_index(root: Path, version: str) -> Path:
    """A file:// package index under `root` holding one stub torch wheel of `version`."""
    src = root / "src"
    (src / "torch").mkdir(parents=True)
    (src / "torch" / "__init__.py").write_text(f'__version__ = "{version}"\n')
    (src / "setup.py").write_text(f"from setuptools import setup\nsetup(name='torch', version='{version}', packages=['torch'])\n")
    project = root / "index" / "torch"
    project.mkdir(parents=True)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(project), str(src)])
    wheel, = project.glob("torch-*.whl")
    (project / "index.html").write_text(f'<html><body><a href="{wheel.name}">{wheel.name}</a></body></html>\n')
    return project.parent


def test_setup_installs_torch_from_torch_index_url(tmp_path):
    """scripts/setup.sh in a stand-in checkout, offline: torch==0.0.1 is on the file:// index
    TORCH_INDEX_URL names and nowhere else (pip's own index is an empty folder); naming another
    index with another build of the pin (a local label, as +cpu or +cu128) switches builds."""
    checkout = tmp_path / "checkout"
    (checkout / "scripts").mkdir(parents=True)
    (checkout / "demo_pkg").mkdir()
    shutil.copy2(REPO / "scripts" / "setup.sh", checkout / "scripts" / "setup.sh")
    (checkout / "requirements.txt").write_text("torch==0.0.1\n")
    (checkout / "requirements-test.txt").write_text("-r requirements.txt\n")
    (checkout / "demo_pkg" / "__init__.py").write_text("")
    (checkout / "stub_backend.py").write_text(STUB_BACKEND)
    (checkout / "pyproject.toml").write_text(
        '[build-system]\nrequires = []\nbuild-backend = "stub_backend"\nbackend-path = ["."]\n')
    (tmp_path / "empty-index").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_INDEX_URL=(tmp_path / "empty-index").as_uri(),
               TORCH_INDEX_URL=stub_torch_index(tmp_path / "a", "0.0.1").as_uri(), PYTHON=sys._base_executable)

    def setup() -> str:
        out = subprocess.run(["bash", "scripts/setup.sh"], cwd=checkout, env=env, capture_output=True, text=True,
                             timeout=600)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
        return out.stdout

    assert f"installing torch==0.0.1 from {env['TORCH_INDEX_URL']}" in setup()
    check = "import torch, demo_pkg; print(torch.__version__)"
    assert run([str(checkout / ".venv" / "bin" / "python"), "-c", check], cwd=tmp_path).strip() == "0.0.1"
    # A second run finds its stamps and installs nothing.
    assert "installing" not in setup()
    env["TORCH_INDEX_URL"] = stub_torch_index(tmp_path / "b", "0.0.1+other").as_uri()
    out = setup()
    assert "installing torch==0.0.1 from" in out and "installing requirements" not in out
    assert run([str(checkout / ".venv" / "bin" / "python"), "-c", check], cwd=tmp_path).strip() == "0.0.1+other"


def test_the_slow_marker_selects_tests():
    """README: `./scripts/test.sh -m slow` runs the slow benchmarks (pytest exits 5 on none)."""
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "slow", "-p", "no:cacheprovider"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert any(line.startswith("tests/") and "::" in line for line in out.stdout.splitlines())
