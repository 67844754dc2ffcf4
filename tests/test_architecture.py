"""The package's layers (docs/architecture.md) hold: every import of ours, at module level or inside a function,
points to a lower layer, or stays inside its own sub-package. A new module must be given a layer here and in
docs/architecture.md, so the map stays true."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "reward_forcing"

# Lower numbers sit lower. A module may import modules of strictly lower layers; same-layer imports are allowed
# only inside one of the SUBPACKAGES below (e.g. training/ importing its own files).
LAYERS = {
    "reward_forcing": 9,  # the package's __init__ (metadata only)
    "reward_forcing.models.attention": 0,
    "reward_forcing.models.kv_cache": 0,
    "reward_forcing.file_io": 0,  # torch / stdlib only: reading weights, strict loading, atomic writes
    "reward_forcing.interfaces": 0,  # the pluggable parts as typing.Protocols, and the Registry
    "reward_forcing.extras": 0,  # optional dependency groups ([app], [eval]) and the one-line error
    "reward_forcing.models": 1,  # every other model: tensors, own config dataclasses, file paths
    "reward_forcing.schedule": 1,
    "reward_forcing.toy": 1,  # the toy world: data, word-table text encoder, motion reward, exact metrics
    "reward_forcing.compile": 2,
    "reward_forcing.quantize": 2,
    "reward_forcing.denoising": 2,  # the one block loop
    "reward_forcing.sampling": 2,  # the teacher's Euler + CFG sampler (ODE pairs, toy evaluation)
    "reward_forcing.pipeline_parallel": 2,  # a WanModel stage per rank: its layers, torch.distributed sends
    "reward_forcing.streaming": 3,  # what a stream runs on: models, block loop, settings (StreamingModels)
    "reward_forcing.interactive.session": 4,  # the block loop with state; stream() is a loop over it
    "reward_forcing.interactive.events": 4,
    "reward_forcing.pipeline": 5,
    "reward_forcing.config": 6,
    "reward_forcing.checkpoints": 6,
    "reward_forcing.data": 6,
    "reward_forcing.video_io": 6,
    "reward_forcing.build": 7,
    "reward_forcing.training": 8,
    "reward_forcing.evaluation": 8,
    "reward_forcing.benchmark": 8,  # the streaming speed benchmark (scripts/benchmark.py is its CLI)
    "reward_forcing.interactive": 8,  # its __init__ and start media
    "reward_forcing.toy.evaluate": 8,  # toy-world evaluation through the pipeline and the teacher sampler
    "reward_forcing.toy.report": 8,
    "reward_forcing.toy.studies": 8,  # live features measured in the toy world (switches, start media, levers)
    "reward_forcing.serve": 9,
}
SUBPACKAGES = ("reward_forcing.training", "reward_forcing.evaluation", "reward_forcing.models.video_reward",
               "reward_forcing.interactive", "reward_forcing.serve", "reward_forcing.toy", "reward_forcing.benchmark")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(name: str) -> int:
    """The layer of the longest registered prefix of ``name``."""
    best = max((key for key in LAYERS if name == key or name.startswith(key + ".")), key=len, default=None)
    if best is None or (best == "reward_forcing" and name != "reward_forcing"):
        raise KeyError(name)
    return LAYERS[best]


def group_of(name: str) -> str:
    return next((p for p in SUBPACKAGES if name == p or name.startswith(p + ".")), name)


def our_imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every reward_forcing import in the file, nested ones included."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "reward_forcing"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "reward_forcing":
                continue
            # `from . import x` / `from .models import wan` import sub-modules: check each one.
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((node.lineno, sub if (REPO_ROOT / Path(*sub.split("."))).with_suffix(".py").exists()
                              or (REPO_ROOT / Path(*sub.split("."))).is_dir() else target))
    return found


def package_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer():
    missing = [module_name(p) for p in package_files() if not _has_layer(module_name(p))]
    assert not missing, (f"give {missing} a layer in tests/test_architecture.py and a line in "
                         "docs/architecture.md")


def _has_layer(name: str) -> bool:
    try:
        layer_of(name)
    except KeyError:
        return False
    return True


@pytest.mark.parametrize("path", package_files(), ids=lambda p: module_name(p))
def test_imports_point_down(path):
    name = module_name(path)
    own = layer_of(name)
    bad = []
    for line, target in our_imports(path):
        if target == "reward_forcing":
            continue
        theirs = layer_of(target)
        same_group = group_of(target) == group_of(name) and group_of(name) in SUBPACKAGES
        if theirs > own or (theirs == own and not same_group):
            bad.append(f"{path.relative_to(REPO_ROOT)}:{line} imports {target} (layer {theirs} >= {own})")
    assert not bad, "\n".join(bad)


def test_models_import_only_attention_kv_cache_and_file_io():
    allowed = {"reward_forcing.models.attention", "reward_forcing.models.kv_cache", "reward_forcing.file_io"}
    for path in sorted((PACKAGE / "models").rglob("*.py")):
        name = module_name(path)
        for line, target in our_imports(path):
            inside = group_of(target) == group_of(name) and group_of(name) in SUBPACKAGES
            assert target in allowed or inside, f"{path.relative_to(REPO_ROOT)}:{line} imports {target}"


@pytest.mark.parametrize("entry", ["inference.py", "scripts/benchmark.py", "scripts/evaluate.py"])
def test_inference_entry_points_never_import_training(entry):
    """Generation and evaluation must not pull in the trainer: checked over the whole import closure."""
    path = REPO_ROOT / entry
    if not path.exists():
        pytest.fail(f"{entry} is missing")
    seen, todo = set(), [t for _, t in our_imports_of_script(path)]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        assert not name.startswith("reward_forcing.training"), f"{entry} reaches {name}"
        file = REPO_ROOT / Path(*name.split("."))
        file = file / "__init__.py" if file.is_dir() else file.with_suffix(".py")
        if file.exists():
            todo += [t for _, t in our_imports(file)]


def our_imports_of_script(path: Path) -> list[tuple[int, str]]:
    return [(n.lineno, n.module) for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("reward_forcing")] + \
           [(n.lineno, a.name) for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Import)
            for a in n.names if a.name.startswith("reward_forcing")]


def test_the_checker_catches_a_forbidden_import(tmp_path, monkeypatch):
    """The rule is live: a model importing the pipeline is reported."""
    fake = PACKAGE / "models" / "wan.py"
    source = fake.read_text() + "\nfrom ..pipeline import StreamingPipeline\n"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: source if self == fake else
                        Path.read_bytes(self).decode())
    with pytest.raises(AssertionError, match="imports reward_forcing.pipeline"):
        test_imports_point_down(fake)


def test_the_session_reads_only_what_streaming_models_define():
    """What an import test cannot see: the session uses its models object only through StreamingModels' own
    attributes (the layer below it), never through pipeline internals. Other objects handed across layers are
    typed with the lower layer's class the same way; this checks the one that used to be duck-typed."""
    from reward_forcing.streaming import StreamingModels

    tree = ast.parse((PACKAGE / "interactive" / "session.py").read_text())
    used = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            base = node.value
            if (isinstance(base, ast.Name) and base.id == "models") or (
                    isinstance(base, ast.Attribute) and base.attr == "models" and isinstance(base.value, ast.Name)
                    and base.value.id == "self"):
                used.add(node.attr)
    init = ast.parse((PACKAGE / "streaming.py").read_text())
    assigned = {t.attr for n in ast.walk(init) if isinstance(n, ast.Assign) for t in n.targets
                if isinstance(t, ast.Attribute)} | {e.attr for n in ast.walk(init) if isinstance(n, ast.Assign)
                                                    for t in n.targets if isinstance(t, ast.Tuple) for e in t.elts
                                                    if isinstance(e, ast.Attribute)}
    defined = {name for name in dir(StreamingModels) if not name.startswith("__")} | assigned
    assert used and used <= defined, f"the session reads {sorted(used - defined)}, which StreamingModels lacks"


