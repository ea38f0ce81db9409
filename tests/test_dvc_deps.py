"""dvc.yaml's deps are complete: each stage depends on every ipa_lib file its command imports
(lazy imports included) and on the params it reads, and DVC sees an edit to any of them.

A stage's code is `python -m ipa_lib.cli <stage>`: the CLI functions that run the command
(read from their source, not the whole CLI, which imports every command), then everything the
modules they import reach in grimp's import graph, plus the packages' `__init__.py` files."""

from __future__ import annotations

import ast
import json
import shlex
from pathlib import Path

import pytest
import yaml
from conftest import REPO, sh

STAGES = ("pretrain", "sample", "gate", "train", "evaluate", "register", "promote")
PATH_KEYS = {"out", "metrics", "register_out"}  # paths that dvc.yaml wires as deps and outs
# dvc.yaml: `tracking` only decides where the MLflow runs of these stages go, not their outputs
TRACKING_ONLY = {"pretrain", "sample", "gate", "train", "evaluate"}
PARAM_OWNERS = {"params", "p"}  # the names a stage's code gives the Params object


def _dvc_stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def _graph():
    import grimp

    return grimp.build_graph("ipa_lib", cache_dir=None)


def _file(module: str) -> Path:
    rel = Path(*module.split("."))
    return rel / "__init__.py" if (REPO / rel).is_dir() else rel.with_suffix(".py")


def _tree(module: str) -> ast.Module:
    return ast.parse((REPO / _file(module)).read_text())


def _imported_modules(nodes, graph, in_module: str) -> set[str]:
    """ipa_lib modules named by the import statements among `nodes` (ast nodes)."""
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("ipa_lib")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ipa_lib"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in graph.modules else node.module)
    missing = out - graph.modules
    assert not missing, f"{in_module} imports modules that do not exist: {sorted(missing)}"
    return out


def _functions(tree: ast.Module) -> dict[str, ast.FunctionDef]:
    return {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}


