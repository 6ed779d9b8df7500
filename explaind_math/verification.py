"""The verification command: run every proof check and property test, one row per theorem.

    python -m explaind_math verify            (wired by the CLI; ``main(argv)`` here does the work)

It runs ``pytest`` in-process on ``proofs_checks/`` (machine-checked sympy algebra, MATH.md) and
``tests/`` (Hypothesis property tests) of a source checkout, and prints, per theorem: how many proof
checks passed/failed, how many property tests passed/failed, how many random Hypothesis cases those
tests tried, and the worst residual the tests reported. The exit status is non-zero when anything failed
or errored (collection included), or when a theorem has no passing proof check.

Which theorem a test belongs to (first match wins):

1. the marker ``@pytest.mark.verifies("corollary_3_2")`` on the test (register ``verifies`` under
   ``[tool.pytest.ini_options] markers`` to use it outside this command);
2. a module-level ``VERIFIES = "corollary_3_2"`` in the test module;
3. the file name: ``check_<key>*.py`` (proof checks) or ``test_<key>*.py`` (property tests), where
   <key> is one of the row keys of :data:`explaind_math.theorems.registry.VERIFY_ROWS` (case-insensitive),
   e.g. ``test_theorem_3_1_replay.py``, ``test_corollary_F_2_partition.py``, ``check_quadrature.py``.

The rows, their titles, and which need a passing proof check come from the theorem registry
(:mod:`explaind_math.theorems.registry`), which also renders the README's theorem table.

Tests matching no key are counted in an "other tests" row (their failures still fail the command).
A test is a proof check when its file name starts with ``check_``, a property test otherwise.

Residuals and case counts — the recording API for test code (a module-level registry, read after the run):

    from explaind_math.verification import record_residual, record_cases
    record_residual("theorem_3_1", float(result.max_residual))   # keeps the maximum per theorem
    record_cases("theorem_3_1", 1)                               # cases not run through Hypothesis

Hypothesis cases are counted automatically (valid and failing examples of the explicit, reuse and
generate phases of every ``@given`` test); ``record_cases`` adds cases that Hypothesis does not see.
Both functions accept a key, an alias such as "Theorem 3.1" or "AdamW", or a row title; any other
name gets a row of its own (so a new theorem needs no change here, and a typo shows up as an extra
row). Outside this command they only fill the registry (harmless).

Every theorem of :data:`PROOF_REQUIRED` (all but the template and Appendix G.2 rows, whose evidence is
property tests) must have at least one passing proof check, or the command fails.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .theorems.registry import VERIFY_ROWS, proof_required_rows

__all__ = [
    "THEOREMS",
    "record_residual",
    "record_cases",
    "registry",
    "known_key",
    "reset_registry",
    "theorem_of_path",
    "main",
]

#: key → row title, in the order rows are printed (from the theorem registry)
THEOREMS: dict[str, str] = dict(VERIFY_ROWS)
OTHER = "other"
#: the rows whose status needs at least one passing machine-checked proof (a file in proofs_checks/): the
#: registry's rows whose proof checks prove them (not the template row, whose evidence is the shared checks
#: of every registered rule, nor Appendix G.2, an estimation procedure whose exact case q = 1 is
#: Theorem 3.1 / Corollary 3.2)
PROOF_REQUIRED = proof_required_rows()

_ALIASES: dict[str, str] = {
    "theorem 3.1": "theorem_3_1", "thm 3.1": "theorem_3_1", "3.1": "theorem_3_1", "adamw": "theorem_3_1",
    "corollary 3.2": "corollary_3_2", "3.2": "corollary_3_2", "sgd": "corollary_3_2",
    "path": "path_identity", "path identity": "path_identity",
    "gauss_legendre": "quadrature", "gauss-legendre": "quadrature", "gauss–legendre quadrature": "quadrature",
    "corollary 3.3": "corollary_3_3", "3.3": "corollary_3_3",
    "corollary f.2": "corollary_f_2", "f.2": "corollary_f_2", "partition": "corollary_f_2",
    "exact cross-check": "exact_crosscheck", "exact_cross_check": "exact_crosscheck", "crosscheck": "exact_crosscheck",
    "theorem 3.1 (adamw)": "theorem_3_1", "corollary 3.2 (sgd with momentum)": "corollary_3_2",
    "optimizer_rules": "template", "linear template": "template", "§4": "template",
    "remark f.3": "remark_f_3", "f.3": "remark_f_3", "checkpoints": "remark_f_3",
    "appendix g.2": "step_subsampling", "g.2": "step_subsampling",
}

#: the statement labels the library writes into ``Influence.theorem`` (e.g. "Corollary F.2, partition
#: (AdamW)") → keys, matched on the label's start
_LIBRARY_LABELS: tuple[tuple[str, str], ...] = (
    ("theorem 3.1", "theorem_3_1"), ("corollary 3.2", "corollary_3_2"), ("corollary 3.3", "corollary_3_3"),
    ("corollary f.2", "corollary_f_2"), ("remark f.3", "remark_f_3"), ("appendix g.2", "step_subsampling"),
    ("math.md §4", "template"),
)


def known_key(theorem: str) -> str | None:
    """The row key of a key, alias, row title or library label (``Influence.theorem``); None if unknown."""
    name = str(theorem).strip().lower()
    key = _resolve(name) if name else None
    if key in THEOREMS:
        return key
    for prefix, key in _LIBRARY_LABELS:
        if name.startswith(prefix):
            return key
    return None


def _resolve(theorem: str) -> str:
    """The key of a theorem given as key, alias or row title; an unknown name is kept as its own row
    (printed under that name) rather than failing the test that reports it."""
    name = str(theorem).strip().lower()
    if name in THEOREMS:
        return name
    if name in _ALIASES:
        return _ALIASES[name]
    for key, title in THEOREMS.items():
        if name == title.lower():
            return key
    if not name:
        raise ValueError("record_residual/record_cases need a theorem name")
    return name


# ----------------------------------------------------------------------------- the registry
_RESIDUALS: dict[str, float] = {}
_CASES: dict[str, int] = {}


def record_residual(theorem: str, value: float) -> None:
    """Report a residual seen by a test of ``theorem``; the command prints the worst (max |value|,
    NaN counted as infinite)."""
    key = _resolve(theorem)
    v = abs(float(value))
    if math.isnan(v):
        v = math.inf
    _RESIDUALS[key] = max(_RESIDUALS.get(key, 0.0), v)


def record_cases(theorem: str, count: int = 1) -> None:
    """Report ``count`` cases checked by a test of ``theorem`` outside Hypothesis."""
    key = _resolve(theorem)
    _CASES[key] = _CASES.get(key, 0) + int(count)


def registry() -> dict[str, dict[str, float]]:
    """A copy of what was recorded: {"residuals": {key: worst}, "cases": {key: count}}."""
    return {"residuals": dict(_RESIDUALS), "cases": dict(_CASES)}


def reset_registry() -> None:
    _RESIDUALS.clear()
    _CASES.clear()


def theorem_of_path(path: str | os.PathLike) -> str:
    """The theorem key of a test file by the naming convention, or ``"other"``."""
    stem = Path(path).name.lower()
    for prefix in ("check_", "test_"):
        if stem.startswith(prefix):
            rest = stem[len(prefix):]
            for key in sorted(THEOREMS, key=len, reverse=True):
                if rest == key + ".py" or rest.startswith(key + "_") or rest.startswith(key + "."):
                    return key
    return OTHER


# ----------------------------------------------------------------------------- the pytest plugin
@dataclass
class Row:
    proof_passed: int = 0
    proof_failed: int = 0
    property_passed: int = 0
    property_failed: int = 0
    skipped: int = 0
    hypothesis_cases: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return self.proof_failed + self.property_failed


_STATS_LINE = re.compile(r"during (\w+) phase.*?(\d+) passing, (\d+) failing", re.S)


class _Collector:
    """Collects per-test outcomes and Hypothesis case counts, keyed by theorem."""

    def __init__(self):
        self.theorem: dict[str, str] = {}
        self.is_proof: dict[str, bool] = {}
        self.outcome: dict[str, str] = {}
        self.cases: dict[str, int] = {}
        self.collection_errors: list[tuple[str, str]] = []

    @classmethod
    def _classify(cls, item) -> str:
        try:
            return cls._declared(item)
        except Exception:  # a malformed declaration must not break collection
            return OTHER

    @staticmethod
    def _declared(item) -> str:
        marker = item.get_closest_marker("verifies")
        if marker is not None and marker.args:
            return _resolve(marker.args[0])
        module = getattr(item, "module", None)
        declared = getattr(module, "VERIFIES", None) if module is not None else None
        if declared:
            return _resolve(declared)
        return theorem_of_path(item.path)

    # pytest hooks ---------------------------------------------------------------------
    def pytest_configure(self, config):
        config.addinivalue_line("markers", "verifies(theorem): the theorem a test verifies (explaind_math.verification)")

    def pytest_collection_modifyitems(self, session, config, items):
        for item in items:
            self.theorem[item.nodeid] = self._classify(item)
            self.is_proof[item.nodeid] = Path(str(item.path)).name.startswith("check_")

    def pytest_collectreport(self, report):
        if report.failed:
            path = str(getattr(report, "fspath", "") or report.nodeid)
            self.collection_errors.append((path, str(report.longrepr)[-2000:]))

    def pytest_runtest_logreport(self, report):
        nodeid = report.nodeid
        if report.failed:
            self.outcome[nodeid] = "failed" if report.when == "call" else "error"
        elif report.when == "call" and nodeid not in self.outcome:
            self.outcome[nodeid] = "skipped" if report.skipped else "passed"
        elif report.skipped and report.when == "setup":
            self.outcome.setdefault(nodeid, "skipped")

    def _note_hypothesis(self, nodeid: str, stats: dict) -> None:
        count = 0
        for phase in ("explicit", "reuse", "generate"):
            for case in stats.get(f"{phase}-phase", {}).get("test-cases", []):
                if case.get("status") in ("valid", "interesting"):
                    count += 1
        self.cases[nodeid] = self.cases.get(nodeid, 0) + count

    def pytest_runtest_teardown(self, item, nextitem):
        # fallback when Hypothesis's own collector was innermost: parse its statistics text
        text = getattr(item, "hypothesis_statistics", None)
        if text and item.nodeid not in self.cases:
            count = 0
            for phase, passing, failing in _STATS_LINE.findall(text):
                if phase in ("explicit", "reuse", "generate"):
                    count += int(passing) + int(failing)
            self.cases[item.nodeid] = count

    # rows ---------------------------------------------------------------------------------
    def rows(self) -> dict[str, Row]:
        rows: dict[str, Row] = defaultdict(Row)
        for key in (*THEOREMS, OTHER):
            rows[key] = Row()
        for nodeid, outcome in self.outcome.items():
            key = self.theorem.get(nodeid) or theorem_of_path(nodeid.split("::")[0])
            row = rows[key]
            proof = self.is_proof.get(nodeid, Path(nodeid.split("::")[0]).name.startswith("check_"))
            if outcome == "passed":
                if proof:
                    row.proof_passed += 1
                else:
                    row.property_passed += 1
            elif outcome == "skipped":
                row.skipped += 1
            else:
                if proof:
                    row.proof_failed += 1
                else:
                    row.property_failed += 1
                row.failures.append(nodeid)
        for nodeid, count in self.cases.items():
            rows[self.theorem.get(nodeid, OTHER)].hypothesis_cases += count
        for path, _ in self.collection_errors:
            key = theorem_of_path(path)
            row = rows[key]
            if Path(path).name.startswith("check_"):
                row.proof_failed += 1
            else:
                row.property_failed += 1
            row.failures.append(f"{path} (collection error)")
        return rows


def _make_plugin():
    import pytest

    collector = _Collector()

    class Plugin:
        pytest_configure = staticmethod(collector.pytest_configure)
        pytest_collectreport = staticmethod(collector.pytest_collectreport)
        pytest_runtest_logreport = staticmethod(collector.pytest_runtest_logreport)
        pytest_runtest_teardown = staticmethod(collector.pytest_runtest_teardown)

        @staticmethod
        def pytest_collection_modifyitems(session, config, items):
            collector.pytest_collection_modifyitems(session, config, items)

        @staticmethod
        @pytest.hookimpl(hookwrapper=True, trylast=True)
        def pytest_runtest_call(item):
            try:
                from hypothesis.statistics import collector as hypothesis_collector
            except ImportError:  # pragma: no cover - hypothesis is a test dependency
                yield
                return
            outer = hypothesis_collector.value

            def note(stats):
                collector._note_hypothesis(item.nodeid, stats)
                if outer is not None:
                    outer(stats)

            with hypothesis_collector.with_value(note):
                yield

    return Plugin(), collector


# ----------------------------------------------------------------------------- the command
def _source_root() -> Path | None:
    """The checkout holding proofs_checks/ (the package is installed editable) or the working directory."""
    for candidate in (Path(__file__).resolve().parents[1], Path.cwd()):
        if (candidate / "proofs_checks").is_dir():
            return candidate
    return None


def _format_residual(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.2e}"


def format_table(rows: dict[str, Row], residuals: dict[str, float], extra_cases: dict[str, int]) -> str:
    header = ("theorem", "proof checks", "property tests", "Hypothesis cases", "worst residual", "status")
    lines = []

    def used(key):
        row = rows[key]
        return row.proof_passed + row.property_passed + row.failed + row.skipped or key in residuals or key in extra_cases

    extra = sorted(k for k in {*rows, *residuals, *extra_cases} if k not in THEOREMS and k != OTHER and used(k))
    keys = list(THEOREMS) + extra + ([OTHER] if used(OTHER) else [])
    for key in keys:
        row = rows[key]
        title = THEOREMS.get(key, "other tests" if key == OTHER else key)
        cases = row.hypothesis_cases + extra_cases.get(key, 0)
        if row.failed:
            status = "FAILED"
        elif key in PROOF_REQUIRED and not row.proof_passed:
            status = "NOT PROVED"
        elif row.proof_passed:
            status = "ok"
        else:
            status = "ok (tests only)" if row.property_passed else "not run"
        lines.append((
            title,
            f"{row.proof_passed} passed" + (f", {row.proof_failed} failed" if row.proof_failed else ""),
            f"{row.property_passed} passed" + (f", {row.property_failed} failed" if row.property_failed else ""),
            str(cases),
            _format_residual(residuals.get(key)),
            status,
        ))
    widths = [max(len(h), *(len(r[i]) for r in lines)) for i, h in enumerate(header)]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*r) for r in lines]
    return "\n".join(out)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="explaind_math verify",
        description="Run the machine-checked proofs (proofs_checks/) and the property tests (tests/) and "
                    "print one row per theorem.",
    )
    p.add_argument("--proofs-only", action="store_true", help="run proofs_checks/ only, not tests/")
    p.add_argument("--profile", default=None,
                   help="Hypothesis profile for the property tests (dev, ci, thorough); default: conftest's choice")
    p.add_argument("-k", dest="keyword", default=None, help="pytest -k expression (selects tests)")
    p.add_argument("-v", "--verbose", action="store_true", help="show pytest's per-test output")
    p.add_argument("--root", default=None, help="source checkout holding proofs_checks/ and tests/")
    p.add_argument("pytest_args", nargs="*", help="extra arguments passed to pytest (after --)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the verification suite; print the per-theorem table; return the exit status (0 = all passed)."""
    args = _parse(argv)
    root = Path(args.root).resolve() if args.root else _source_root()
    if root is None or not (root / "proofs_checks").is_dir():
        print("explaind_math verify: no proofs_checks/ directory found; run it from a source checkout "
              "(or pass --root)", file=sys.stderr)
        return 2
    try:
        import pytest
    except ImportError:  # pragma: no cover
        print("explaind_math verify needs pytest (pip install 'explaind_math[test]')", file=sys.stderr)
        return 2

    paths = [str(root / "proofs_checks")]
    if not args.proofs_only and (root / "tests").is_dir():
        paths.append(str(root / "tests"))
    pytest_args = [*paths, "--rootdir", str(root), "-p", "no:cacheprovider", "-rfE"]
    pytest_args.append("-v" if args.verbose else "-q")
    if args.keyword:
        pytest_args += ["-k", args.keyword]
    pytest_args += list(args.pytest_args)

    previous_profile = os.environ.get("HYPOTHESIS_PROFILE")
    if args.profile:
        os.environ["HYPOTHESIS_PROFILE"] = args.profile
    reset_registry()
    plugin, collector = _make_plugin()
    try:
        code = int(pytest.main(pytest_args, plugins=[plugin]))
    finally:
        if args.profile:
            if previous_profile is None:
                os.environ.pop("HYPOTHESIS_PROFILE", None)
            else:
                os.environ["HYPOTHESIS_PROFILE"] = previous_profile

    rows = collector.rows()
    recorded = registry()
    print()
    print("explaind_math verification (MATH.md): proof checks are sympy algebra calling the library's own")
    print("coefficient functions; property tests are Hypothesis searches on real torch runs.")
    print()
    print(format_table(rows, recorded["residuals"], recorded["cases"]))

    failed = [f for row in rows.values() for f in row.failures]
    not_proved = [THEOREMS[k] for k in PROOF_REQUIRED if rows[k].proof_passed == 0] if not args.keyword else []
    bad_residual = [THEOREMS.get(k, k) for k, v in recorded["residuals"].items() if not math.isfinite(v)]
    print()
    if failed:
        print(f"{len(failed)} failing test(s):")
        for f in failed:
            print(f"  {f}")
    if not_proved:
        print("no passing proof check for: " + ", ".join(not_proved))
    if bad_residual:
        print("non-finite residual reported for: " + ", ".join(bad_residual))
    ok = code == 0 and not failed and not not_proved and not bad_residual
    print("verification " + ("PASSED" if ok else f"FAILED (pytest exit status {code})"))
    if ok:
        return 0
    return code if code not in (0, 5) else 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
