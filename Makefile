# One target per stage. Every stage target takes CONFIG= (a YAML under configs/ or any path),
# ROOT= (the dataset root; default: the config's `root`) and SET="section.key=value ..." overrides;
# some take their verb's own options, and only their own (the CLI refuses another verb's):
# `make label ONLY=depth,det` reruns chosen labelers without touching the others;
# `make download RETRY_FAILED=1` re-fetches only the failed urls of finished shards;
# `make preview SAMPLES=4` (and preview-tokens) sets the rows of the grid;
# `make models OMNIDATA=omnidata_dpt_normal_v2.ckpt [OMNIDATA_DEPTH=omnidata_dpt_depth_v2.ckpt]` converts Omnidata's
# normal (depth) model into label.normal.model (label.depth.model);
# `make finetune [FROM_RUN=tiny]` trains the config's fine-tune recipe (finetune.train: a new run, e.g. a task
# rgb_pixels -> canny_edge) starting from run `tiny`'s weights; `make eval SET=train.run=<it>` scores it;
# `make import-4m SOURCE=<folder or hub id> SET=train.run=4m-b [LEAVE_OUT=t5_caption,...] [REPLACE=1]` converts a
# released apple/ml-4m model into a run (LEAVE_OUT: its modalities this project lacks, left out; REPLACE=1: replace
# the run if it exists, which is otherwise refused);
# `make probe` trains a dense head on train.run's encoder (an RGB backbone) and scores it on the held-out shards;
# `make verify` checks every file of the root against the size and sha256 its marker recorded (exit 1 naming each
# file that does not hold: missing, truncated, altered, made from a remade input, or listed by no marker);
# `make sample FROM=rgb TO=depth,normal [IMAGE=photo.jpg | CAPTION="a dog"] [KEEP=depth:0.5]` generates with the
# trained run (KEEP: in-paint, half of depth's stored tokens given)
# (`make demo` takes FROM= and TO= too: it runs sample).
# `make demo` and `make test` install everything they need into .venv first, so they are the only two
# commands a fresh machine needs.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= configs/default.yaml
ROOT   ?=
STAMP  := $(VENV)/.installed
CLI    := $(BIN)/python -m four_m
SET    ?=
ONLY   ?=
SIZES  ?=
RETRY_FAILED ?=
FROM   ?=
TO     ?=
IMAGE  ?=
CAPTION ?=
KEEP   ?=
OMNIDATA ?=
OMNIDATA_DEPTH ?=
SAMPLES ?=
FROM_RUN ?=
SOURCE ?=
LEAVE_OUT ?=
REPLACE ?=
# Every verb's options, then each verb's own: target `x` passes $(x_ARGS) after $(ARGS).
ARGS     = --config $(CONFIG) $(if $(ROOT),--root $(ROOT)) $(foreach s,$(SET),--set $(s))
comma := ,
# KEEP=depth:0.5,normal:0.25 -> --set generate.keep.depth=0.5 --set generate.keep.normal=0.25 (in-painting)
GENERATE = $(if $(FROM),--set 'generate.given=[$(FROM)]') $(if $(TO),--set 'generate.targets=[$(TO)]') \
           $(foreach k,$(subst $(comma), ,$(KEEP)),--set 'generate.keep.$(subst :,=,$(k))')
download_ARGS       = $(if $(RETRY_FAILED),--retry-failed)
label_ARGS          = $(if $(ONLY),--only $(ONLY))
models_ARGS         = $(if $(OMNIDATA),--omnidata '$(OMNIDATA)') $(if $(OMNIDATA_DEPTH),--omnidata-depth '$(OMNIDATA_DEPTH)')
preview_ARGS        = $(if $(SAMPLES),--samples $(SAMPLES))
preview-tokens_ARGS = $(preview_ARGS)
sample_ARGS         = $(GENERATE) $(if $(IMAGE),--image '$(IMAGE)') $(if $(CAPTION),--caption '$(CAPTION)')
demo_ARGS           = $(GENERATE)
finetune_ARGS       = $(if $(FROM_RUN),--set finetune.from_run=$(FROM_RUN))
import-4m_ARGS      = $(if $(SOURCE),--source '$(SOURCE)') $(if $(LEAVE_OUT),--leave-out '$(LEAVE_OUT)') \
                      $(if $(REPLACE),--replace)

# torch/torchvision: the pair this machine has on disk (CPU wheels); other pairs download gigabytes.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
OPENCV_HEADLESS := $(shell grep -E '^opencv-python-headless==' constraints.txt)

.PHONY: install demo dryrun test test-all crash-test cluster-test download sample-urls curate curate-report label tokenizers tokenize train finetune import-4m probe sample eval \
        card verify preview preview-tokens models bad-input bench bench-scale lint clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PINS)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	# Both opencv wheels write cv2/: unpack the headless one last so cv2 needs no libGL.
	$(BIN)/python -m pip install -q --no-deps --force-reinstall '$(OPENCV_HEADLESS)'
	$(BIN)/python -m pip check
	touch $@

demo: $(STAMP)
	$(CLI) demo $(ARGS) $(demo_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Longer suites (crash runs, production-size checks) that stay out of `make test`.
test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow or not slow"

# Every stage SIGKILLed at random moments (CRASH_SEED=n for other moments), rerun, compared with an
# uninterrupted run; and the download and label stages as `ray job submit` jobs on a local two-node cluster.
crash-test: $(STAMP)
	$(BIN)/python -m pytest -q -m slow tests/pipeline/test_crash.py

cluster-test: $(STAMP)
	$(BIN)/python -m pytest -q -m slow tests/pipeline/test_cluster.py

sample-urls download curate curate-report label tokenizers tokenize train finetune import-4m probe sample eval card verify preview preview-tokens models bad-input: $(STAMP)
	$(CLI) $@ $(ARGS) $($@_ARGS)

# The production config's architectures at full size with random weights, on this CPU (docs/cc12m.md).
dryrun: $(STAMP)
	$(CLI) dryrun --config $(if $(filter command line,$(origin CONFIG)),$(CONFIG),configs/cc12m.yaml) $(if $(ROOT),--root $(ROOT)) $(foreach s,$(SET),--set $(s))

bench: $(STAMP)
	$(BIN)/python bench/download.py
	$(BIN)/python bench/label.py
	$(BIN)/python bench/label_view.py
	$(BIN)/python bench/tokens.py
	$(BIN)/python bench/train.py

# Not in `bench` nor `test`: hours at the default sizes. SIZES=1000,10000 (100000 is an option).
bench-scale: $(STAMP)
	$(BIN)/python bench/scale.py $(if $(SIZES),--sizes $(SIZES))

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf data .pytest_cache .ruff_cache build *.egg-info
