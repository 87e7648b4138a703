#!/usr/bin/env bash
# Peak RSS and wall time of `sdrt generate` upscaling 128, 256 and 512 inputs with an x4 upscaler engine folder
# (default tiling: inputs above 128x128 run in 128x128 latent tiles), 2 steps, guidance 1 (one U-Net pass a step).
# Usage: benchmarks/upscale_memory.sh ENGINE_DIR [WORK_DIR]
set -eu
E=$(realpath "$1")
W=${2:-$(mktemp -d)}
mkdir -p "$W" && cd "$W"
python - <<'PY'
import numpy as np
from PIL import Image
colours = np.random.default_rng(0).integers(0, 256, (6, 6, 3), dtype=np.uint8)
for size in (128, 256, 512):
    Image.fromarray(colours).resize((size, size), Image.Resampling.BICUBIC).save(f"in{size}.png")
PY
for size in 128 256 512; do
  /usr/bin/time -v sdrt generate "$E" --image "in$size.png" --prompt "a photo" --steps 2 --guidance 1 --output "out$size.png" \
    --overwrite --quiet --verify never 2> "log$size.txt"
  echo "$size -> $((size * 4)): $(grep 'Maximum resident' "log$size.txt" | tr -s ' \t' ' ') $(grep 'Elapsed' "log$size.txt" | tr -s ' \t' ' ')"
done
echo "cpu flags: $(grep -o 'avx512[a-z_0-9]*\|avx2' /proc/cpuinfo | sort -u | tr '\n' ' ')"
