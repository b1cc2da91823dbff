# Source on the GPU machine (uploads: .devcarry/gb, .devcarry/py, .devcarry/gguf.sha) after
# stage1.sh ran there: joins the GGUF into $M (checked against its sha256), makes `lsrt.*`
# importable from this checkout and points the benchmarks at the staged traces.
mkdir -p /tmp/pkg/lsrt /tmp/py /tmp/m
for f in runtime kernels sessions clients proto; do ln -sfn "$PWD/$f" /tmp/pkg/lsrt/$f; done
[ -d .devcarry/py ] && cp -r .devcarry/py/. /tmp/py/
export M=/tmp/m/SmolLM2-135M-Instruct.Q4_1.gguf
if [ -f .devcarry/gb ] && [ -f /tmp/m/ga ] && [ ! -f "$M" ]; then
  cat /tmp/m/ga .devcarry/gb > "$M"
fi
if [ -f .devcarry/gguf.sha ] && [ "$(sha256sum "$M" | cut -d' ' -f1)" != "$(cat .devcarry/gguf.sha)" ]; then
  echo "setup.sh: $M does not match .devcarry/gguf.sha (run stage1.sh first)" >&2
  rm -f "$M"
fi
export PYTHONPATH=/tmp/pkg:/tmp/py:$PWD/bench
export LSRT_TRACES=/tmp/traces LSRT_HOME=/tmp/lsrt_home
