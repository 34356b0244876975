"""`python -m ctpo_megatron.rollout.sandbox --self-test`: what isolation this host gives.
"""

from __future__ import annotations

import argparse
import sys

from ctpo_megatron.rollout.sandbox.selftest import self_test


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ctpo_megatron.rollout.sandbox", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--self-test", action="store_true",
                        help="run a probe in the sandbox and report namespaces, root, cgroup, seccomp "
                             "(exit status 1 when something is missing)")
    args = parser.parse_args(argv)
    if not args.self_test:
        parser.print_help()
        return 2
    report = self_test()
    print("\n".join(report.lines()))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
