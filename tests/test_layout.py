"""The module graph and the tree: binaries on a library, import names = folder names, a quiet console."""
import ast
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from fast_compile import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARIES = {"olmax.train", "olmax.eval", "olmax.infer", "olmax.plan"}
SOURCE_DIRS = ("olmax", "olmax_tasks", "benchmarks", "launch")


def _modules():
    """{dotted module name: parsed AST} of every Python file in the source folders."""
    out = {}
    for top in SOURCE_DIRS:
        for root, _, files in os.walk(os.path.join(REPO, top)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(root, f)
                    name = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".").removesuffix(".__init__")
                    out[name] = ast.parse(open(path).read(), path)
    return out


def _imports(name: str, tree: ast.AST) -> set[str]:
    """Olmax modules `name` imports (`from olmax import x` counts as olmax.x)."""
    found = set()
    package = name if name.count(".") == 0 or name.endswith("__init__") else name.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m.split(".")[0] in ("olmax", "olmax_tasks", "benchmarks", "launch")}


def test_no_module_imports_a_binary():
    offenders = {name: sorted(_imports(name, tree) & BINARIES) for name, tree in _modules().items()}
    # A binary's `if __name__ == "__main__"` block imports itself under its package name (one Gin registration).
    offenders = {k: [m for m in v if m != k] for k, v in offenders.items()}
    assert not {k: v for k, v in offenders.items() if v}, offenders


def test_no_module_reaches_for_another_modules_private_names():
    modules = _modules()
    olmax_names = {n.rsplit(".", 1)[-1] for n in modules}
    offenders = []
    for name, tree in modules.items():
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and isinstance(node.value, ast.Name) and node.value.id in olmax_names
                    and node.value.id != name.rsplit(".", 1)[-1]):
                offenders.append(f"{name}: {node.value.id}.{node.attr}")
    assert not offenders, offenders


def test_olmax_tasks_is_an_alias_of_olmax_tasks_package():
    import olmax_tasks
    from olmax import tasks
    from olmax.tasks import registry, text_files_task
    from olmax_tasks import registry as alias_registry
    import olmax_tasks.text_files_task as alias_text_files

    assert olmax_tasks is tasks and alias_registry is registry and alias_text_files is text_files_task
    assert olmax_tasks.text_files is tasks.text_files_config  # the Gin name existing files bind


def _checkout_only_env():
    """The checkout on PYTHONPATH, no site processing: an installed olmax (editable or not) is invisible."""
    sites = [p for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages")]  # venv + system
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "CUDA_VISIBLE_DEVICES")}
    env.update(PYTHONPATH=os.pathsep.join([REPO, *sites]), XLA_FLAGS=xla_flags(), JAX_PLATFORMS="cpu")
    return env


@pytest.mark.slow
def test_checkout_on_pythonpath_runs_like_an_install_and_starts_quietly(tmp_path):
    """From another directory, with only the checkout on the path (python -S: no .pth files, so
    no pip install is seen): the binary finds its gin files and tasks, and the first lines
    it prints are Olmax's, not TensorFlow's CUDA probing."""
    args = ["--gin_file=gin/quickstart.gin", f"--gin.MODEL_DIR={tmp_path / 'run'}", "--gin.TRAIN_STEPS=2",
            "--gin.TASK_FEATURE_LENGTHS={'targets': 32}", "--gin.BATCH_SIZE=2", "--gin.train.train.eval_period=0",
            "--gin.optim.create_optimizer.warmup_steps=1", "--gin.train.train.peak_flops=1e11"]
    probe = ("import olmax, olmax_tasks, olmax.tasks; from olmax import gin_utils; "
             "print(olmax.__file__, olmax_tasks.__file__, gin_utils.package_gin_dir())")
    proc = subprocess.run([sys.executable, "-S", "-c", probe], cwd=tmp_path, env=_checkout_only_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == [os.path.join(REPO, "olmax", "__init__.py"),
                                   os.path.join(REPO, "olmax", "tasks", "__init__.py"), os.path.join(REPO, "olmax", "gin")]
    assert proc.stderr == ""  # not even the import of tensorflow prints

    proc = subprocess.run([sys.executable, "-S", "-m", "olmax.train", *args], cwd=tmp_path, env=_checkout_only_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "step 2/2" in proc.stderr and os.path.isdir(tmp_path / "run" / "2")
    first = (proc.stdout + proc.stderr).splitlines()[:3]
    chatter = ("cuInit", "cuda", "CUDA", "absl::InitializeLog", "oneDNN", "cpu_feature_guard")
    assert not [line for line in first if any(c in line for c in chatter)], first
    assert "Model:" in first[0] and "parameters" in first[0], first


@pytest.mark.slow
def test_wheel_holds_what_the_tree_holds(tmp_path):
    """A plain install gets the same paths as the checkout: olmax/gin/*.gin as package data,
    olmax/tasks, the olmax_tasks alias; no top-level `tasks` or `gin` package."""
    source = tmp_path / "source"  # setuptools builds in the source tree: leave the checkout alone
    skip = {".git", "build", "runs", "__pycache__"}  # at the top: olmax/gin/runs holds Gin files
    shutil.copytree(REPO, source, ignore=lambda d, names: [n for n in names if n.endswith(".egg-info") or (
        n in skip and (d == REPO or n == "__pycache__"))])
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(source)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = [f for f in os.listdir(tmp_path) if f.endswith(".whl")]
    names = set(zipfile.ZipFile(tmp_path / wheel).namelist())
    gin_files = {os.path.relpath(os.path.join(r, f), REPO) for r, _, fs in os.walk(os.path.join(REPO, "olmax", "gin"))
                 for f in fs if f.endswith(".gin")}
    assert gin_files and gin_files <= names, gin_files - names
    assert {"olmax/tasks/__init__.py", "olmax/tasks/train_spm.py", "olmax_tasks/__init__.py", "olmax/trainer.py"} <= names
    assert not [n for n in names if n.split("/")[0] in ("tasks", "gin", "tests", "benchmarks")]


def test_no_import_circle():
    """No module reaches itself through the modules it imports (TYPE_CHECKING and function-level
    imports included): each layer of the package can be read, tested and reused below the next."""
    modules = _modules()
    graph = {name: {m for m in _imports(name, tree) if m in modules and m != name} for name, tree in modules.items()}
    # A package's __init__ that re-exports its submodules is the package itself, not a circle.
    graph = {n: {m for m in deps if not n.startswith(m + ".")} for n, deps in graph.items()}
    circles = []
    for start in graph:
        stack, seen = [(start, (start,))], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    circles.append(" -> ".join(path + (start,)))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + (nxt,)))
    assert not circles, circles
