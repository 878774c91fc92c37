# Sourced by the build scripts and the Makefile (POSIX sh): exports CUDA_HOME, the CUDA toolkit
# folder, when nvcc is on PATH and CUDA_HOME is not set. nvcc may be a link or a wrapper script,
# so the folder is asked of nvcc itself: torch's guess from nvcc's path then fails to link
# -lcudart.
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null 2>&1; then
  cuda_top=$(cd /tmp && nvcc --dryrun -c -x cu /dev/null -o /dev/null 2>&1 \
    | sed -n 's/^#\$ TOP=//p' | head -n 1)
  if [ -n "$cuda_top" ]; then
    CUDA_HOME=$(cd "$cuda_top" && pwd -P)
    export CUDA_HOME
  fi
  unset cuda_top
fi
