"""``python -m pyneuralode.julia doctor`` (report) or ``install`` (resolve + precompile)."""

import argparse
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m pyneuralode.julia", description="pyneuralode's Julia backend"
    )
    ap.add_argument(
        "command",
        choices=["doctor", "install"],
        help="doctor: report what is found; install: set up Julia",
    )
    ap.add_argument(
        "--cuda",
        action="store_true",
        help="install: also add and load CUDA.jl 5 and DLPack.jl (juliapkg-cuda.json)",
    )
    a = ap.parse_args(argv)
    if a.command == "doctor":
        from ._doctor import run

        run()
        return 0
    from . import install

    install(cuda=a.cuda)
    return 0


if __name__ == "__main__":
    sys.exit(main())
