#!/usr/bin/env bash
# Multi-process training with torchrun, as mmdet's dist_train.sh: GPUS processes per node (one per
# GPU; on a machine without GPUs, CPU processes talking over gloo).
#   tools/dist_train.sh CONFIG GPUS [train.py args]
CONFIG=$1
GPUS=$2
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
PORT=${PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-"127.0.0.1"}
DIR=$(dirname "$0")
PYTHON=${PYTHON:-python}

PYTHONPATH="$DIR/..":${PYTHONPATH:-} \
exec "$PYTHON" -m torch.distributed.run \
    --nnodes="$NNODES" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" \
    --nproc_per_node="$GPUS" --master_port="$PORT" \
    "$DIR/train.py" "$CONFIG" --launcher pytorch "${@:3}"
