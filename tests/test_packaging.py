"""quant/, kernels/, models/ install as edgeinfer.* (never top-level), for regular and editable installs."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("quant", "kernels", "models")


def test_editable_install_maps_folders():
    import edgeinfer.kernels
    import edgeinfer.models
    import edgeinfer.quant

    for mod, folder in ((edgeinfer.quant, "quant"), (edgeinfer.kernels, "kernels"), (edgeinfer.models, "models")):
        assert Path(mod.__file__).resolve().parent == ROOT / folder


def test_regular_wheel_installs_and_imports(tmp_path):
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheel_dir), str(ROOT)], check=True, capture_output=True, timeout=300)
    (whl,) = wheel_dir.glob("edgeinfer-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    for sub in SUBPACKAGES:
        assert f"edgeinfer/{sub}/__init__.py" in names
        assert not any(n.startswith(f"{sub}/") for n in names), f"{sub} must not be a top-level package"
    assert any(n.endswith("entry_points.txt") for n in names)
    # every Python package folder in the source tree is in the wheel (a sub-package missing from
    # pyproject's `packages` list would silently vanish from regular installs)
    for init in ROOT.glob("**/__init__.py"):
        rel = init.relative_to(ROOT)
        if rel.parts[0] in SUBPACKAGES:
            rel = Path("edgeinfer") / rel
        elif rel.parts[0] != "edgeinfer":
            continue
        assert rel.as_posix() in names, f"{rel} missing from the wheel: add its package to pyproject.toml"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(whl)],
                   check=True, capture_output=True, timeout=300)
    # the compiled K-quant searches are built into the wheel and pass their load-time self-check
    assert any(n.startswith("edgeinfer/quant/_kqnative") for n in names), "the C extension was not built"
    code = ("import edgeinfer, edgeinfer.quant, edgeinfer.kernels, edgeinfer.models, edgeinfer.cli; "
            "from edgeinfer.quant import searches; "
            "print(edgeinfer.__file__); print(searches.implementation(), searches._LIB._name)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}, cwd=tmp_path).stdout
    first, second = out.strip().splitlines()
    assert first.startswith(str(target)), out
    impl, lib_path = second.split(" ", 1)
    assert impl == "native" and lib_path.startswith(str(target)), out
    print(f"wheel {whl.name}: {len(names)} files")
