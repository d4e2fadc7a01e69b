# The two front-door commands: `make test` and `make demo`. Both set up .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: venv refvenv test test-slow test-all lint format demo demo-bilingual bench clean-venv

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install $(TORCH_PINS) "setuptools>=64" wheel
	# cn_clip with every extra (setup.py lists them). No build isolation: deepspeed's setup imports torch, so it
	# builds against the torch above instead of fetching a fresh CUDA wheel.
	$(PY) -m pip install --no-build-isolation -e ".[all]" -r requirements-dev.txt
	touch $(STAMP)

lint: venv
	$(PY) -m ruff check cn_clip tests benchmarks
	$(PY) -m ruff format --check cn_clip tests benchmarks

format: venv
	$(PY) -m ruff check --fix cn_clip tests benchmarks
	$(PY) -m ruff format cn_clip tests benchmarks

test: lint
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  echo "browser test skipped: no chromium/chromedriver (sudo apt-get install chromium chromium-driver to enable)"
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Everything the default suite leaves out (slow, reliability); CI runs it after `make test`.
# Tests that run the reference itself read CN_CLIP_REF_PYTHON; `make refvenv` provides one in .refvenv.
REF_VENV := .refvenv
REF_PY := $(REF_VENV)/bin/python
export CN_CLIP_REF_PYTHON ?= $(if $(wildcard $(REF_PY)),$(CURDIR)/$(REF_PY))

test-slow: venv
	$(PY) -m pytest -q -m "slow" $(PYTEST_ARGS)

# The reference (cn-clip 1.6.0) in its own venv: its module is also named cn_clip, so it never shares .venv.
refvenv: $(REF_VENV)/.installed

# torch and torchvision (a CUDA build, about 5.5 GB with its NVIDIA libraries) are not installed a second time: the
# reference sees .venv's copy through a symlink overlay (tests/fixtures/torch_overlay.py), and pip fetches the rest.
$(REF_VENV)/.installed: | $(STAMP)
	test -x $(REF_PY) || $(PYTHON) -m venv $(REF_VENV)
	$(PY) tests/fixtures/torch_overlay.py $(REF_VENV)
	$(REF_PY) -m pip install --no-cache-dir cn-clip==1.6.0 jieba
	$(REF_PY) -c 'import cn_clip, importlib.metadata as m; assert m.version("cn_clip") == "1.6.0", cn_clip.__file__'
	touch $@

test-all: test test-slow

# ---- make demo: the whole pipeline on the embedded demo data, CPU, tiny from-scratch model. ----
# Each step is a file target, so a re-run reuses what exists (delete $(DEMO) to start over).
DEMO ?= demo_out
DEMO_DATA := $(DEMO)/datasets/demo
DEMO_CLS := $(DEMO)/datasets/demo_cls
DEMO_NAME := demo_vit-tiny_bert-tiny
DEMO_CKPT := $(DEMO)/experiments/$(DEMO_NAME)/checkpoints/epoch_latest.pt
DEMO_MODEL := --vision-model ViT-Tiny --text-model BERT-Tiny-chinese

demo: venv $(DEMO)/eval/summary.json $(DEMO)/zeroshot/result.txt $(DEMO)/index/meta.json
	$(PY) -m cn_clip.demo $(DEMO)

$(DEMO_DATA)/train_texts.jsonl: | venv
	$(PY) -m cn_clip.preprocess.make_demo_dataset --out $(DEMO)

$(DEMO_DATA)/lmdb/train/pairs/data.mdb: $(DEMO_DATA)/train_texts.jsonl
	$(PY) -m cn_clip.preprocess.build_lmdb_dataset --data_dir $(DEMO_DATA) --splits train,valid,test --overwrite

# The MUGE recipe script, retargeted by environment variables: one CPU process, no released weights.
# $(call demo_train,OUT,DATA): the demo's training run (both demos).
define demo_train
PATH="$(CURDIR)/$(VENV)/bin:$$PATH" NAME=$(DEMO_NAME) GPUS_PER_NODE=1 RESUME= \
VISION_MODEL=ViT-Tiny TEXT_MODEL=BERT-Tiny-chinese BATCH_SIZE=32 VALID_BATCH_SIZE=44 MAX_EPOCHS=10 LR=1e-3 WARMUP=10 WD=0.001 \
LOG_INTERVAL=2 VALID_STEP_INTERVAL=0 USE_AUGMENT=0 \
bash run_scripts/muge_finetune.sh $(1) --train-data $(2)/lmdb/train --val-data $(2)/lmdb/valid \
  --precision fp32 --num-workers 1 --valid-num-workers 1
endef

$(DEMO_CKPT): $(DEMO_DATA)/lmdb/train/pairs/data.mdb
	$(call demo_train,$(DEMO),$(DEMO_DATA))

