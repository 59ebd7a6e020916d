#!/usr/bin/env bash
# Wheels of the Python packages the GPU check needs that the device machines' image lacks (their image has torch,
# numpy, scipy, pandas, matplotlib, pillow, safetensors, pyyaml, tqdm, but no Hydra/OmegaConf, torch-fidelity or
# lpips; see the device tool's KINDS.md). Run here, where pip reaches the registry; the device machine cannot.
# All are pure Python, so the wheels fit any Python 3 there (3.12 as last seen). Writes .whl/ (git-ignored);
# name it in the device call's `carry`:
#   bash replication/gpu_wheels.sh
#   run(command="COPY_TO=$OUT bash replication/gpu_check.sh", carry=[".whl"])
# gpu_check.sh installs them into /tmp/site when its imports fail there.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
# the versions this project is tested with (pyproject.toml's ranges)
python3 -m pip wheel -q --no-deps -w .whl \
  hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3 torch-fidelity==0.4.0 lpips==0.1.4
ls -la .whl
du -sh .whl
