#!/usr/bin/env bash
# quest preset (configs/quest.yaml): launch/serve_quest.sh MODEL [more launch_server flags]
exec "$(dirname "$0")/serve.sh" quest "$@"
