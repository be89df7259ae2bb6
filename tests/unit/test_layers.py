"""The package's layers import only downwards (docs/architecture.md):
`server/` -> `images/` -> `engine/`, `tiny_model` -> `engine/` and `pipelines/` -> `engine/`;
`platforms/` stands alone.

Read from the source, so a new module is checked the day it is added.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "vllm_omni_images"

# `platforms/` is vllm-omni's CPU platform: vllm-omni loads it through its entry point, in the
# server and in its worker processes, so it stands alone and no layer imports it.
# `pipelines/` holds this package's pipelines for vllm-omni, which registers them through its
# plugin entry point: no layer imports it either.
PLATFORMS = "vllm_omni_images.platforms"
PIPELINES = "vllm_omni_images.pipelines"
FORBIDDEN = {
    "engine": (
        "vllm_omni_images.images",
        "vllm_omni_images.server",
        "vllm_omni_images.tiny_model",
        PLATFORMS,
        PIPELINES,
    ),
    "images": ("vllm_omni_images.server", "vllm_omni_images.tiny_model", PLATFORMS, PIPELINES),
    "server": (PLATFORMS, PIPELINES),
    "tiny_model": ("vllm_omni_images.images", "vllm_omni_images.server", PLATFORMS, PIPELINES),
    "platforms": (
        "vllm_omni_images.engine",
        "vllm_omni_images.images",
        "vllm_omni_images.server",
        "vllm_omni_images.tiny_model",
        PIPELINES,
    ),
    "pipelines": (
        "vllm_omni_images.images",
        "vllm_omni_images.server",
        "vllm_omni_images.tiny_model",
        PLATFORMS,
    ),
}


def layer_of(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def imports(tree: ast.AST) -> list[tuple[str, bool]]:
    """Every imported module, with whether the import runs when the module is imported
    (outside any function and outside an `if TYPE_CHECKING:` block)."""
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, at_import: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend((alias.name, at_import) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, at_import))
        inner = at_import and not isinstance(
            node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
        )
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            inner = False
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(tree, True)
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda path: str(path.relative_to(PACKAGE)))
def test_modules_import_only_lower_layers(path: Path) -> None:
    tree = ast.parse(path.read_text())
    forbidden = FORBIDDEN.get(layer_of(path), ())
    wrong = [name for name, _ in imports(tree) if name.startswith(forbidden)]
    assert not wrong, f"{path.name} imports {wrong} from a layer above it"


@pytest.mark.parametrize(
    "path",
    [path for path in MODULES if layer_of(path) == "engine"],
    ids=lambda path: path.name,
)
def test_the_engine_layer_imports_vllm_only_inside_functions(path: Path) -> None:
    tree = ast.parse(path.read_text())
    eager = [
        name
        for name, at_import in imports(tree)
        if at_import
        and (name == "vllm" or name.startswith(("vllm.", "vllm_omni")))
        and not name.startswith("vllm_omni_images")
    ]
    assert not eager, f"{path.name} imports {eager} when it is imported"


def test_the_rules_see_every_layer() -> None:
    assert {layer_of(path) for path in MODULES} >= {
        "engine",
        "images",
        "server",
        "platforms",
        "pipelines",
        "tiny_model",
    }
