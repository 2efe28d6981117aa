#!/usr/bin/env bash
# Replaced by bench/gpu_proof.sh (one proof of the GPU path that fits one lent GPU's time, with the
# phases, caps and budget table in its header). This name runs it, with the same arguments.
exec bash "$(dirname "$0")/gpu_proof.sh" "$@"
