#!/bin/bash
# Diagnostic probe (one device call): ncu of each kernel, a Triton config sweep, model decode capture.
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 GATEDLORA_CUDA_ARCHS=90
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -1
python3 -c "from gatedlora.ops import cuda_backend; import torch; print(cuda_backend.extension_problem(torch.device('cuda')))"
NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
timeout 60 $NCU --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis --launch-skip 0 -k regex:"gated_lora_add_kernel|adapter_kernel|fused_gemv" -c 12 python3 benchmarks/probes/kernel_probe.py ncu > $OUT/ncu.txt 2>&1; echo "ncu rc $?"
grep -E "gated_lora_add_kernel|adapter|fused_gemv|Duration|Memory Throughput|DRAM Throughput|Compute \(SM\)|Grid Size|Block Size|Registers|Achieved Occupancy|Stall|One or More" $OUT/ncu.txt | head -150
timeout 40 python3 benchmarks/probes/kernel_probe.py twophase 2>&1 | tail -20
timeout 25 python3 benchmarks/probes/kernel_probe.py sweep 2>&1 | tail -45
CUDA_LAUNCH_BLOCKING=1 timeout 35 python3 benchmarks/probes/kernel_probe.py decode 2>&1 | grep -v "IndexKernel.cu" | tail -40
