"""`python -m ctpo_megatron.ops`: print which kernels are active and why."""

from ctpo_megatron.ops._backend import backend_report


def main() -> None:
    for line in backend_report():
        print(line)


if __name__ == "__main__":
    main()
