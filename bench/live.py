"""Thin entry point for `antiphon bench --live`: python bench/live.py [--json] [--quick] [--model M]."""

import argparse
import sys

from antiphon.daemon.rigs import bench_live

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=bench_live.__doc__.splitlines()[0])
    p.add_argument("--model", default="", help="ONNX model (default: the shipped model)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--quick", action="store_true", help="30 calls instead of 120")
    sys.exit(bench_live.main(p.parse_args()))
