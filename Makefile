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
# layer, real clients), then the kTLS suite inside the VM on Debian's 6.1, then only the rekey
# and record-size tests (marker ktls7) on a 7.x kernel (tools/vm/ktls-vm --kernel 7).
KTLS_61 = tools/vm/ktls-vm run --timeout 3600 -- python -m pytest -m "ktls and not ktls7" -p no:cacheprovider
KTLS_7 = tools/vm/ktls-vm run --kernel 7 --timeout 1200 -- python -m pytest -m ktls7 tests/test_ktls_rekey.py -p no:cacheprovider

test: setup-test lint
	.venv/bin/python -m pytest
	$(KTLS_61)
	$(KTLS_7)

lint: setup-test
	.venv/bin/ruff check ironsocket tests tools
	.venv/bin/mypy

test-host: setup-test
	.venv/bin/python -m pytest

test-vm: setup-test
	$(KTLS_61)
	$(KTLS_7)
