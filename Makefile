# Developer workflow. `make compile` builds the extension in place for running from the tree.
PY ?= python3

.PHONY: compile debug annotate test bench bench-e2e lint clean

compile:
	$(PY) setup.py build_ext --inplace

debug:
	FASTLB_DEBUG=1 FASTLB_FORCE=1 $(PY) setup.py build_ext --inplace

annotate:  ## writes fastlb/_core.html: yellow lines are Python overhead
	FASTLB_ANNOTATE=1 FASTLB_FORCE=1 $(PY) setup.py build_ext --inplace
	@echo "open fastlb/_core.html"

test: compile
	$(PY) -m pytest

bench: compile
	$(PY) -m pytest bench/bench_core.py --benchmark-only --benchmark-group-by=param:n

bench-e2e: compile
	$(PY) bench/e2e.py

lint:  ## what CI runs; the settings are pyproject.toml's [tool.ruff] and [tool.mypy]
	$(PY) -m ruff check fastlb tests bench
	$(PY) -m mypy fastlb

clean:
	rm -rf build fastlb/*.c fastlb/*.so fastlb/*.html fastlb/core/*.html *.egg-info
