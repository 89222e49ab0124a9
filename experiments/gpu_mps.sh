# Sourced by the GPU scripts (gpu_ablation.sh, gpu_batch.sh): start CUDA MPS, so that many processes'
# kernels run side by side on one GPU instead of time-sliced.  Used when its daemon starts and a CuPy
# call works under it; else the processes share the GPU without it.  Writes one line to the file $1.
if command -v nvidia-cuda-mps-control > /dev/null; then
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps_pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps_log
  mkdir -p /tmp/mps_pipe /tmp/mps_log
  if nvidia-cuda-mps-control -d && timeout 60 python3 -c "import cupy; assert int(cupy.arange(4).sum()) == 6"; then
    echo "CUDA MPS on" | tee "$1"
  else
    echo quit | nvidia-cuda-mps-control
    unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
    echo "CUDA MPS did not start; without it" | tee "$1"
  fi
else
  echo "no nvidia-cuda-mps-control; without CUDA MPS" | tee "$1"
fi