def test_importing_the_pipeline_loads_no_higher_layer():
    """The pipeline stands on interactive.session; importing it must not run the start-media readers (layer 8,
    through interactive/__init__) nor any optional extra."""
    code = ("import sys, reward_forcing.pipeline, reward_forcing.build; "
            "print(sorted(m for m in sys.modules if m in ('reward_forcing.interactive.media', 'fastapi', 'cv2', "
            "'matplotlib', 'reward_forcing.training', 'reward_forcing.evaluation', 'reward_forcing.serve.app')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_a_toy_pipeline_loads_neither_transformers_nor_diffusers():
    """transformers and diffusers are imported where the UMT5 encoder and the Wan VAE are built: a process that
    only needs the toy world (every stage of scripts/toy_world.py) skips their seconds of import time."""
    code = ("import sys\nfrom reward_forcing.config import load_config\nfrom reward_forcing.build import build_pipeline\n"
            "import reward_forcing.training.trainer\n"
            "pipe = build_pipeline(load_config('configs/toy/student.yaml'))\n"
            "print(sorted(m for m in ('transformers', 'diffusers', 'tokenizers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def test_a_missing_extra_is_one_line_with_the_install_command(monkeypatch):
    from reward_forcing import extras

    monkeypatch.setattr(extras.importlib.util, "find_spec", lambda name: None if name == "cv2" else object())
    with pytest.raises(extras.MissingExtra) as err:
        extras.require("eval", "the evaluation kit")
    assert str(err.value) == ('the evaluation kit needs opencv-python-headless: pip install -e ".[eval]" (or pip '
                              'install "reward-forcing[eval]")')
    extras.require("app", "the web app")  # present: nothing raised
