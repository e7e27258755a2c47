#!/bin/sh
# The images' ENTRYPOINT wrapper:
#
#   loraserve-entrypoint loraserve-server --host 0.0.0.0 ... [docker run / compose command flags]
#
# does two things an exec-form ENTRYPOINT cannot, then execs the server (which stays PID 1, so
# SIGTERM reaches it and drains):
#
#   LORASERVE_THREADS=N   adds `--threads N` before the other flags (an explicit --threads in
#                         the command still wins). Unset or empty: the server's default, the
#                         CPUs the container may use (affinity and `docker run --cpus` quota).
#   --model demo          the default; an empty adapters folder is then seeded with the demo
#                         adapters. Any other model starts from the folder as it is: the demo
#                         adapters do not fit a real model, which would refuse every one.
set -eu

server=$1
shift

model=demo
adapters=
previous=
for arg in "$@"; do
    case $previous in
        --model) model=$arg ;;
        --adapters) adapters=$arg ;;
    esac
    case $arg in
        --model=*) model=${arg#--model=} ;;
        --adapters=*) adapters=${arg#--adapters=} ;;
    esac
    previous=$arg
done

if [ "$model" = demo ] && [ -n "$adapters" ] && [ -d "$adapters" ] && [ -w "$adapters" ] \
    && [ -z "$(ls -A "$adapters")" ]; then
    # before the server starts, so no watcher sees a half-copied file
    python -c 'import shutil, sys
from loraserve.adapters.demo_paths import demo_adapters_dir
shutil.copytree(demo_adapters_dir(), sys.argv[1], dirs_exist_ok=True)' "$adapters"
    echo "loraserve-entrypoint: seeded $adapters with the demo adapters" >&2
fi

if [ -n "${LORASERVE_THREADS:-}" ]; then
    exec "$server" --threads "$LORASERVE_THREADS" "$@"
fi
exec "$server" "$@"
