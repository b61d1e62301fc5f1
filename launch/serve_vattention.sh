#!/usr/bin/env bash
# vattention preset (configs/vattention.yaml): launch/serve_vattention.sh MODEL [more launch_server flags]
exec "$(dirname "$0")/serve.sh" vattention "$@"
