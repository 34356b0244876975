"""`python -m ctpo_megatron.ops`: print which kernels are active and why."""

import argparse

from ctpo_megatron.ops._backend import backend_report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m ctpo_megatron.ops",
        description="Print which kernel backend ctpo_megatron.ops uses per device type (csrc CUDA, "
                    "csrc CPU or pure torch) and, where the extension or its CUDA kernels are "
                    "missing, why. Takes no options besides --help.")
    parser.parse_args(argv)
    for line in backend_report():
        print(line)


if __name__ == "__main__":
    main()
