#!/usr/bin/env bash
# The whole GPU check, for the lent device machine (or any CUDA machine), in one script.
#
#   bash scripts/gpu_check.sh [tests] [parity] [engine] [bench] [norm] [rows] [jpeg] [codecs] [latency] [serve]
#                             [serve-compile] [gil] [soak] [starts] [warmstart] [aot] [aotprobe] [trace] [reuse] [sim]
#                             [viewers] [lora] [files]
#                                                                                          (default: parity engine serve)
#
# tests:  every test marked gpu (tests/ -m gpu), then the fused kernels' test files whole (on a GPU machine all their
#         tests run on CUDA, not through Triton's interpreter); logs in $OUT/tests-gpu.log and tests-fused.log. About
#         three minutes. tests-gpu and tests-fused run one half each. The LoRA test needs PEFT: carry its wheel
#         (device-wheels.sh peft); skipped without it
# parity: scripts/gpu_parity.py (the project's parity rule: the engine in fp16 with graphs and diffusers in fp16,
#         both against diffusers in fp32 on fresh components, TAESD and the full VAE, with a stage diagnosis and
#         one-setting variants), then the GPU tests of tests/test_parity.py; JSON in $OUT/parity.json
# engine: the tests marked gpu, `turbostream bench --model random --device cuda --compile` at 512x512 (compiled
#         batch 1, 4 and 8; StreamDiffusion's rows too when its wheel is carried: device-wheels.sh
#         streamdiffusion==0.1.1), and scripts/host_overhead.py (the engine's host work per call, networks stubbed) at
#         batch 1 and 8
# bench:  the engine stage's bench alone (no tests, no host microbenchmark); $OUT/bench.json. In both stages
#         BENCH_ARGS is added to its command line (e.g. BENCH_ARGS=--skip-diffusers: compiled batch 1, 4, 8 and
#         StreamDiffusion's rows, without the diffusers rows and parity) and BENCH_S limits it (default 330 s).
#         About four minutes, compiling; after the aot stage, BENCH_ARGS="--compile-aot --aot-format dynamo
#         --compile-dynamic --compile-cache $AOT_CACHE --compile-buckets 1,2,4,8" (with AOT_CACHE set for both) loads
#         what its starts built instead of compiling
# norm:   --fused-norm's and --fused-epilogue's Triton kernels: tests/test_group_norm.py and tests/test_epilogue.py on
#         CUDA (the kernels compiled for this GPU, against PyTorch at every SD-Turbo norm shape, in the engine's
#         graphs), then scripts/group_norm_speed.py (eager vs fused per norm shape, each in a CUDA graph); JSON in
#         $OUT/group_norm_speed.json. About a minute
# rows:   scripts/engine_rows.py (issue 12): each candidate engine setting (attention backends, no /1.0, fused norms
#         and epilogues, --prompt-kv and --fused-time-proj, fp8, compile modes) as one row, batch 1 and 8 timed,
#         parity against one fp32 reference, and profiles of the compiled batch-1 frame (compile_default and
#         compile_conditioning when the budget reaches them: kernel time and count by kind); ROWS_S seconds in
#         all (default 540; rows that no longer fit are skipped and named), ROWS=name,... picks rows; JSON in
#         $OUT/engine_rows.json, profile files beside it. The fp8 rows need torchao: carry its wheel too
#         (device-wheels.sh torchao==0.18.0, the release built for torch 2.11)
# jpeg:   `serve --jpeg gpu` (nvJPEG through torchvision): tests/test_codec_cuda.py and the engine's own-stream test
#         on CUDA, scripts/jpeg_speed.py (CPU and GPU codec per frame and from 1-8 threads; $OUT/jpeg_speed.json), then
#         the load test at 1, 8 and 16 clients with --jpeg cpu and with --jpeg gpu, SERVE_S seconds each
#         ($OUT/serve_jpeg_cpu.json, serve_jpeg_gpu.json). Needs torchvision: carry its wheel (device-wheels.sh
#         torchvision==0.26.0, the release built for torch 2.11)
# codecs: scripts/jpeg_speed.py alone (the jpeg stage without its tests and load tests): the CPU codec (simplejpeg)
#         beside OpenCV's and the GPU codec, and a 1920x1080 client frame decoded in full and reduced; about a minute
# latency: scripts/latency_breakdown.py: one client's frame through a real server cut into stages (hand-offs, decode,
#         engine host work, device, encode, send), SERVE_S seconds with --jpeg cpu and with --jpeg hybrid;
#         $OUT/latency_cpu.json, latency_hybrid.json (LAT_CODECS="cpu gpu hybrid" picks among the three);
#         LAT_SWITCH_MS=0.5 runs the last codec once more with that Python thread switch interval (is the submit's
#         tail a wait for the GIL?), $OUT/latency_CODEC_switch.json
# warmstart: scripts/warm_start.py --only-compile-cache: `serve --compile` started twice with a fresh compile cache,
#         each start timed to /healthz 200; the second start gets fresh Triton and inductor caches, so all it finds
#         is the compile cache file the first one wrote (it should say `compile cache: hit`); JSON in
#         $OUT/warm_start.json. SERVE_ARGS apply (--compile-dynamic: two compiles instead of four)
# aot:    --compile-aot (AOTInductor packages, engine/aot.py): the engine's own check that packages load here
#         (engine/aot_check.py; everything else is skipped if they do not), its GPU test (packages captured into CUDA
#         graphs, equal to the plain engine, loaded at a second start), then scripts/warm_start.py with it (the first
#         start builds every package, the second loads them: issue 11's "second start of serve --compile at most 30 s";
#         $OUT/warm_start_aot.json), then the load test at 8 and 16 clients on a server that loads the same packages
#         ($OUT/serve_aot.json: "8 clients with --compile at least 30 frames/s each"). SERVE_ARGS apply
#         (--compile-dynamic: two packages a network instead of one per bucket). AOT_CACHE=DIR keeps the packages
#         (and the starts' server logs go to $OUT/aot-starts); AOT_TEST_S and AOT_START_S limit the test and the two
#         starts (default 300 and 540 s). AOT_FORMAT=dynamo runs the same with `--aot-format dynamo` (torch.compile's
#         ahead-of-time artifacts, no AOTInductor library: no loader check; JSON names get a _dynamo suffix)
# aotprobe: scripts/aot_probe.py: which AOTInductor settings load and run here, each variant in a child process (a
#         crash is a result); JSON in $OUT/aot_probe.json. About two minutes on a GPU machine. AOT_VARIANTS=a,b picks
#         variants (default: the six not yet run on a GPU; the first eight all crashed on the H200 on 2026-11-27)
# trace:  scripts/compile_buckets.py --trace-only: the engine's torch.compile through dynamo's eager back end, every
#         bucket (static, then --compile-dynamic), so the seconds are dynamo's tracing alone on this machine's CPU:
#         what a second start of `serve --compile` spends whatever its compile cache holds. About two minutes, no
#         compile; $OUT/compile_trace.json
# starts: scripts/warm_start.py without --compile: serve started twice with today's defaults, then twice with
#         --fused-norm --fused-epilogue --frame-graph, then twice more with --kernel-compile-threads 1 (the kernels'
#         variants compiled one after another in the capture, not on threads ahead of it), each pair with a fresh
#         Triton cache (first start on a new machine, then a start that finds the kernels cached), each start timed to
#         /healthz 200 with its engine warm-up; $OUT/starts_default.json, starts_fused.json, starts_fused_serial.json.
#         What making the fused kernels the default would cost a start. About three minutes
# reuse:  scripts/reuse_speed.py (temporal feature reuse: full and partial frame times in CUDA graphs, fp16, and the
#         output's distance from full recomputation for reuse 2, 3, 4), for partial frames that recompute the whole
#         outer block pair and only the last up layer side by side (REUSE_LAYERS, default all,1); JSON in
#         $OUT/reuse.json
# serve:  scripts/loadtest.py through one real `turbostream serve --model random` on loopback: 1, 4, 8 and 16
#         clients, SERVE_S seconds each (default 15)
# serve-compile: the load test at 8 and 16 clients with `serve --compile` (issue 11: 8 clients >= 30 frames/s each);
#         with the default buckets 1,2,4,8 the start compiles four graphs (on the H200 it was not up after 315 s):
#         SERVE_ARGS=--compile-dynamic compiles two
# gil:    where the server's threads hold the GIL at 16 clients: `serve` runs under `py-spy record --gil` (its own child,
#         so no ptrace rights are needed) while scripts/loadtest.py drives it; $OUT/serve-gil.svg (a flame graph) and
#         the load test's JSON. Needs py-spy: carry its wheel (device-wheels.sh py-spy==0.4.3); skipped without it
# sim:    scripts/serve_sim.py: the server on this machine's CPUs against a simulated GPU (the H200's measured call
#         times), 1, 8 and 16 clients, submit ahead off and on: how busy the batcher keeps a device when the engine's
#         own host work is taken out; compare with `serve` to tell the server's share of a shortfall from the engine's
# soak:   a soak (--soak verdict: memory, descriptors, threads, errors) at 8 and 16 clients, SOAK_S seconds each
#         (default 180)
# viewers: the load test with 8 clients beside 0, 64 and 256 viewers of a broadcast (`serve --source`, a 320x240
#         30 frames/s clip made with OpenCV), SERVE_S seconds each: every viewer's frames/s and the gaps between its
#         frames, and what the viewers cost the clients; $OUT/viewers.json
# lora:   scripts/lora_merge_speed.py --live: a rank-32 LoRA of every attention and feed-forward Linear merged, loaded
#         with --lora-live (the layers kept: MiB) and its scale changed 5 times (the stall of a change); about a
#         minute; $OUT/lora_live.json
# files:  scripts/file_run_speed.py: `turbostream run` of a 640x480 30 fps file (SERVE_S x 40 frames: 600) into
#         .mp4 as H.264 (when the machine has an ffmpeg with libx264), as OpenCV's mp4v, and into .avi, each the run's
#         own frames/s and device share; $OUT/file_run_speed.json. A few minutes
# SERVE_ARGS="--frame-graph ..." adds serve options to the serve, serve-compile, warmstart and soak stages' server
# (and engine options to the latency stage's).
# Results (JSON and logs; the spawned servers' logs too) go to $OUT (default ./gpu-out). PACK=FILE.tgz also packs $OUT
# into one file after every step, so a run cut short still returns what it did: on the device machine, where at most
# 8 files come back, run with PACK=$OUT/gpu.tgz OUT=/tmp/g (PACK outside $OUT; in this order, as the shell expands
# $OUT in PACK before the OUT= after it: the other order packs into /tmp/g, and is refused). There, carry .whl too (the
# README's pip download line): the wheels it lacks (diffusers, websockets, simplejpeg) are installed from there.
# CHECK_CPU=1 runs the same steps on the CPU with tiny-random at 64 px, to test this script without a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
if [ -n "${PACK:-}" ]; then
  mkdir -p "$(dirname "$PACK")"
  case "$(cd "$(dirname "$PACK")" && pwd -P)/" in
    "$(cd "$OUT" && pwd -P)"/*)
      echo "gpu_check.sh: PACK=$PACK lies inside OUT=$OUT: the pack would pack itself and never reach the device" \
           "tool's \$OUT; give PACK before OUT (PACK=\$OUT/gpu.tgz OUT=/tmp/g)" >&2
      exit 2 ;;
  esac
fi
stages=("$@"); [ ${#stages[@]} -gt 0 ] || stages=(parity engine serve)
status=0

if [ -d .whl ] && { ! python3 -c "import diffusers, websockets, simplejpeg" 2>/dev/null \
    || { ls .whl/torchao-*.whl >/dev/null 2>&1 && ! python3 -c "import torchao" 2>/dev/null; } \
    || { ls .whl/torchvision-*.whl >/dev/null 2>&1 && ! python3 -c "import torchvision" 2>/dev/null; } \
    || { ls .whl/streamdiffusion-*.whl >/dev/null 2>&1 && ! python3 -c "import streamdiffusion" 2>/dev/null; } \
    || { ls .whl/peft-*.whl >/dev/null 2>&1 && ! python3 -c "import peft" 2>/dev/null; }; }; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
read -r -a SERVE_EXTRA <<< "${SERVE_ARGS:-}"
read -r -a BENCH_EXTRA <<< "${BENCH_ARGS:-}"

if [ "${CHECK_CPU:-0}" = 1 ]; then
  MODEL=(--model tiny-random --device cpu --size 64); COMPILE=(); DUR=3; SOAK_S=${SOAK_S:-4}; PARITY_S=300
  export TRITON_INTERPRET=1  # the norm stage's Triton kernels, through Triton's CPU interpreter
  ROWS_S=${ROWS_S:-240}; ROWS_ARGS=(--iters 3 --burn-in 1)
else
  MODEL=(--model random --device cuda --size 512); COMPILE=(--compile); DUR=${SERVE_S:-15}; SOAK_S=${SOAK_S:-180}
  PARITY_S=${PARITY_S:-480}; ROWS_S=${ROWS_S:-540}; ROWS_ARGS=()
  nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
fi
"$PY" - > "$OUT/env.txt" 2>&1 <<'PY'
import torch, platform
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
# How far this torch's CPU float16 normal draw is from the float32 one of the same seed: ~1e-3 is a rounding; units
# mean another sample (why diffusers' own fp16 img2img noise differs from fp32: README, parity on the GPU).
a, b = (torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(7), dtype=dt).float()
        for dt in (torch.float32, torch.float16))
print("cpu randn float16 vs float32, max abs", float((a - b).abs().max()))
try:  # --fused-norm and --fused-epilogue run Triton kernels (CUDA torch wheels bring Triton along)
    import triton
    print("triton", triton.__version__)
except ImportError as exc:
    print("triton missing:", exc)
PY
cat "$OUT/env.txt"

step() {  # step NAME TIMEOUT_S CMD...: run with a time limit, log to $OUT/NAME.log, remember failures
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date +%T), limit ${limit}s)"
  timeout --signal=INT --kill-after=15 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  echo "=== $name exit $rc"
  [ $rc = 0 ] || status=1
  pack
}

bench_step() {  # the bench of the engine and bench stages: BENCH_ARGS added, BENCH_S seconds at most
  step bench "${BENCH_S:-330}" "$PY" -m turbostream bench "${MODEL[@]}" "${COMPILE[@]}" "${BENCH_EXTRA[@]}" \
    --json "$OUT/bench.json"
}

pack() {  # PACK=file.tgz: everything in $OUT so far, in one file (the device tool returns at most 8 files)
  if [ -n "${PACK:-}" ]; then tar czf "$PACK.part" -C "$OUT" . 2>/dev/null && mv "$PACK.part" "$PACK"; fi
}

if [ -n "${PACK:-}" ]; then
  # Also every PACK_EVERY_S seconds while a step runs: the device tool ends a command at its time limit without
  # warning, and what a step had written by then (a load test's finished client counts: loadtest.py's *.partial
  # JSON) still comes back in the last pack.
  ( while sleep "${PACK_EVERY_S:-30}"; do pack; done ) &
  packer=$!
  trap 'kill $packer 2>/dev/null' EXIT
fi

for stage in "${stages[@]}"; do
  case $stage in
    tests|tests-gpu|tests-fused)
      [ "${CHECK_CPU:-0}" = 1 ] && echo "=== tests: the gpu-marked tests skip without CUDA (a CPU dry run checks the call)"
      [ "$stage" = tests-fused ] || step tests-gpu 360 "$PY" -m pytest -q -m gpu -p no:cacheprovider \
        --continue-on-collection-errors tests/
      [ "$stage" = tests-gpu ] || step tests-fused 240 "$PY" -m pytest -q -p no:cacheprovider \
        tests/test_group_norm.py tests/test_epilogue.py tests/test_fused_options.py tests/test_kernel_warmup.py ;;
    parity)
      step parity "$PARITY_S" "$PY" scripts/gpu_parity.py "${MODEL[@]}" --budget-s $((PARITY_S - 60)) \
        --out "$OUT/parity.json"
      [ "${CHECK_CPU:-0}" = 1 ] || step parity-tests 120 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_parity.py ;;
    engine)
      # The --compile-aot tests build packages for minutes: the aot stage runs them with a budget of their own.
      step gpu-tests 90 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_engine_gpu.py -k "not compile_aot"
      bench_step
      step host-overhead 120 "$PY" scripts/host_overhead.py "${MODEL[@]:2}" --batches 1,8 \
        --json "$OUT/host_overhead.json" ;;
    bench)
      bench_step ;;
    norm)
      if [ "${CHECK_CPU:-0}" = 1 ]; then NORM_ARGS=(--device cpu --quick); NORM_S=600; else NORM_ARGS=(); NORM_S=180; fi
      step norm-tests "$NORM_S" "$PY" -m pytest -q -p no:cacheprovider tests/test_group_norm.py tests/test_epilogue.py
      step norm-speed 180 "$PY" scripts/group_norm_speed.py "${NORM_ARGS[@]}" --json "$OUT/group_norm_speed.json" ;;
    rows)
      [ -z "${ROWS:-}" ] || ROWS_ARGS+=(--rows "$ROWS")
      step rows "$ROWS_S" "$PY" scripts/engine_rows.py "${MODEL[@]}" "${ROWS_ARGS[@]}" --profile \
        --budget-s $((ROWS_S - 45)) --json "$OUT/engine_rows.json" ;;
    jpeg)
      JPEG_CODECS=(cpu gpu)
      if [ "${CHECK_CPU:-0}" = 1 ]; then JPEG_ARGS=(--size 64 --iters 20 --rate-s 0.3); JPEG_CODECS=(cpu)
      else JPEG_ARGS=(--size 512); fi
      [ "${CHECK_CPU:-0}" = 1 ] || step jpeg-tests 240 "$PY" -m pytest -q -m gpu -p no:cacheprovider \
        tests/test_codec_cuda.py tests/test_engine_gpu.py::test_engine_calls_run_on_the_engines_own_stream
      step jpeg-speed 180 "$PY" scripts/jpeg_speed.py "${JPEG_ARGS[@]}" --json "$OUT/jpeg_speed.json"
      for codec in "${JPEG_CODECS[@]}"; do
        step "serve-jpeg-$codec" $((DUR * 3 + 120)) "$PY" scripts/loadtest.py --clients 1,8,16 --duration "$DUR" \
          --json "$OUT/serve_jpeg_$codec.json" --server-log "$OUT/serve-jpeg-$codec-server.log" --spawn-server -- \
          "${MODEL[@]}" --max-clients 16 --jpeg "$codec" "${SERVE_EXTRA[@]}"
      done ;;
    codecs)  # the jpeg stage's codec timings alone (no load tests): about a minute
      if [ "${CHECK_CPU:-0}" = 1 ]; then JPEG_ARGS=(--size 64 --iters 20 --rate-s 0.3); else JPEG_ARGS=(--size 512); fi
      step jpeg-speed 180 "$PY" scripts/jpeg_speed.py "${JPEG_ARGS[@]}" --json "$OUT/jpeg_speed.json" ;;
    latency)
      read -r -a LAT_CODECS <<< "${LAT_CODECS:-cpu hybrid}"; [ "${CHECK_CPU:-0}" = 1 ] && LAT_CODECS=(cpu)
      for codec in "${LAT_CODECS[@]}"; do
        step "latency-$codec" $((DUR + 300)) "$PY" scripts/latency_breakdown.py "${MODEL[@]}" --jpeg "$codec" \
          --duration "$DUR" --json "$OUT/latency_$codec.json" "${SERVE_EXTRA[@]}"
      done
      if [ -n "${LAT_SWITCH_MS:-}" ]; then  # the last codec again with that thread switch interval (the GIL's wait)
        step "latency-$codec-switch" $((DUR + 300)) "$PY" scripts/latency_breakdown.py "${MODEL[@]}" --jpeg "$codec" \
          --duration "$DUR" --switch-interval-ms "$LAT_SWITCH_MS" --json "$OUT/latency_${codec}_switch.json" \
          "${SERVE_EXTRA[@]}"
      fi ;;
    serve)
      step serve $((DUR * 4 + 50)) "$PY" scripts/loadtest.py --clients 1,4,8,16 --duration "$DUR" \
        --json "$OUT/serve.json" --server-log "$OUT/serve-server.log" --spawn-server -- "${MODEL[@]}" --max-clients 16 \
        "${SERVE_EXTRA[@]}" ;;
    serve-compile)
      step serve-compile $((DUR * 2 + 420)) "$PY" scripts/loadtest.py --clients 8,16 --duration "$DUR" \
        --json "$OUT/serve_compile.json" --server-log "$OUT/serve-compile-server.log" --spawn-server -- "${MODEL[@]}" \
        "${COMPILE[@]}" --max-clients 16 "${SERVE_EXTRA[@]}" ;;
    gil)
      SPY=$(command -v py-spy || ls /tmp/site/bin/py-spy 2>/dev/null || true)
      if [ -z "$SPY" ]; then
        echo "=== gil: skipped (no py-spy: carry its wheel, device-wheels.sh py-spy==0.4.3)"
      else
        port=$("$PY" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
        "$SPY" record --gil --threads --nonblocking --rate 200 --format flamegraph -o "$OUT/serve-gil.svg" -- \
          "$PY" -m turbostream serve "${MODEL[@]}" --max-clients 16 --port "$port" > "$OUT/gil-server.log" 2>&1 &
        spy=$!
        "$PY" - "$port" <<'PY' || echo "=== gil: the server was not ready in 600 s (see $OUT/gil-server.log)"
import sys, time, urllib.request
deadline = time.monotonic() + 600
while time.monotonic() < deadline:
    try:
        if urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/healthz", timeout=5).status == 200:
            sys.exit(0)
    except OSError:
        pass
    time.sleep(1)
sys.exit(1)
PY
        step gil $((DUR + 120)) "$PY" scripts/loadtest.py --clients 16 --duration "$DUR" --warmup 5 \
          --json "$OUT/gil.json" --url "ws://127.0.0.1:$port/ws"
        pkill -INT -f "turbostream serve .*--port $port" || true
        wait "$spy"; echo "=== gil: py-spy exit $? ($OUT/serve-gil.svg)"
      fi ;;
    soak)
      step soak $((SOAK_S * 2 + 240)) "$PY" scripts/loadtest.py --soak --clients 8,16 --duration "$SOAK_S" \
        --warmup 15 --sample-every 10 --json "$OUT/soak.json" --server-log "$OUT/soak-server.log" --spawn-server -- \
        "${MODEL[@]}" --max-clients 16 "${SERVE_EXTRA[@]}" ;;
    starts)  # what the fused kernels cost a start: serve started twice each way, each pair with a fresh Triton cache
      step starts-default 400 "$PY" scripts/warm_start.py --json "$OUT/starts_default.json" -- "${MODEL[@]}"
      step starts-fused 400 "$PY" scripts/warm_start.py --json "$OUT/starts_fused.json" -- "${MODEL[@]}" \
        --fused-norm --fused-epilogue --frame-graph
      step starts-fused-serial 400 "$PY" scripts/warm_start.py --json "$OUT/starts_fused_serial.json" -- \
        "${MODEL[@]}" --fused-norm --fused-epilogue --frame-graph --kernel-compile-threads 1 ;;
    warmstart)
      step warmstart 900 "$PY" scripts/warm_start.py --only-compile-cache --json "$OUT/warm_start.json" -- \
        "${MODEL[@]}" "${COMPILE[@]}" "${SERVE_EXTRA[@]}" ;;
    aot)
      # One cache folder for the three steps, so the load test's server finds what the warm starts built.
      AOT_CACHE=${AOT_CACHE:-$(mktemp -d /tmp/turbostream-aot-XXXXXX)}
      FMT=${AOT_FORMAT:-aotinductor}; SFX=
      if [ "$FMT" = dynamo ]; then SFX=_dynamo; fi  # its files beside the packages' in one $OUT
      if [ "${CHECK_CPU:-0}" = 1 ]; then AOT_TESTS=(tests/test_aot.py -k "engine or $FMT"); else
        AOT_TESTS=(-m gpu tests/test_engine_gpu.py -k "compile_aot and ($FMT or cannot_run)"); fi
      before=$status; status=0
      if [ "${CHECK_CPU:-0}" = 1 ]; then CHECK_ARGS=(--device cpu --dtype float32); else CHECK_ARGS=(--device cuda); fi
      if [ "$FMT" = aotinductor ]; then  # the dynamo format loads no AOTInductor library: nothing to check first
        step aot-check 300 "$PY" -m turbostream.engine.aot_check "${CHECK_ARGS[@]}"
        if [ $status != 0 ]; then  # the engine would run without packages: nothing below would measure them
          echo "=== aot: packages do not load and run here (aot-check.log; scripts/aot_probe.py tells more;" \
            "AOT_FORMAT=dynamo measures the other format)"; continue
        fi
      fi
      step aot-tests$SFX "${AOT_TEST_S:-300}" "$PY" -m pytest -q "${AOT_TESTS[@]}"
      if [ $status != 0 ]; then  # packages that cannot be captured fail every start below: keep the device time
        echo "=== aot: its test failed; the starts and the load test are skipped"; continue
      fi
      status=$before
      step aot-warmstart$SFX "${AOT_START_S:-540}" "$PY" scripts/warm_start.py --cache "$AOT_CACHE" \
        --only-compile-cache --logs "$OUT/aot-starts$SFX" --json "$OUT/warm_start_aot$SFX.json" -- "${MODEL[@]}" \
        --compile-aot --aot-format "$FMT" "${SERVE_EXTRA[@]}"
      step aot-serve$SFX $((DUR * 2 + 120)) "$PY" scripts/loadtest.py --clients 8,16 --duration "$DUR" \
        --json "$OUT/serve_aot$SFX.json" --server-log "$OUT/serve-aot$SFX-server.log" --spawn-server -- \
        "${MODEL[@]}" --compile-aot --aot-format "$FMT" --compile-cache "$AOT_CACHE" --max-clients 16 \
        "${SERVE_EXTRA[@]}" ;;
    aotprobe)
      # The first eight variants all crashed on the H200 (2026-11-27): by default only the ones that can tell more.
      NEW=toy-compiler-logged,toy-linked-bsymbolic,toy-inlines-hidden,toy-no-precompiled-headers
      NEW=$NEW,toy-gxx-libstdcxx-preloaded,engine-check
      step aot-probe 400 "$PY" scripts/aot_probe.py --device "${MODEL[3]}" --parallel 8 --timeout 230 \
        --variants "${AOT_VARIANTS:-$NEW}" --json "$OUT/aot_probe.json" ;;
    trace)
      step trace 400 "$PY" scripts/compile_buckets.py "${MODEL[@]}" --trace-only --json "$OUT/compile_trace.json" ;;
    reuse)
      step reuse 300 "$PY" scripts/reuse_speed.py "${MODEL[@]}" --layers "${REUSE_LAYERS:-all,1}" \
        --json "$OUT/reuse.json" ;;
    sim)
      step sim $((DUR * 6 + 150)) "$PY" scripts/serve_sim.py --size "${MODEL[5]}" --clients 1,8,16 --duration "$DUR" \
        --json "$OUT/serve_sim.json" ;;
    viewers)  # a test clip longer than the run (a file source ends, and its viewers with it), made with OpenCV
      clip=${TMPDIR:-/tmp}/turbostream-viewers-clip.mp4
      "$PY" - "$clip" $((DUR * 3 + 240)) <<'PY'
import sys
import cv2
import numpy as np
path, seconds = sys.argv[1], int(sys.argv[2])
out = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), 30, (320, 240))
y, x = np.mgrid[0:240, 0:320]
for i in range(seconds * 30):
    out.write(np.stack([(x + 4 * i) % 256, (y + 3 * i) % 256, np.full_like(x, i % 256)], -1).astype(np.uint8))
out.release()
PY
      step viewers $((DUR * 3 + 120)) "$PY" scripts/loadtest.py --clients 8 --viewers 0,64,256 --duration "$DUR" \
        --json "$OUT/viewers.json" --server-log "$OUT/viewers-server.log" --spawn-server -- "${MODEL[@]}" \
        --max-clients 8 --source "$clip" "${SERVE_EXTRA[@]}" ;;
    lora)  # --lora and --lora-live on the GPU: merge, live load (memory kept) and a change of scale, timed
      step lora 240 "$PY" scripts/lora_merge_speed.py "${MODEL[@]:0:4}" --rank 32 --live --repeats 5 \
        --json "$OUT/lora_live.json" ;;
    files)  # run's file-to-file throughput per video writer (H.264 through ffmpeg where there is one, mp4v, MJPG)
      step files 600 "$PY" scripts/file_run_speed.py "${MODEL[@]}" --frames $((DUR * 40)) \
        --json "$OUT/file_run_speed.json" ;;
    *) echo "unknown stage $stage (tests, tests-gpu, tests-fused, parity, engine, norm, rows, jpeg, codecs, latency," \
         "serve, serve-compile, gil, soak, starts, warmstart, aot, aotprobe, trace, reuse, sim, viewers, lora, files)"
       status=2 ;;
  esac
done
pack
exit $status
