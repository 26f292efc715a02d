"""The import layers of the project (DESIGN.md): a module imports only from layers below its own, never from its
own layer or above, and only at the top of the file (an import inside a function is how a cycle hides).

The order, bottom to top:
    world -> data -> questions -> scorer -> model -> vlm, rewards, controls -> common -> sample -> evaluate, grids ->
    train, judges -> the method scripts -> bench
world/data/questions/scorer are the world, its tasks, its yes/no questions and its exact measurement; model the
DiT; vlm and rewards the frozen raters' networks, controls Dual-Process's controls as data; common the shared
plumbing; sample the flow ODE and its CLI; evaluate the scorer's tables, grids Self-Distillation's paired data;
train and judges build the shared models (base, experts, judges); the method scripts each run one method and never
import each other; bench times train's and the methods' steps.
"""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = [("world",), ("data",), ("questions",), ("scorer",), ("model",), ("vlm", "rewards", "controls"), ("common",),
          ("sample",), ("evaluate", "grids"), ("train", "judges"),
          ("distill_onpolicy", "dual_process", "self_distill", "feedback"), ("bench",)]
LAYER = {m: i for i, layer in enumerate(LAYERS) for m in layer}
MODULES = sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py"))


def project_imports(source):
    """[(imported project module, line, at top level?)] of a module's source."""
    tree, found = ast.parse(source), []
    top = set(map(id, tree.body))
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
        for name in names:
            root = name.split(".")[0]
            if os.path.exists(os.path.join(ROOT, root + ".py")):
                found.append((root, node.lineno, id(node) in top))
    return found


def test_every_module_has_a_layer():
    assert set(MODULES) <= set(LAYER), f"add {sorted(set(MODULES) - set(LAYER))} to LAYERS"


@pytest.mark.parametrize("module", MODULES)
def test_imports_go_down_the_layers_from_the_top_of_the_file(module):
    with open(os.path.join(ROOT, module + ".py")) as f:
        imports = project_imports(f.read())
    for name, line, top_level in imports:
        assert top_level, f"{module}.py:{line} imports {name} inside a function or block"
        assert LAYER[name] < LAYER[module], (f"{module}.py:{line} imports {name}, which is not below it "
                                             f"(layers: {LAYERS})")


def test_the_check_catches_an_upward_or_hidden_import():
    """The checker itself: it sees an import inside a function, and `from x import y` as well as `import x`."""
    found = project_imports("import torch\nfrom train import train\n\ndef f():\n    import evaluate\n")
    assert found == [("train", 2, True), ("evaluate", 5, False)]