def _reached(funcs: dict, start: str) -> set[str]:
    """`start` and the functions of the same module it calls, transitively."""
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        if name in seen or name not in funcs:
            continue
        seen.add(name)
        todo += [n.func.id for n in ast.walk(funcs[name]) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
    return seen


def _top_level(tree: ast.Module) -> list[ast.AST]:
    """The statements a module runs when imported (function bodies excluded)."""
    out, todo = [], list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        out.append(node)
        todo += list(ast.iter_child_nodes(node))
    return out


def _cli_path(stage: str):
    """(module, name) of the CLI function that `dvc.yaml` runs for `stage`."""
    from ipa_lib.cli import build_parser

    argv = shlex.split(_dvc_stages()[stage]["cmd"])
    assert argv[:3] == ["python", "-m", "ipa_lib.cli"], argv
    args, _ = build_parser().parse_known_args(argv[3:])
    return args.func.__module__, args.func.__name__


def stage_closure(stage: str, graph) -> tuple[set[str], dict[str, set[str]]]:
    """(every ipa_lib module the stage's command imports, {cli module: functions on the path})."""
    handler_module, handler = _cli_path(stage)
    on_path = {"ipa_lib.cli": {"main"}}
    on_path.setdefault(handler_module, set()).add(handler)
    modules, todo = {"ipa_lib.cli.__main__"}, []
    for mod, starts in on_path.items():
        tree = _tree(mod)
        funcs = _functions(tree)
        names = set().union(*(_reached(funcs, s) for s in starts))
        on_path[mod] = names
        modules.add(mod)
        todo += _imported_modules([n for f in names for n in ast.walk(funcs[f])] + _top_level(tree), graph, mod)
    while todo:
        mod = todo.pop()
        if mod in modules:
            continue
        modules.add(mod)
        if mod.startswith("ipa_lib.cli"):  # another CLI module: only what it runs on import
            todo += _imported_modules(_top_level(_tree(mod)), graph, mod)
        else:
            todo += graph.find_upstream_modules(mod)
    packages = {".".join(m.split(".")[:i]) for m in modules for i in range(1, m.count(".") + 1)}
    return modules | packages, on_path


def _covered(path: Path, deps: list[str]) -> bool:
    return any(path == Path(d) or Path(d) in path.parents for d in deps)


def _deps(stage: str) -> list[str]:
    return [next(iter(d)) if isinstance(d, dict) else d for d in _dvc_stages()[stage].get("deps", [])]


@pytest.mark.parametrize("stage", STAGES)
def test_stage_depends_on_every_module_it_imports(stage):
    graph = _graph()
    modules, _ = stage_closure(stage, graph)
    assert {"ipa_lib.cli", "ipa_lib.core.config"} <= modules
    deps = _deps(stage)
    missing = sorted(str(_file(m)) for m in modules if not _covered(_file(m), deps))
    assert not missing, f"dvc.yaml stage {stage!r} imports these files but does not depend on them: {missing}"
    stale = sorted(d for d in deps if d.startswith("ipa_lib") and not (REPO / d).exists())
    assert not stale, f"dvc.yaml stage {stage!r} depends on files that do not exist: {stale}"


def _param_reads(nodes) -> set[tuple[str, str | None]]:
    """(section, key) for every `params.section.key` among `nodes`, (section, None) for a
    `params.section` used whole (`cfg = params.train`)."""
    from ipa_lib.core.config import Params

    sections = set(Params.model_fields)

    def section_of(node) -> str | None:
        if not (isinstance(node, ast.Attribute) and node.attr in sections):
            return None
        owner = node.value
        if isinstance(owner, ast.Attribute) and owner.attr == "params":  # self.params.x
            return node.attr
        return node.attr if isinstance(owner, ast.Name) and owner.id in PARAM_OWNERS else None

    keyed, out = set(), set()
    for node in nodes:
        if isinstance(node, ast.Attribute) and (sec := section_of(node.value)):
            keyed.add(id(node.value))
            out.add((sec, node.attr))
    for node in nodes:
        if (sec := section_of(node)) and id(node) not in keyed:
            out.add((sec, None))
    return out


@pytest.mark.parametrize("stage", STAGES)
def test_stage_declares_the_params_it_reads(stage):
    """The CLI functions of the command, the stage functions they import (and what those call
    in their module) and stages/common.py: every `params.<section>[.<key>]` is a DVC param."""
    graph = _graph()
    modules, on_path = stage_closure(stage, graph)
    nodes = []
    for mod, names in on_path.items():
        funcs = _functions(_tree(mod))
        for f in names:
            nodes += list(ast.walk(funcs[f]))
            for imp in ast.walk(funcs[f]):
                if isinstance(imp, ast.ImportFrom) and (imp.module or "").startswith("ipa_lib.stages."):
                    stage_funcs = _functions(_tree(imp.module))
                    for a in imp.names:
                        for g in _reached(stage_funcs, a.name):
                            nodes += list(ast.walk(stage_funcs[g]))
    if "ipa_lib.stages.common" in modules:
        nodes += list(ast.walk(_tree("ipa_lib.stages.common")))
    reads = {(s, k) for s, k in _param_reads(nodes) if k not in PATH_KEYS}
    if stage in TRACKING_ONLY:
        reads = {(s, k) for s, k in reads if s != "tracking"}
    declared = set(_dvc_stages()[stage].get("params", []))
    missing = sorted(f"{s}.{k}" if k else s for s, k in reads if s not in declared and f"{s}.{k}" not in declared)
    assert reads, f"found no params reads for {stage!r}: the scan is broken"
    assert not missing, f"dvc.yaml stage {stage!r} reads these params without declaring them: {missing}"


def _placeholder(repo: Path, path: str) -> None:
    """An output or data input that does not exist yet (no stage is run): a file or a folder."""
    p = repo / path
    if p.exists():
        return
    if p.suffix:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("{}\n")
    else:
        p.mkdir(parents=True)
        (p / "placeholder.txt").write_text("placeholder\n")


def test_dvc_status_sees_an_edit_in_every_code_dependency(scratch_dvc_repo):
    """In a scratch git+DVC repo whose dvc.lock matches the tree (`dvc commit -f`, no stage run):
    appending a comment to a file of each code dep marks changed every stage whose imports
    include that file, on that dep; `dvc status` is clean again once the file is restored."""
    graph = _graph()
    repo, env = scratch_dvc_repo()
    stages = _dvc_stages()
    for stage in stages.values():
        for entry in stage.get("deps", []) + stage.get("outs", []) + stage.get("metrics", []) + stage.get("plots", []):
            _placeholder(repo, next(iter(entry)) if isinstance(entry, dict) else entry)
    sh(["dvc", "unfreeze", "pretrain"], repo, env)  # a frozen stage's deps are not checked
    sh(["dvc", "commit", "-f", "-q"], repo, env)
    assert json.loads(sh(["dvc", "status", "--json"], repo, env).stdout) == {}

    closures = {s: {_file(m) for m in stage_closure(s, graph)[0]} for s in STAGES}
    code_deps = sorted({d for s in STAGES for d in _deps(s) if d.startswith("ipa_lib")})
    for dep in code_deps:
        # one file of the dep that some stage imports (a folder's first, in name order)
        target = min((f for files in closures.values() for f in files if _covered(f, [dep])), default=None)
        if target is None:
            continue  # a dep no stage imports today (broader than needed, not missing)
        original = (repo / target).read_text()
        (repo / target).write_text(original + "\n# edited by test_dvc_deps\n")
        status = json.loads(sh(["dvc", "status", "--json"], repo, env).stdout)
        (repo / target).write_text(original)
        for stage in STAGES:
            if target in closures[stage]:
                changed = {k: v for e in status.get(stage, []) for k, v in e.get("changed deps", {}).items()}
                assert any(_covered(target, [d]) for d in changed), f"edited {target}: dvc status shows {stage!r} unchanged: {status}"
    assert json.loads(sh(["dvc", "status", "--json"], repo, env).stdout) == {}
