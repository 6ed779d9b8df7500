"""One registry of the theorems: the single source of the README's theorem table, of the rows of
``python -m explaind_math verify`` and of the optimizer rules' labels.

Each :class:`Theorem` names its statement (MATH.md section), the optimizer rules it covers, its public
function(s), its reference implementation (a literal torch.func transcription, the specification the
engine is tested against), its property tests (``file::name``), its proof checks (``proofs_checks/``) and
its examples. ``tests/test_theorem_registry.py`` checks that the README's table is :func:`readme_table`
and that every file and name listed here exists.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Theorem", "THEOREMS", "VERIFY_ROWS", "RULE_LABELS", "rule_label", "theorem", "readme_table",
           "proof_required_rows"]

#: optimizer rule name (``Trajectory.optimizer``) → label written into ``Influence.theorem``
RULE_LABELS: dict[str, str] = {"adamw": "AdamW", "sgd": "SGD with momentum", "rmsprop": "RMSprop",
                               "adagrad": "Adagrad", "adamax": "Adamax", "nadam": "NAdam", "radam": "RAdam"}

#: the rows of ``python -m explaind_math verify``, in print order: key → title
VERIFY_ROWS: dict[str, str] = {
    "theorem_3_1": "Theorem 3.1 AdamW",
    "corollary_3_2": "Corollary 3.2 SGD",
    "path_identity": "path identity",
    "quadrature": "Gauss–Legendre quadrature",
    "corollary_3_3": "Corollary 3.3",
    "corollary_f_2": "Corollary F.2",
    "exact_crosscheck": "exact cross-check",
    "template": "§4 optimizer template",
    "remark_f_3": "Remark F.3 checkpoints",
    "step_subsampling": "Appendix G.2 step subsampling",
    "contraction": "§11 contraction planning",
    "block_scan": "§11 block scan (distributed)",
    "adjoint": "§12 adjoint accumulation",
}

ALL_RULES = tuple(RULE_LABELS)


@dataclass(frozen=True)
class Theorem:
    """One row of the README's theorem table.

    ``functions``: public names of :mod:`explaind_math` (``name``), a submodule (``name.*``) or an option
    of :class:`~explaind_math.DecompositionOptions` (``name=``). ``reference``: the dotted path of the
    reference implementation, or None for rows that are not an exact decomposition formula (then
    ``reference_note`` says why). ``property_tests``: ``file::test name``; ``proof_checks``: files, with
    ``proof_note`` when they do not prove the row by themselves (such rows need no passing proof check).
    ``verify_rows``: the rows of the verification command its tests are counted under.
    """

    key: str
    title: str
    section: str
    rules: tuple[str, ...]
    functions: tuple[str, ...]
    reference: str | None
    property_tests: tuple[str, ...]
    proof_checks: tuple[str, ...]
    examples: tuple[str, ...]
    verify_rows: tuple[str, ...]
    function_note: str = ""
    test_note: str = ""
    proof_note: str = ""
    reference_note: str = ""

    @property
    def property_test_files(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p.split("::")[0] for p in self.property_tests))


_REF = "explaind_math.theorems."

THEOREMS: tuple[Theorem, ...] = (
    Theorem(
        key="theorem_3_1", title="Theorem 3.1 — AdamW (and Adam, amsgrad, maximize, coupled/decoupled decay)",
        section="§2", rules=("adamw",), functions=("decompose_adamw_training", "theorem_3_1"),
        reference=_REF + "adamw.reference_adamw",
        property_tests=("tests/test_theorem_3_1_adamw.py::test_adamw_reconstruction_is_exact_on_smooth_models",
                        "tests/test_theorem_3_1_reference.py::test_theorem_3_1_engine_equals_reference"),
        proof_checks=("proofs_checks/check_theorem_3_1_adamw.py",),
        examples=("python -m explaind_math demo", "examples/pruning.py"), verify_rows=("theorem_3_1",)),
    Theorem(
        key="corollary_3_2", title="Corollary 3.2 — SGD with momentum, dampening, Nesterov, weight decay",
        section="§3", rules=("sgd",), functions=("decompose_sgd_momentum_training", "corollary_3_2"),
        reference=_REF + "sgd_momentum.reference_sgd_momentum",
        property_tests=("tests/test_corollary_3_2_sgd.py::test_sgd_reconstruction_is_exact_on_smooth_models",
                        "tests/test_corollary_3_2_reference.py::test_corollary_3_2_engine_equals_reference"),
        proof_checks=("proofs_checks/check_corollary_3_2_sgd.py",), examples=("examples/sgd_momentum.py",),
        verify_rows=("corollary_3_2",)),
    Theorem(
        key="path_identity",
        title="§1 path identity f(θ_{t+1}) − f(θ_t) = Φ_t Δθ_t, and its quadrature (fixed, bisection, "
              "hp-adaptive by JVP probes; §13 piecewise-smooth between the kinks, the default)",
        section="§1, §13", rules=ALL_RULES,
        functions=("default_quadrature", "piecewise_gauss_legendre", "gauss_legendre", "midpoint", "adaptive",
                   "adaptive_gauss_legendre"),
        reference=None, reference_note="Φ_t by jacrev at Gauss–Legendre nodes is part of every reference",
        property_tests=("tests/test_deep_linear_exactness.py::test_deep_linear_is_exact_with_ceil_half_L_nodes",
                        "tests/test_relu_models.py::test_relu_mlp_with_adaptive_quadrature",
                        "tests/test_adaptive_quadrature.py::test_every_step_meets_the_tolerance",
                        "tests/test_piecewise_quadrature.py::test_default_quadrature_is_exact_on_relu_mlps",
                        "tests/test_piecewise_quadrature.py::test_default_quadrature_is_exact_on_piecewise_smooth_models"),
        proof_checks=("proofs_checks/check_path_identity.py", "proofs_checks/check_quadrature.py"),
        examples=("benchmarks/bench_core.py", "examples/table1_revisited.py", "benchmarks/relu_fidelity.py"),
        verify_rows=("path_identity", "quadrature")),
    Theorem(
        key="contraction",
        title="§11 contraction planning — per step the cheaper exact way (JVPs per kept direction, or Jacobian + "
              "matrix product), chunked under a memory budget, quadrature nodes batched into one vmapped call",
        section="§11", rules=ALL_RULES, functions=("contraction=", "memory_budget=", "node_chunk_size="),
        function_note="of every theorem function", reference=None,
        reference_note="a reordering of the same sums; the references are its atomic tensors",
        property_tests=("tests/test_contraction_paths.py::test_planned_contractions_equal_the_atomic_tensor",),
        test_note="every path against the atomic tensor, 1e-12; nodes batched, in chunks or one at a time, 1e-12",
        proof_checks=(), proof_note="a reordering of one sum; checked numerically against the atomic tensor",
        examples=("benchmarks/bench_scaling.py", "benchmarks/bench_memory.py"), verify_rows=("contraction",)),
    Theorem(
        key="block_scan", title="§4, §11 — steps split across `torch.distributed` ranks, buffers carried by an exact scan",
        section="§4, §11", rules=ALL_RULES, functions=("distributed=",), reference=None,
        reference_note="the single-process engine is its reference",
        property_tests=("tests/test_distributed.py::test_two_ranks_equal_one_process",),
        test_note="2 gloo ranks under torchrun = one process, 1e-12",
        proof_checks=("proofs_checks/check_block_scan.py",), examples=("examples/distributed.py",),
        verify_rows=("block_scan",)),
    Theorem(
        key="adjoint", title="§12 — the adjoint: per-unit influences by λ_s run backward, only each step's batch contracted",
        section="§12", rules=ALL_RULES, functions=("accumulation=", "batch_contraction="), reference=None,
        reference_note="the forward recursion of §4 is its reference",
        property_tests=("tests/test_adjoint.py::test_adjoint_equals_forward_for_every_rule",
                        "tests/test_adjoint.py::test_adjoint_with_partitions_targets_and_penalty",
                        "tests/test_adjoint_batch_jvp.py::test_jvp_and_gradient_paths_agree_on_random_runs"),
        test_note="adjoint = forward to 1e-12 of the L1 mass; origin-step totals = update-step totals; the batch "
                  "by JVPs = by per-sample gradients",
        proof_checks=("proofs_checks/check_adjoint.py",), examples=("benchmarks/bench_adjoint.py",), verify_rows=("adjoint",)),
    Theorem(
        key="gradient_rounding",
        title="§4 pseudo-unit — the recorded gradients' rounding δ_t = `.grad` − Σ_i w_i ∇ℓ_i, fed through the rule "
              "like a sample (taken only within 64 ε · max abs(g_t); a larger δ_t warns and stays in the residual)",
        section="§4", rules=ALL_RULES, functions=("Influence",),
        function_note="`.gradient_rounding`, of every theorem function when the run recorded its gradients",
        reference=None,
        reference_note="the same run without recorded gradients is the decomposition less this unit",
        property_tests=("tests/test_gradient_rounding.py::test_float32_run_rounding_unit_shrinks_the_residual_and_the_replay_error",
                        "tests/test_gradient_rounding.py::test_adjoint_and_forward_give_the_same_rounding_influence",
                        "tests/test_gradient_rounding.py::test_a_mismatch_within_the_checks_tolerance_stays_in_the_residual",
                        "tests/test_hf_integration.py::test_gpt2_trainer_example_float32_across_dropout_seeds",
                        "tests/test_from_records.py::test_from_records_equals_the_recorder"),
        test_note="float32 runs: residual and replay error shrink, kernel unchanged; forward = adjoint; a 3e-5 weight "
                  "error not absorbed; GPT-2 float32, six dropout seeds ≤ 1e-6",
        proof_checks=("proofs_checks/check_recurrence_kernels.py", "proofs_checks/check_adjoint.py"),
        proof_note="a unit whose gradient is given: it runs through the buffer_step / unit_update kernels (and the "
                   "adjoint's) proved in",
        examples=("examples/hf_gpt2_trainer.py",), verify_rows=("template",)),
    Theorem(
        key="corollary_3_3_i", title="Corollary 3.3 (i) — functions of the output h(f)", section="§6 (i)",
        rules=ALL_RULES, functions=("decompose_function_of_output", "targets.*"),
        reference=_REF + "post_composition.reference_function_of_output",
        property_tests=("tests/test_corollary_3_3_post_composition.py::test_function_of_output_is_exact_and_matches_live_model",
                        "tests/test_corollary_3_3_reference.py::"
                        "test_corollary_3_3_function_of_output_engine_equals_reference"),
        proof_checks=("proofs_checks/check_corollary_3_3.py",), examples=("examples/corollaries.py",),
        verify_rows=("corollary_3_3",)),
    Theorem(
        key="corollary_3_3_ii", title="Corollary 3.3 (ii) — intermediate activations", section="§6 (ii)",
        rules=ALL_RULES, functions=("decompose_activation",),
        reference=_REF + "activations.reference_activation",
        property_tests=("tests/test_corollary_3_3_activations.py::test_mlp_hidden_layer_activation_is_exact",
                        "tests/test_corollary_3_3_reference.py::test_corollary_3_3_activation_engine_equals_reference"),
        proof_checks=("proofs_checks/check_corollary_3_3.py",), examples=("examples/corollaries.py",),
        verify_rows=("corollary_3_3",)),
    Theorem(
        key="corollary_f_2", title="Corollary F.2 — partition accumulation", section="§7",
        rules=ALL_RULES, functions=("decompose_by_partition",), reference=_REF + "partition.reference_partition",
        property_tests=("tests/test_corollary_F_2_partition.py::test_group_influences_are_sums_of_per_sample_influences",
                        "tests/test_corollary_F_2_reference.py::test_corollary_F_2_engine_equals_reference"),
        proof_checks=("proofs_checks/check_corollary_F_2_partition.py",),
        examples=("examples/corollaries.py", "benchmarks/bench_partition_memory.py"), verify_rows=("corollary_f_2",)),
    Theorem(
        key="remark_f_3",
        title="Remark F.3 — checkpoints only (exact per simulated update; persistence is an estimate, labelled)",
        section="§8", rules=("adamw",), functions=("decompose_from_checkpoints", "checkpoint_from_optimizer"),
        reference=None, reference_note="not yet transcribed",
        property_tests=("tests/test_remark_F_3_checkpoints.py::test_checkpoint_update_is_exact_and_equals_the_real_step",),
        proof_checks=("proofs_checks/check_remark_F_3_checkpoints.py",), examples=("examples/corollaries.py",),
        verify_rows=("remark_f_3",)),
    Theorem(
        key="step_subsampling", title="Appendix G.2 — step subsampling (approximation by design, labelled)",
        section="§9", rules=ALL_RULES, functions=("rank_steps_by_heldout_loss", "step_subsampling_fidelity"),
        reference=None, reference_note="an estimate by design; q = 1 is Theorem 3.1 / Corollary 3.2",
        property_tests=("tests/test_step_subsampling.py::test_ranking_and_fidelity_rows",),
        proof_checks=(), examples=("examples/corollaries.py",), verify_rows=("step_subsampling",)),
    Theorem(
        key="template",
        title="MATH.md §4 — the linear-optimizer template: RMSprop (momentum, centered), Adagrad, Adamax, NAdam "
              "(incl. decoupled decay), RAdam (incl. decoupled decay), and your own rules",
        section="§4", rules=ALL_RULES, functions=("decompose_training",),
        reference=_REF + "linear_optimizers.reference_template",
        property_tests=("tests/test_optimizer_rules.py::test_rule_passes_shared_properties",
                        "tests/test_training_details.py::test_clip_grad_norm_is_exact_with_the_recovered_factor",
                        "tests/test_template_reference.py::test_template_engine_equals_reference"),
        test_note="replay against the real optimizer, decomposition, flags, and the engine against the unrolled "
                  "reference, for every registered rule",
        proof_checks=("proofs_checks/check_path_identity.py",),
        proof_note="no per-rule sympy transcription: each rule is checked by replay against the real torch step; "
                   "the template's telescoping (SGD and AdamW tables) in",
        examples=("examples/custom_optimizer.py",), verify_rows=("template",)),
    Theorem(
        key="exact_crosscheck", title="Exact cross-check against rational arithmetic", section="§1, §2, §3",
        rules=("adamw", "sgd"), functions=("decompose_adamw_training", "decompose_sgd_momentum_training"),
        reference=None, reference_note="rational arithmetic is its reference",
        property_tests=(), proof_checks=("proofs_checks/check_exact_crosscheck.py",),
        examples=("proofs_checks/check_exact_crosscheck.py",), verify_rows=("exact_crosscheck",)),
)


def theorem(key: str) -> Theorem:
    """The registered theorem with this key."""
    for entry in THEOREMS:
        if entry.key == key:
            return entry
    raise KeyError(f"no registered theorem {key!r}; keys: {[t.key for t in THEOREMS]}")


def rule_label(rule: str) -> str:
    """The label of an optimizer rule in ``Influence.theorem`` (its name when unregistered)."""
    return RULE_LABELS.get(rule, rule)


def proof_required_rows() -> tuple[str, ...]:
    """The verify rows that need a passing proof check: those of rows whose proof checks prove them."""
    rows = {r for t in THEOREMS if t.proof_checks and not t.proof_note for r in t.verify_rows}
    return tuple(k for k in VERIFY_ROWS if k in rows)


# ------------------------------------------------------------------------------------ the README table
README_HEADER = ("theorem", "function", "property test", "proof check", "example", "reference implementation")


def _code(items) -> str:
    return ", ".join(f"`{i}`" for i in items)


def _with_note(text: str, note: str, parenthesized: bool = True) -> str:
    if not note:
        return text
    if not text:
        return note
    return f"{text} ({note})" if parenthesized else f"{note} {text}"


def readme_row(entry: Theorem) -> tuple[str, ...]:
    """The cells of one README row."""
    if entry.proof_checks:
        proof = _with_note(_code(entry.proof_checks), entry.proof_note, parenthesized=False)
    else:
        proof = "— (" + entry.proof_note + ")" if entry.proof_note else "—"
    reference = f"`{entry.reference.removeprefix('explaind_math.')}`" if entry.reference else f"— ({entry.reference_note})"
    functions = _code(entry.functions) + (f" {entry.function_note}" if entry.function_note else "")
    return (entry.title, functions, _with_note(_code(entry.property_test_files), entry.test_note) or "—", proof, _code(entry.examples),
            reference)


def readme_table() -> str:
    """The README's theorem table, rendered from :data:`THEOREMS`."""
    lines = ["| " + " | ".join(README_HEADER) + " |", "|" + "---|" * len(README_HEADER)]
    lines += ["| " + " | ".join(readme_row(t)) + " |" for t in THEOREMS]
    return "\n".join(lines)
