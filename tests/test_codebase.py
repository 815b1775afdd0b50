"""Properties of the code base as a whole: light imports, short functions, one step builder."""
import ast
import json
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
HEAVY = ("grain", "tensorflow_datasets", "tqdm", "matplotlib", "contrastive_jax.train.loop")


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport json, sys; print(json.dumps(sorted(sys.modules)))"],
                         cwd=REPO, capture_output=True, text=True, check=True, timeout=300)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


# Each stage imports more than the one before, in one fresh interpreter: a heavy module present
# after a stage would be present if that stage's import ran alone, so one process checks them all.
_STAGES = [
    "import contrastive_jax; contrastive_jax.load",
    "import contrastive_jax.api, contrastive_jax.train.restore",
    "import contrastive_jax.train",
    "import contrastive_jax.interop",
]


def test_loading_and_the_training_library_import_no_pipeline_loop_or_progress_bar():
    code = "import json, sys\nseen = []\n" + "".join(
        f"{stage}\nseen.append(sorted(m for m in {HEAVY!r} if m in sys.modules))\n" for stage in _STAGES)
    out = subprocess.run([sys.executable, "-c", code + "print(json.dumps(seen))"], cwd=REPO, capture_output=True,
                         text=True, check=True, timeout=300)
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert dict(zip(_STAGES, seen)) == {stage: [] for stage in _STAGES}


def test_the_heavy_module_names_are_the_ones_the_pipeline_and_evaluation_pull_in():
    # The check above is not vacuous: these are the modules a training run imports.
    loaded = _modules_after("import contrastive_jax.train.loop, contrastive_jax.data.pipeline, "
                            "contrastive_jax.data.registry\n"
                            "from contrastive_jax.train.loop import _progress; _progress(1, 0, True).close()")
    # (matplotlib is imported inside the report's drawing functions only.)
    assert set(HEAVY) - {"matplotlib"} <= loaded, set(HEAVY) - loaded


def _long_functions(limit=100):
    out = []
    for path in sorted((REPO / "contrastive_jax").rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                body = "\n".join(source.splitlines()[node.lineno - 1:node.end_lineno])
                if n > limit and "# long function:" not in body:
                    out.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({n} lines)")
    return out


def test_no_function_longer_than_100_lines_without_a_stated_reason():
    # A reason is a comment '# long function: <why>' inside the function.
    assert _long_functions() == []


@pytest.mark.parametrize("tool", ["bench_train.py", "bench_batch.py", "bench_vs_open_clip.py", "gpu_bench.py"])
def test_benchmarks_build_the_step_with_the_loops_builder(tool):
    tree = ast.parse((REPO / "tools" / tool).read_text(encoding="utf-8"))
    called = {n.func.id if isinstance(n.func, ast.Name) else getattr(n.func, "attr", "")
              for n in ast.walk(tree) if isinstance(n, ast.Call)}
    assert "build_training" in called
    assert not called & {"make_train_step", "create_train_state", "make_optimizer"}, called
    loop = ast.parse((REPO / "contrastive_jax" / "train" / "loop.py").read_text(encoding="utf-8"))
    assert "build_training" in {n.func.id for n in ast.walk(loop) if isinstance(n, ast.Call)
                                and isinstance(n.func, ast.Name)}
