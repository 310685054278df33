"""Decode-latency benchmark: the same as `antiphon bench`, runnable from a checkout.

    python bench/decode.py --random            # default-shaped random model
    python bench/decode.py --checkpoint RUN.pt --model RUN.onnx --json
"""

import sys

from antiphon.daemon.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
