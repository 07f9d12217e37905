"""The MoE layer benchmark (W1, W2; float32, bfloat16; forward and forward+backward) — see
`moekit bench layer --help`. Runs through the `moekit` program so that every competitor is measured
under the same glibc malloc setting. Example: python benchmarks/moe_layer.py --json docs/results/moe_layer.json
"""

import os
import sys

if __name__ == "__main__":
    os.execvp(sys.executable, [sys.executable, "-m", "moekit", "bench", "layer", *sys.argv[1:]])