$(DEMO)/eval/summary.json: $(DEMO_CKPT)
	$(PY) -m cn_clip.eval.run --data $(DEMO_DATA) --split valid --resume $(DEMO_CKPT) $(DEMO_MODEL) \
	  --output-dir $(DEMO)/eval --num-workers 1

$(DEMO)/zeroshot/result.txt: $(DEMO_CKPT)
	mkdir -p $(DEMO)/zeroshot
	$(PY) -m cn_clip.eval.zeroshot_evaluation --datapath $(DEMO_CLS)/test --label-file $(DEMO_CLS)/label_cn.txt \
	  --dataset demo_cls --save-dir $(DEMO)/zeroshot --resume $(DEMO_CKPT) $(DEMO_MODEL) --num-workers 1 \
	  > $(DEMO)/zeroshot/result.txt.tmp
	cat $(DEMO)/zeroshot/result.txt.tmp
	mv $(DEMO)/zeroshot/result.txt.tmp $(DEMO)/zeroshot/result.txt

# The search index that the summary's last line serves (python -m cn_clip.search serve --index $(DEMO)/index).
$(DEMO)/index/meta.json: $(DEMO_CKPT)
	$(PY) -m cn_clip.search index --image-data $(DEMO_DATA)/lmdb/valid/imgs --resume $(DEMO_CKPT) --out $(DEMO)/index \
	  --num-workers 1 --overwrite

# ---- make demo-bilingual: the same pipeline on Chinese + English captions (data_docs/demo.md). ----
# One tiny model trained on both languages; zh→image and en→image recall, zero-shot with Chinese and English prompts.
DEMO_BI ?= demo_bilingual_out
DEMO_BI_DATA := $(DEMO_BI)/datasets/demo_bilingual
DEMO_BI_CLS := $(DEMO_BI)/datasets/demo_cls
DEMO_BI_CKPT := $(DEMO_BI)/experiments/$(DEMO_NAME)/checkpoints/epoch_latest.pt

demo-bilingual: venv $(DEMO_BI)/eval/zh/summary.json $(DEMO_BI)/eval/en/summary.json \
  $(DEMO_BI)/zeroshot/zh/result.txt $(DEMO_BI)/zeroshot/en/result.txt
	$(PY) -m cn_clip.demo --bilingual $(DEMO_BI)

$(DEMO_BI_DATA)/train_texts.jsonl: | venv
	$(PY) -m cn_clip.preprocess.make_demo_dataset --out $(DEMO_BI) --bilingual

$(DEMO_BI_DATA)/lmdb/train/pairs/data.mdb: $(DEMO_BI_DATA)/train_texts.jsonl
	$(PY) -m cn_clip.preprocess.build_lmdb_dataset --data_dir $(DEMO_BI_DATA) --splits train,valid,test,valid_en,test_en \
	  --overwrite

$(DEMO_BI_CKPT): $(DEMO_BI_DATA)/lmdb/train/pairs/data.mdb
	$(call demo_train,$(DEMO_BI),$(DEMO_BI_DATA))

# zh: the valid split (Chinese captions); en: valid_en (the same images, English captions)
$(DEMO_BI)/eval/%/summary.json: $(DEMO_BI_CKPT)
	$(PY) -m cn_clip.eval.run --data $(DEMO_BI_DATA) --split $(if $(filter en,$*),valid_en,valid) --resume $(DEMO_BI_CKPT) \
	  $(DEMO_MODEL) --output-dir $(DEMO_BI)/eval/$* --num-workers 1

$(DEMO_BI)/zeroshot/%/result.txt: $(DEMO_BI_CKPT)
	mkdir -p $(DEMO_BI)/zeroshot/$*
	$(PY) -m cn_clip.eval.zeroshot_evaluation --datapath $(DEMO_BI_CLS)/test --dataset demo_cls --save-dir $(DEMO_BI)/zeroshot/$* \
	  $(if $(filter en,$*),--label-file $(DEMO_BI_CLS)/label.txt --templates $(DEMO_BI_CLS)/templates_en.txt,--label-file $(DEMO_BI_CLS)/label_cn.txt) \
	  --resume $(DEMO_BI_CKPT) $(DEMO_MODEL) --num-workers 1 > $(DEMO_BI)/zeroshot/$*/result.txt.tmp
	cat $(DEMO_BI)/zeroshot/$*/result.txt.tmp
	mv $(DEMO_BI)/zeroshot/$*/result.txt.tmp $(DEMO_BI)/zeroshot/$*/result.txt

clean-venv:  # .refvenv links into .venv's torch, so it goes too
	rm -rf $(VENV) $(REF_VENV)
