#!/usr/bin/env bash
"""exec" "${PYTHON:-python3}" -u "$0" "$@"
"""
# Train textdiff. This file is both a shell script and a Python program, so all of these work:
#   deepspeed launch.sh --config ds_configs/base64.json          (the launcher runs `python -u launch.sh`)
#   deepspeed --no_python ./launch.sh --config ...               (the launcher runs the file itself)
#   bash launch.sh --config ...                                  (one process, no launcher)
# Bash reads the second line as `exec python3 -u launch.sh ARGS` (PYTHON overrides the interpreter);
# Python reads it as a string and goes on below. Flags: see `bash launch.sh --help` and docs/training.md.
import sys

from textdiff.launch import main

sys.exit(main())
