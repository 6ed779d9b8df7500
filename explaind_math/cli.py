"""Command line: ``python -m explaind_math demo`` and ``python -m explaind_math verify``."""

from __future__ import annotations

import sys

USAGE = """usage: python -m explaind_math COMMAND [options]

commands:
  demo     record a real AdamW training run, decompose it (Theorem 3.1), print the certified residual
  verify   run the proof checks and property tests; one row per theorem
  verify-rule [module:Name ...]
           run the shared optimizer-rule checks (replay, decomposition, flags) on a rule
"""


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "demo":
        from .demo import main as demo_main

        return demo_main(rest)
    if command == "verify":
        from .verification import main as verify_main

        return verify_main(rest)
    if command == "verify-rule":
        from .testing.rule_checks import main as rule_main

        return rule_main(rest)
    print(f"unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2
