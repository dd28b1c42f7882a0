"""What importing the package pulls in: the library stays light, the Optax part stands alone."""

import ast
import subprocess
import sys

import pytest

from helpers import ROOT

TRAINER_ONLY = ("tensorflow", "tensorflow_datasets", "clu", "orbax", "ml_collections")


def modules_after(code: str) -> set[str]:
  """Top-level module names (and every `ovsw_jax.*` one) loaded after `code`, in a fresh Python."""
  probe = code + ("\nimport sys\nprint(' '.join(sorted({m.split('.')[0] for m in sys.modules}"
                  " | {m for m in sys.modules if m.startswith('ovsw_jax')})))")
  out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True,
                       check=True, timeout=120)
  return set(out.stdout.split())


@pytest.mark.slow
def test_import_ovsw_jax_loads_no_trainer_stack():
  loaded = modules_after(
      "import ovsw_jax as ow\now.ovsw, ow.BinaryConv, ow.nnx.BinaryConv, ow.xnor_conv")
  assert "flax" in loaded  # the layers were really imported
  assert not loaded & set(TRAINER_ONLY), sorted(loaded & set(TRAINER_ONLY))
  assert not any(m.startswith("ovsw_jax.trainer") for m in loaded), sorted(loaded)


@pytest.mark.slow
def test_optax_transforms_import_without_flax():
  loaded = modules_after("import ovsw_jax.optim\nimport ovsw_jax as ow\now.ovsw, ow.scale_by_ags")
  assert "optax" in loaded
  assert not loaded & {"flax", "ml_collections"}, sorted(loaded & {"flax", "ml_collections"})


def test_lazy_names_are_the_defining_modules_objects():
  import ovsw_jax as ow
  from ovsw_jax import layers, nnx, optim, quantizers
  assert ow.ovsw is optim.ovsw and ow.BinaryConv is layers.BinaryConv
  assert ow.ste_sign is quantizers.ste_sign and ow.nnx is nnx
  assert set(ow.__all__) <= set(dir(ow))
  with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
    ow.no_such_name  # noqa: B018


# The tree's three parts and who may import whom (docs/design.md, "The map"): the library
# imports neither the trainer nor the tools; the trainer imports the library only; the tools
# (export, repro) import both.
LIBRARY_ONLY_PACKAGES = ("optim", "models")
TOOLS = ("export", "repro")


def _ovsw_imports(path) -> set[str]:
  """The `ovsw_jax.*` modules that the file at `path` imports (anywhere in it)."""
  tree = ast.parse(path.read_text(), filename=str(path))
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names if a.name.startswith("ovsw_jax")}
    elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ovsw_jax"):
      found |= {f"{node.module}.{a.name}" for a in node.names}
  return found


def _part(module: str) -> str:
  """'library', 'trainer' or 'tools': the part of the tree `module` (dotted) belongs to."""
  parts = module.split(".")
  if len(parts) > 1 and parts[1] == "trainer":
    return "trainer"
  if len(parts) > 1 and parts[1] in TOOLS:
    return "tools"
  return "library"


def test_each_part_imports_only_what_the_map_allows():
  allowed = {"library": {"library"}, "trainer": {"library", "trainer"},
             "tools": {"library", "trainer", "tools"}}
  package = ROOT / "ovsw_jax"
  wrong = []
  for path in sorted(package.rglob("*.py")):
    module = ".".join(("ovsw_jax",) + path.relative_to(package).with_suffix("").parts)
    if module == "ovsw_jax.main":  # the command line's old name: starts the trainer
      continue
    for imported in _ovsw_imports(path):
      if imported in ("ovsw_jax.configs",):
        continue
      if _part(imported) not in allowed[_part(module)]:
        wrong.append(f"{module} ({_part(module)}) imports {imported} ({_part(imported)})")
  assert not wrong, wrong
  assert _part("ovsw_jax.trainer.train") == "trainer" and _part("ovsw_jax.repro.run") == "tools"


def test_the_top_of_the_package_holds_at_most_twelve_modules():
  top = sorted(p.name for p in (ROOT / "ovsw_jax").glob("*.py"))
  assert len(top) <= 12, top
  assert "train.py" not in top and (ROOT / "ovsw_jax" / "trainer" / "train.py").is_file()
  for name in LIBRARY_ONLY_PACKAGES + TOOLS + ("trainer",):
    assert (ROOT / "ovsw_jax" / name / "__init__.py").is_file(), name
