# `make test` and `make demo` create the virtual environment on first use.
PY := .venv/bin/python

.venv/.installed: requirements.txt requirements-test.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q -r requirements.txt -r requirements-test.txt
	touch $@

venv: .venv/.installed

test: .venv/.installed
	$(PY) -m pytest -q tests

# ruff.toml: pyflakes, pycodestyle errors, complexity; the whole tree but .venv and runs/.
lint: .venv/.installed
	.venv/bin/ruff check .

# matplotlib draws the demo's pictures and nothing else; the stages never need it.
.venv/.demo-installed: .venv/.installed requirements-demo.txt
	$(PY) -m pip install -q -r requirements-demo.txt
	touch $@

# Refine the committed MAE twice, evaluate all three: runs/demo/summary.json and three pictures.
demo: .venv/.demo-installed
	$(PY) demo.py --out runs/demo

# The same chain from an MAE pre-trained here (pretrain.py's docstring command, ~31 min on one
# thread, into runs/ so that the committed checkpoint stays as it is).
demo-full: .venv/.demo-installed
	OMP_NUM_THREADS=1 $(PY) pretrain.py --out runs/demo-full/pretrain --base-lr 1.5e-3 --epochs 50 \
		--crop-min 0.5 --save-every 100 --export runs/demo-full/mae_tiny_digits.pth
	$(PY) demo.py --ckpt runs/demo-full/mae_tiny_digits.pth --out runs/demo-full

# The stronger 12-block MAE of docs/DEMO.md (light decoder, mask 0.85; ~90 min on one thread) and the
# 3-seed run on it (docs/demo_summary_d12.json): several hours on 2 cores; rerun to resume.
demo-deep: .venv/.demo-installed
	OMP_NUM_THREADS=1 $(PY) pretrain.py --out runs/demo-deep/pretrain --depth 12 --num-heads 4 --dec-dim 32 \
		--dec-depth 1 --dec-heads 1 --mask-ratio 0.85 --base-lr 1.5e-3 --crop-min 0.5 --epochs 100 \
		--save-every 200 --export runs/demo-deep/mae_d12_digits.pth
	$(PY) demo.py --ckpt runs/demo-deep/mae_d12_digits.pth --seeds 3 --own-view mim-refiner,mae-ct --precision fp32 \
		--control --one-seed random+mim-refiner,random+mae-ct --out runs/demo-deep

# The long 12-block MAE of docs/DEMO.md, pre-trained and refined on one CUDA GPU (bf16 autocast; on an
# H200 about 6 min of pre-training, 2 of refinement), evaluated on the host's CPU cores.
demo-long: .venv/.demo-installed
	$(PY) pretrain.py --out runs/demo-long/pretrain --depth 12 --num-heads 4 --dec-dim 32 --dec-depth 1 \
		--dec-heads 1 --mask-ratio 0.85 --base-lr 1.5e-3 --crop-min 0.5 --epochs 225 --workers 3 \
		--save-every 500 --device cuda --export runs/demo-long/mae_d12_long_digits.pth
	$(PY) demo.py --ckpt runs/demo-long/mae_d12_long_digits.pth --seeds 3 --own-view mim-refiner,mae-ct \
		--mim-refiner-args "--device cuda" --mae-ct-args "--device cuda" --precision bf16 --jobs 12 --out runs/demo-long

# The course assignment (docs/TEACHING.md): student, solution and grader copies; the grade of this tree.
assignment:
	$(PY) tools/make_assignment.py --out runs/assignment

grade:
	$(PY) tools/grade.py

.PHONY: venv test lint demo demo-full demo-deep demo-long assignment grade
