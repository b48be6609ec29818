# hetmoe-compile: `make demo` and `make test` bring up .venv by themselves on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt
STAMP  := $(VENV)/.installed
OUT    ?= out/demo
DEMO_MODEL ?= examples/olmoe-demo

.PHONY: install demo test lint bench bench-export bench-scale bench-sweep noise-scan sweep devices placement-evidence peers clean
SHARED ?= ../shared

install: $(STAMP)

# Re-run when the dependency pins or the package metadata change.
$(STAMP): constraints.txt requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -r requirements.txt 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
	$(PY) -c "import torch, transformers, onnx, onnxruntime" # fail loudly if the install above did
	$(PIP) --no-deps aihwkit==1.1.0
	$(PIP) --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/hetmoe-compile analyze $(DEMO_MODEL) --out $(OUT) --calib examples/calibration.txt
	$(VENV)/bin/hetmoe-compile place $(DEMO_MODEL) --digital-fraction 0.25 --out $(OUT)/placement.json
	$(VENV)/bin/hetmoe-compile eval $(DEMO_MODEL) --placement $(OUT)/placement.json --noise pcm --noise-scale 2.5 \
	  --seeds 2 --ppl examples/calibration.txt --out $(OUT)/results.json
	$(VENV)/bin/hetmoe-compile export $(DEMO_MODEL) --placement $(OUT)/placement.json --noise pcm --instance-seed 0 \
	  --kv-cache --out $(OUT)/onnx
	$(VENV)/bin/hetmoe-compile run $(OUT)/onnx --prompt "The history of" --max-new-tokens 12
	@echo
	@echo "Demo outputs are in $(OUT)/: scores.json, scores.png, placement.json, results.json, onnx/ (partitions, manifest.json, genai_config.json)"

# One pytest-xdist worker per core (TEST_WORKERS=0 runs in one process); each test file stays on one worker, so its
# module fixtures are built once. Files go out in collection order (tests/conftest.py puts the longest first), not
# xdist's default of most tests first, which left the README test running alone at the end.
TEST_WORKERS ?= auto
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

# Lint and format rules, and the type check of the package (configured in pyproject.toml).
lint: $(STAMP)
	$(VENV)/bin/ruff check hetmoe_compile tests benchmarks examples
	$(VENV)/bin/ruff format --check hetmoe_compile tests benchmarks examples
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) benchmarks/family_parity.py
	$(PY) benchmarks/bench_scoring.py
	$(PY) benchmarks/bench_analog.py
	$(PY) benchmarks/aihwkit_agreement.py
	$(PY) benchmarks/cost_table.py
	$(MAKE) bench-export

# Export parity per family, runtime speed (partitioned vs monolithic vs eager), decode and export at OLMoE-1B-7B
# width (bench_runtime_scale.py peaks at about 13 GB of RAM and 8 GB of temporary disk; the rest need less).
bench-export: $(STAMP)
	$(PY) benchmarks/export_parity.py
	$(PY) benchmarks/bench_runtime.py --repeat 9 --decode-repeat 15
	$(PY) benchmarks/bench_runtime_scale.py
	$(PY) benchmarks/bench_export_scale.py
	$(PY) benchmarks/lowbit_ppl.py

# OLMoE-1B-7B-shaped model, float32 and bfloat16 (about 15 minutes and 12 GB of RAM with 2 layers on 2 CPU cores;
# LAYERS=16 on a GPU).
LAYERS ?= 2
bench-scale: $(STAMP)
	$(PY) benchmarks/bench_scale.py --layers $(LAYERS)

# Every device preset at 1 s, 1 h, 1 day and 1 year (about 20 minutes on 2 CPU cores).
noise-scan: $(STAMP)
	$(PY) benchmarks/noise_scan.py --ppl-tokens 8192 --scales 0,1,2.5,4,8 --presets pcm,reram-wan2022,reram-cmo,hermes-pcm \
	  --times 1,3600,86400,31536000 --plot benchmarks/results/noise_scan.png

# One sweep serial, on 2 local worker processes and on 2 local Ray actors, 3 rounds (about 12 minutes on 2 CPU cores).
bench-sweep: $(STAMP)
	$(PY) benchmarks/bench_sweep_workers.py --repeat 3

# The reference-model sweeps of benchmarks/RESULTS.md (about 25 minutes on 2 CPU cores; SWEEP_FLAGS="--workers 8"
# on an 8-GPU node, "--ray auto" on a Ray cluster). Rerunning resumes where an interrupted run stopped.
SWEEP_FLAGS ?=
sweep: $(STAMP)
	for c in 2.5 8; do $(VENV)/bin/hetmoe-compile sweep $(SHARED)/models/olmoe-ref --fractions 0,0.125,0.25,0.5,1 \
	  --selectors max-neuron-norm,router-norm,activation-frequency,activation-weight,measured,random \
	  --calib $(SHARED)/data/wikitext2-tokenized-valid.txt --calib-tokens 8192 --noise pcm --noise-scale $$c \
	  --seeds 3 --ppl $(SHARED)/data/wikitext2-raw-test.txt --ppl-tokens 16384 \
	  --tasks piqa,arc_easy,lambada_openai --tasks-dir $(SHARED)/data/qa --limit 100 $(SWEEP_FLAGS) \
	  --out benchmarks/results/pcm_x$$c; done
	$(PY) benchmarks/paired_differences.py benchmarks/results/pcm_x2.5/results.json benchmarks/results/pcm_x8/results.json

