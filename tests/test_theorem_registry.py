"""The theorem registry (explaind_math.theorems.registry) is the one source of the README's theorem table,
of the rows of ``python -m explaind_math verify`` and of the optimizer rules' labels; every file and name it
lists exists."""

import ast
import dataclasses
import importlib
from pathlib import Path

import pytest

import explaind_math as em
from explaind_math import verification
from explaind_math.optimizers import RULES
from explaind_math.theorems import registry

ROOT = Path(__file__).resolve().parents[1]
#: the exact decompositions of MATH.md §2, §3, §4, §6, §7: each must have a reference implementation
DECOMPOSITION_THEOREMS = ("theorem_3_1", "corollary_3_2", "template", "corollary_3_3_i", "corollary_3_3_ii",
                          "corollary_f_2")
ENTRIES = {t.key: t for t in registry.THEOREMS}


def _markdown_table(text: str, header: str) -> list[list[str]]:
    """The rows (cells stripped) of the markdown table whose header line starts with ``header``."""
    lines = text.splitlines()
    start = next(k for k, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split(" | ")])
    return [rows[0]] + rows[2:]  # without the |---| separator


def test_readme_theorem_table_is_the_registry():
    readme = _markdown_table((ROOT / "README.md").read_text(encoding="utf-8"), "| theorem | function |")
    expected = _markdown_table(registry.readme_table(), "| theorem | function |")
    assert readme[0] == expected[0], f"README's table header {readme[0]} != registry's {expected[0]}"
    readme_titles, registry_titles = [r[0] for r in readme[1:]], [r[0] for r in expected[1:]]
    assert readme_titles == registry_titles, (
        f"README's theorem rows {readme_titles} differ from the registry's {registry_titles}")
    for row, want in zip(readme[1:], expected[1:]):
        for column, have, cell in zip(expected[0], row, want):
            assert have == cell, f"README row {row[0]!r}, column {column!r}: {have!r}, the registry says {cell!r}"


def test_verify_prints_the_registry_rows():
    assert verification.THEOREMS == registry.VERIFY_ROWS
    assert verification.PROOF_REQUIRED == registry.proof_required_rows()
    table = verification.format_table(verification._Collector().rows(), {}, {})
    printed = [line.split("  ")[0] for line in table.splitlines()[2:]]
    assert printed == list(registry.VERIFY_ROWS.values())


def test_every_verify_row_belongs_to_a_registered_theorem():
    keys = [t.key for t in registry.THEOREMS]
    assert len(keys) == len(set(keys)), f"duplicate theorem keys in {keys}"
    covered = {row for t in registry.THEOREMS for row in t.verify_rows}
    assert covered == set(registry.VERIFY_ROWS), (
        f"verify rows without a theorem: {set(registry.VERIFY_ROWS) - covered}; unknown: {covered - set(registry.VERIFY_ROWS)}")


def test_every_optimizer_rule_has_a_label():
    assert set(RULES) <= set(registry.RULE_LABELS), f"rules without a label: {set(RULES) - set(registry.RULE_LABELS)}"
    for t in registry.THEOREMS:
        assert set(t.rules) <= set(RULES), f"{t.key}: unknown rules {set(t.rules) - set(RULES)}"


def _resolve(dotted: str):
    module, name = dotted.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("key", DECOMPOSITION_THEOREMS)
def test_every_decomposition_theorem_has_a_reference_and_a_test_against_it(key):
    entry = ENTRIES[key]
    assert entry.reference, f"{key} has no reference implementation"
    reference = _resolve(entry.reference)
    assert callable(reference) and reference.__doc__ and "specification implementation" in reference.__doc__
    name = entry.reference.rsplit(".", 1)[1]
    assert getattr(em.theorems, name) is reference, f"{name} is not exported from explaind_math.theorems"
    assert any(name in (ROOT / f).read_text(encoding="utf-8") for f in entry.property_test_files), (
        f"no property test of {key} calls {name}")


def _defined_tests(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


@pytest.mark.parametrize("key", list(ENTRIES))
def test_every_registered_file_and_name_exists(key):
    entry = ENTRIES[key]
    if entry.reference is None:
        assert entry.reference_note, f"{key}: no reference implementation and no reason given"
    else:
        assert callable(_resolve(entry.reference))
    for test in entry.property_tests:
        file, name = test.split("::")
        assert (ROOT / file).is_file(), f"{key}: property test file {file} does not exist"
        assert name in _defined_tests(ROOT / file), f"{key}: {file} defines no test {name}"
    assert entry.property_tests or entry.proof_checks, f"{key} has neither property tests nor proof checks"
    for file in entry.proof_checks:
        assert file.startswith("proofs_checks/") and (ROOT / file).is_file(), f"{key}: proof check {file} missing"
    if not entry.proof_checks:
        assert key not in registry.proof_required_rows()
    assert entry.examples, f"{key} has no example"
    commands = importlib.import_module("explaind_math.cli").USAGE
    for example in entry.examples:
        if example.startswith("python -m explaind_math "):
            assert f"  {example.split()[-1]} " in commands, f"{key}: {example!r} is not a command of the CLI"
        else:
            assert (ROOT / example).is_file(), f"{key}: example {example} does not exist"
    options = {f.name for f in dataclasses.fields(em.DecompositionOptions)}
    for function in entry.functions:
        if function.endswith("="):
            assert function[:-1] in options, f"{key}: {function} is not a decomposition option"
        elif function.endswith(".*"):
            importlib.import_module(f"explaind_math.{function[:-2]}")
        else:
            assert callable(getattr(em, function)), f"{key}: explaind_math.{function} is not public"
