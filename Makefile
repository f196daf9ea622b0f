# The two commands of the README: `make serve` and `make test`. Both set themselves up first:
# `serve` only the venv, `test` also the Debian packages listed in tools/packages.
.PHONY: setup setup-test serve lint test test-host test-vm

setup:
	@tools/setup

setup-test:
	@tools/setup --test

serve: setup
	.venv/bin/ironsocket serve

# Static checks (pyproject.toml [tool.mypy], [tool.ruff]), the host suite (userspace record
# layer, real clients), then the kTLS suite inside the VM.
test: setup-test lint
	.venv/bin/python -m pytest
	tools/vm/ktls-vm run -- python -m pytest -m ktls -p no:cacheprovider

lint: setup-test
	.venv/bin/ruff check ironsocket tests tools
	.venv/bin/mypy

test-host: setup-test
	.venv/bin/python -m pytest

test-vm: setup-test
	tools/vm/ktls-vm run -- python -m pytest -m ktls -p no:cacheprovider