# 25 % max-neuron-norm against random under each device preset and standard-hwa (input ranges calibrated on the
# WikiText-2 validation text) at 1 s, 1 h, 1 day and 1 year (reram-wan2022: 1 s and 1 day, its only fits), nominal
# programming noise (DEVICE_SCALES="1 8" adds x8; benchmarks/results/devices/; about 30 minutes per scale on 2 CPU
# cores).
DEVICE_SCALES ?= 1
devices: $(STAMP)
	for d in pcm standard-hwa reram-wan2022 reram-cmo hermes-pcm; do for c in $(DEVICE_SCALES); do \
	  t=1,3600,86400,31536000; if [ $$d = reram-wan2022 ]; then t=1,86400; fi; \
	  calib=; if [ $$d = standard-hwa ]; then calib="--calib $(SHARED)/data/wikitext2-tokenized-valid.txt"; fi; \
	  $(VENV)/bin/hetmoe-compile sweep $(SHARED)/models/olmoe-ref --fractions 0.25 --selectors max-neuron-norm,random \
	  --no-ablation --noise $$d --noise-scale $$c --t-inference $$t --seeds 5 $$calib --routing-tokens 0 \
	  --ppl $(SHARED)/data/wikitext2-raw-test.txt --ppl-tokens 8192 --out benchmarks/results/devices/$${d}_x$$c || exit 1; \
	done; done
	$(PY) benchmarks/device_differences.py benchmarks/results/devices/*/results.json

# Issue 18's placement evidence: expected-damage and its two variants beside max-neuron-norm, activation frequency
# and weight, the measured oracle and random, at 12.5 % and 25 % digital, noise x2.5 and x8, 5 hardware instances,
# on both shared models, and the same fractions spent over all layers together (--scope global) at x8
# (benchmarks/results/placement/; about 40 minutes on 2 CPU cores). One thread per sweep: on this 2-core VM, next to
# another job, a sweep took 60-190 s per placement at torch's default two threads and about 22 s at one.
placement-evidence: $(STAMP)
	for m in olmoe-ref olmoe-demo; do for c in 8 2.5; do for scope in per-layer global; do \
	  if [ $$scope = global ] && [ $$c = 2.5 ]; then continue; fi; \
	  sel=; suffix=; if [ $$scope = global ]; then suffix=_global; \
	    sel="--selectors max-neuron-norm,activation-frequency,expected-damage,measured,random"; fi; \
	  OMP_NUM_THREADS=1 $(PY) benchmarks/selector_variants.py -- $(SHARED)/models/$$m --fractions 0.125,0.25 \
	  --no-ablation --scope $$scope $$sel --calib $(SHARED)/data/wikitext2-tokenized-valid.txt --calib-tokens 8192 \
	  --noise pcm --noise-scale $$c --seeds 5 --ppl $(SHARED)/data/wikitext2-raw-test.txt --ppl-tokens 16384 \
	  --out benchmarks/results/placement/$${m}_x$$c$$suffix || exit 1; done; done; done
	$(PY) benchmarks/paired_differences.py benchmarks/results/placement/*/results.json \
	  --against max-neuron-norm,activation-frequency,random
	for m in olmoe-ref olmoe-demo; do $(PY) benchmarks/scope_differences.py \
	  benchmarks/results/placement/$${m}_x8/results.json benchmarks/results/placement/$${m}_x8_global/results.json; done

# The peers (ROMER, HPD, INT8/INT4 digital experts) alone and with 25 % max-neuron-norm, at two noise levels, with
# estimated energy per token and a Pareto plot (benchmarks/results/peers_pcm_x*/; about 30 minutes on 2 CPU cores).
peers: $(STAMP)
	for c in 2.5 8; do $(VENV)/bin/hetmoe-compile sweep $(SHARED)/models/olmoe-ref --fractions 0,0.25,1 \
	  --selectors max-neuron-norm --peers romer,romer-recalibrate,romer-replace,hpd,int8,int4 \
	  --calib $(SHARED)/data/wikitext2-tokenized-valid.txt --calib-tokens 8192 --noise pcm --noise-scale $$c \
	  --seeds 3 --ppl $(SHARED)/data/wikitext2-raw-test.txt --ppl-tokens 16384 \
	  --tasks piqa,arc_easy,lambada_openai --tasks-dir $(SHARED)/data/qa --limit 100 --out benchmarks/results/peers_pcm_x$$c; done
	$(PY) benchmarks/peer_differences.py benchmarks/results/peers_pcm_x2.5/results.json benchmarks/results/peers_pcm_x8/results.json

clean:
	rm -rf $(VENV) out .pytest_cache
