#!/usr/bin/env bash
# twilight preset (configs/twilight.yaml): launch/serve_twilight.sh MODEL [more launch_server flags]
exec "$(dirname "$0")/serve.sh" twilight "$@"
