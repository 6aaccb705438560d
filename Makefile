# ppft developer entry points. `make demo` and `make test` are the two commands the README gives.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ppft-installed

.PHONY: setup demo test test-all bench bench-goal mutation clean

# A fresh machine: a virtual environment, the CPU build of torch (never a multi-GB CUDA download
# here: on these machines `pip install torch==2.13.0` takes a local CPU wheel), then ppft itself.
setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0" || $(PY) -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
	$(PY) -m pip install -q -e ".[dev,lmeval]"
	touch $(STAMP)

# The main job on the embedded default (the skills lab); builds the lab model on first use.
demo: setup
	$(VENV)/bin/ppft lab build --size tiny
	bash scripts/demo.sh $(VENV)/bin/ppft

# The test suite (slow tests excluded; `make test-all` runs them too).
test: setup
	$(PY) -m pytest -q -m "not slow"

test-all: setup
	$(PY) -m pytest -q

# Benchmarks: results in bench/results/, summarised in docs/results.md.
# The goal bench (issue 12): the pick, kl, replay, full, the leak rows and the adapter forms with leak + kl on all eight new lab tasks, three seeds, 400 steps
# (about two and a half hours with two jobs on a quiet 2-core machine; resumable; results in bench/goal/).
bench-goal: setup
	$(VENV)/bin/ppft lab build --size tiny --no-progress
	$(VENV)/bin/ppft bench recipes/lab_bench_goal.yaml --jobs 2

bench: setup
	$(VENV)/bin/ppft lab build --size tiny --no-progress
	$(VENV)/bin/ppft bench recipes/lab_bench.yaml --jobs 2
	$(PY) bench/bench_train.py
	$(PY) bench/bench_packing.py
	$(PY) bench/bench_methods.py
	$(PY) bench/bench_guards.py
	$(PY) bench/bench_fora_bf16.py
	$(PY) bench/bench_calibration.py --real
	$(PY) bench/bench_memory.py --layers 1 --out bench/results/memory.json
	$(PY) bench/bench_memory.py --layers 2 --methods lora fora_u0_s0 --append --out bench/results/memory.json
	$(PY) bench/bench_memory.py --shapes llama3-8b --layers 2 --stats-budgets none 0.6 0.3 --out bench/results/memory_stats.json
	$(PY) bench/bench_memory.py --shapes qwen3-1.7b --layers 2 --init-budgets none 0.06 --out bench/results/memory_init.json
	$(PY) -c "import lm_eval" 2>/dev/null && $(PY) bench/bench_eval.py || echo "bench_eval skipped: pip install -e '.[lmeval]'"
	$(PY) bench/summarize.py

# Mutation testing of the numerical core (not in CI: a full run takes hours on 2 cores). MUTATION_SAMPLE=0.1
# runs a seeded 10% sample (MUTATION_SEED) and estimates the score with its interval; MUTATION_JOBS sets workers.
# Results: mutants/, summarised in docs/reliability.md.
mutation: setup
	$(PY) -m pip install -q -e ".[dev,lmeval,mutation]"
	-OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) scripts/mutation_sample.py --fraction $${MUTATION_SAMPLE:-1} \
		--seed $${MUTATION_SEED:-0} --jobs $${MUTATION_JOBS:-2}
	$(PY) scripts/mutation_summary.py --sample --survivors 200

clean:
	rm -rf $(VENV) runs .pytest_cache
