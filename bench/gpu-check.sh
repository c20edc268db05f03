#!/usr/bin/env bash
# The GPU checks of round 2 as ONE prepared script for the device tool (an H200 host without fastapi, uvicorn,
# pydantic(-settings), python-multipart, piq, redis: carry cp312 wheels in .whl/, see docs/scaling.md, "GPU checks on
# a host without the service's packages").
# Every step has its own time limit and writes JSON under $OUT/r (about 9 minutes in all).
# bench/serve.py at one worker ran on an H200 on 2026-11-30 (bench/results/serve-cuda*.json); the rest is still to run.
set -u
OUT=${OUT:-/tmp/gpu-check}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HEIST_DATA_DIR=/tmp/hd || exit
mkdir -p $OUT/r
timeout 150 python3 bench/serve.py --device cuda --no-redis --quick --requests 512 --workers 4 --configs auto --levels 32,64 --out $OUT/r/serve-cuda-w4.json > /dev/null 2> $OUT/serve.log; echo serve rc=$?; grep -E "c=|raw" $OUT/serve.log | tail -4
timeout 60 python3 bench/ownership.py --part cost --device cuda --out $OUT/r/ownership-cost-cuda.json > /dev/null 2> $OUT/own.log; echo own rc=$?; tail -2 $OUT/own.log
timeout 50 python3 bench/watermark.py --device cuda --images 8 --out $OUT/r/watermark-cuda.json > /dev/null 2> $OUT/wm.log; echo wm rc=$?; tail -2 $OUT/wm.log
timeout 90 python3 bench/mia.py --device cuda --side 256 --akd-steps 200 --candidates 64 > $OUT/r/mia-cuda.json 2> $OUT/mia.log; echo mia rc=$?; tail -2 $OUT/mia.log
timeout 170 python3 bench/perturbation.py --device cuda --victims sr4x --budgets 16 --steps 300 --defenses none,fmd2,feature_amplify,poison40 --counters aware --out $OUT/r/perturbation-cuda.json > /dev/null 2> $OUT/pert.log; echo pert rc=$?; tail -3 $OUT/pert.log
